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
//!
//! [`Whitening::principal`] is the unsupervised kind, for many rows of few dimensions (local
//! descriptors): the principal axes of the rows, each scaled by its variance to a power.

use crate::fsio::{f32_safetensors, read_f32, write_bytes_atomic};
use crate::linalg::{matmul, normalize_rows, symmetric_eigen};
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
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// Rows of the covariance are summed over blocks of this many rows (bounds the copy).
const COVARIANCE_BLOCK: usize = 4096;

impl Whitening {
    /// PCA whitening fitted on `rows` (row-major, `dim` columns), unsupervised: `proj`'s
    /// column `j` is the `j`-th principal axis scaled by `λⱼ^−power` (its variance λⱼ, floored
    /// at 10⁻⁶ of the largest). Power 0.5 gives every direction unit variance; lower keeps some
    /// of the leading directions' weight. All `dim` directions are kept.
    pub fn principal(rows: &[f32], dim: usize, power: f64) -> Result<Whitening> {
        ensure!(
            dim > 0 && rows.len() % dim == 0 && rows.len() >= 2 * dim,
            "whitening needs at least two rows of {dim} values, got {} values",
            rows.len()
        );
        ensure!(
            (0.0..=1.0).contains(&power),
            "whitening power must lie in [0, 1], got {power}"
        );
        let n = rows.len() / dim;
        let mut mean = vec![0.0f64; dim];
        for r in rows.chunks(dim) {
            mean.iter_mut()
                .zip(r)
                .for_each(|(m, &x)| *m += f64::from(x));
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        // cov = Σ (x − μ)ᵀ(x − μ) / n, a block of centred rows at a time: (blockᵀ)·block.
        let mut cov = vec![0.0f64; dim * dim];
        for block in rows.chunks(COVARIANCE_BLOCK * dim) {
            let m = block.len() / dim;
            let mut t = vec![0.0f32; dim * m];
            for (i, r) in block.chunks(dim).enumerate() {
                for (j, (&x, &mu)) in r.iter().zip(&mean32).enumerate() {
                    t[j * m + i] = x - mu;
                }
            }
            let part = matmul(&t, &t, dim, m, dim, true);
            cov.iter_mut()
                .zip(part)
                .for_each(|(c, p)| *c += f64::from(p));
        }
        cov.iter_mut().for_each(|c| *c /= n as f64);
        let (values, vectors) = symmetric_eigen(&cov, dim);
        let floor = values[0].max(0.0) * 1e-6;
        ensure!(floor > 0.0, "whitening found no variation between the rows");
        let scale: Vec<f64> = values.iter().map(|&v| v.max(floor).powf(-power)).collect();
        let proj = (0..dim * dim)
            .map(|k| (vectors[k] * scale[k % dim]) as f32)
            .collect();
        Ok(Whitening {
            mean: mean32,
            proj,
            dim_in: dim,
            dim_out: dim,
        })
    }

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

    #[test]
    fn principal_whitening_scales_each_axis_by_its_variance_to_the_power() {
        // Rows (3, 1) ± (2, 0) and (3, 1) ± (0, 1): mean (3, 1), covariance diag(2, 0.5).
        // Power 0.5 maps (2, 0) to (2/√2, 0) and (0, 1) to (0, 1/√0.5), both of length √2;
        // power 0 leaves lengths alone; power 0.25 gives 2/2^¼ and 1/0.5^¼.
        let rows = [5.0, 1.0, 1.0, 1.0, 3.0, 2.0, 3.0, 0.0];
        let centred = |w: &Whitening, r: [f32; 2]| {
            let x = [r[0] - w.mean[0], r[1] - w.mean[1]];
            let y = matmul(&x, &w.proj, 1, 2, 2, false);
            (y[0].hypot(y[1]), y[0].abs().max(y[1].abs()))
        };
        for (power, long, short) in [
            (0.5, 2f32.sqrt(), 2f32.sqrt()),
            (0.25, 2.0 / 2f32.powf(0.25), 1.0 / 0.5f32.powf(0.25)),
            (0.0, 2.0, 1.0),
        ] {
            let w = Whitening::principal(&rows, 2, power).unwrap();
            assert_eq!((w.mean.as_slice(), w.dim_out), ([3.0, 1.0].as_slice(), 2));
            let (a, _) = centred(&w, [5.0, 1.0]);
            let (b, _) = centred(&w, [3.0, 2.0]);
            assert!(
                (a - long).abs() < 1e-5 && (b - short).abs() < 1e-5,
                "{power}: {a} {b}"
            );
            // Axes stay apart: (2, 0) lands on one axis only.
            let (len, largest) = centred(&w, [5.0, 1.0]);
            assert!((len - largest).abs() < 1e-5, "{power}");
            // apply() gives unit rows.
            let unit = w.apply(&rows).unwrap();
            assert!(unit
                .chunks(2)
                .all(|r| (r[0].hypot(r[1]) - 1.0).abs() < 1e-5));
        }
        assert!(Whitening::principal(&rows[..2], 2, 0.5).is_err());
        assert!(Whitening::principal(&[1.0; 8], 2, 0.5).is_err());
        assert!(Whitening::principal(&rows, 2, 2.0).is_err());
    }

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
