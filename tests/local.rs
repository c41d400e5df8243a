//! Local features end to end: `finprint evaluate --local rootsift` on generated animals whose
//! identity is only a pattern of spots, photographed at other positions, scales and angles on
//! other backgrounds.

mod common;

use common::{finprint, spot_animal, spot_photo};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::fmt::Write as _;
use std::path::Path;

/// `animals` animals of three photos each under `dir`, listed in a labels CSV.
fn photograph(dir: &Path, first: usize, animals: usize, rng: &mut ChaCha8Rng) -> String {
    let mut csv = String::from("image,individual_id\n");
    for a in first..first + animals {
        let spots = spot_animal(rng);
        for p in 0..3 {
            let name = format!("a{a:02}_{p}.png");
            spot_photo(&spots, rng).save(dir.join(&name)).unwrap();
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
