//! Measures the search indexes on random unit vectors and writes them for `tools/bench_knn.py`.
//!
//! ```text
//! cargo run --release --example bench_knn -- --n 51000 --dim 512
//! ```
//!
//! Writes `<out>/base.f32` and `<out>/queries.f32` (raw little-endian f32, row-major),
//! `<out>/meta.json` and `<out>/rust.json`. Queries are catalogue rows of the HNSW subset plus an
//! equally large random perturbation (cosine about 0.7 to their row), like a new photo of a known
//! individual.

use clap::Parser;
use finprint::search::{FlatIndex, HnswIndex, HnswParams, Index, Neighbor, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Catalogue rows.
    #[arg(long, default_value_t = 51_000)]
    n: usize,
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Queries of the batched search.
    #[arg(long, default_value_t = 1_000)]
    queries: usize,
    /// Queries searched one at a time for the latency.
    #[arg(long, default_value_t = 200)]
    single: usize,
    #[arg(long, default_value_t = 10)]
    k: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 16)]
    m: usize,
    #[arg(long, default_value_t = 100)]
    ef_construction: usize,
    /// Search widths of HNSW, one row of the table each.
    #[arg(long, value_delimiter = ',', default_value = "64,128")]
    ef_search: Vec<usize>,
    /// Rows of the HNSW catalogue (its first rows): all by default.
    #[arg(long)]
    hnsw_n: Option<usize>,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long, default_value = "target/knn")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()?;
    let (n, dim, k) = (args.n, args.dim, args.k);
    let hnsw_n = args.hnsw_n.unwrap_or(n).min(n);
    std::fs::create_dir_all(&args.out)?;

    let start = Instant::now();
    let base = random_unit_vectors(n, dim, args.seed);
    let queries = perturbed_rows(&base[..hnsw_n * dim], args.queries, dim, args.seed + 1);
    write_f32(&args.out.join("base.f32"), &base)?;
    write_f32(&args.out.join("queries.f32"), &queries)?;
    let meta = json!({
        "n": n, "dim": dim, "queries": args.queries, "single": args.single, "k": k,
        "threads": args.threads, "m": args.m, "ef_construction": args.ef_construction,
        "ef_search": args.ef_search, "hnsw_n": hnsw_n, "seed": args.seed,
    });
    std::fs::write(
        args.out.join("meta.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    eprintln!(
        "data: {n} × {dim} in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    let mut flat = FlatIndex::new(dim, Storage::F32);
    let (exact, row) = measure("flat f32", None, &mut flat, &base, &queries, &args, None)?;
    rows.push(row);
    drop(flat);
    let mut half = FlatIndex::new(dim, Storage::F16);
    rows.push(
        measure(
            "flat f16",
            None,
            &mut half,
            &base,
            &queries,
            &args,
            Some(&exact),
        )?
        .1,
    );
    drop(half);

    let exact_subset = if hnsw_n < n {
        let mut subset = FlatIndex::new(dim, Storage::F32);
        subset.add(&base[..hnsw_n * dim])?;
        subset.search(&queries, k)?
    } else {
        exact
    };
    let params = HnswParams {
        m: args.m,
        ef_construction: args.ef_construction,
        ef_search: args.ef_search.first().copied().unwrap_or(64),
        seed: args.seed,
    };
    let mut hnsw = HnswIndex::new(dim, params);
    let sub = &base[..hnsw_n * dim];
    let (_, first) = measure(
        "hnsw",
        Some(params.ef_search),
        &mut hnsw,
        sub,
        &queries,
        &args,
        Some(&exact_subset),
    )?;
    let build = first["build_s"].clone();
    rows.push(first);
    for &ef in args.ef_search.iter().skip(1) {
        hnsw.set_ef_search(ef);
        let (_, mut row) = measure_search(
            "hnsw",
            Some(ef),
            &hnsw,
            &queries,
            &args,
            Some(&exact_subset),
        )?;
        row["build_s"] = build.clone();
        rows.push(row);
    }
    for row in &mut rows {
        if row["index"] == "hnsw" {
            row["n"] = json!(hnsw_n);
        }
    }

    println!(
        "{:<24} {:>9} {:>8} {:>11} {:>10} {:>9} {:>10} {:>9}",
        "index", "n", "build s", "storage MB", "VmHWM MB", "1q ms", "batch q/s", "recall"
    );
    for r in &rows {
        let name = match r["ef_search"].as_u64() {
            Some(ef) => format!("{} ef={ef}", r["index"].as_str().unwrap_or("?")),
            None => r["index"].as_str().unwrap_or("?").to_string(),
        };
        println!(
            "{:<24} {:>9} {:>8.2} {:>11.1} {:>10.0} {:>9.3} {:>10.0} {:>9.4}",
            name,
            r["n"],
            r["build_s"].as_f64().unwrap_or(f64::NAN),
            r["storage_mb"].as_f64().unwrap_or(f64::NAN),
            r["vm_hwm_mb"].as_f64().unwrap_or(f64::NAN),
            r["single_median_ms"].as_f64().unwrap_or(f64::NAN),
            r["batch_qps"].as_f64().unwrap_or(f64::NAN),
            r["recall"].as_f64().unwrap_or(f64::NAN),
        );
    }
    let report = json!({ "meta": meta, "rows": rows });
    std::fs::write(
        args.out.join("rust.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

/// Builds `index` from `rows` and measures it; returns its batched results and its table row.
fn measure(
    name: &str,
    ef_search: Option<usize>,
    index: &mut dyn Index,
    rows: &[f32],
    queries: &[f32],
    args: &Args,
    exact: Option<&[Vec<Neighbor>]>,
) -> anyhow::Result<(Vec<Vec<Neighbor>>, Value)> {
    reset_peak_rss();
    let start = Instant::now();
    index.add(rows)?;
    let build_s = start.elapsed().as_secs_f64();
    eprintln!("{name}: built in {build_s:.2} s");
    let (results, mut row) = measure_search(name, ef_search, index, queries, args, exact)?;
    row["build_s"] = json!(build_s);
    Ok((results, row))
}

/// Measures the searches of a built index; returns its batched results and its table row.
fn measure_search(
    name: &str,
    ef_search: Option<usize>,
    index: &dyn Index,
    queries: &[f32],
    args: &Args,
    exact: Option<&[Vec<Neighbor>]>,
) -> anyhow::Result<(Vec<Vec<Neighbor>>, Value)> {
    let dim = args.dim;
    let mut latencies = Vec::with_capacity(args.single);
    for q in queries.chunks_exact(dim).cycle().take(args.single) {
        let start = Instant::now();
        let result = index.search(q, args.k)?;
        latencies.push(start.elapsed().as_secs_f64());
        std::hint::black_box(result);
    }
    latencies.sort_by(f64::total_cmp);
    let median = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or(f64::NAN);
    let start = Instant::now();
    let results = index.search(queries, args.k)?;
    let batch_s = start.elapsed().as_secs_f64();
    let recall = exact.map(|e| recall(&results, e, args.k));
    eprintln!(
        "{name}: 1 query {:.3} ms, batch {batch_s:.3} s",
        median * 1e3
    );
    let row = json!({
        "index": name,
        "n": index.len(),
        "ef_search": ef_search,
        "storage_mb": index.storage_bytes() as f64 / 1e6,
        "vm_hwm_mb": vm_hwm_kb().map(|kb| kb as f64 / 1e3),
        "single_median_ms": median * 1e3,
        "batch_s": batch_s,
        "batch_qps": queries.len() as f64 / dim as f64 / batch_s,
        "recall": recall,
    });
    Ok((results, row))
}

/// Mean fraction of the exact `k` best found, per query.
fn recall(got: &[Vec<Neighbor>], exact: &[Vec<Neighbor>], k: usize) -> f64 {
    let hits: usize = got
        .iter()
        .zip(exact)
        .map(|(g, e)| g.iter().filter(|n| e.iter().any(|x| x.id == n.id)).count())
        .sum();
    hits as f64 / (k * exact.len()).max(1) as f64
}

/// `n` random unit vectors, generated in parallel blocks each seeded from `seed`.
fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
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

/// `count` rows of `base` picked at random, each plus a random vector of its own length, renormalised.
fn perturbed_rows(base: &[f32], count: usize, dim: usize, seed: u64) -> Vec<f32> {
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

fn normalise(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
}

fn write_f32(path: &Path, values: &[f32]) -> std::io::Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    for chunk in values.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
        file.write_all(&bytes)?;
    }
    file.flush()
}

/// Resets the process's peak resident set (VmHWM) to its current size (Linux ≥ 4.0).
fn reset_peak_rss() {
    // Not all kernels allow it; the peak then covers the whole run.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn vm_hwm_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
