//! Identify one photo, end to end, against a catalogue of `--n` photos, as the service does:
//! decode and resize (the evaluation pipeline) → embed (EfficientNet-Lite0 + GeM + BN +
//! Linear 512, random weights: speed does not depend on them) → exact search of the catalogue
//! (`FlatIndex`, f32) → individuals ranked by their best photo (`predict::rank_candidates`) →
//! five answers with `new_individual` (`decide::answers`). The catalogue is `--n` random unit
//! vectors labelled with `--individuals` individuals.
//!
//! Prints one JSON line: per-photo latency (median, min, max over `--queries` photos after a
//! warm-up) in total and per stage, and the process's peak resident memory (model, catalogue
//! index, labels and names: what the service holds in memory for such a catalogue).
//!
//!   cargo run --release --example bench_identify -- --images DIR --list FILE [--n 1000000]

mod common;

use clap::Parser;
use common::{random_unit_vectors, stats, vm_hwm_mb};
use finprint::data::image::load_rgb;
use finprint::decide::answers;
use finprint::model::config::ModelConfig;
use finprint::model::happywhale::HappyWhaleModel;
use finprint::network::{embed_batch, input_tensor, to_vec};
use finprint::predict::rank_candidates;
use finprint::search::{Aggregation, FlatIndex, Index, Storage};
use finprint::transforms::{batch_with, Fit, ImgSize, Pipeline};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

#[derive(Parser)]
struct Args {
    /// A folder of photos...
    #[arg(long)]
    images: PathBuf,
    /// ...and a file naming them (relative to --images), one per line: the queries, in turn.
    #[arg(long)]
    list: PathBuf,
    /// Catalogue photos.
    #[arg(long, default_value_t = 51_033)]
    n: usize,
    /// Individuals they show (the Happywhale training set: 15,587).
    #[arg(long, default_value_t = 15_587)]
    individuals: usize,
    /// Photos identified (timed).
    #[arg(long, default_value_t = 20)]
    queries: usize,
    #[arg(long, default_value_t = 224)]
    size: i64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::fix_threads(args.threads)?;
    let photos: Vec<String> = std::fs::read_to_string(&args.list)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!photos.is_empty(), "{} names no photo", args.list.display());

    // The model, as the service loads a trained one.
    let mut cfg = ModelConfig::for_backbone("efficientnet_lite0", vec!["x".into()], vec![1])?;
    cfg.img_size = ImgSize::square(args.size as u32);
    let model = HappyWhaleModel::new(cfg, Device::Cpu)?;
    let dim = model.config.embedding_size as usize;
    let pipeline = Pipeline::eval(
        model.config.img_size,
        Fit::Squash,
        model.config.mean.map(|v| v as f32),
        model.config.std.map(|v| v as f32),
    )?;

    // The catalogue: its index, each row's individual, the individuals' names.
    let start = Instant::now();
    let ids: Vec<String> = (0..args.individuals.max(1))
        .map(|i| format!("individual_{i:06}"))
        .collect();
    let labels: Vec<u32> = (0..args.n).map(|i| (i % ids.len()) as u32).collect();
    let mut index = FlatIndex::new(dim, Storage::F32);
    index.add(&random_unit_vectors(args.n, dim, args.seed))?;
    let build_s = start.elapsed().as_secs_f64();

    let identify = |name: &str| -> anyhow::Result<[f64; 3]> {
        let t0 = Instant::now();
        let chw = batch_with(&pipeline, 1, 0, |_| Ok(load_rgb(&args.images.join(name))?))?;
        let t1 = Instant::now();
        let query = to_vec(&embed_batch(&model, &input_tensor(&model, &chw, 1), false))?;
        let t2 = Instant::now();
        let ranked = rank_candidates(&index, &labels, &ids, &query, Aggregation::Max, 5)?;
        let five = answers(&ranked[0], 0.5);
        std::hint::black_box(five);
        let t3 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok([ms(t0, t1), ms(t1, t2), ms(t2, t3)])
    };
    identify(&photos[0])?;
    let mut stages = [Vec::new(), Vec::new(), Vec::new()];
    let mut totals = Vec::new();
    for name in photos.iter().cycle().take(args.queries.max(1)) {
        let t = identify(name)?;
        totals.push(t.iter().sum());
        stages.iter_mut().zip(t).for_each(|(s, v)| s.push(v));
    }
    let line = json!({
        "impl": "finprint (library path)",
        "n": args.n,
        "individuals": ids.len(),
        "dim": dim,
        "size": args.size,
        "threads": args.threads,
        "catalogue_build_s": build_s,
        "index_mb": index.storage_bytes() as f64 / 1e6,
        "total_ms": stats(&totals),
        "decode_ms": stats(&stages[0]),
        "embed_ms": stats(&stages[1]),
        "search_rank_ms": stats(&stages[2]),
        "vm_hwm_mb": vm_hwm_mb(),
    });
    println!("{line}");
    Ok(())
}
