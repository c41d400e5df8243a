//! Local naive-Bayes nearest neighbour (McCann & Lowe 2012), one query against many photos, as
//! HotSpotter scores animals: the gallery's descriptors are pooled; each query descriptor finds
//! its k+1 nearest, and each of the first k votes for its photo with the distance of the
//! (k+1)-th minus its own: how much more it resembles that photo than the background of all
//! the others. A photo takes one vote per query descriptor, its best.
//!
//! Where every photo frames the animal alike (crops aligned to the body), a mark sits near the
//! same place in each: a position weight `w` adds `w` times the distance between two keypoints'
//! positions (in fractions of each photo's width and height) to their descriptors' distance,
//! as if each descriptor carried its position scaled by `w`.

use super::Features;
use crate::linalg::top_k;

/// One query descriptor's vote for a photo, with the gallery keypoint it matched.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Vote {
    pub query: usize,
    pub gallery: usize,
    pub weight: f32,
}

/// Everything a photo of the gallery received.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PhotoVotes {
    pub photo: usize,
    pub total: f32,
    pub matches: Vec<Vote>,
}

/// Queries per block of the similarity matrix (bounds its memory at `BLOCK × pooled` floats).
const BLOCK: usize = 128;

/// The LNBNN votes of `query`'s descriptors for each photo of `gallery`, in gallery order,
/// neighbours found by descriptor distance and `position_weight` times the positions' distance
/// (0: wherever they are). Photos whose descriptors are of another length than the query's get
/// none.
pub fn vote(
    query: &Features,
    gallery: &[&Features],
    k: usize,
    position_weight: f32,
) -> Vec<PhotoVotes> {
    let mut out: Vec<PhotoVotes> = (0..gallery.len())
        .map(|photo| PhotoVotes {
            photo,
            ..Default::default()
        })
        .collect();
    // ‖(a, w·p) − (b, w·q)‖² = 2 − 2a·b + w²‖p − q‖² for unit a and b: the similarity less
    // half the weighted squared distance. Positions are gathered only when weighed.
    let half_w2 = 0.5 * position_weight * position_weight;
    let mut owner = Vec::new();
    let mut pooled = Vec::new();
    let mut positions = Vec::new();
    let dim = query.dim;
    for (photo, f) in gallery.iter().enumerate().filter(|(_, f)| f.dim == dim) {
        for point in 0..f.len() {
            owner.push((photo, point));
        }
        pooled.extend_from_slice(&f.descriptors);
        if half_w2 > 0.0 {
            positions.extend(relative_positions(f));
        }
    }
    let query_positions: Vec<[f32; 2]> = match half_w2 > 0.0 {
        true => relative_positions(query).collect(),
        false => Vec::new(),
    };
    let m = owner.len();
    let k = k.min(m.saturating_sub(1));
    if k == 0 || query.is_empty() {
        return out;
    }
    let mut sims = vec![0f32; BLOCK * m];
    for start in (0..query.len()).step_by(BLOCK) {
        let rows = BLOCK.min(query.len() - start);
        let q = &query.descriptors[start * dim..(start + rows) * dim];
        similarities(q, &pooled, dim, &mut sims[..rows * m]);
        if half_w2 > 0.0 {
            for r in 0..rows {
                let [x, y] = query_positions[start + r];
                let row = &mut sims[r * m..(r + 1) * m];
                for (s, &[px, py]) in row.iter_mut().zip(&positions) {
                    *s -= half_w2 * ((x - px) * (x - px) + (y - py) * (y - py));
                }
            }
        }
        for r in 0..rows {
            let nearest = top_k(&sims[r * m..(r + 1) * m], k + 1);
            // Unit vectors: ‖a − b‖ = √(2 − 2a·b).
            let distance = |s: f32| (2.0 - 2.0 * s).max(0.0).sqrt();
            let normaliser = distance(nearest[k].1);
            let mut voted: Vec<usize> = Vec::with_capacity(k);
            for &(j, s) in &nearest[..k] {
                let (photo, point) = owner[j];
                if voted.contains(&photo) {
                    continue;
                }
                voted.push(photo);
                let weight = normaliser - distance(s);
                out[photo].total += weight;
                out[photo].matches.push(Vote {
                    query: start + r,
                    gallery: point,
                    weight,
                });
            }
        }
    }
    out
}

/// A photo's keypoints in fractions of its width and height (as they are where its size is
/// unknown).
fn relative_positions(f: &Features) -> impl Iterator<Item = [f32; 2]> + '_ {
    let [w, h] = f.size.map(|s| s.max(1) as f32);
    f.points.iter().map(move |&[x, y]| [x / w, y / h])
}

/// `out[r·m + j]` = the dot product of descriptor `r` of `a` with descriptor `j` of `b`
/// (row-major `[·, dim]` each; `out` holds their product of counts).
pub(super) fn similarities(a: &[f32], b: &[f32], dim: usize, out: &mut [f32]) {
    let (rows, m) = (a.len() / dim, b.len() / dim);
    assert_eq!(out.len(), rows * m, "similarity matrix size");
    // out[rows, m] = a[rows, D] · bᵀ[D, m]
    // SAFETY: the slices hold rows×D, m×D and rows×m floats, laid out as the strides say.
    unsafe {
        matrixmultiply::sgemm(
            rows,
            dim,
            m,
            1.0,
            a.as_ptr(),
            dim as isize,
            1,
            b.as_ptr(),
            1,
            dim as isize,
            0.0,
            out.as_mut_ptr(),
            m as isize,
            1,
        );
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::local::sift::DESC_LEN;

    /// A descriptor: `v` padded with zeros and scaled to unit length.
    pub(in crate::local) fn unit(v: &[f32]) -> Vec<f32> {
        let mut d = vec![0.0; DESC_LEN];
        d[..v.len()].copy_from_slice(v);
        let n = d.iter().map(|x| x * x).sum::<f32>().sqrt();
        d.iter().map(|x| x / n).collect()
    }

    fn features(descs: &[Vec<f32>]) -> Features {
        Features {
            points: (0..descs.len()).map(|i| [i as f32, 0.0]).collect(),
            dim: descs.first().map_or(DESC_LEN, Vec::len),
            descriptors: descs.concat(),
            ..Default::default()
        }
    }

    #[test]
    fn votes_are_the_normaliser_distance_minus_the_neighbour_distance() {
        // Query descriptor e0; photo 0 holds e0 exactly, photo 1 a vector at 60° from it,
        // photo 2 one at 90°. With k = 1 the nearest (photo 0, distance 0) votes, weighted by
        // the second-nearest distance √(2 − 2·cos 60°) = 1.
        let q = features(&[unit(&[1.0])]);
        let g0 = features(&[unit(&[1.0])]);
        let g1 = features(&[unit(&[0.5, 0.75f32.sqrt()])]);
        let g2 = features(&[unit(&[0.0, 0.0, 1.0])]);
        let v = vote(&q, &[&g0, &g1, &g2], 1, 0.0);
        assert!((v[0].total - 1.0).abs() < 1e-5, "{v:?}");
        assert_eq!((v[1].total, v[2].total), (0.0, 0.0));
        assert_eq!(
            v[0].matches,
            [Vote {
                query: 0,
                gallery: 0,
                weight: v[0].total
            }]
        );
        // With k = 2 photo 1 votes too, by √2 − 1, and photo 0 by √2 − 0.
        let v = vote(&q, &[&g0, &g1, &g2], 2, 0.0);
        let r2 = 2f32.sqrt();
        assert!((v[0].total - r2).abs() < 1e-5 && (v[1].total - (r2 - 1.0)).abs() < 1e-5);
    }

    #[test]
    fn a_position_weight_prefers_keypoints_at_the_same_place() {
        // The query's e0 sits at the top left of a 10×10 photo. Photo 0 has e0 itself at the
        // bottom right, photo 1 a vector at 60° at the top left, photo 2 one at 90° there.
        // Unweighted, photo 0 is nearest (distance 0, normaliser photo 1's 1). With weight 1,
        // photo 0's squared distance is 0 + 1·(1² + 1²) = 2, photo 1's 2 − 2·cos 60° = 1 and
        // photo 2's 2: photo 1 votes √2 − 1.
        let at = |d: Vec<f32>, x: f32, y: f32| Features {
            size: [10, 10],
            points: vec![[x, y]],
            dim: d.len(),
            descriptors: d,
        };
        let q = at(unit(&[1.0]), 0.0, 0.0);
        let g0 = at(unit(&[1.0]), 10.0, 10.0);
        let g1 = at(unit(&[0.5, 0.75f32.sqrt()]), 0.0, 0.0);
        let g2 = at(unit(&[0.0, 0.0, 1.0]), 0.0, 0.0);
        let v = vote(&q, &[&g0, &g1, &g2], 1, 0.0);
        assert!(
            (v[0].total - 1.0).abs() < 1e-5 && v[1].total == 0.0,
            "{v:?}"
        );
        let v = vote(&q, &[&g0, &g1, &g2], 1, 1.0);
        assert!(v[0].total == 0.0, "{v:?}");
        assert!((v[1].total - (2f32.sqrt() - 1.0)).abs() < 1e-5, "{v:?}");
    }

    #[test]
    fn descriptors_of_any_length_vote_and_photos_of_another_length_get_none() {
        let short = |v: &[f32]| unit(v)[..64].to_vec();
        let q = features(&[short(&[1.0])]);
        let g0 = features(&[short(&[1.0])]);
        let g1 = features(&[short(&[0.5, 0.75f32.sqrt()])]);
        let other = features(&[unit(&[1.0])]);
        assert_eq!((q.dim, other.dim), (64, DESC_LEN));
        let v = vote(&q, &[&g0, &other, &g1], 1, 0.0);
        assert!((v[0].total - 1.0).abs() < 1e-5, "{v:?}");
        assert_eq!((v[1].total, v[2].total), (0.0, 0.0));
    }

    #[test]
    fn a_photo_gets_one_vote_per_query_descriptor() {
        // Photo 0 holds two copies of the query descriptor: one vote only, then photo 1's.
        let q = features(&[unit(&[1.0])]);
        let g0 = features(&[unit(&[1.0]), unit(&[1.0, 0.01])]);
        let g1 = features(&[unit(&[1.0, 1.0])]);
        let v = vote(&q, &[&g0, &g1], 2, 0.0);
        assert_eq!(v[0].matches.len(), 1);
        assert_eq!(
            v[1].matches.len(),
            0,
            "the third neighbour is the normaliser"
        );
    }
}
