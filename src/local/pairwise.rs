//! Pairwise matching of two photos: mutual nearest neighbours that pass Lowe's ratio test,
//! kept where they agree with one map (affine, or a homography). This is what the person who
//! confirms a match is shown, lines between the same marks in both photos, and a score of its
//! own.

use super::lnbnn::similarities;
use super::ransac::{self, Correspondence, RansacConfig};
use super::Features;

/// Lowe's ratio: a match is kept when its distance is below this share of the second
/// nearest's.
pub const RATIO: f32 = 0.8;

/// One verified match, in fractions of each photo's width and height (`[x, y]`).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Line {
    pub query: [f32; 2],
    pub candidate: [f32; 2],
}

/// Index pairs `(i in a, j in b)` that are each other's nearest neighbour and whose distance
/// is below [`RATIO`] times the second nearest's, on both sides (none between descriptors of
/// different lengths).
pub fn mutual_ratio_matches(a: &Features, b: &Features) -> Vec<(usize, usize)> {
    let (n, m) = (a.len(), b.len());
    if n < 2 || m < 2 || a.dim != b.dim {
        return Vec::new();
    }
    let mut sims = vec![0f32; n * m];
    similarities(&a.descriptors, &b.descriptors, a.dim, &mut sims);
    // Unit vectors: ‖a − b‖ = √(2 − 2a·b).
    let distance = |s: f32| (2.0 - 2.0 * s).max(0.0).sqrt();
    let best_two = |values: &mut dyn Iterator<Item = (usize, f32)>| {
        let (mut first, mut second) = ((usize::MAX, f32::MIN), f32::MIN);
        for (j, s) in values {
            if s > first.1 {
                second = first.1;
                first = (j, s);
            } else if s > second {
                second = s;
            }
        }
        let passes = distance(first.1) < RATIO * distance(second);
        (first.0, passes)
    };
    let from_b: Vec<(usize, bool)> = (0..m)
        .map(|j| best_two(&mut (0..n).map(|i| (i, sims[i * m + j]))))
        .collect();
    (0..n)
        .filter_map(|i| {
            let (j, passes) = best_two(&mut sims[i * m..(i + 1) * m].iter().copied().enumerate());
            (passes && from_b[j] == (i, true)).then_some((i, j))
        })
        .collect()
}

/// The mutual ratio matches of `query` and `candidate` that agree with the map (of
/// `cfg.geometry`) most of them agree with (none when fewer than three do).
pub fn verified(
    query: &Features,
    candidate: &Features,
    cfg: &RansacConfig,
    side: f32,
) -> Vec<Line> {
    debug_assert_eq!(query.descriptors.len(), query.len() * query.dim);
    let pairs: Vec<Correspondence> = mutual_ratio_matches(query, candidate)
        .into_iter()
        .map(|(i, j)| Correspondence {
            from: query.points[i],
            to: candidate.points[j],
            weight: 1.0,
        })
        .collect();
    lines(query, candidate, &pairs, cfg, side)
}

/// The correspondences `pairs` (query's points to candidate's) that agree with the map (of
/// `cfg.geometry`) of most weight, as lines (none when fewer than three agree).
pub fn lines(
    query: &Features,
    candidate: &Features,
    pairs: &[Correspondence],
    cfg: &RansacConfig,
    side: f32,
) -> Vec<Line> {
    let fit = ransac::fit(pairs, cfg, side);
    if fit.inliers < 3 {
        return Vec::new();
    }
    let fraction =
        |[x, y]: [f32; 2], size: [u32; 2]| [x / size[0].max(1) as f32, y / size[1].max(1) as f32];
    pairs
        .iter()
        .filter(|p| ransac::agrees(&fit.map, p, cfg, side))
        .map(|p| Line {
            query: fraction(p.from, query.size),
            candidate: fraction(p.to, candidate.size),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::lnbnn::tests::unit;
    use crate::local::sift::DESC_LEN;

    fn features(points: &[[f32; 2]], descs: &[Vec<f32>]) -> Features {
        Features {
            size: [100, 50],
            points: points.to_vec(),
            dim: DESC_LEN,
            descriptors: descs.concat(),
        }
    }

    #[test]
    fn keeps_only_mutual_nearest_neighbours_that_pass_the_ratio() {
        // a0 ↔ b1 is mutual and clear; a1's nearest is b0, but b0 is nearer to a2 (not
        // mutual); a2 ↔ b0 is mutual, yet b2 is nearly as near to a2 (ratio fails).
        let a = features(
            &[[0.0; 2]; 3],
            &[
                unit(&[1.0, 0.0, 0.0]),
                unit(&[0.0, 1.0, 0.3]),
                unit(&[0.0, 1.0, 0.0]),
            ],
        );
        let b = features(
            &[[0.0; 2]; 3],
            &[
                unit(&[0.0, 1.0, 0.02]),
                unit(&[1.0, 0.05, 0.0]),
                unit(&[0.0, 1.0, -0.022]),
            ],
        );
        assert_eq!(mutual_ratio_matches(&a, &b), vec![(0, 1)]);
    }

    #[test]
    fn verified_lines_follow_the_map_and_drop_the_outlier() {
        // Five distinct marks moved by (+10, +5) in the candidate, and one whose match lands
        // far from where the map takes it.
        let descs: Vec<Vec<f32>> = (0..6)
            .map(|i| {
                let mut v = vec![0.0; 6];
                v[i] = 1.0;
                unit(&v)
            })
            .collect();
        let from = [
            [10.0, 10.0],
            [40.0, 12.0],
            [20.0, 30.0],
            [70.0, 20.0],
            [55.0, 40.0],
            [80.0, 5.0],
        ];
        let mut to: Vec<[f32; 2]> = from.iter().map(|[x, y]| [x + 10.0, y + 5.0]).collect();
        to[5] = [5.0, 45.0];
        let lines = verified(
            &features(&from, &descs),
            &features(&to, &descs),
            &RansacConfig::default(),
            100.0,
        );
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0].query, [0.1, 0.2]);
        assert_eq!(lines[0].candidate, [0.2, 0.3]);
        assert!(lines.iter().all(|l| l.query != [0.8, 0.1]));
    }
}
