//! finprint's SIFT beside OpenCV's on the same pixels: for each photo, the grey image local
//! matching sees (longer side `--size`) is written as PNG with finprint's keypoints and
//! RootSIFT descriptors and its extraction time, for `tools/bench_sift.py` to compare. Then
//! each photo queries all the others as a shortlist (LNBNN and affine RANSAC, `Matcher::rescore`):
//! its time and the verified votes, for the reference re-scoring on the same descriptors.
//!
//! ```text
//! cargo run --release --example bench_sift -- --out /tmp/sift PHOTO...
//! ```

use clap::Parser;
use finprint::data::image::load_rgb;
use finprint::local::sift::{detect_and_describe, SiftConfig};
use finprint::local::{Features, Gray, Matcher, Method, Region};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 256)]
    size: u32,
    #[arg(long, default_value_t = 1000)]
    keypoints: usize,
    photos: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let cfg = SiftConfig {
        max_keypoints: args.keypoints,
        ..Default::default()
    };
    let mut photos = Vec::new();
    let mut features = Vec::new();
    for (i, path) in args.photos.iter().enumerate() {
        let gray = Gray::from_rgb_longest(&load_rgb(path)?, args.size);
        let pixels: Vec<u8> = gray
            .data
            .iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let png = args.out.join(format!("{i}.png"));
        image::GrayImage::from_raw(gray.width as u32, gray.height as u32, pixels)
            .expect("sized")
            .save(&png)?;
        // Described from the 8-bit image, as OpenCV sees it.
        let gray = Gray::new(
            gray.width,
            gray.height,
            gray.data
                .iter()
                .map(|v| (v * 255.0).round() / 255.0)
                .collect(),
        );
        let start = Instant::now();
        let (kps, desc) = detect_and_describe(&gray, &cfg);
        let seconds = start.elapsed().as_secs_f64();
        features.push(Features {
            size: [gray.width as u32, gray.height as u32],
            dim: finprint::local::sift::DESC_LEN,
            points: kps.iter().map(|k| [k.x, k.y]).collect(),
            descriptors: desc.clone(),
        });
        photos.push(json!({
            "png": png,
            "seconds": seconds,
            "keypoints": kps.iter().map(|k| json!([k.x, k.y, k.size, k.response, k.opencv_octave(&cfg)])).collect::<Vec<_>>(),
            "descriptors": desc,
        }));
    }
    let matcher = Matcher {
        size: args.size,
        region: Region::default(),
        clahe: 0.0,
        sift: cfg,
        method: Method::RootSift,
        k: 4,
        position_weight: 0.0,
        score: Default::default(),
        glue: None,
        ransac: Default::default(),
    };
    for (q, photo) in photos.iter_mut().enumerate() {
        let others: Vec<&Features> = (0..features.len())
            .filter(|&j| j != q)
            .map(|j| &features[j])
            .collect();
        let start = Instant::now();
        let scores = matcher.rescore(&features[q], &others);
        photo["rescore_seconds"] = json!(start.elapsed().as_secs_f64());
        photo["verified"] = json!(scores.iter().map(|m| m.verified).collect::<Vec<_>>());
    }
    std::fs::write(args.out.join("finprint.json"), serde_json::to_vec(&photos)?)?;
    Ok(())
}
