//! Measures the search indexes on a synthetic embedding catalogue and writes it for
//! `tools/bench_knn.py`.
//!
//! ```text
//! cargo run --release --example bench_knn -- --n 51000 --dim 512
//! ```
//!
//! The catalogue is shaped like a real one (`common::catalogue`, seeded): 30 species as random
//! unit directions, individuals as random offsets of a species, a heavy-tailed number of photos
//! per individual (about 60% singletons, mean about 3.3, as Happywhale), each photo its
//! individual's centre plus noise (cosine 0.8 to it), rows shuffled. Queries are new photos of
//! individuals of the HNSW subset (a fresh perturbation of their centre). Random i.i.d. vectors
//! would be the worst case of a graph index and nothing like embeddings of animals.
//!
//! Besides recall@k against the exact answer, each row reports `own_first`: the share of
//! queries whose first result is a photo of the query's own individual.
//!
//! Writes `<out>/base.f32` and `<out>/queries.f32` (raw little-endian f32, row-major),
//! `<out>/labels.u32` and `<out>/query_labels.u32` (each row's and query's individual),
//! `<out>/meta.json` and `<out>/rust.json`. Single-query latency: median, min and max over
//! `--single` queries; batched throughput: over `--batch-runs` searches of all the queries.
//! `tools/bench.sh` runs it.

mod common;

use clap::Parser;
use common::{catalogue, reset_peak_rss, stats, vm_hwm_mb, write_f32, write_u32};
use finprint::search::{FlatIndex, HnswIndex, HnswParams, Index, Neighbor, Storage};
use serde_json::{json, Value};
use std::path::PathBuf;
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
    /// Searches of all the queries at once.
    #[arg(long, default_value_t = 3)]
    batch_runs: usize,
    /// Skip the f16 flat index.
    #[arg(long)]
    no_f16: bool,
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
    /// Rows of the HNSW catalogue (its first rows): all by default, 0 for no HNSW.
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
    let cat = catalogue(n, dim, args.seed);
    let (queries, query_labels) = cat.queries(args.queries, hnsw_n.max(1), args.seed + 1);
    write_u32(&args.out.join("labels.u32"), &cat.labels)?;
    write_u32(&args.out.join("query_labels.u32"), &query_labels)?;
    let truth = Truth {
        labels: &cat.labels,
        queries: &query_labels,
    };
    let base = cat.photos;
    write_f32(&args.out.join("base.f32"), &base)?;
    write_f32(&args.out.join("queries.f32"), &queries)?;
    let meta = json!({
        "n": n, "dim": dim, "queries": args.queries, "single": args.single, "k": k,
        "threads": args.threads, "m": args.m, "ef_construction": args.ef_construction,
        "ef_search": args.ef_search, "hnsw_n": hnsw_n, "seed": args.seed,
        "batch_runs": args.batch_runs, "f16": !args.no_f16,
        "individuals": cat.centres.len() / dim,
    });
    std::fs::write(
        args.out.join("meta.json"),
        serde_json::to_string_pretty(&meta)?,
    )?;
    eprintln!(
        "data: {n} × {dim} ({} individuals) in {:.1} s",
        meta["individuals"],
        start.elapsed().as_secs_f64()
    );

    let mut rows = Vec::new();
    let mut flat = FlatIndex::new(dim, Storage::F32);
    let (exact, mut row) = measure("flat f32", None, &mut flat, &base, &queries, &args, None)?;
    row["own_first"] = json!(truth.own_first(&exact));
    rows.push(row);
    drop(flat);
    if !args.no_f16 {
        let mut half = FlatIndex::new(dim, Storage::F16);
        let (found, mut row) = measure(
            "flat f16",
            None,
            &mut half,
            &base,
            &queries,
            &args,
            Some(&exact),
        )?;
        row["own_first"] = json!(truth.own_first(&found));
        rows.push(row);
    }
    if hnsw_n > 0 {
        hnsw_rows(
            &args,
            &base[..hnsw_n * dim],
            &queries,
            exact,
            &truth,
            &mut rows,
        )?;
    }
    print_rows(&rows);
    let report = json!({ "meta": meta, "rows": rows });
    std::fs::write(
        args.out.join("rust.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(())
}

/// Builds HNSW on the first rows `sub` and measures it at each search width.
fn hnsw_rows(
    args: &Args,
    sub: &[f32],
    queries: &[f32],
    exact: Vec<Vec<Neighbor>>,
    truth: &Truth,
    rows: &mut Vec<Value>,
) -> anyhow::Result<()> {
    let (dim, k) = (args.dim, args.k);
    let hnsw_n = sub.len() / dim;
    let exact_subset = if hnsw_n < args.n {
        let mut subset = FlatIndex::new(dim, Storage::F32);
        subset.add(sub)?;
        subset.search(queries, k)?
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
    let (found, mut first) = measure(
        "hnsw",
        Some(params.ef_search),
        &mut hnsw,
        sub,
        queries,
        args,
        Some(&exact_subset),
    )?;
    first["own_first"] = json!(truth.own_first(&found));
    let build = first["build_s"].clone();
    rows.push(first);
    for &ef in args.ef_search.iter().skip(1) {
        hnsw.set_ef_search(ef);
        let (found, mut row) =
            measure_search("hnsw", Some(ef), &hnsw, queries, args, Some(&exact_subset))?;
        row["own_first"] = json!(truth.own_first(&found));
        row["build_s"] = build.clone();
        rows.push(row);
    }
    for row in rows.iter_mut() {
        if row["index"] == "hnsw" {
            row["n"] = json!(hnsw_n);
        }
    }
    Ok(())
}

fn print_rows(rows: &[Value]) {
    println!(
        "{:<24} {:>9} {:>8} {:>11} {:>10} {:>9} {:>10} {:>9} {:>9}",
        "index",
        "n",
        "build s",
        "storage MB",
        "VmHWM MB",
        "1q ms",
        "batch q/s",
        "recall",
        "own 1st"
    );
    for r in rows {
        let name = match r["ef_search"].as_u64() {
            Some(ef) => format!("{} ef={ef}", r["index"].as_str().unwrap_or("?")),
            None => r["index"].as_str().unwrap_or("?").to_string(),
        };
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<24} {:>9} {:>8.2} {:>11.1} {:>10.0} {:>9.3} {:>10.0} {:>9.4} {:>9.4}",
            name,
            r["n"],
            f(&r["build_s"]),
            f(&r["storage_mb"]),
            f(&r["vm_hwm_mb"]),
            f(&r["single_ms"]["median"]),
            f(&r["batch_qps"]["median"]),
            f(&r["recall"]),
            f(&r["own_first"]),
        );
    }
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
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(result);
    }
    let mut rates = Vec::new();
    let mut results = Vec::new();
    for _ in 0..args.batch_runs.max(1) {
        let start = Instant::now();
        results = index.search(queries, args.k)?;
        rates.push(queries.len() as f64 / dim as f64 / start.elapsed().as_secs_f64());
    }
    let recall = exact.map(|e| recall(&results, e, args.k));
    let row = json!({
        "index": name,
        "n": index.len(),
        "ef_search": ef_search,
        "storage_mb": index.storage_bytes() as f64 / 1e6,
        "vm_hwm_mb": vm_hwm_mb(),
        "single_ms": stats(&latencies),
        "batch_qps": stats(&rates),
        "recall": recall,
    });
    eprintln!(
        "{name}: 1 query {:.3} ms, batch {:.0} q/s",
        row["single_ms"]["median"], row["batch_qps"]["median"]
    );
    Ok((results, row))
}

/// Which individual each catalogue row and each query shows.
struct Truth<'a> {
    labels: &'a [u32],
    queries: &'a [u32],
}

impl Truth<'_> {
    /// The share of queries whose first result shows the query's own individual.
    fn own_first(&self, results: &[Vec<Neighbor>]) -> f64 {
        let hits = results
            .iter()
            .zip(self.queries)
            .filter(|(r, &q)| r.first().is_some_and(|n| self.labels[n.id as usize] == q))
            .count();
        hits as f64 / results.len().max(1) as f64
    }
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
