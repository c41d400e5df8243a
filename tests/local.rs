//! Local features end to end: `finprint evaluate --local rootsift` on generated animals whose
//! identity is only a pattern of spots, photographed at other positions, scales and angles on
//! other backgrounds.

mod common;

use common::finprint;
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;
use std::path::Path;

/// An animal: spots `(x, y, radius)` on a pale body, in body coordinates centred on 0.
fn animal(rng: &mut ChaCha8Rng) -> Vec<(f32, f32, f32)> {
    (0..30)
        .map(|_| {
            (
                rng.gen_range(-90.0..90.0),
                rng.gen_range(-45.0..45.0),
                rng.gen_range(2.0..5.0),
            )
        })
        .collect()
}

/// A photo of `spots`: the body moved, scaled and turned a little, on a background of its own.
fn photo(spots: &[(f32, f32, f32)], rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = (320u32, 240u32);
    let scale = rng.gen_range(0.85..1.15f32);
    let angle = rng.gen_range(-0.08..0.08f32);
    let (cx, cy) = (
        160.0 + rng.gen_range(-20.0..20.0f32),
        120.0 + rng.gen_range(-15.0..15.0f32),
    );
    let (c, s) = (angle.cos() * scale, angle.sin() * scale);
    let placed: Vec<(f32, f32, f32)> = spots
        .iter()
        .map(|&(x, y, r)| (cx + c * x - s * y, cy + s * x + c * y, r * scale))
        .collect();
    // Background clutter of its own: big soft blobs, different in every photo.
    let clutter: Vec<(f32, f32, f32)> = (0..12)
        .map(|_| {
            (
                rng.gen_range(0.0..w as f32),
                rng.gen_range(0.0..h as f32),
                rng.gen_range(3.0..8.0),
            )
        })
        .collect();
    let tone = rng.gen_range(60.0..100.0f32);
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let (bx, by) = ((fx - cx) / scale, (fy - cy) / scale);
        let on_body = (bx / 110.0).powi(2) + (by / 60.0).powi(2) < 1.0;
        let mut v = if on_body { 200.0 } else { tone };
        for &(px, py, r) in &clutter {
            let d2 = (fx - px).powi(2) + (fy - py).powi(2);
            v += 60.0 * (-d2 / (2.0 * r * r)).exp();
        }
        for &(px, py, r) in &placed {
            let d2 = (fx - px).powi(2) + (fy - py).powi(2);
            v -= 150.0 * (-d2 / (2.0 * r * r)).exp();
        }
        let v = (v + rng.gen_range(-4.0..4.0)).clamp(0.0, 255.0) as u8;
        Rgb([v, v, v])
    })
}

/// `animals` animals of three photos each under `dir`, listed in a labels CSV.
fn photograph(dir: &Path, first: usize, animals: usize, rng: &mut ChaCha8Rng) -> String {
    let mut csv = String::from("image,individual_id\n");
    for a in first..first + animals {
        let spots = animal(rng);
        for p in 0..3 {
            let name = format!("a{a:02}_{p}.png");
            photo(&spots, rng).save(dir.join(&name)).unwrap();
            writeln!(csv, "{name},animal{a:02}").unwrap();
        }
    }
    csv
}

#[test]
fn local_features_find_animals_by_their_spots_and_the_fusion_keeps_the_gain() {
    if !Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("weights/efficientnet_lite0.safetensors")
        .is_file()
    {
        eprintln!(
            "skipped: weights/efficientnet_lite0.safetensors absent (run bash tools/setup.sh)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let evaluated = dir.path().join("evaluated.csv");
    let calibration = dir.path().join("calibration.csv");
    std::fs::write(&evaluated, photograph(dir.path(), 0, 12, &mut rng)).unwrap();
    std::fs::write(&calibration, photograph(dir.path(), 12, 10, &mut rng)).unwrap();
    let evaluate = |extra: &[&str], json: &str| {
        let json = dir.path().join(json);
        let o = finprint()
            .args([
                "evaluate",
                "--zero-shot",
                "efficientnet_lite0",
                "--local",
                "rootsift",
            ])
            .args(["--labels", evaluated.to_str().unwrap()])
            .args(["--images", dir.path().to_str().unwrap()])
            .args(["--bootstrap", "200", "--json", json.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("the embedding alone"), "{stdout}");
        eprintln!("{stdout}");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        let top1 = |r: &serde_json::Value| r["top1"].as_f64().unwrap();
        (top1(&v["report"]), top1(&v["local"]["embedding"]))
    };
    let (local, embedding) = evaluate(&[], "local.json");
    assert!(
        local >= 0.9,
        "local re-scoring top-1 {local}, embedding alone {embedding}"
    );
    assert!(local > embedding, "local {local} vs embedding {embedding}");
    let (fused, _) = evaluate(
        &["--calibration-labels", calibration.to_str().unwrap()],
        "fused.json",
    );
    assert!(
        fused >= 0.9,
        "fused top-1 {fused}, embedding alone {embedding}"
    );
}
