//! Training as a user runs it: a killed run resumes to the same weights, and a short run on
//! the synthetic catalogue learns well beyond the pretrained backbone's zero-shot features.

mod common;

use finprint::network::Engine;
use finprint::predict::head_candidates;
use finprint::runs::{read_metrics, Ensemble, TrainSummary};
use finprint::train::PRETRAINED_WEIGHTS;
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tch::Tensor;

use common::{fails_with, finprint, succeeds};

fn synth(dir: &Path, individuals: usize, width: u32, height: u32, seed: u64) {
    common::synth(dir, individuals, width, height, seed);
}

fn epoch_done(run: &Path) -> usize {
    std::fs::read(run.join("last/state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["epoch"].as_u64())
        .unwrap_or(0) as usize
}

fn weights(run: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(run.join("last/model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// `finprint train --data DATA --out OUT`, for the flags each test adds.
fn train_cmd(data: impl AsRef<OsStr>, out: &Path) -> Command {
    let mut c = finprint();
    c.arg("train").arg("--data").arg(data).arg("--out").arg(out);
    c
}

/// `finprint train` in fast mode, without pretrained weights, at 64 px on one thread: a few
/// epochs of a small synthetic catalogue take seconds.
fn tiny_fast_run(data: &Path, out: &Path, epochs: usize) -> Command {
    let mut c = train_cmd(data, out);
    c.args(["--mode", "fast", "--img-size", "64", "--batch-size", "8"]);
    c.args(["--pretrained", "false", "--threads", "1", "--folds", "3"]);
    c.args(["--epochs", &epochs.to_string()]);
    c
}

#[test]
fn a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    synth(&data, 60, 96, 64, 4);
    let epochs = 6;
    let args = |out: &Path| {
        let mut c = tiny_fast_run(&data, out, epochs);
        c.args(["--aug-passes", "2"]);
        c
    };
    let straight = dir.path().join("straight");
    succeeds(&mut args(&straight));

    let killed = dir.path().join("killed");
    let mut child = args(&killed)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while epoch_done(&killed) < 2 && t.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = epoch_done(&killed);
    assert!(
        (2..epochs).contains(&at_kill),
        "killed after epoch {at_kill}"
    );

    // Without --resume the run folder is protected.
    fails_with(&mut args(&killed), "--resume");

    let o = succeeds(args(&killed).arg("--resume"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("resuming after epoch {at_kill}")),
        "{stderr}"
    );

    let (a, b) = (weights(&straight), weights(&killed));
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(ta.equal(tb), "{na} differs after resuming");
    }
    let (ma, mb) = (
        read_metrics(&straight.join("metrics.jsonl")).unwrap(),
        read_metrics(&killed.join("metrics.jsonl")).unwrap(),
    );
    // Without pretrained weights there is no zero-shot baseline (epoch 0): a line per epoch.
    let epochs_seen: Vec<usize> = ma.iter().map(|m| m.epoch).collect();
    assert_eq!(epochs_seen, (1..=epochs).collect::<Vec<_>>());
    let losses = |m: &[finprint::runs::EpochMetrics]| {
        m.iter()
            .map(|e| (e.epoch, e.train_loss, e.val_map5))
            .collect::<Vec<_>>()
    };
    assert_eq!(losses(&ma), losses(&mb));

    succeeds(finprint().args(["report", killed.to_str().unwrap()]));
    for f in ["report.md", "loss.png", "map5.png"] {
        assert!(killed.join(f).is_file(), "{f} missing");
    }
}

/// `--keep last` (the default) keeps the last epoch's model with its validation's threshold;
/// `--keep best` the best-validated epoch's, with that epoch's threshold.
#[test]
fn the_run_keeps_the_last_epochs_model_or_the_best_validated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    synth(&data, 60, 96, 64, 5);
    let epochs = 4;
    for keep in ["last", "best"] {
        let run = dir.path().join(keep);
        succeeds(tiny_fast_run(&data, &run, epochs).args(["--keep", keep, "--lr", "1e-2"]));
        let metrics = read_metrics(&run.join("metrics.jsonl")).unwrap();
        let best = metrics.iter().fold(
            &metrics[0],
            |b, m| if m.val_map5 > b.val_map5 { m } else { b },
        );
        let kept = if keep == "last" {
            metrics.last().unwrap()
        } else {
            best
        };
        let summary: TrainSummary =
            serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
        eprintln!(
            "--keep {keep}: best epoch {}, kept {}",
            best.epoch, summary.kept_epoch
        );
        // At this rate validation peaks before the last epoch, so the two differ.
        assert!(best.epoch < epochs, "the best epoch is the last");
        assert_eq!(summary.best_epoch, best.epoch, "{keep}");
        assert_eq!(summary.kept_epoch, kept.epoch, "{keep}");
        assert_eq!(Some(summary.kept_map5), kept.val_map5, "{keep}");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("best/state.json")).unwrap()).unwrap();
        assert_eq!(state["epoch"].as_u64(), Some(kept.epoch as u64), "{keep}");
        assert_eq!(
            state["threshold"].as_f64().map(|t| t as f32),
            kept.threshold,
            "{keep}"
        );
        if keep == "last" {
            let (a, b) = (
                weights(&run),
                Tensor::read_safetensors(run.join("best/model.safetensors")).unwrap(),
            );
            let b: std::collections::BTreeMap<_, _> = b.into_iter().collect();
            assert!(a.iter().all(|(n, t)| t.equal(&b[n])), "best/ is not last/");
        }
    }
}

fn pretrained_weights_present() -> bool {
    let present = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("weights/efficientnet_lite0.safetensors")
        .is_file();
    if !present {
        eprintln!("skipped: weights/efficientnet_lite0.safetensors absent (run bash tools/fetch_weights.sh)");
    }
    present
}

/// `finprint predict` with `run` (networks run by `engine`) on the catalogue `data` into `sub`,
/// then `finprint score` against its test solution: the test MAP@5.
fn predict_and_score(run: &Path, data: &Path, sub: &Path, engine: &str) -> f64 {
    succeeds(
        finprint()
            .args([
                "predict",
                "--models",
                run.to_str().unwrap(),
                "--engine",
                engine,
            ])
            .args([
                "--data",
                data.to_str().unwrap(),
                "--out",
                sub.to_str().unwrap(),
            ]),
    );
    let o = finprint()
        .args([
            "score",
            "--solution",
            data.join("test_solution.csv").to_str().unwrap(),
            "--submission",
            sub.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let test_map: f64 = text.trim().trim_start_matches("MAP@5 ").parse().unwrap();
    eprintln!("test MAP@5 of predict: {test_map:.4}");
    test_map
}

#[test]
fn a_short_fast_run_beats_zero_shot_features_and_predict_agrees_with_validation() {
    if !pretrained_weights_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    synth(&data, 300, 256, 192, 11);
    let run = dir.path().join("run");
    succeeds(
        train_cmd(&data, &run)
            .args([
                "--mode",
                "fast",
                "--img-size",
                "128",
                "--epochs",
                "10",
                "--lr",
                "1e-3",
            ])
            .args(["--aug-passes", "3", "--folds", "3", "--threads", "2"]),
    );
    let summary: TrainSummary =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let zero_shot = summary.zero_shot_map5.unwrap();
    eprintln!(
        "validation MAP@5: zero-shot {zero_shot:.4}, trained {:.4} (epoch {}; best {:.4} at {})",
        summary.kept_map5, summary.kept_epoch, summary.best_map5, summary.best_epoch
    );
    assert!(
        summary.kept_map5 > zero_shot + 0.08,
        "trained {:.4} vs zero-shot {zero_shot:.4}",
        summary.kept_map5
    );

    let test_map = predict_and_score(&run, &data, &dir.path().join("sub.csv"), "libtorch");
    onnx_engines_run_what_libtorch_runs(&run, &data, test_map);
    assert!(
        test_map > zero_shot + 0.05,
        "test MAP@5 {test_map:.4}, zero-shot validation {zero_shot:.4}"
    );
    assert!(
        (test_map - summary.kept_map5).abs() < 0.12,
        "test MAP@5 {test_map:.4} far from the kept model's validation {:.4}",
        summary.kept_map5
    );
    pretrained_features_join_the_ensemble_at_the_saved_weight(&run);
}

/// The networks training wrote to ONNX in each checkpoint, run by tract and by onnxruntime,
/// embed photos as libtorch does (within 1e-4 with the flip TTA, the pretrained features and
/// the whitening that the run fuses), their heads are libtorch's, and `predict --engine E`
/// scores as libtorch's `predict` did (`libtorch_map`). A checkpoint without its ONNX files
/// is run by onnxruntime all the same, from networks written in memory.
fn onnx_engines_run_what_libtorch_runs(run: &Path, data: &Path, libtorch_map: f64) {
    let onnx = run.join("best/onnx");
    let written = std::fs::read_dir(&onnx).unwrap().count();
    let torch = Ensemble::load(&[run.to_path_buf()], Engine::Libtorch).unwrap();
    assert_eq!(
        written,
        2 * torch.models.len(),
        "an .onnx and a .json per network"
    );
    let mut photos: Vec<_> = std::fs::read_dir(data.join("test_images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    photos.sort();
    photos.truncate(6);
    let load = |i: usize| Ok(finprint::data::image::load_rgb(&photos[i])?);
    let hidden = indicatif::ProgressBar::hidden();
    // Batches of 4: tract plans for 4, then for the last 2.
    let embed = |e: &Ensemble| e.embed(photos.len(), load, 4, true, &hidden).unwrap();
    let want = embed(&torch);
    let max_diff = |got: &[f32]| {
        assert_eq!(want.len(), got.len());
        want.iter()
            .zip(got)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let mut by_file = Vec::new();
    for (engine, name) in [
        (Engine::Tract, "tract"),
        (Engine::Onnxruntime, "onnxruntime"),
    ] {
        let other = Ensemble::load(&[run.to_path_buf()], engine).unwrap();
        let got = embed(&other);
        let diff = max_diff(&got);
        eprintln!(
            "{name} against libtorch: max |diff| {diff:.2e} over {} values",
            got.len()
        );
        assert!(diff <= 1e-4, "{name}: max |diff| {diff}");
        for (t, r) in torch.models.iter().zip(&other.models) {
            assert_eq!(t.heads.identities, r.heads.identities, "{name}");
            assert_eq!(t.heads.species, r.heads.species, "{name}");
        }
        let sub = run.parent().unwrap().join(format!("sub-{name}.csv"));
        let map = predict_and_score(run, data, &sub, name);
        assert!(
            (map - libtorch_map).abs() < 0.01,
            "{name} {map:.4}, libtorch {libtorch_map:.4}"
        );
        by_file = got;
    }
    let bare = run.parent().unwrap().join("no-onnx");
    std::fs::create_dir_all(&bare).unwrap();
    for entry in std::fs::read_dir(run.join("best")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, bare.join(path.file_name().unwrap())).unwrap();
        }
    }
    let in_memory = Ensemble::load(&[bare], Engine::Onnxruntime).unwrap();
    let got = embed(&in_memory);
    let same = by_file.iter().zip(&got).all(|(a, b)| (a - b).abs() <= 1e-6);
    assert!(same, "the networks written in memory embed as the files do");
}

/// A checkpoint whose validation chose to fuse the pretrained features loads them as a member
/// of its own at that weight, and the trained member's ArcFace head still scores.
fn pretrained_features_join_the_ensemble_at_the_saved_weight(run: &Path) {
    let metrics = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert!(metrics[1..].iter().all(|m| m
        .pretrained_weight
        .is_some_and(|w| PRETRAINED_WEIGHTS.contains(&w))));
    let copy = run.parent().unwrap().join("fused");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(run.join("best").join(f), copy.join(f)).unwrap();
    }
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("best/state.json")).unwrap()).unwrap();
    for (w, members) in [(0.0, 1), (0.75, 2)] {
        state["pretrained_weight"] = serde_json::json!(w);
        std::fs::write(copy.join("state.json"), state.to_string()).unwrap();
        let e = Ensemble::load(std::slice::from_ref(&copy), Engine::Libtorch).unwrap();
        assert_eq!(e.models.len(), members);
        assert_eq!(e.dim(), 512 + 1280 * (members - 1));
        if members == 2 {
            assert_eq!(e.weights, [1.0, 0.75]);
            assert!(
                e.models[0].heads.identities.is_some() && e.models[1].heads.identities.is_none()
            );
        }
        let models: Vec<_> = e.models.iter().map(|m| (&m.config, &m.heads)).collect();
        let rows: Vec<f32> = (0..e.dim())
            .map(|i| ((i % 7) as f32 - 3.0) / 50.0)
            .collect();
        let heads = head_candidates(&models, &e.weights, &rows, 1, 3);
        assert_eq!(heads.map(|h| h[0].len()), Some(3), "{members} members");
    }
}

#[test]
fn the_frozen_mode_whitens_pretrained_features_beyond_zero_shot_and_predict_uses_it() {
    if !pretrained_weights_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    synth(&data, 300, 256, 192, 11);
    let run = dir.path().join("run");
    succeeds(
        train_cmd(&data, &run)
            .args(["--mode", "frozen", "--img-size", "128", "--folds", "3"])
            .args(["--model", "efficientnet_lite0,efficientnet_lite1"]),
    );
    let summary: TrainSummary =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let zero_shot = summary.zero_shot_map5.unwrap();
    eprintln!(
        "validation MAP@5: zero-shot {zero_shot:.4}, whitened {:.4}",
        summary.best_map5
    );
    assert!(
        summary.best_map5 > zero_shot + 0.05,
        "whitened {:.4} vs zero-shot {zero_shot:.4}",
        summary.best_map5
    );
    let metrics = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.iter().map(|m| m.epoch).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(metrics[1].val_map5, Some(summary.best_map5));

    let frozen: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("best/frozen.json")).unwrap()).unwrap();
    let e = Ensemble::load(std::slice::from_ref(&run), Engine::Libtorch).unwrap();
    assert_eq!(e.models.len(), 2);
    assert_eq!(e.dim() as u64, frozen["dim"].as_u64().unwrap());

    let test_map = predict_and_score(&run, &data, &dir.path().join("sub.csv"), "libtorch");
    onnx_engines_run_what_libtorch_runs(&run, &data, test_map);
    assert!(
        (test_map - summary.kept_map5).abs() < 0.12,
        "test MAP@5 {test_map:.4} far from the kept model's validation {:.4}",
        summary.kept_map5
    );
}

#[test]
fn a_config_file_is_overridden_by_the_flags_given_and_saved_whole() {
    if !pretrained_weights_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    synth(&data, 30, 96, 64, 4);
    let config = dir.path().join("config.json");
    std::fs::write(
        &config,
        r#"{"seed": 5, "new_share": 0.3, "arcface": {"s": 20.0}, "augment": {"gray_p": 0.2}}"#,
    )
    .unwrap();
    let run = dir.path().join("run");
    succeeds(
        train_cmd(&data, &run)
            .args(["--config", config.to_str().unwrap()])
            .args(["--mode", "frozen", "--img-size", "32", "--threads", "2"])
            .args(["--new-share", "0.25", "--arc-m", "0.4", "--fit", "pad"]),
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("train_config.json")).unwrap()).unwrap();
    // From the file where no flag was given, from the flags where one was, defaults elsewhere.
    assert_eq!(saved["seed"], 5);
    assert_eq!(saved["new_share"], 0.25);
    assert_eq!(saved["arcface"]["s"], 20.0);
    assert_eq!(saved["arcface"]["m"], 0.4);
    assert_eq!(saved["augment"]["gray_p"], 0.2);
    assert_eq!(saved["augment"]["hflip_p"], 0.1);
    assert_eq!(saved["epochs"], 10);
    assert_eq!(saved["img_size"], 32);
    assert_eq!(saved["fit"], "pad");
    assert!(std::path::Path::new(saved["data"].as_str().unwrap()).is_absolute());
}

#[test]
fn several_data_folders_train_one_model_with_their_animals_kept_apart() {
    if !pretrained_weights_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The same catalogue twice: the same ids in both folders, which must not merge.
    let (a, b) = (dir.path().join("north/data"), dir.path().join("south/data"));
    synth(&a, 30, 96, 64, 4);
    synth(&b, 30, 96, 64, 4);
    let run = dir.path().join("run");
    let both = format!("{},{}", a.display(), b.display());
    succeeds(train_cmd(&both, &run).args(["--mode", "frozen", "--img-size", "32", "--folds", "3"]));
    let summary: TrainSummary =
        serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let ids = |d: &Path| {
        finprint::data::read_train_csv(&d.join("train.csv"))
            .unwrap()
            .rows
            .into_iter()
            .map(|r| r.individual_id)
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    assert_eq!(ids(&a), ids(&b));
    // A third of the animals validate and a fifth of those are never trained on.
    let animals = ids(&a) + ids(&b);
    assert!(
        summary.classes > ids(&a) && summary.classes < animals,
        "{} classes from {animals} animals",
        summary.classes
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("train_config.json")).unwrap()).unwrap();
    let saved: Vec<&str> = saved["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(saved, [a.to_str().unwrap(), b.to_str().unwrap()]);

    // The run against itself as the baseline: the same figures, a gain of exactly zero.
    let json = dir.path().join("eval.json");
    let o = succeeds(
        finprint()
            .args(["evaluate", "--models", run.to_str().unwrap()])
            .args(["--labels", a.join("train.csv").to_str().unwrap()])
            .args(["--images", a.join("train_images").to_str().unwrap()])
            .args(["--baseline", run.to_str().unwrap(), "--bootstrap", "20"])
            .args(["--json", json.to_str().unwrap()]),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("gain over the run"), "{out}");
    let e: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(e["baseline"]["report"]["top1"], e["report"]["top1"]);
    for figure in ["top1", "top5", "map5"] {
        assert_eq!(e["baseline"]["gain"][figure], 0.0, "{figure}");
    }
    assert_eq!(e["baseline"]["run"], true);
    // A baseline that is neither a run folder nor a backbone is named.
    fails_with(
        finprint()
            .args(["evaluate", "--models", run.to_str().unwrap()])
            .args(["--labels", a.join("train.csv").to_str().unwrap()])
            .args(["--images", a.join("train_images").to_str().unwrap()])
            .args(["--baseline", "runs/no_such_run"]),
        "no_such_run",
    );

    let missing = dir.path().join("nowhere");
    fails_with(
        train_cmd(
            format!("{},{}", a.display(), missing.display()),
            &dir.path().join("run2"),
        )
        .args(["--mode", "frozen", "--img-size", "32"]),
        "nowhere/train.csv",
    );
}

#[test]
fn a_species_head_learns_the_species_and_predict_uses_it() {
    if !pretrained_weights_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    synth(&data, 80, 160, 120, 21);
    let run = dir.path().join("run");
    succeeds(
        train_cmd(&data, &run)
            .args(["--mode", "fast"])
            .args(["--img-size", "96", "--epochs", "4", "--lr", "1e-3"])
            .args(["--aug-passes", "2", "--folds", "3", "--species-weight", "1"]),
    );
    let metrics = read_metrics(&run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics[0].val_species_accuracy, None,
        "zero-shot has no head"
    );
    let accuracy = metrics.last().unwrap().val_species_accuracy.unwrap();
    // The most common of the 5 species is 40% of the animals.
    assert!(accuracy > 0.6, "species accuracy {accuracy:.3}");
    let e = Ensemble::load(std::slice::from_ref(&run), Engine::Libtorch).unwrap();
    let species = &e.models[0].config.species;
    assert!(
        species.len() >= 4 && e.models[0].heads.species.is_some(),
        "{species:?}"
    );
    succeeds(finprint().args(["report", run.to_str().unwrap()]));
    assert!(std::fs::read_to_string(run.join("report.md"))
        .unwrap()
        .contains("species accuracy"));
    predict_and_score(&run, &data, &dir.path().join("sub.csv"), "libtorch");

    fails_with(
        train_cmd(&data, &dir.path().join("frozen")).args([
            "--mode",
            "frozen",
            "--img-size",
            "32",
            "--species-weight",
            "1",
        ]),
        "--species-weight",
    );
}

#[test]
fn pseudo_labels_grow_the_catalogue_for_a_second_round() {
    if !pretrained_weights_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cat");
    synth(&data, 60, 128, 96, 8);
    let train = |data: &Path, run: &Path| {
        succeeds(train_cmd(data, run).args([
            "--mode",
            "frozen",
            "--img-size",
            "64",
            "--folds",
            "3",
        ]));
    };
    let run = dir.path().join("run");
    train(&data, &run);
    let round2 = dir.path().join("round2");
    let o = succeeds(
        finprint()
            .args(["predict", "--models", run.to_str().unwrap()])
            .args(["--data", data.to_str().unwrap()])
            .args(["--out", dir.path().join("sub.csv").to_str().unwrap()])
            .args(["--pseudo-labels", round2.to_str().unwrap()])
            .args(["--pseudo-min-score", "0.5"]),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let added: usize = out
        .split("pseudo-labels: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(out.contains("right by the test solution"), "{out}");
    let rows = |d: &Path| {
        finprint::data::read_train_csv(&d.join("train.csv"))
            .unwrap()
            .rows
    };
    let grown = rows(&round2);
    assert!(added > 0, "{out}");
    assert_eq!(grown.len(), rows(&data).len() + added);
    // The added photos are test photos of known individuals, linked where train reads them.
    let truth: std::collections::HashMap<String, String> =
        finprint::data::read_solution(&data.join("test_solution.csv"))
            .unwrap()
            .into_iter()
            .map(|r| (r.image, r.individual_id))
            .collect();
    for r in &grown[grown.len() - added..] {
        assert!(truth.contains_key(&r.image), "{}", r.image);
        assert!(round2.join("train_images").join(&r.image).is_file());
    }
    train(&round2, &dir.path().join("run2"));
}
