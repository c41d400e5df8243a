//! Local features end to end: `finprint evaluate --local rootsift` and `finprint predict
//! --local rootsift` on generated animals whose identity is only a pattern of spots,
//! photographed at other positions, scales and angles on other backgrounds.

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
    if lite0_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let evaluated = dir.path().join("evaluated.csv");
    let calibration = dir.path().join("calibration.csv");
    std::fs::write(&evaluated, photograph(dir.path(), 0, 12, &mut rng)).unwrap();
    std::fs::write(&calibration, photograph(dir.path(), 12, 10, &mut rng)).unwrap();
    let run = |extra: &[&str]| {
        finprint()
            .args([
                "evaluate",
                "--zero-shot",
                "efficientnet_lite0",
                "--local",
                "rootsift",
            ])
            .args(["--labels", evaluated.to_str().unwrap()])
            .args(["--images", dir.path().to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let evaluate = |extra: &[&str], json: &str| {
        let json = dir.path().join(json);
        let o = run(&[
            &["--bootstrap", "200", "--json", json.to_str().unwrap()],
            extra,
        ]
        .concat());
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(stdout.contains("the embedding alone"), "{stdout}");
        eprintln!("{stdout}");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        let top1 = |r: &serde_json::Value| r["top1"].as_f64().unwrap();
        (top1(&v["report"]), top1(&v["local"]["embedding"]))
    };
    let queries = dir.path().join("queries.csv");
    let (local, embedding) = evaluate(&["--queries", queries.to_str().unwrap()], "local.json");
    // Without a calibration, the default whitening is fitted on the evaluated photos.
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("local.json")).unwrap()).unwrap();
    assert_eq!(v["local"]["whitened"], true, "{v}");
    // Each known query's rank, by local re-scoring and by the embedding alone: their shares
    // of first places are the two top-1 figures.
    let table = std::fs::read_to_string(&queries).unwrap();
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("image,animal,rank,embedding_rank"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let first =
        |col: usize| rows.iter().filter(|r| r[col] == "1").count() as f64 / rows.len() as f64;
    assert!(
        (first(2) - local).abs() < 1e-9 && (first(3) - embedding).abs() < 1e-9,
        "{table}"
    );
    assert!(rows.iter().all(|r| r[2].parse::<usize>().unwrap() <= 5));
    assert!(
        local >= 0.9,
        "local re-scoring top-1 {local}, embedding alone {embedding}"
    );
    assert!(local > embedding, "local {local} vs embedding {embedding}");
    let (unwhitened, _) = evaluate(
        &[
            "--calibration-labels",
            calibration.to_str().unwrap(),
            "--local-whitening",
            "0",
        ],
        "fused.json",
    );
    assert!(
        unwhitened >= 0.9,
        "fused top-1 {unwhitened} unwhitened, embedding alone {embedding}"
    );
    // Descriptors whitened (the default) by a whitening fitted with the calibration and saved
    // in it; the saved calibration gives the same figures, and is refused at another power.
    let saved = dir.path().join("whitened.json");
    let (whitened, _) = evaluate(
        &[
            "--calibration-labels",
            calibration.to_str().unwrap(),
            "--save-calibration",
            saved.to_str().unwrap(),
        ],
        "whitened.json.out",
    );
    assert!(
        whitened >= 0.9,
        "whitened top-1 {whitened}, embedding alone {embedding}"
    );
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(c["whitening_power"], 0.5);
    assert_eq!(c["whitening"]["dim_in"], 128);
    assert_eq!(c["whitening"]["proj"].as_array().unwrap().len(), 128 * 128);
    let (again, _) = evaluate(&["--calibration", saved.to_str().unwrap()], "again.json");
    assert_eq!(again, whitened);
    let o = run(&[
        "--calibration",
        saved.to_str().unwrap(),
        "--local-whitening",
        "0",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("fitted for --local-whitening 0.5, not 0"),
        "{stderr}"
    );
    // An identity scored by all its shortlisted photos' fused probabilities.
    let (noisy, _) = evaluate(
        &[
            "--calibration-labels",
            calibration.to_str().unwrap(),
            "--identity-score",
            "noisy-or",
        ],
        "noisy.json",
    );
    assert!(
        noisy >= 0.9,
        "noisy-or top-1 {noisy}, embedding alone {embedding}"
    );
    let o = run(&["--identity-score", "noisy-or"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("--identity-score noisy-or combines fused"),
        "{stderr}"
    );
    // Each shortlisted photo matched alone: verified mutual ratio-test matches.
    let (pairwise, _) = evaluate(&["--local-score", "pairwise"], "pairwise.json");
    assert!(
        pairwise >= 0.9,
        "pairwise top-1 {pairwise}, embedding alone {embedding}"
    );
}

/// Skips (with the reason) where the Lite0 weights were not fetched.
fn lite0_missing() -> bool {
    common::weights("efficientnet_lite0.safetensors").is_none()
}

#[test]
fn predict_with_local_features_calibrates_on_the_catalogue_and_reuses_what_it_saved() {
    if lite0_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (train, test) = (root.join("train_images"), root.join("test_images"));
    std::fs::create_dir_all(&train).unwrap();
    std::fs::create_dir_all(&test).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut csv = String::from("image,species,individual_id\n");
    let mut truth = Vec::new();
    // 14 animals with two catalogue photos and one test photo; 6 with one catalogue photo
    // (new individuals to the calibration's leave-one-out); 3 seen only in the test photos.
    for a in 0..23 {
        let spots = spot_animal(&mut rng);
        let in_catalogue = match a {
            0..14 => 2,
            14..20 => 1,
            _ => 0,
        };
        for p in 0..in_catalogue {
            let name = format!("a{a:02}_{p}.png");
            spot_photo(&spots, &mut rng)
                .save(train.join(&name))
                .unwrap();
            writeln!(csv, "{name},beluga,animal{a:02}").unwrap();
        }
        if in_catalogue != 1 {
            let name = format!("t{a:02}.png");
            spot_photo(&spots, &mut rng).save(test.join(&name)).unwrap();
            let id = if a < 14 {
                format!("animal{a:02}")
            } else {
                "new_individual".into()
            };
            truth.push((name, id));
        }
    }
    std::fs::write(root.join("train.csv"), csv).unwrap();
    let features = root.join("catalogue.features");
    let predict = |out: &str, extra: &[&str]| {
        let out = root.join(out);
        let o = finprint()
            .args(["predict", "--zero-shot", "efficientnet_lite0"])
            .args([
                "--data",
                root.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .args([
                "--local",
                "rootsift",
                "--local-features",
                features.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
            stderr,
            out,
        )
    };
    let (ok, stdout, stderr, first) = predict("first.csv", &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("calibration saved to"), "{stdout}");
    let saved = root.join("first.calibration.json");
    assert!(saved.is_file() && features.is_file(), "{stdout}");
    let submission = std::fs::read_to_string(&first).unwrap();
    let answers: std::collections::HashMap<&str, Vec<&str>> = submission
        .lines()
        .skip(1)
        .map(|l| {
            let (image, ids) = l.split_once(',').unwrap();
            (image, ids.split(' ').collect())
        })
        .collect();
    let mut right = 0;
    for (image, id) in &truth {
        let a = &answers[image.as_str()];
        assert_eq!(a.len(), 5, "{image}: {a:?}");
        right += usize::from(a[0] == id.as_str());
    }
    // The known animals by their spots; the new ones by the calibrated threshold.
    assert!(
        right * 10 >= truth.len() * 8,
        "{right} of {} right first:\n{submission}",
        truth.len()
    );
    let (ok, _, stderr, second) =
        predict("second.csv", &["--calibration", saved.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(second).unwrap(),
        submission,
        "the saved calibration and features give the same answers"
    );
    // The first run's descriptors were whitened (the default) by a whitening fitted on the
    // catalogue's calibration photos. Unwhitened, the answers are as good, and the same again
    // from the saved calibration.
    let c: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    assert_eq!(c["whitening"]["dim_in"], 128, "{c}");
    let (ok, _, stderr, unwhitened) = predict("unwhitened.csv", &["--local-whitening", "0"]);
    assert!(ok, "{stderr}");
    let unwhitened = std::fs::read_to_string(unwhitened).unwrap();
    let first_right = |submission: &str| {
        let firsts: std::collections::HashMap<&str, &str> = submission
            .lines()
            .skip(1)
            .map(|l| {
                let (image, ids) = l.split_once(',').unwrap();
                (image, ids.split(' ').next().unwrap())
            })
            .collect();
        truth
            .iter()
            .filter(|(image, id)| firsts[image.as_str()] == id.as_str())
            .count()
    };
    assert!(
        first_right(&unwhitened) * 10 >= truth.len() * 8,
        "{unwhitened}"
    );
    let unwhitened_saved = root.join("unwhitened.calibration.json");
    let (ok, _, stderr, again) = predict(
        "unwhitened_again.csv",
        &[
            "--local-whitening",
            "0",
            "--calibration",
            unwhitened_saved.to_str().unwrap(),
        ],
    );
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(again).unwrap(), unwhitened);
    // The saved calibration refuses other settings, naming the file and the setting.
    let saved = saved.to_str().unwrap();
    for (out, flag, value, said) in [
        (
            "third.csv",
            "--local-size",
            "192",
            "fitted for local features",
        ),
        (
            "fourth.csv",
            "--local-score",
            "pairwise",
            "fitted for --local-score lnbnn, not pairwise",
        ),
        (
            "fifth.csv",
            "--identity-score",
            "noisy-or",
            "fitted for --identity-score best, not noisy-or",
        ),
        (
            "sixth.csv",
            "--local-geometry",
            "homography",
            "fitted for --local-geometry affine, not homography",
        ),
        (
            "seventh.csv",
            "--local-whitening",
            "0",
            "fitted for --local-whitening 0.5, not 0",
        ),
    ] {
        let (ok, _, stderr, _) = predict(out, &["--calibration", saved, flag, value]);
        assert!(
            !ok && stderr.contains("first.calibration.json") && stderr.contains(said),
            "{stderr}"
        );
    }
}
