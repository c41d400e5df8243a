//! Geometric verification: the affine map (no mirror, bounded scale) that the most
//! correspondence weight agrees with, found by RANSAC from three-point samples.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A query keypoint matched to a gallery keypoint, with its LNBNN vote.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Correspondence {
    pub from: [f32; 2],
    pub to: [f32; 2],
    pub weight: f32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RansacConfig {
    pub iterations: usize,
    /// Inlier distance as a fraction of the matched image's longer side.
    pub tolerance: f32,
    /// Largest change of scale (and its inverse the smallest) an affine map may make.
    pub max_scale: f32,
    pub seed: u64,
}

impl Default for RansacConfig {
    fn default() -> Self {
        RansacConfig {
            iterations: 300,
            tolerance: 0.03,
            max_scale: 4.0,
            seed: 0,
        }
    }
}

/// The best map found: its inliers and their summed weight (zero when fewer than three
/// correspondences or no admissible map).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fit {
    pub inliers: usize,
    pub weight: f32,
    /// `[a, b, tx, c, d, ty]`: x' = a·x + b·y + tx, y' = c·x + d·y + ty.
    pub map: [f32; 6],
}

/// RANSAC over affine maps taking `from` to `to`, images of longer side `side` pixels.
pub fn affine(pairs: &[Correspondence], cfg: &RansacConfig, side: f32) -> Fit {
    let mut best = Fit::default();
    if pairs.len() < 3 {
        return best;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ pairs.len() as u64);
    let n = pairs.len();
    for _ in 0..cfg.iterations {
        let i = rng.gen_range(0..n);
        let j = rng.gen_range(0..n);
        let k = rng.gen_range(0..n);
        if i == j || j == k || i == k {
            continue;
        }
        let Some(map) = solve(&[pairs[i], pairs[j], pairs[k]]) else {
            continue;
        };
        let det = map[0] * map[4] - map[1] * map[3];
        let (lo, hi) = ((1.0 / cfg.max_scale).powi(2), cfg.max_scale.powi(2));
        if !(lo..=hi).contains(&det) {
            continue;
        }
        let (mut inliers, mut weight) = (0, 0.0);
        for p in pairs {
            if agrees(&map, p, cfg, side) {
                inliers += 1;
                weight += p.weight;
            }
        }
        if weight > best.weight {
            best = Fit {
                inliers,
                weight,
                map,
            };
        }
    }
    best
}

/// Whether `p` is an inlier of `map`: within the tolerance of where the map takes it.
pub fn agrees(map: &[f32; 6], p: &Correspondence, cfg: &RansacConfig, side: f32) -> bool {
    residual2(map, p) <= (cfg.tolerance * side).powi(2)
}

fn residual2(map: &[f32; 6], p: &Correspondence) -> f32 {
    let [x, y] = p.from;
    let dx = map[0] * x + map[1] * y + map[2] - p.to[0];
    let dy = map[3] * x + map[4] * y + map[5] - p.to[1];
    dx * dx + dy * dy
}

/// The affine map through three correspondences; `None` when they are (nearly) collinear.
fn solve(p: &[Correspondence; 3]) -> Option<[f32; 6]> {
    let [[x0, y0], [x1, y1], [x2, y2]] = [p[0].from, p[1].from, p[2].from];
    let det = x0 * (y1 - y2) - y0 * (x1 - x2) + (x1 * y2 - x2 * y1);
    if det.abs() < 1e-3 {
        return None;
    }
    // Cramer's rule on [x y 1]·[a b t]ᵀ = u, once for each output coordinate.
    let row = |u: [f32; 3]| {
        let a = (u[0] * (y1 - y2) - y0 * (u[1] - u[2]) + (u[1] * y2 - u[2] * y1)) / det;
        let b = (x0 * (u[1] - u[2]) - u[0] * (x1 - x2) + (x1 * u[2] - x2 * u[1])) / det;
        let t = (x0 * (y1 * u[2] - y2 * u[1]) - y0 * (x1 * u[2] - x2 * u[1])
            + u[0] * (x1 * y2 - x2 * y1))
            / det;
        [a, b, t]
    };
    let [a, b, tx] = row([p[0].to[0], p[1].to[0], p[2].to[0]]);
    let [c, d, ty] = row([p[0].to[1], p[1].to[1], p[2].to[1]]);
    Some([a, b, tx, c, d, ty])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(map: [f32; 6], [x, y]: [f32; 2]) -> [f32; 2] {
        [
            map[0] * x + map[1] * y + map[2],
            map[3] * x + map[4] * y + map[5],
        ]
    }

    #[test]
    fn three_points_give_back_the_map_that_made_them() {
        let map = [1.2, -0.3, 5.0, 0.2, 0.9, -7.0];
        let from = [[1.0, 2.0], [30.0, 4.0], [7.0, 50.0]];
        let pairs = from.map(|f| Correspondence {
            from: f,
            to: apply(map, f),
            weight: 1.0,
        });
        let got = solve(&pairs).unwrap();
        for (g, m) in got.iter().zip(map) {
            assert!((g - m).abs() < 1e-3, "{got:?}");
        }
        assert_eq!(solve(&[pairs[0], pairs[0], pairs[1]]), None);
    }

    #[test]
    fn finds_the_map_behind_noisy_matches_among_outliers() {
        let map = [0.8, 0.1, 20.0, -0.1, 0.8, 10.0];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut pairs = Vec::new();
        for i in 0..60 {
            let from = [rng.gen_range(0.0..256.0), rng.gen_range(0.0..256.0)];
            let to = match i % 3 {
                // A third are true matches, within a pixel.
                0 => {
                    let [x, y] = apply(map, from);
                    [x + rng.gen_range(-1.0..1.0), y + rng.gen_range(-1.0..1.0)]
                }
                _ => [rng.gen_range(0.0..256.0), rng.gen_range(0.0..256.0)],
            };
            pairs.push(Correspondence {
                from,
                to,
                weight: 0.5,
            });
        }
        let fit = affine(&pairs, &RansacConfig::default(), 256.0);
        assert!((20..=24).contains(&fit.inliers), "{fit:?}");
        assert!((fit.weight - 0.5 * fit.inliers as f32).abs() < 1e-4);
        assert!(
            (fit.map[2] - 20.0).abs() < 6.0 && (fit.map[0] - 0.8).abs() < 0.1,
            "{fit:?}"
        );
        // A mirror is not admitted: mirrored true matches verify nothing.
        let mirrored: Vec<_> = pairs
            .iter()
            .step_by(3)
            .map(|p| Correspondence {
                from: [-p.from[0], p.from[1]],
                ..*p
            })
            .collect();
        let fit = affine(&mirrored, &RansacConfig::default(), 256.0);
        assert!(fit.inliers < 5, "{fit:?}");
    }
}
