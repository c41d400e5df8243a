//! Helpers shared by the bench examples: synthetic catalogues, timing statistics, peak memory.
// Each example uses its own subset.
#![allow(dead_code)]

use rand::seq::SliceRandom;
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

/// A synthetic embedding catalogue shaped like a real one (see [`catalogue`]).
pub struct Catalogue {
    pub dim: usize,
    /// Row-major photos, unit length, in a shuffled order.
    pub photos: Vec<f32>,
    /// The individual of each photo.
    pub labels: Vec<u32>,
    /// Each individual's centre, unit length, row-major.
    pub centres: Vec<f32>,
}

/// Species in a [`catalogue`] (Happywhale: 30).
const SPECIES: usize = 30;
/// Individual centre = species direction + this times a random unit vector, renormalised
/// (cosine about 0.5 to its species, about 0.26 between two individuals of a species).
const INDIVIDUAL_SPREAD: f32 = 1.7;
/// Photo = individual centre + this times a random unit vector, renormalised (cosine 0.8 to its
/// centre, about 0.64 between two photos of one individual).
const PHOTO_NOISE: f32 = 0.75;
/// The largest number of photos of one individual.
const MAX_PHOTOS: u64 = 400;

/// `n` photos of individuals, seeded and deterministic: species are random unit directions
/// (the i-th drawn with weight 1/(i+1)); each individual's centre is its species plus a larger
/// random offset; each individual has a heavy-tailed number of photos, `⌊u^(−1/1.3)⌋` for a
/// uniform `u`, at most 400 (about 60% singletons and a mean of about 3.3 photos, like
/// Happywhale's 51,033 photos of 15,587 individuals); each photo is its centre plus noise.
/// Rows are shuffled so that an individual's photos are not inserted one after another.
pub fn catalogue(n: usize, dim: usize, seed: u64) -> Catalogue {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut labels: Vec<u32> = Vec::with_capacity(n);
    let mut individual = 0u32;
    while labels.len() < n {
        let u: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        let photos = (u.powf(-1.0 / 1.3) as u64).clamp(1, MAX_PHOTOS) as usize;
        let take = photos.min(n - labels.len());
        labels.extend(std::iter::repeat_n(individual, take));
        individual += 1;
    }
    let individuals = individual as usize;
    labels.shuffle(&mut rng);
    let weights: Vec<f64> = (0..SPECIES).map(|i| 1.0 / (i + 1) as f64).collect();
    let species_of = rand::distributions::WeightedIndex::new(&weights).expect("positive weights");
    let species = random_unit_vectors(SPECIES, dim, seed ^ 0x5EC1E5);
    let mut centres = random_unit_vectors(individuals, dim, seed ^ 0xCE17E5);
    for c in centres.chunks_exact_mut(dim) {
        let s = rng.sample(&species_of);
        let dir = &species[s * dim..(s + 1) * dim];
        c.iter_mut()
            .zip(dir)
            .for_each(|(x, d)| *x = d + INDIVIDUAL_SPREAD * *x);
        normalise(c);
    }
    let photos = new_photos(&centres, &labels, dim, seed ^ 0xF07E5);
    Catalogue {
        dim,
        photos,
        labels,
        centres,
    }
}

/// A new photo of each individual of `labels`: its centre plus fresh noise, renormalised.
pub fn new_photos(centres: &[f32], labels: &[u32], dim: usize, seed: u64) -> Vec<f32> {
    let mut out = random_unit_vectors(labels.len(), dim, seed);
    out.par_chunks_exact_mut(dim)
        .zip(labels.par_iter())
        .for_each(|(row, &label)| {
            let c = &centres[label as usize * dim..(label as usize + 1) * dim];
            row.iter_mut()
                .zip(c)
                .for_each(|(x, c)| *x = c + PHOTO_NOISE * *x);
            normalise(row);
        });
    out
}

impl Catalogue {
    /// `count` queries and their individuals: new photos of the individuals of photos picked at
    /// random among the first `among` rows (so every query's individual is in that part).
    pub fn queries(&self, count: usize, among: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let among = among.clamp(1, self.labels.len());
        let labels: Vec<u32> = (0..count)
            .map(|_| self.labels[rng.gen_range(0..among)])
            .collect();
        let photos = new_photos(&self.centres, &labels, self.dim, seed ^ 0x9E37);
        (photos, labels)
    }

    pub fn individuals(&self) -> usize {
        self.centres.len() / self.dim
    }
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

/// Raw little-endian u32.
pub fn write_u32(path: &Path, values: &[u32]) -> std::io::Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes)
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
/// thread, rayon `threads`, and libtorch's seed 0; freed memory reused as `finprint` does.
pub fn fix_threads(threads: usize) -> anyhow::Result<()> {
    finprint::runtime::reuse_freed_memory();
    finprint::runtime::configure_threads(Some(threads));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    tch::manual_seed(0);
    Ok(())
}
