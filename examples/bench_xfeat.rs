//! Speed of XFeat local-feature extraction end to end (decode → resize → network → keypoints
//! and descriptors), one JSON line for `tools/bench.sh` to set beside the PyTorch eager and
//! onnxruntime references on the same photos (`tools/bench_xfeat.py`).
//!
//! Each photo is decoded (`data::image::load_rgb`) and extracted by `Matcher::extract`, the path
//! `evaluate`, `predict` and the catalogue take (`--local xfeat`): resized so its longer side is
//! `--size`, then XFeat's sparse `detectAndCompute` with top-k `--keypoints`. The region kept is
//! the whole photo unless `--region` says otherwise, so that the counts compare with the
//! reference's. First, after one warm-up photo, a pass of its own shows where a photo's time goes
//! (decode, resize, the network alone, the rest of `Matcher::extract`: input tensor, resize to
//! multiples of 32, heatmap, NMS, top-k, sampling, the region and the copy out). Then photos/s of
//! `--runs` timed passes, two ways: one photo at a time (as the references run), and the photos
//! spread over the rayon threads as the pipeline extracts them (`local::store::cached`).
//!
//! With `--out DIR`: for the reference's parity check, each photo as XFeat sees it (resized, PNG,
//! `DIR/N.png`), its keypoints (`DIR/finprint.json`) and descriptors (`DIR/descriptors.f32`,
//! f32 little-endian, the photos' rows one after another), and the JSON line (`DIR/result.json`).
//!
//!   cargo run --release --example bench_xfeat -- [--size 256] [--keypoints 2000] [--threads 2]
//!       [--runs 3] [--out DIR] PHOTO...

mod common;

use anyhow::{ensure, Context};
use clap::Parser;
use common::{stats, vm_hwm_mb};
use finprint::data::image::load_rgb;
use finprint::local::{resize_longest, xfeat, Features, LocalArgs, Method};
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// The longer side photos are extracted at (default: `--local-size`'s).
    #[arg(long)]
    size: Option<u32>,
    /// XFeat's top-k (default: `--local-keypoints`'s).
    #[arg(long)]
    keypoints: Option<usize>,
    /// Where keypoints are kept (`--local-region`); the whole photo by default.
    #[arg(long, default_value = "0,0,1,1")]
    region: String,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed passes over the photos, each way.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the resized photos, keypoints and descriptors here.
    #[arg(long)]
    out: Option<PathBuf>,
    photos: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(!args.photos.is_empty(), "no photo given");
    common::fix_threads(args.threads)?;
    let defaults = LocalArgs::default();
    let size = args.size.unwrap_or(defaults.local_size);
    let keypoints = args.keypoints.unwrap_or(defaults.local_keypoints);
    let (size_flag, keypoints_flag) = (size.to_string(), keypoints.to_string());
    let matcher = LocalArgs::from_flags(&[
        "--local",
        "xfeat",
        "--local-size",
        &size_flag,
        "--local-keypoints",
        &keypoints_flag,
        "--local-region",
        &args.region,
    ])?
    .matcher()?;
    let photos = &args.photos;
    let extract = |i: usize| -> anyhow::Result<Features> {
        let rgb = load_rgb(&photos[i]).with_context(|| photos[i].display().to_string())?;
        Ok(matcher.extract(&rgb))
    };

    extract(0)?;
    // Where one photo's time goes, in a pass of its own (the timed passes' warm-up): each stage
    // timed alone, one photo at a time.
    let Method::XFeat(nets) = &matcher.method else {
        unreachable!("an XFeat matcher")
    };
    let (mut decode, mut resize, mut network, mut extract_resized) = (0.0, 0.0, 0.0, 0.0);
    let mut resized = Vec::new();
    for path in photos {
        let t = Instant::now();
        let rgb = load_rgb(path)?;
        decode += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let small = resize_longest(&rgb, size);
        resize += t.elapsed().as_secs_f64();
        {
            let net = nets[0].lock().unwrap_or_else(|e| e.into_inner());
            tch::no_grad(|| {
                let (x, _, _) = xfeat::preprocess(&xfeat::image_tensor(&small));
                let t = Instant::now();
                std::hint::black_box(net.net().forward(&x));
                network += t.elapsed().as_secs_f64();
            });
        }
        // The whole extraction of the resized photo (its resize a copy): the same features as the
        // timed passes' (compared below).
        let t = Instant::now();
        let again = matcher.extract(&small);
        extract_resized += t.elapsed().as_secs_f64();
        resized.push((small, again));
    }
    let mut sequential = Vec::new();
    let mut features = Vec::new();
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        features = (0..photos.len())
            .map(extract)
            .collect::<anyhow::Result<_>>()?;
        sequential.push(photos.len() as f64 / t.elapsed().as_secs_f64());
    }
    let (mut parallel, mut parallel_differ) = (Vec::new(), 0);
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        let found: Vec<Features> = (0..photos.len())
            .into_par_iter()
            .map(extract)
            .collect::<anyhow::Result<_>>()?;
        parallel.push(photos.len() as f64 / t.elapsed().as_secs_f64());
        parallel_differ =
            parallel_differ.max(found.iter().zip(&features).filter(|(a, b)| a != b).count());
    }

    let again_differ = resized
        .iter()
        .zip(&features)
        .filter(|((_, again), f)| again != *f)
        .count();
    let n = photos.len() as f64;
    let ms = |s: f64| 1e3 * s / n;

    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let mut descriptors = Vec::new();
        let mut written = Vec::new();
        for (i, ((small, _), f)) in resized.iter().zip(&features).enumerate() {
            ensure!(
                f.size == [small.width(), small.height()],
                "resized as extract"
            );
            let png = dir.join(format!("{i}.png"));
            small.save(&png)?;
            descriptors.extend(f.descriptors.iter().flat_map(|v| v.to_le_bytes()));
            written
                .push(json!({"photo": photos[i], "png": png, "size": f.size, "points": f.points}));
        }
        std::fs::write(dir.join("descriptors.f32"), descriptors)?;
        std::fs::write(dir.join("finprint.json"), serde_json::to_vec(&written)?)?;
    }

    let counts: Vec<usize> = features.iter().map(Features::len).collect();
    let line = json!({
        "impl": "finprint (tch)",
        "photos": photos.len(),
        "size": size,
        "keypoints": keypoints,
        "region": args.region,
        "threads": args.threads,
        "runs": args.runs.max(1),
        "photos_s": stats(&sequential),
        "parallel_photos_s": stats(&parallel),
        // Photos whose features differ from the sequential pass's: extracted in parallel, and
        // extracted again from the resized photo (both 0 when extraction is deterministic and
        // the resize above is extract's).
        "parallel_differ": parallel_differ,
        "resized_differ": again_differ,
        "mean_keypoints": counts.iter().sum::<usize>() as f64 / n,
        "counts": counts,
        "ms": {
            "decode": ms(decode),
            "resize": ms(resize),
            "network": ms(network),
            "post": ms(extract_resized - network),
        },
        "vm_hwm_mb": vm_hwm_mb(),
    });
    if let Some(dir) = &args.out {
        std::fs::write(dir.join("result.json"), line.to_string())?;
    }
    println!("{line}");
    Ok(())
}
