//! Helpers shared by the bench examples: random catalogues, timing statistics, peak memory.
// Each example uses its own subset.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;

/// `n` random unit vectors, generated in parallel blocks each seeded from `seed`.
pub fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    const BLOCK: usize = 4096;
    let mut v = vec![0.0f32; n * dim];
    v.par_chunks_mut(BLOCK * dim)
        .enumerate()
        .for_each(|(b, block)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (b as u64).wrapping_mul(0x9E37_79B9));
            block
                .iter_mut()
                .for_each(|x| *x = StandardNormal.sample(&mut rng));
            block.chunks_exact_mut(dim).for_each(normalise);
        });
    v
}

/// `count` rows of `base` picked at random, each plus a random vector of its own length,
/// renormalised (cosine about 0.7 to their row, like a new photo of a known individual).
pub fn perturbed_rows(base: &[f32], count: usize, dim: usize, seed: u64) -> Vec<f32> {
    let n = base.len() / dim;
    let noise = random_unit_vectors(count, dim, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count * dim);
    for e in noise.chunks_exact(dim) {
        let row = rng.gen_range(0..n);
        let start = out.len();
        out.extend(
            base[row * dim..(row + 1) * dim]
                .iter()
                .zip(e)
                .map(|(a, b)| a + b),
        );
        normalise(&mut out[start..]);
    }
    out
}

pub fn normalise(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Raw little-endian f32, row-major.
pub fn write_f32(path: &Path, values: &[f32]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for chunk in values.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        file.write_all(&bytes)?;
    }
    file.flush()
}

/// Resets the process's peak resident set (VmHWM) to its current size (Linux ≥ 4.0).
pub fn reset_peak_rss() {
    // Not all kernels allow it; the peak then covers the whole run.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident set so far, in MB.
pub fn vm_hwm_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1e3)
}

/// Median, min and max of some measurements, and how many, as JSON.
pub fn stats(values: &[f64]) -> Value {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    json!({
        "median": median,
        "min": v.first().copied().unwrap_or(f64::NAN),
        "max": v.last().copied().unwrap_or(f64::NAN),
        "runs": v.len(),
    })
}

/// Fixed threads for a side-by-side measurement: libtorch intra-op `threads`, one inter-op
/// thread, rayon `threads`, and libtorch's seed 0.
pub fn fix_threads(threads: usize) -> anyhow::Result<()> {
    tch::set_num_threads(threads as i32);
    tch::set_num_interop_threads(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    tch::manual_seed(0);
    Ok(())
}
