//! `finprint`: the command line over the finprint library. Each command is a library function
//! taking its typed arguments; this file parses, dispatches and prints.

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use finprint::args::bar;
use finprint::catalog::{ExportArgs, ImportArgs};
use finprint::compare::CompareArgs;
use finprint::crops::CropArgs;
use finprint::data::folds::{self, FoldsArgs};
use finprint::data::stats::{Stats, StatsArgs};
#[cfg(feature = "torch")]
use finprint::demo::DemoArgs;
use finprint::embed::EmbedArgs;
#[cfg(feature = "torch")]
use finprint::embed::ExportOnnxArgs;
use finprint::evaluate::EvaluateArgs;
use finprint::metrics::ScoreArgs;
use finprint::predict::PredictArgs;
use finprint::runtime::configure_threads;
use finprint::service::ServeArgs;
use finprint::synth::SynthArgs;
#[cfg(feature = "torch")]
use finprint::train::config::TrainArgs;
use std::io::Write;
#[cfg(feature = "torch")]
use std::path::PathBuf;

/// Print a line on stdout; a closed pipe (`finprint stats | head`) ends the program quietly.
fn say(line: impl std::fmt::Display) {
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

#[derive(Parser)]
#[command(
    name = "finprint",
    version,
    about = "Identify individual whales and dolphins from photos of their fins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Largest photo decoded, in pixels: larger ones are refused from their header, before
    /// any pixel is allocated.
    #[arg(long, global = true, default_value_t = finprint::data::image::DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Write a synthetic catalogue in Kaggle's layout (rendered fin photos with known identities).
    Synth(SynthArgs),
    /// Print the statistics of a catalogue's train.csv.
    Stats(StatsArgs),
    /// Score a submission against a solution with MAP@5.
    Score(ScoreArgs),
    /// Write the k-fold assignment of a catalogue: each photo's fold and role.
    Folds(FoldsArgs),
    /// Crop photos to their fin boxes (from a community box file, or found with --auto).
    Crop(CropArgs),
    #[cfg(feature = "torch")]
    /// Train a model on a Kaggle-format catalogue, validating MAP@5 on a held-out fold.
    Train(Box<TrainArgs>),
    /// Write L2-normalised embeddings of a folder of photos (safetensors, names in metadata).
    Embed(EmbedArgs),
    #[cfg(feature = "torch")]
    /// Write the networks that embed photos to ONNX, from finprint's own layers (for
    /// onnxruntime, tract or other runtimes): one file per network.
    ExportOnnx(ExportOnnxArgs),
    /// Write a Kaggle submission for DIR/test_images against the catalogue DIR/train.csv.
    Predict(PredictArgs),
    /// Leave-one-out identification over a labelled folder: top-1, top-5, MAP@5.
    Evaluate(EvaluateArgs),
    /// Pool the per-query tables of `evaluate --queries` (cross-validation folds) and compare
    /// systems on them: intervals over animals and paired gains over the first.
    Compare(CompareArgs),
    #[cfg(feature = "torch")]
    /// Draw a run's loss and MAP@5 curves (PNG) and write its Markdown summary.
    Report {
        /// The run folder written by `finprint train`.
        run: PathBuf,
    },
    #[cfg(feature = "torch")]
    /// The main job on the synthetic default: synthesise a catalogue, show its statistics,
    /// train a model (fast mode), predict the test photos and score the submission.
    Demo(DemoArgs),
    /// Serve the identification service (HTTP API and web page) over a catalogue.
    Serve(Box<ServeArgs>),
    /// Import into or export from a catalogue folder.
    #[command(subcommand)]
    Catalog(CatalogCommand),
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Import a Kaggle folder (train.csv, train_images/) or a finprint export into an empty
    /// catalogue.
    Import(ImportArgs),
    /// Export a catalogue: individuals.csv, photos.csv, decisions.csv, train.csv and
    /// train_images/ (imports back unchanged).
    Export(ExportArgs),
}

fn main() {
    finprint::runtime::reuse_freed_memory();
    let matches = Cli::command().get_matches();
    let run = Cli::from_arg_matches(&matches)
        .map_err(anyhow::Error::from)
        .and_then(|cli| run(cli, &matches));
    if let Err(err) = run {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// `matches` holds where each flag's value came from (only `train` asks).
#[cfg_attr(not(feature = "torch"), allow(unused_variables))]
fn run(cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    finprint::data::image::set_max_pixels(cli.max_pixels);
    match cli.command {
        Command::Synth(a) => {
            let progress = bar(0, "rendering photos");
            let summary = finprint::synth::run(&a, &progress)?;
            progress.finish_and_clear();
            say(format!("wrote {}: {summary}", a.out.display()));
        }
        Command::Stats(a) => say(Stats::of_path(&a.data)?),
        Command::Score(a) => say(format!("MAP@5 {:.5}", finprint::metrics::score(&a)?)),
        Command::Folds(a) => {
            for (fold, s) in folds::write(&a)?.iter().enumerate() {
                let (train, val) = (s.train.len(), s.val.len());
                say(format!(
                    "fold {fold}: {train} train, {val} validation photos"
                ));
            }
            say(format!("wrote {}", a.out.display()));
        }
        Command::Crop(a) => say(finprint::crops::run(&a)?),
        #[cfg(feature = "torch")]
        Command::Train(a) => {
            let train_matches = matches.subcommand_matches("train").expect("train matches");
            let config = a.resolve(train_matches)?;
            let summary =
                finprint::train::train(&config, &a.out, a.resume, &mut |l| eprintln!("{l}"))?;
            say(format!("{summary}; run in {}", a.out.display()));
        }
        Command::Embed(a) => {
            configure_threads(None);
            let progress = bar(0, "embedding");
            let e = finprint::embed::run(&a, &progress)?;
            progress.finish_and_clear();
            let (count, dim) = (e.names.len(), e.dim);
            say(format!(
                "wrote {count} embeddings of {dim} dimensions to {}",
                a.out.display()
            ));
        }
        #[cfg(feature = "torch")]
        Command::ExportOnnx(a) => {
            for path in finprint::embed::export_onnx(&a)? {
                say(format!("wrote {}", path.display()));
            }
        }
        Command::Predict(a) => {
            configure_threads(None);
            let progress = bar(0, "embedding");
            let predicted = finprint::predict::run(&a, &progress)?;
            progress.finish_and_clear();
            let out = a.out.display();
            say(format!("wrote {} predictions to {out}", predicted.count));
            say(predicted);
        }
        Command::Evaluate(a) => {
            configure_threads(None);
            let progress = bar(0, "embedding");
            let evaluation = finprint::evaluate::run(&a, &progress)?;
            progress.finish_and_clear();
            say(evaluation);
        }
        Command::Compare(a) => say(finprint::compare::compare(&a)?),
        #[cfg(feature = "torch")]
        Command::Report { run } => say(finprint::train::report::report(&run)?),
        #[cfg(feature = "torch")]
        Command::Demo(a) => finprint::demo::run(&a, &mut |l| say(l))?,
        Command::Serve(a) => finprint::service::run(&a, &mut |l| say(l))?,
        Command::Catalog(CatalogCommand::Import(a)) => {
            let progress = bar(0, "copying photos");
            let s = finprint::catalog::import(&a, &progress)?;
            progress.finish_and_clear();
            say(format!("imported {s} into {}", a.catalog.display()));
        }
        Command::Catalog(CatalogCommand::Export(a)) => {
            let progress = bar(0, "copying photos");
            let s = finprint::catalog::export(&a, &progress)?;
            progress.finish_and_clear();
            say(format!("exported {s} to {}", a.out.display()));
        }
    }
    Ok(())
}
