//! Learned whitening: a linear map fitted in closed form on labelled embeddings that flattens
//! the variation between photos of one identity (pose, light, background) and keeps the
//! directions along which identities differ — "learned whitening" of Radenović, Tolias & Chum
//! (2018), with the within-identity covariance shrunk towards a multiple of the identity matrix,
//! as a catalogue has only a few photos per animal.
//!
//! A unit row x of dimension D maps to unit((x − mean) · proj), proj `[D, d]`:
//! 1. `Cw` = covariance of the training rows about their identity's mean (an identity with a
//!    single photo adds nothing), shrunk: `Cs = (1 − s)·Cw + s·(tr Cw / D)·I`;
//! 2. the rows whitened by `Cs^-1/2`;
//! 3. `proj = Cs^-1/2 · A`, A the top d principal axes of the whitened rows.
//!
//! Both eigen-decompositions are of n×n Gram matrices (n rows, usually fewer than D), in f64.

use crate::fsio::{f32_safetensors, read_f32, write_bytes_atomic};
use crate::linalg::{matmul, normalize_rows};
use anyhow::{ensure, Context, Result};
use std::path::Path;
#[cfg(feature = "torch")]
use {
    anyhow::bail,
    std::collections::HashMap,
    tch::{Kind, Tensor},
};

/// Relative size under which an eigenvalue counts as zero.
#[cfg(feature = "torch")]
const EPS: f64 = 1e-9;

/// A fitted map from `dim_in` to `dim_out` dimensions (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Whitening {
    pub mean: Vec<f32>,
    /// Row-major `[dim_in, dim_out]`.
    pub proj: Vec<f32>,
    pub dim_in: usize,
    pub dim_out: usize,
}

#[cfg(feature = "torch")]
fn matrix(rows: &[f32], dim: usize) -> Tensor {
    Tensor::from_slice(rows)
        .to_kind(Kind::Double)
        .view([-1, dim as i64])
}

/// Eigenvalues (descending) and eigenvectors (columns) of the symmetric `m`, the zero ones
/// dropped.
#[cfg(feature = "torch")]
fn eigen(m: &Tensor) -> (Tensor, Tensor) {
    let (values, vectors) = m.linalg_eigh("L");
    let (values, vectors) = (values.flip([0]), vectors.flip([1]));
    let top = values.double_value(&[0]).max(0.0);
    let kept = Vec::<f64>::try_from(&values)
        .unwrap_or_default()
        .iter()
        .take_while(|&&v| v > EPS * top && v > 0.0)
        .count() as i64;
    (values.narrow(0, 0, kept), vectors.narrow(1, 0, kept))
}

/// Fit on `rows` (row-major, `dim` columns) labelled by identity, with shrinkage `shrink` in
/// (0, 1] and at most `out_dim` output dimensions (fewer when the rows span fewer).
#[cfg(feature = "torch")]
pub fn fit(
    rows: &[f32],
    dim: usize,
    labels: &[usize],
    shrink: f64,
    out_dim: usize,
) -> Result<Whitening> {
    ensure!(
        shrink > 0.0 && shrink <= 1.0,
        "whitening shrinkage must lie in (0, 1], got {shrink}"
    );
    ensure!(
        dim > 0 && rows.len() == labels.len() * dim,
        "rows and labels disagree"
    );
    let x = matrix(rows, dim);
    let mean = x.mean_dim(0, false, Kind::Double);
    let centred = &x - &mean;

    let mut groups: HashMap<usize, Vec<i64>> = HashMap::new();
    for (i, &l) in labels.iter().enumerate() {
        groups.entry(l).or_default().push(i as i64);
    }
    let deviations: Vec<Tensor> = groups
        .values()
        .filter(|g| g.len() > 1)
        .map(|g| {
            let members = x.index_select(0, &Tensor::from_slice(g));
            &members - members.mean_dim(0, true, Kind::Double)
        })
        .collect();
    if deviations.is_empty() {
        bail!("whitening needs identities with two or more photos; every identity has one");
    }
    let dev = Tensor::cat(&deviations, 0);
    let m = dev.size()[0] as f64;
    // Cw = devᵀ·dev / m: its non-zero eigenpairs from the Gram matrix dev·devᵀ / m.
    let (lambda, u) = eigen(&(dev.matmul(&dev.tr()) / m));
    let axes = dev.tr().matmul(&u) / (&lambda * m).sqrt(); // [D, r], orthonormal columns
    let spread = dev.square().sum(Kind::Double).double_value(&[]) / (m * dim as f64);
    let floor = shrink * spread;
    ensure!(
        floor > 0.0,
        "the photos of each identity are identical: nothing to whiten"
    );
    let c = floor.powf(-0.5);
    let scale = (lambda * (1.0 - shrink) + floor).pow_tensor_scalar(-0.5) - c;
    // Cs^-1/2 applied to rows: c·z + ((z·axes) ∘ scale)·axesᵀ.
    let whiten = |z: &Tensor| z * c + (z.matmul(&axes) * &scale).matmul(&axes.tr());

    let y = whiten(&centred);
    let (mu, q) = eigen(&y.matmul(&y.tr()));
    let k = (out_dim as i64).min(mu.size()[0]);
    ensure!(k > 0, "whitening found no variation between the photos");
    let principal = y.tr().matmul(&q.narrow(1, 0, k)) / mu.narrow(0, 0, k).sqrt(); // [D, k]
    let proj = whiten(&principal.tr()).tr().contiguous(); // Cs^-1/2 is symmetric
    Ok(Whitening {
        mean: to_f32(&mean)?,
        proj: to_f32(&proj)?,
        dim_in: dim,
        dim_out: k as usize,
    })
}

#[cfg(feature = "torch")]
fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view(-1)).context("tensor to vector")
}

impl Whitening {
    /// Map `rows` (row-major, `dim_in` columns) to unit rows of `dim_out`.
    pub fn apply(&self, rows: &[f32]) -> Result<Vec<f32>> {
        ensure!(
            rows.len() % self.dim_in == 0,
            "rows of {} values do not fit the whitening's {} inputs",
            rows.len(),
            self.dim_in
        );
        let n = rows.len() / self.dim_in;
        let (d, k) = (self.dim_in, self.dim_out);
        let centred: Vec<f32> = rows
            .chunks(d)
            .flat_map(|r| r.iter().zip(&self.mean).map(|(x, m)| x - m))
            .collect();
        let mut out = matmul(&centred, &self.proj, n, d, k, false);
        normalize_rows(&mut out, k);
        Ok(out)
    }

    /// Write `mean` and `proj` as a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = [
            ("mean", vec![self.dim_in], &self.mean[..]),
            ("proj", vec![self.dim_in, self.dim_out], &self.proj[..]),
        ];
        let bytes = f32_safetensors(&tensors, None)
            .with_context(|| format!("cannot write {}", path.display()))?;
        write_bytes_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read whitening {}", path.display()))?;
        let file = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("cannot read whitening {}", path.display()))?;
        let (mean_shape, mean) = read_f32(&file, "mean", path)?;
        let (shape, proj) = read_f32(&file, "proj", path)?;
        ensure!(
            shape.len() == 2 && mean_shape == [shape[0]],
            "{}: mean and proj shapes disagree",
            path.display()
        );
        Ok(Self {
            mean,
            proj,
            dim_in: shape[0],
            dim_out: shape[1],
        })
    }
}

#[cfg(all(test, feature = "torch"))]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `ids` identities of `per` photos in `dim` dimensions: identity means spread with
    /// `between`, photos about them with per-axis spreads `within`.
    fn sample(ids: usize, per: usize, between: f32, within: &[f32]) -> (Vec<f32>, Vec<usize>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let dim = within.len();
        let (mut rows, mut labels) = (Vec::new(), Vec::new());
        for id in 0..ids {
            let centre: Vec<f32> = (0..dim).map(|_| rng.gen_range(-between..between)).collect();
            for _ in 0..per {
                rows.extend(
                    centre
                        .iter()
                        .zip(within)
                        .map(|(c, w)| c + w * rng.gen_range(-1.0f32..1.0)),
                );
                labels.push(id);
            }
        }
        (rows, labels)
    }

    /// The shrunk within-identity covariance, computed naively: `[dim][dim]`.
    fn shrunk_within(rows: &[f32], dim: usize, labels: &[usize], s: f64) -> Vec<Vec<f64>> {
        let ids = labels.iter().max().unwrap() + 1;
        let mut means = vec![vec![0.0f64; dim]; ids];
        let mut counts = vec![0usize; ids];
        for (r, &l) in rows.chunks(dim).zip(labels) {
            counts[l] += 1;
            means[l]
                .iter_mut()
                .zip(r)
                .for_each(|(m, &v)| *m += v as f64);
        }
        for (m, &c) in means.iter_mut().zip(&counts) {
            m.iter_mut().for_each(|v| *v /= c as f64);
        }
        let mut cov = vec![vec![0.0f64; dim]; dim];
        for (r, &l) in rows.chunks(dim).zip(labels) {
            let d: Vec<f64> = r
                .iter()
                .zip(&means[l])
                .map(|(&v, m)| v as f64 - m)
                .collect();
            for i in 0..dim {
                for j in 0..dim {
                    cov[i][j] += d[i] * d[j] / labels.len() as f64;
                }
            }
        }
        let t = (0..dim).map(|i| cov[i][i]).sum::<f64>() / dim as f64;
        for (i, row) in cov.iter_mut().enumerate() {
            row.iter_mut().for_each(|v| *v *= 1.0 - s);
            row[i] += s * t;
        }
        cov
    }

    #[test]
    fn the_projection_whitens_the_shrunk_within_identity_covariance() {
        let within = [2.0, 0.2, 1.0, 0.5];
        let (rows, labels) = sample(30, 4, 1.0, &within);
        let dim = within.len();
        for s in [0.1, 0.5, 1.0] {
            let w = fit(&rows, dim, &labels, s, dim).unwrap();
            assert_eq!((w.dim_in, w.dim_out), (dim, dim));
            let cs = shrunk_within(&rows, dim, &labels, s);
            // projᵀ · Cs · proj = I
            for a in 0..dim {
                for b in 0..dim {
                    let mut v = 0.0;
                    for (i, row) in cs.iter().enumerate() {
                        for (j, c) in row.iter().enumerate() {
                            v += w.proj[i * dim + a] as f64 * c * w.proj[j * dim + b] as f64;
                        }
                    }
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-3, "s {s}: [{a},{b}] = {v}");
                }
            }
        }
    }

    #[test]
    fn whitened_cosines_find_the_identity_that_raw_cosines_miss() {
        // Identities differ along the last four axes; photos of one identity vary a lot along
        // the first two (pose, light). Queries are fresh photos of the fitted identities.
        let within = [3.0, 3.0, 0.05, 0.05, 0.05, 0.05];
        let (rows, labels) = sample(20, 6, 1.0, &within);
        let dim = within.len();
        let w = fit(&rows, dim, &labels, 0.1, 4).unwrap();
        let accuracy = |vectors: &[f32], d: usize| {
            let n = labels.len();
            let mut right = 0;
            for q in 0..n {
                let best = (0..n)
                    .filter(|&g| g != q)
                    .max_by(|&a, &b| {
                        let cos = |g: usize| -> f32 {
                            let (x, y) = (&vectors[q * d..][..d], &vectors[g * d..][..d]);
                            let dot: f32 = x.iter().zip(y).map(|(a, b)| a * b).sum();
                            let nx: f32 = x.iter().map(|v| v * v).sum::<f32>().sqrt();
                            let ny: f32 = y.iter().map(|v| v * v).sum::<f32>().sqrt();
                            dot / (nx * ny)
                        };
                        cos(a).total_cmp(&cos(b))
                    })
                    .unwrap();
                right += usize::from(labels[best] == labels[q]);
            }
            right as f64 / n as f64
        };
        let raw = accuracy(&rows, dim);
        let whitened = accuracy(&w.apply(&rows).unwrap(), 4);
        assert!(
            raw < 0.5 && whitened > 0.95,
            "raw {raw}, whitened {whitened}"
        );
    }

    #[test]
    fn fitting_needs_repeated_identities_and_round_trips_through_its_file() {
        let (rows, _) = sample(5, 1, 1.0, &[1.0, 1.0]);
        let err = fit(&rows, 2, &[0, 1, 2, 3, 4], 0.5, 2).unwrap_err();
        assert!(err.to_string().contains("two or more photos"), "{err}");
        let (rows, labels) = sample(6, 3, 1.0, &[1.0, 0.5, 0.2]);
        let w = fit(&rows, 3, &labels, 0.5, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("whitening.safetensors");
        w.save(&path).unwrap();
        assert_eq!(Whitening::load(&path).unwrap(), w);
        let out = w.apply(&rows).unwrap();
        assert_eq!(out.len(), labels.len() * 2);
        assert!(w.apply(&rows[..4]).is_err());
    }
}
