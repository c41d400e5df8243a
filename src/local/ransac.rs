//! Geometric verification: the map (affine from three-point samples, or a homography from
//! four-point ones; no mirror, bounded scale) that the most correspondence weight agrees
//! with, found by RANSAC.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt;

/// A query keypoint matched to a gallery keypoint, with its LNBNN vote.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Correspondence {
    pub from: [f32; 2],
    pub to: [f32; 2],
    pub weight: f32,
}

/// The kind of map correspondences must agree with.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Geometry {
    /// Six parameters: rotation, scale, shear and translation of a pattern seen face on.
    #[default]
    Affine,
    /// Eight parameters: also the perspective of a flat pattern seen at an angle.
    Homography,
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Geometry::Affine => "affine",
            Geometry::Homography => "homography",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RansacConfig {
    pub iterations: usize,
    /// Inlier distance as a fraction of the matched image's longer side.
    pub tolerance: f32,
    /// Largest change of scale (and its inverse the smallest) a map may make, in area at the
    /// sampled points.
    pub max_scale: f32,
    pub seed: u64,
    pub geometry: Geometry,
    /// Largest rotation a map may make at the sampled points, in degrees (180: any).
    pub max_rotation: f32,
}

impl RansacConfig {
    /// The settings for `geometry`: 300 three-point samples, or 1000 four-point ones, about as
    /// likely to draw one sample of inliers only (at a third of inliers, all but e⁻¹¹ and e⁻¹²).
    pub fn of(geometry: Geometry) -> Self {
        RansacConfig {
            iterations: match geometry {
                Geometry::Affine => 300,
                Geometry::Homography => 1000,
            },
            tolerance: 0.03,
            max_scale: 4.0,
            seed: 0,
            geometry,
            max_rotation: 180.0,
        }
    }
}

impl Default for RansacConfig {
    fn default() -> Self {
        RansacConfig::of(Geometry::Affine)
    }
}

/// The best map found: its inliers and their summed weight (zero when fewer correspondences
/// than a sample or no admissible map).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Fit {
    pub inliers: usize,
    pub weight: f32,
    /// The 3×3 matrix, row by row, taking `[x, y, 1]` to `[x'w, y'w, w]`; an affine map's
    /// last row is `[0, 0, 1]`, so it starts `[a, b, tx, c, d, ty]`.
    pub map: [f32; 9],
}

/// RANSAC over maps of `cfg.geometry` taking `from` to `to`, images of longer side `side`
/// pixels.
pub fn fit(pairs: &[Correspondence], cfg: &RansacConfig, side: f32) -> Fit {
    match cfg.geometry {
        Geometry::Affine => search::<3>(pairs, cfg, side, solve_affine),
        Geometry::Homography => search::<4>(pairs, cfg, side, solve_homography),
    }
}

/// RANSAC from samples of `K` distinct correspondences, each solved for a map by `solve`.
fn search<const K: usize>(
    pairs: &[Correspondence],
    cfg: &RansacConfig,
    side: f32,
    solve: fn(&[Correspondence; K]) -> Option<[f32; 9]>,
) -> Fit {
    let mut best = Fit::default();
    if pairs.len() < K {
        return best;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ pairs.len() as u64);
    let n = pairs.len();
    let (lo, hi) = ((1.0 / cfg.max_scale).powi(2), cfg.max_scale.powi(2));
    for _ in 0..cfg.iterations {
        let picks: [usize; K] = std::array::from_fn(|_| rng.gen_range(0..n));
        if (1..K).any(|i| picks[..i].contains(&picks[i])) {
            continue;
        }
        let sample = picks.map(|i| pairs[i]);
        let Some(map) = solve(&sample) else {
            continue;
        };
        // The derivative at each sampled point: its area scale positive (no mirror) and
        // bounded, and its rotation bounded.
        let bounded = |p: &Correspondence| {
            (lo..=hi).contains(&jacobian(&map, p.from))
                && (cfg.max_rotation >= 180.0 || rotation(&map, p.from).abs() <= cfg.max_rotation)
        };
        if !sample.iter().all(bounded) {
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

/// Whether `p` is an inlier of `map`: in front of it, and within the tolerance of where the
/// map takes it.
pub fn agrees(map: &[f32; 9], p: &Correspondence, cfg: &RansacConfig, side: f32) -> bool {
    residual2(map, p).is_some_and(|r| r <= (cfg.tolerance * side).powi(2))
}

/// Where `map` takes `[x, y]`, `None` behind or on its horizon.
fn project(m: &[f32; 9], [x, y]: [f32; 2]) -> Option<[f32; 2]> {
    let w = m[6] * x + m[7] * y + m[8];
    (w > 1e-6).then(|| {
        [
            (m[0] * x + m[1] * y + m[2]) / w,
            (m[3] * x + m[4] * y + m[5]) / w,
        ]
    })
}

fn residual2(map: &[f32; 9], p: &Correspondence) -> Option<f32> {
    let [u, v] = project(map, p.from)?;
    let (dx, dy) = (u - p.to[0], v - p.to[1]);
    Some(dx * dx + dy * dy)
}

/// The determinant of the map's derivative at `[x, y]`: the top-left 2×2's for an affine
/// map, `det(H) / w³` for a homography; negative mirrors.
fn jacobian(m: &[f32; 9], [x, y]: [f32; 2]) -> f32 {
    let m = m.map(f64::from);
    let det = m[0] * (m[4] * m[8] - m[5] * m[7]) - m[1] * (m[3] * m[8] - m[5] * m[6])
        + m[2] * (m[3] * m[7] - m[4] * m[6]);
    let w = m[6] * f64::from(x) + m[7] * f64::from(y) + m[8];
    (det / (w * w * w)) as f32
}

/// The rotation of the map's derivative at `[x, y]`, in degrees: the angle of the rotation
/// nearest to it (its polar factor's), `atan2(c − b, a + d)` for a derivative `[a b; c d]`.
fn rotation(m: &[f32; 9], [x, y]: [f32; 2]) -> f32 {
    let w = m[6] * x + m[7] * y + m[8];
    let (u, v) = (
        (m[0] * x + m[1] * y + m[2]) / w,
        (m[3] * x + m[4] * y + m[5]) / w,
    );
    // The derivative up to the factor 1/w, which leaves the angle alone (w > 0 in front).
    let (a, b) = (m[0] - u * m[6], m[1] - u * m[7]);
    let (c, d) = (m[3] - v * m[6], m[4] - v * m[7]);
    (c - b).atan2(a + d).to_degrees()
}

/// The affine map through three correspondences; `None` when they are (nearly) collinear.
fn solve_affine(p: &[Correspondence; 3]) -> Option<[f32; 9]> {
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
    Some([a, b, tx, c, d, ty, 0.0, 0.0, 1.0])
}

/// Points moved to their centroid and scaled to a mean distance of √2 (Hartley's
/// normalisation), and the similarity `[s, tx, ty]` that did it.
fn normalise(points: [[f32; 2]; 4]) -> ([[f64; 2]; 4], [f64; 3]) {
    let points = points.map(|p| p.map(f64::from));
    let cx = points.iter().map(|p| p[0]).sum::<f64>() / 4.0;
    let cy = points.iter().map(|p| p[1]).sum::<f64>() / 4.0;
    let spread = points
        .iter()
        .map(|p| (p[0] - cx).hypot(p[1] - cy))
        .sum::<f64>()
        / 4.0;
    let s = std::f64::consts::SQRT_2 / spread.max(1e-12);
    (
        points.map(|p| [s * (p[0] - cx), s * (p[1] - cy)]),
        [s, -s * cx, -s * cy],
    )
}

/// Whether no three of the (normalised) points are nearly on one line.
fn in_general_position(p: &[[f64; 2]; 4]) -> bool {
    let area = |a: [f64; 2], b: [f64; 2], c: [f64; 2]| {
        ((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])).abs()
    };
    [(0, 1, 2), (0, 1, 3), (0, 2, 3), (1, 2, 3)]
        .iter()
        .all(|&(i, j, k)| area(p[i], p[j], p[k]) > 1e-2)
}

/// The homography through four correspondences, by the normalised direct linear transform
/// (its last entry fixed at one, an 8×8 solve in f64); `None` when three points of either
/// side are (nearly) collinear or the map sends the origin to infinity.
fn solve_homography(p: &[Correspondence; 4]) -> Option<[f32; 9]> {
    let (from, [s, tx, ty]) = normalise(p.map(|c| c.from));
    let (to, [s2, tx2, ty2]) = normalise(p.map(|c| c.to));
    if !in_general_position(&from) || !in_general_position(&to) {
        return None;
    }
    // Two rows per correspondence: u·(g x + h y + 1) = a x + b y + c, and likewise for v.
    let mut a = [[0f64; 9]; 8];
    for (i, ([x, y], [u, v])) in from.iter().zip(&to).enumerate() {
        a[2 * i] = [*x, *y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, *u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, *x, *y, 1.0, -v * x, -v * y, *v];
    }
    let h = gauss(a)?;
    let hn = [h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], 1.0];
    // Undo the normalisations: H = T_to⁻¹ · Hn · T_from.
    let t_from = [s, 0.0, tx, 0.0, s, ty, 0.0, 0.0, 1.0];
    let t_to_inv = [
        1.0 / s2,
        0.0,
        -tx2 / s2,
        0.0,
        1.0 / s2,
        -ty2 / s2,
        0.0,
        0.0,
        1.0,
    ];
    let m = mul(&t_to_inv, &mul(&hn, &t_from));
    let scale = m.iter().map(|v| v.abs()).fold(0.0, f64::max);
    if m[8].abs() < 1e-9 * scale {
        return None;
    }
    let m = m.map(|v| v / m[8]);
    // The sample must lie on one side of the horizon, the side in front.
    let w = p.map(|c| m[6] * f64::from(c.from[0]) + m[7] * f64::from(c.from[1]) + 1.0);
    let sign = if w.iter().all(|&w| w > 0.0) {
        1.0
    } else if w.iter().all(|&w| w < 0.0) {
        -1.0
    } else {
        return None;
    };
    Some(m.map(|v| (sign * v) as f32))
}

fn mul(a: &[f64; 9], b: &[f64; 9]) -> [f64; 9] {
    std::array::from_fn(|k| {
        let (i, j) = (k / 3, k % 3);
        (0..3).map(|l| a[3 * i + l] * b[3 * l + j]).sum()
    })
}

/// Solves the 8×8 system whose right-hand side is each row's last column, by Gaussian
/// elimination with partial pivoting; `None` when (nearly) singular.
fn gauss(mut a: [[f64; 9]; 8]) -> Option<[f64; 8]> {
    for col in 0..8 {
        let pivot = (col..8).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-9 {
            return None;
        }
        a.swap(col, pivot);
        let top = a[col];
        for row in &mut a[col + 1..] {
            let f = row[col] / top[col];
            for (x, t) in row.iter_mut().zip(top).skip(col) {
                *x -= f * t;
            }
        }
    }
    let mut x = [0f64; 8];
    for row in (0..8).rev() {
        let rest: f64 = (row + 1..8).map(|k| a[row][k] * x[k]).sum();
        x[row] = (a[row][8] - rest) / a[row][row];
    }
    Some(x)
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
        let got = solve_affine(&pairs).unwrap();
        for (g, m) in got.iter().zip(map) {
            assert!((g - m).abs() < 1e-3, "{got:?}");
        }
        assert_eq!(solve_affine(&[pairs[0], pairs[0], pairs[1]]), None);
    }

    #[test]
    fn finds_the_map_behind_noisy_matches_among_outliers() {
        let map = [0.8, 0.1, 20.0, -0.1, 0.8, 10.0];
        let pairs = noisy(|f| apply(map, f), 3);
        let fit = super::fit(&pairs, &RansacConfig::default(), 256.0);
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
        let fit = super::fit(&mirrored, &RansacConfig::default(), 256.0);
        assert!(fit.inliers < 5, "{fit:?}");
    }

    fn project_by(h: [f32; 9], p: [f32; 2]) -> [f32; 2] {
        project(&h, p).unwrap()
    }

    /// Matches among outliers, a third of them true to `map` within a pixel.
    fn noisy(map: impl Fn([f32; 2]) -> [f32; 2], seed: u64) -> Vec<Correspondence> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..60)
            .map(|i| {
                let from = [rng.gen_range(0.0..256.0), rng.gen_range(0.0..256.0)];
                let to = match i % 3 {
                    0 => {
                        let [x, y] = map(from);
                        [x + rng.gen_range(-1.0..1.0), y + rng.gen_range(-1.0..1.0)]
                    }
                    _ => [rng.gen_range(0.0..256.0), rng.gen_range(0.0..256.0)],
                };
                Correspondence {
                    from,
                    to,
                    weight: 0.5,
                }
            })
            .collect()
    }

    const HOMOGRAPHY: Geometry = Geometry::Homography;

    /// A flat pattern seen at an angle: far side shrunk, near side grown.
    const PERSPECTIVE: [f32; 9] = [0.9, 0.1, 15.0, -0.05, 0.8, 20.0, 0.0012, 0.0006, 1.0];

    #[test]
    fn four_points_give_back_the_homography_that_made_them() {
        let from = [[10.0, 20.0], [200.0, 15.0], [30.0, 180.0], [220.0, 240.0]];
        let pairs = from.map(|f| Correspondence {
            from: f,
            to: project_by(PERSPECTIVE, f),
            weight: 1.0,
        });
        let got = solve_homography(&pairs).unwrap();
        for (g, m) in got.iter().zip(PERSPECTIVE) {
            assert!((g - m).abs() < 1e-3 * m.abs().max(1e-3), "{got:?}");
        }
        // Three on one line solve nothing.
        let mut collinear = pairs;
        collinear[2].from = [105.0, 17.5];
        assert_eq!(solve_homography(&collinear), None);
    }

    #[test]
    fn finds_the_homography_behind_noisy_matches_among_outliers() {
        let pairs = noisy(|p| project_by(PERSPECTIVE, p), 3);
        let fit = super::fit(&pairs, &RansacConfig::of(HOMOGRAPHY), 256.0);
        assert!((20..=24).contains(&fit.inliers), "{fit:?}");
        assert!((fit.weight - 0.5 * fit.inliers as f32).abs() < 1e-4);
        for p in [[0.0, 0.0], [256.0, 0.0], [0.0, 256.0], [256.0, 256.0]] {
            let (got, want) = (project_by(fit.map, p), project_by(PERSPECTIVE, p));
            assert!(
                (got[0] - want[0]).hypot(got[1] - want[1]) < 6.0,
                "{p:?}: {got:?} for {want:?}, {fit:?}"
            );
        }
        // The affine model cannot follow the perspective across the whole pattern.
        let affine = super::fit(&pairs, &RansacConfig::default(), 256.0);
        assert!(affine.inliers < fit.inliers, "{affine:?} and {fit:?}");
    }

    #[test]
    fn a_mirrored_homography_is_not_admitted() {
        let mirrored: Vec<_> = noisy(|p| project_by(PERSPECTIVE, p), 3)
            .into_iter()
            .step_by(3)
            .map(|p| Correspondence {
                from: [256.0 - p.from[0], p.from[1]],
                ..p
            })
            .collect();
        assert_eq!(mirrored.len(), 20);
        let fit = super::fit(&mirrored, &RansacConfig::of(HOMOGRAPHY), 256.0);
        assert!(fit.inliers < 5, "{fit:?}");
    }

    #[test]
    fn the_homography_model_verifies_affine_matches_too() {
        let map = [0.8, 0.1, 20.0, -0.1, 0.8, 10.0];
        let pairs = noisy(|p| apply(map, p), 5);
        let fit = super::fit(&pairs, &RansacConfig::of(HOMOGRAPHY), 256.0);
        assert!((20..=24).contains(&fit.inliers), "{fit:?}");
        let centre = [128.0, 128.0];
        let (got, want) = (project_by(fit.map, centre), apply(map, centre));
        assert!((got[0] - want[0]).hypot(got[1] - want[1]) < 3.0, "{fit:?}");
    }

    /// A rotation by `deg` degrees about (128, 128), scaled by 0.9.
    fn turned(deg: f32) -> impl Fn([f32; 2]) -> [f32; 2] {
        let (sin, cos) = deg.to_radians().sin_cos();
        move |[x, y]| {
            let (dx, dy) = (x - 128.0, y - 128.0);
            [
                128.0 + 0.9 * (cos * dx - sin * dy),
                128.0 + 0.9 * (sin * dx + cos * dy),
            ]
        }
    }

    #[test]
    fn the_rotation_of_a_map_is_read_at_a_point_for_both_models() {
        let (sin, cos) = 25f32.to_radians().sin_cos();
        let affine = [
            2.0 * cos,
            -2.0 * sin,
            5.0,
            2.0 * sin,
            2.0 * cos,
            -3.0,
            0.0,
            0.0,
            1.0,
        ];
        assert!((rotation(&affine, [40.0, 90.0]) - 25.0).abs() < 1e-3);
        // A perspective map turns by different angles at different points: each the angle of
        // its derivative there, taken here by finite differences.
        let numeric = |[x, y]: [f32; 2]| {
            // Central differences: exact to second order, and steps large beside f32's
            // rounding at a few hundred pixels.
            let e = 0.25;
            let [u0, v0] = project_by(PERSPECTIVE, [x - e, y]);
            let [u1, v1] = project_by(PERSPECTIVE, [x + e, y]);
            let [u2, v2] = project_by(PERSPECTIVE, [x, y - e]);
            let [u3, v3] = project_by(PERSPECTIVE, [x, y + e]);
            let (a, c) = ((u1 - u0) / (2.0 * e), (v1 - v0) / (2.0 * e));
            let (b, d) = ((u3 - u2) / (2.0 * e), (v3 - v2) / (2.0 * e));
            (c - b).atan2(a + d).to_degrees()
        };
        let angles = [[1.0, 1.0], [250.0, 10.0], [20.0, 240.0]].map(|p| {
            let (got, want) = (rotation(&PERSPECTIVE, p), numeric(p));
            assert!((got - want).abs() < 0.05, "{p:?}: {got} for {want}");
            got
        });
        assert!((angles[1] - angles[2]).abs() > 1.0, "{angles:?}");
    }

    #[test]
    fn a_rotation_bound_refuses_maps_that_turn_further() {
        for geometry in [Geometry::Affine, HOMOGRAPHY] {
            let bounded = RansacConfig {
                max_rotation: 30.0,
                ..RansacConfig::of(geometry)
            };
            let slight = noisy(turned(10.0), 7);
            let fit = super::fit(&slight, &bounded, 256.0);
            assert!((20..=24).contains(&fit.inliers), "{geometry}: {fit:?}");
            let steep = noisy(turned(60.0), 7);
            let free = super::fit(&steep, &RansacConfig::of(geometry), 256.0);
            assert!((20..=24).contains(&free.inliers), "{geometry}: {free:?}");
            let fit = super::fit(&steep, &bounded, 256.0);
            assert!(fit.inliers < 8, "{geometry}: {fit:?}");
        }
    }
}
