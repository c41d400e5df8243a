//! `finprint demo`: the main job on a default that needs nothing from the user. Synthesise a
//! catalogue, show its statistics, score Kaggle's kind of sample submission, find the animal in
//! every photo by saliency, train EfficientNet-Lite0 in fast mode on those crops mixed with
//! whole photos, predict the test photos and score the submission against the truth.

use crate::args::bar;
use crate::crops::sets::{load_sets, write_auto_boxes};
use crate::data::stats::Stats;
use crate::data::{write_submission, KaggleDir};
use crate::embed::EmbedOptions;
use crate::metrics::{score, ScoreArgs};
use crate::network::Engine;
use crate::predict::{predict_submission, NewRule};
use crate::runs::{validation_crops, Ensemble};
use crate::search::IndexSpec;
use crate::synth::{self, SynthConfig};
use crate::train::{self, Mode, TrainConfig};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// `finprint demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// The catalogue folder; the run goes to OUT/run (replaced) and the submission to
    /// OUT/submission.csv.
    #[arg(long, default_value = "synth")]
    pub out: PathBuf,
    /// Individuals synthesised.
    #[arg(long, default_value_t = 300)]
    pub individuals: usize,
    /// Training epochs.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Input size of the model, in pixels.
    #[arg(long, default_value_t = 160)]
    pub img_size: u32,
}

/// Run the demo; `say` prints each step's outcome as it comes.
pub fn run(args: &DemoArgs, say: &mut dyn FnMut(String)) -> Result<()> {
    let out = &args.out;
    let kaggle = KaggleDir::new(out);
    let cfg = SynthConfig {
        individuals: args.individuals,
        ..SynthConfig::default()
    };
    let progress = bar(0, "rendering photos");
    let summary = synth::generate(&kaggle, &cfg, &progress)?;
    progress.finish_and_clear();
    say(format!("wrote {}: {summary}", out.display()));
    say(Stats::of_path(out)?.to_string());
    let scored = |submission: PathBuf| {
        score(&ScoreArgs {
            solution: kaggle.test_solution(),
            submission,
        })
    };
    let baseline = scored(kaggle.sample_submission())?;
    say(format!("sample submission MAP@5 {baseline:.5}"));

    let run = out.join("run");
    if run.exists() {
        std::fs::remove_dir_all(&run)
            .with_context(|| format!("cannot replace {}", run.display()))?;
    }
    // The seed trains on crops of the animal: here the built-in saliency crop's boxes (no
    // detector weights needed), mixed with some whole photos.
    let boxes = out.join("auto_boxes.csv");
    let n = write_auto_boxes(&[kaggle.train_images(), kaggle.test_images()], &boxes)?;
    say(format!(
        "found the animal in {n} photos by saliency: {}",
        boxes.display()
    ));
    let train_cfg = TrainConfig {
        data: crate::data::DataFolders(vec![out.clone()]),
        mode: Mode::Fast,
        epochs: args.epochs,
        img_size: Some(crate::transforms::ImgSize::square(args.img_size)),
        lr: 1e-3,
        aug_passes: 3,
        crops: vec![
            format!("auto={}:0.85", boxes.display()).parse()?,
            "full:0.15".parse()?,
        ],
        ..TrainConfig::default()
    };
    let summary = train::train(&train_cfg, &run, false, &mut *say)?;
    train::report::report(&run)?;
    say(format!(
        "trained: {}; zero-shot features {}; report in {}",
        summary.kept(),
        summary
            .zero_shot_map5
            .map_or("-".into(), |z| format!("{z:.4}")),
        run.join("report.md").display()
    ));

    let ensemble = Ensemble::load(std::slice::from_ref(&run), Engine::default())?;
    let options = EmbedOptions {
        flip_tta: false,
        batch_size: 32,
        crops: Vec::new(),
    };
    let progress = bar(0, "embedding");
    let predictions = predict_submission(
        &ensemble,
        &kaggle,
        &load_sets(&validation_crops(&run)?)?,
        &NewRule::Threshold((&ensemble).into()),
        &options,
        IndexSpec::default(),
        None,
        &progress,
    )?
    .predictions;
    progress.finish_and_clear();
    let submission = out.join("submission.csv");
    write_submission(&submission, &predictions)?;
    let map = scored(submission.clone())?;
    say(format!(
        "test MAP@5 {map:.5} ({} against {})",
        submission.display(),
        kaggle.test_solution().display()
    ));
    Ok(())
}
