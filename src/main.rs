//! `finprint`: the command line over the finprint library.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use finprint::data::{self, folds, stats::Stats, KaggleDir};
use finprint::embed::{Embeddings, Ensemble};
use finprint::predict;
use finprint::runtime::{self, configure_threads};
use finprint::synth::{self, SynthConfig};
use finprint::train::{
    self,
    run::{Mode, TrainConfig},
};
use finprint::{fsio, metrics};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Print a line on stdout; a closed pipe (`finprint stats | head`) ends the program quietly.
macro_rules! say {
    ($($arg:tt)*) => {{
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
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
}

#[derive(Subcommand)]
enum Command {
    /// Write a synthetic catalogue in Kaggle's layout (rendered fin photos with known identities).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 200)]
        individuals: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Photo width and height in pixels.
        #[arg(long, default_value_t = 384)]
        width: u32,
        #[arg(long, default_value_t = 256)]
        height: u32,
        /// Share of individuals seen only in test images (truth `new_individual`).
        #[arg(long, default_value_t = 0.15)]
        new_share: f64,
        /// Most photos of one individual.
        #[arg(long, default_value_t = 60)]
        max_photos: usize,
    },
    /// Print the statistics of a catalogue's train.csv.
    Stats {
        /// A folder with train.csv (Kaggle layout), or the CSV itself.
        #[arg(long)]
        data: PathBuf,
    },
    /// Score a submission against a solution with MAP@5.
    Score {
        #[arg(long)]
        solution: PathBuf,
        #[arg(long)]
        submission: PathBuf,
    },
    /// Write the k-fold assignment of a catalogue: each photo's fold and role.
    Folds {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 5)]
        folds: usize,
        /// Share of each validation fold's individuals kept out of training.
        #[arg(long, default_value_t = 0.2)]
        new_share: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Crop photos to their fin boxes (from a community box file, or found with --auto).
    Crop(finprint::crops::CropArgs),
    /// Train a model on a Kaggle-format catalogue, validating MAP@5 on a held-out fold.
    Train(Box<TrainArgs>),
    /// Write L2-normalised embeddings of a folder of photos (safetensors, names in metadata).
    Embed {
        /// Trained models (run folders), fused by concatenating their embeddings.
        #[arg(long, value_delimiter = ',', required = true)]
        models: Vec<PathBuf>,
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Mean of each photo's embedding and its mirror image's.
        #[arg(long)]
        flip_tta: bool,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Crop sets embedded and fused by share (`NAME=BOXES.csv[:SHARE]`, see `predict`);
        /// default: the set the first model validated on.
        #[arg(long, value_delimiter = ',')]
        crops: Vec<finprint::crops::CropSet>,
    },
    /// Write a Kaggle submission for DIR/test_images against the catalogue DIR/train.csv.
    Predict {
        #[arg(long, value_delimiter = ',', required = true)]
        models: Vec<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The new_individual threshold (default: the one chosen on the models' validation).
        #[arg(long)]
        threshold: Option<f32>,
        /// Instead of a threshold: put new_individual first for this share of the test photos.
        #[arg(long, conflicts_with = "threshold")]
        new_share: Option<f64>,
        #[arg(long)]
        flip_tta: bool,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Crop sets embedded and fused by share (`NAME=BOXES.csv[+MORE.csv][:SHARE]` or
        /// `full`), their boxes covering train and test photos; default: the set the first
        /// model validated on.
        #[arg(long, value_delimiter = ',')]
        crops: Vec<finprint::crops::CropSet>,
        /// Weight of the ArcFace heads' scores against the kNN scores (default: the one chosen on
        /// the models' validation; 0: kNN alone).
        #[arg(long)]
        fusion_weight: Option<f32>,
    },
    /// Leave-one-out identification over a labelled folder: top-1, top-5, MAP@5.
    Evaluate {
        #[command(flatten)]
        model: ModelArgs,
        /// CSV with columns image,individual_id (image paths relative to --images).
        #[arg(long)]
        labels: PathBuf,
        #[arg(long)]
        images: PathBuf,
        /// A column whose value is part of the identity and restricts the gallery (e.g. view).
        #[arg(long)]
        group: Option<String>,
        #[arg(long)]
        threshold: Option<f32>,
        #[arg(long)]
        flip_tta: bool,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// 95% bootstrap intervals from this many resamples of the animals (individual_id,
        /// whatever --group adds to the identity); 0 for none.
        #[arg(long, default_value_t = 0)]
        bootstrap: usize,
        #[arg(long, default_value_t = 0)]
        bootstrap_seed: u64,
        /// Also evaluate a pretrained backbone's zero-shot features on the same photos and give
        /// the gain over them, with 95% paired-bootstrap intervals (with --bootstrap).
        #[arg(long)]
        baseline: Option<String>,
        /// Also write the figures (and intervals) to this JSON file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Crop sets embedded and fused by share (`NAME=BOXES.csv[:SHARE]`, see `predict`);
        /// default: whole photos.
        #[arg(long, value_delimiter = ',')]
        crops: Vec<finprint::crops::CropSet>,
    },
    /// Draw a run's loss and MAP@5 curves (PNG) and write its Markdown summary.
    Report {
        /// The run folder written by `finprint train`.
        run: PathBuf,
    },
    /// The main job on the synthetic default: synthesise a catalogue, show its statistics,
    /// train a model (fast mode), predict the test photos and score the submission.
    Demo {
        /// The catalogue folder; the run goes to OUT/run (replaced) and the submission to
        /// OUT/submission.csv.
        #[arg(long, default_value = "synth")]
        out: PathBuf,
        #[arg(long, default_value_t = 300)]
        individuals: usize,
        #[arg(long, default_value_t = 10)]
        epochs: usize,
        #[arg(long, default_value_t = 160)]
        img_size: i64,
    },
    /// Serve the identification service (HTTP API and web page) over a catalogue.
    Serve(Box<ServeArgs>),
    /// Import into or export from a catalogue folder.
    #[command(subcommand)]
    Catalog(CatalogCommand),
}

/// The models that embed photos: trained runs, or a pretrained backbone's features.
#[derive(clap::Args)]
struct ModelArgs {
    /// Trained models (run folders), fused by concatenating their embeddings.
    #[arg(long, value_delimiter = ',', required_unless_present = "zero_shot")]
    models: Vec<PathBuf>,
    /// Instead of trained models: a pretrained backbone's GeM features (the baseline; no
    /// training needed).
    #[arg(long, conflicts_with = "models")]
    zero_shot: Option<String>,
    /// Input size for --zero-shot (default: the backbone's own).
    #[arg(long)]
    img_size: Option<i64>,
}

impl ModelArgs {
    fn spec(self) -> finprint::catalog::ModelSpec {
        match self.zero_shot {
            Some(backbone) => finprint::catalog::ModelSpec::ZeroShot {
                backbone,
                img_size: self.img_size,
            },
            None => finprint::catalog::ModelSpec::Runs(self.models),
        }
    }
}

/// `finprint serve`.
#[derive(clap::Args)]
struct ServeArgs {
    /// The catalogue folder (created when missing).
    #[arg(long)]
    catalog: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// The new_individual threshold (default: the one the models saved; 0 for --zero-shot).
    #[arg(long)]
    threshold: Option<f32>,
    /// A Kaggle folder (train.csv, train_images/) or a finprint export imported into an empty
    /// catalogue; ignored once the catalogue holds photos.
    #[arg(long)]
    import: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// The token that writes need (default: $FINPRINT_TOKEN, else a random one, printed).
    #[arg(long)]
    token: Option<String>,
    /// Largest photo accepted, in megabytes.
    #[arg(long, default_value_t = 20.0)]
    max_upload_mb: f64,
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Import a Kaggle folder (train.csv, train_images/) or a finprint export into an empty
    /// catalogue.
    Import {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long)]
        from: PathBuf,
        /// Who the import decisions are recorded as.
        #[arg(long, default_value = "import")]
        by: String,
    },
    /// Export a catalogue: individuals.csv, photos.csv, decisions.csv, train.csv and
    /// train_images/ (imports back unchanged).
    Export {
        #[arg(long)]
        catalog: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

/// `finprint train`: flags override the `--config` file (or the defaults).
#[derive(clap::Args)]
struct TrainArgs {
    /// A folder in Kaggle's layout.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Backbone variant (e.g. efficientnet_lite0); with --mode frozen, one or more,
    /// comma-separated (e.g. efficientnet_lite0,efficientnet_lite1,efficientnet_lite2).
    #[arg(long)]
    model: Option<String>,
    /// The run folder (checkpoints, metrics, summary).
    #[arg(long)]
    out: PathBuf,
    /// A JSON training config; see `train_config.json` of any run for its form.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    fold: Option<usize>,
    #[arg(long)]
    folds: Option<usize>,
    #[arg(long)]
    new_share: Option<f64>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    img_size: Option<i64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    head_lr_mult: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// full: fine-tune everything; fast: freeze and cache the early backbone stages; frozen: no
    /// gradient steps, the pretrained features whitened on the training identities.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    #[arg(long)]
    freeze_stages: Option<usize>,
    #[arg(long)]
    aug_passes: Option<usize>,
    #[arg(long)]
    embedding_size: Option<i64>,
    /// ArcFace scale and margin.
    #[arg(long)]
    arc_s: Option<f64>,
    #[arg(long)]
    arc_m: Option<f64>,
    /// Horizontal-flip probability of the augmentations (0 where a mirror changes identity).
    #[arg(long)]
    hflip_p: Option<f64>,
    #[arg(long)]
    pretrained: Option<bool>,
    /// Fuse the pretrained backbone's own features with the trained embedding, at the weight
    /// validation finds best (default true; 0 is among the weights tried).
    #[arg(long)]
    fuse_pretrained: Option<bool>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    val_every: Option<usize>,
    /// Crop sets mixed in training by share, `NAME=BOXES.csv[+MORE.csv][:SHARE]` or
    /// `full[:SHARE]`, comma-separated; validation (and predict) use the first.
    #[arg(long, value_delimiter = ',')]
    crops: Vec<finprint::crops::CropSet>,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut c = match &self.config {
            Some(path) => TrainConfig::load(path)?,
            None => TrainConfig::default(),
        };
        macro_rules! set {
            ($($flag:ident => $field:expr),* $(,)?) => {
                $(if let Some(v) = self.$flag.clone() { $field = v; })*
            };
        }
        set!(data => c.data, model => c.model, fold => c.fold, folds => c.folds,
            new_share => c.new_share, epochs => c.epochs, batch_size => c.batch_size, lr => c.lr,
            head_lr_mult => c.head_lr_mult, weight_decay => c.weight_decay,
            warmup_epochs => c.warmup_epochs, mode => c.mode, aug_passes => c.aug_passes,
            embedding_size => c.embedding_size, arc_s => c.arcface.s, arc_m => c.arcface.m,
            hflip_p => c.augment.hflip_p, pretrained => c.pretrained, seed => c.seed,
            val_every => c.val_every, fuse_pretrained => c.fuse_pretrained);
        if self.img_size.is_some() {
            c.img_size = self.img_size;
        }
        if self.freeze_stages.is_some() {
            c.freeze_stages = self.freeze_stages;
        }
        if self.threads.is_some() {
            c.threads = self.threads;
        }
        if !self.crops.is_empty() {
            c.crops = self.crops.clone();
        }
        Ok(c)
    }
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Crop(args) => {
            say!("{}", finprint::crops::run(&args)?);
            Ok(())
        }
        Command::Synth {
            out,
            individuals,
            seed,
            width,
            height,
            new_share,
            max_photos,
        } => {
            let cfg = SynthConfig {
                individuals,
                seed,
                width,
                height,
                new_share,
                max_photos,
                ..SynthConfig::default()
            };
            synthesise(&out, &cfg)
        }
        Command::Stats { data } => {
            say!("{}", stats(&data)?);
            Ok(())
        }
        Command::Score {
            solution,
            submission,
        } => {
            say!("MAP@5 {:.5}", score(&solution, &submission)?);
            Ok(())
        }
        Command::Folds {
            data,
            out,
            folds,
            new_share,
            seed,
        } => write_folds(&data, &out, folds, new_share, seed),
        Command::Train(args) => {
            let summary = train::run::train(&args.config()?, &args.out, args.resume)?;
            say!(
                "best validation MAP@5 {:.4} at epoch {} of {} (zero-shot {}), new_individual threshold {:.3}; run in {}",
                summary.best_map5,
                summary.best_epoch,
                summary.epochs,
                summary.zero_shot_map5.map_or("-".into(), |z| format!("{z:.4}")),
                summary.threshold,
                args.out.display()
            );
            Ok(())
        }
        Command::Embed {
            models,
            images,
            out,
            flip_tta,
            batch_size,
            crops,
        } => {
            configure_threads(None);
            let ensemble = Ensemble::load(&models, runtime::device())?;
            let crops = match crops.is_empty() {
                true => finprint::train::run::validation_crops(&models[0])?,
                false => crops,
            };
            let names = data::image::list_photos(&images)?;
            let progress = bar(0, "embedding");
            let sets = finprint::crops::sets::load_sets(&crops)?;
            let vectors = predict::embed_crops(
                &ensemble, &sets, &images, &names, batch_size, flip_tta, &progress,
            )?;
            progress.finish_and_clear();
            let count = names.len();
            let dim = vectors.len() / count.max(1);
            Embeddings {
                names,
                dim,
                vectors,
            }
            .save(&out)?;
            say!(
                "wrote {count} embeddings of {dim} dimensions to {}",
                out.display()
            );
            Ok(())
        }
        Command::Predict {
            models,
            data,
            out,
            threshold,
            new_share,
            flip_tta,
            batch_size,
            crops,
            fusion_weight,
        } => {
            configure_threads(None);
            let mut ensemble = Ensemble::load(&models, runtime::device())?;
            if let Some(w) = fusion_weight {
                ensemble.fusion_weight = w;
            }
            let crops = match crops.is_empty() {
                true => finprint::train::run::validation_crops(&models[0])?,
                false => crops,
            };
            let rule = match new_share {
                Some(share) => predict::NewRule::Share(share),
                None => predict::NewRule::Threshold(
                    threshold.map_or_else(|| (&ensemble).into(), predict::Thresholds::global),
                ),
            };
            let progress = bar(0, "embedding");
            let predictions = predict::predict_submission(
                &ensemble,
                &KaggleDir::new(&data),
                &crops,
                &rule,
                batch_size,
                flip_tta,
                &progress,
            )?;
            progress.finish_and_clear();
            data::write_submission(&out, &predictions)?;
            say!(
                "wrote {} predictions to {} (new_individual: {rule:?})",
                predictions.len(),
                out.display()
            );
            Ok(())
        }
        Command::Evaluate {
            model,
            labels,
            images,
            group,
            threshold,
            flip_tta,
            batch_size,
            bootstrap,
            bootstrap_seed,
            baseline,
            json,
            crops,
        } => {
            configure_threads(None);
            let ensemble = model.spec().load(threshold, runtime::device())?;
            let table = data::CsvFile::read(&labels)?;
            let (ci, cid) = (table.column("image")?, table.column("individual_id")?);
            let cg = group.as_deref().map(|g| table.column(g)).transpose()?;
            let mut names = Vec::new();
            let mut ids = Vec::new();
            let mut groups = Vec::new();
            let mut animals = Vec::new();
            for row in table.rows() {
                names.push(row.field(ci)?.to_string());
                animals.push(row.field(cid)?.to_string());
                let g = cg.map(|c| row.field(c)).transpose()?.unwrap_or("");
                ids.push(format!(
                    "{}{}{g}",
                    row.field(cid)?,
                    if g.is_empty() { "" } else { "/" }
                ));
                groups.push(g.to_string());
            }
            let sets = finprint::crops::sets::load_sets(&crops)?;
            let evaluate = |ensemble: &Ensemble, threshold: f32| {
                let progress = bar(0, "embedding");
                let emb = predict::embed_crops(
                    ensemble, &sets, &images, &names, batch_size, flip_tta, &progress,
                )?;
                progress.finish_and_clear();
                predict::leave_one_out(
                    &emb,
                    ensemble.dim(),
                    &ids,
                    cg.map(|_| groups.as_slice()),
                    threshold,
                )
            };
            let r = evaluate(&ensemble, threshold.unwrap_or(ensemble.threshold))?;
            say!(
                "{} photos, {} with another photo of their identity",
                r.queries,
                r.known_queries
            );
            say!(
                "top-1 {:.4}  top-5 {:.4}  MAP@5 {:.4}  (identities ranked, known queries)",
                r.top1,
                r.top5,
                r.map5_known
            );
            say!(
                "MAP@5 {:.4} with new_individual at threshold {:.3} (best threshold here {:.3}: {:.4})",
                r.map5, r.threshold, r.best_threshold, r.best_map5
            );
            let ci = (bootstrap > 0).then(|| r.bootstrap(&animals, bootstrap, bootstrap_seed));
            if let Some(b) = &ci {
                say!(
                    "95% intervals over {} animals ({} resamples): top-1 {:.4}–{:.4}  top-5 {:.4}–{:.4}  MAP@5 {:.4}–{:.4}",
                    b.units, b.resamples, b.top1[0], b.top1[1], b.top5[0], b.top5[1], b.map5[0], b.map5[1]
                );
            }
            let mut compared = None;
            if let Some(backbone) = &baseline {
                let zero_shot = Ensemble::zero_shot(backbone, None, 0.0, runtime::device())?;
                let base = evaluate(&zero_shot, r.threshold)?;
                let d = r.paired_bootstrap(&base, &animals, bootstrap, bootstrap_seed)?;
                let ci = |v: [f64; 2]| match bootstrap {
                    0 => String::new(),
                    _ => format!(" ({:+.4} to {:+.4})", v[0], v[1]),
                };
                say!(
                    "gain over zero-shot {backbone} (MAP@5 {:.4}): top-1 {:+.4}{}  top-5 {:+.4}{}  MAP@5 {:+.4}{}",
                    base.map5_known,
                    d.top1,
                    ci(d.interval.top1),
                    d.top5,
                    ci(d.interval.top5),
                    d.map5,
                    ci(d.interval.map5)
                );
                compared =
                    Some(serde_json::json!({ "backbone": backbone, "report": base, "gain": d }));
            }
            if let Some(path) = json {
                let value =
                    serde_json::json!({ "report": r, "bootstrap": ci, "baseline": compared });
                fsio::write_bytes_atomic(&path, serde_json::to_string_pretty(&value)?.as_bytes())?;
            }
            Ok(())
        }
        Command::Serve(args) => serve(*args),
        Command::Catalog(CatalogCommand::Import { catalog, from, by }) => {
            let progress = bar(0, "copying photos");
            let s = finprint::catalog::Catalog::open(&catalog)?.import(&from, &by, &progress)?;
            progress.finish_and_clear();
            say!(
                "imported {} individuals, {} photos and {} decisions into {}",
                s.individuals,
                s.photos,
                s.decisions,
                catalog.display()
            );
            Ok(())
        }
        Command::Catalog(CatalogCommand::Export { catalog, out }) => {
            let progress = bar(0, "copying photos");
            let s = finprint::catalog::Catalog::open(&catalog)?.export(&out, &progress)?;
            progress.finish_and_clear();
            say!(
                "exported {} individuals, {} photos and {} decisions to {}",
                s.individuals,
                s.photos,
                s.decisions,
                out.display()
            );
            Ok(())
        }
        Command::Report { run } => {
            let files = train::report::report(&run)?;
            say!(
                "wrote {}, {} and {}",
                files.markdown.display(),
                files.map_png.display(),
                files.loss_png.display()
            );
            Ok(())
        }
        Command::Demo {
            out,
            individuals,
            epochs,
            img_size,
        } => {
            let cfg = SynthConfig {
                individuals,
                ..SynthConfig::default()
            };
            synthesise(&out, &cfg)?;
            say!("{}", stats(&out)?);
            let kaggle = KaggleDir::new(&out);
            let baseline = score(&kaggle.test_solution(), &kaggle.sample_submission())?;
            say!("sample submission MAP@5 {baseline:.5}");

            let run = out.join("run");
            if run.exists() {
                std::fs::remove_dir_all(&run)
                    .with_context(|| format!("cannot replace {}", run.display()))?;
            }
            // The seed trains on crops of the animal: here the built-in saliency crop's boxes
            // (no detector weights needed), mixed with some whole photos.
            let boxes = out.join("auto_boxes.csv");
            let n = finprint::crops::sets::write_auto_boxes(
                &[kaggle.train_images(), kaggle.test_images()],
                &boxes,
            )?;
            say!(
                "found the animal in {n} photos by saliency: {}",
                boxes.display()
            );
            let train_cfg = TrainConfig {
                data: out.clone(),
                mode: Mode::Fast,
                epochs,
                img_size: Some(img_size),
                lr: 1e-3,
                aug_passes: 3,
                crops: vec![
                    format!("auto={}:0.85", boxes.display()).parse()?,
                    "full:0.15".parse()?,
                ],
                ..TrainConfig::default()
            };
            let summary = train::run::train(&train_cfg, &run, false)?;
            train::report::report(&run)?;
            say!(
                "trained: validation MAP@5 {:.4} (zero-shot {}), report in {}",
                summary.best_map5,
                summary
                    .zero_shot_map5
                    .map_or("-".into(), |z| format!("{z:.4}")),
                run.join("report.md").display()
            );

            let ensemble = Ensemble::load(std::slice::from_ref(&run), runtime::device())?;
            let progress = bar(0, "embedding");
            let predictions = predict::predict_submission(
                &ensemble,
                &kaggle,
                &train::run::validation_crops(&run)?,
                &predict::NewRule::Threshold((&ensemble).into()),
                32,
                false,
                &progress,
            )?;
            progress.finish_and_clear();
            let submission = out.join("submission.csv");
            data::write_submission(&submission, &predictions)?;
            let map = score(&kaggle.test_solution(), &submission)?;
            say!(
                "test MAP@5 {map:.5} ({} against {})",
                submission.display(),
                kaggle.test_solution().display()
            );
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    use finprint::service;
    configure_threads(args.threads);
    let opts = service::ServeOptions {
        catalog: args.catalog.clone(),
        import: args.import,
        model: args.model.spec(),
        threshold: args.threshold,
    };
    let progress = bar(0, "opening the catalogue");
    let (catalog, said) = service::open_catalog(&opts, &progress)?;
    progress.finish_and_clear();
    let counts = catalog.counts()?;
    say!(
        "catalogue {}: {} individuals, {} photos ({said})",
        args.catalog.display(),
        counts.individuals,
        counts.photos
    );
    let token = args
        .token
        .or_else(|| std::env::var("FINPRINT_TOKEN").ok())
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(service::random_token);
    anyhow::ensure!(args.max_upload_mb > 0.0, "--max-upload-mb must be positive");
    let max_upload = (args.max_upload_mb * 1e6) as usize;
    let state = service::AppState::new(std::sync::Arc::new(catalog), token.clone(), max_upload);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(&args.addr)
                .await
                .with_context(|| format!("cannot listen on {}", args.addr))?;
            let addr = listener.local_addr()?;
            say!("finprint serving on http://{addr}/#token={token}  (Ctrl-C stops)");
            service::serve(state, listener).await
        })
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(what.to_string());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

fn synthesise(out: &Path, cfg: &SynthConfig) -> Result<()> {
    let progress = bar(0, "rendering photos");
    let summary = synth::generate(&KaggleDir::new(out), cfg, &progress)?;
    progress.finish_and_clear();
    say!(
        "wrote {}: {} individuals ({} only in test), {} train and {} test photos",
        out.display(),
        summary.individuals,
        summary.new_individuals,
        summary.train_images,
        summary.test_images
    );
    Ok(())
}

/// `train.csv` inside a Kaggle folder, or the path itself when it names a file.
fn train_csv(data: &Path) -> PathBuf {
    if data.is_dir() {
        KaggleDir::new(data).train_csv()
    } else {
        data.to_path_buf()
    }
}

fn stats(data: &Path) -> Result<Stats> {
    let set = data::read_train_csv(&train_csv(data))?;
    Ok(Stats::of(&set))
}

fn score(solution: &Path, submission: &Path) -> Result<f64> {
    let solution_rows = data::read_solution(solution)?;
    let predictions = data::read_submission(submission)?;
    metrics::map_at_5(&solution_rows, &predictions).with_context(|| {
        format!(
            "scoring {} against {}",
            submission.display(),
            solution.display()
        )
    })
}

fn write_folds(data: &Path, out: &Path, k: usize, new_share: f64, seed: u64) -> Result<()> {
    anyhow::ensure!(k >= 2, "--folds must be at least 2");
    let set = data::read_train_csv(&train_csv(data))?;
    let assignments = folds::assign_folds(&set.rows, k, new_share, seed);
    fsio::write_atomic(out, |w| {
        writeln!(w, "image,individual_id,fold,role")?;
        for (r, a) in set.rows.iter().zip(&assignments) {
            writeln!(
                w,
                "{},{},{},{}",
                r.image,
                r.individual_id,
                a.fold,
                a.role.as_str()
            )?;
        }
        Ok(())
    })?;
    for fold in 0..k {
        let s = folds::split(&assignments, fold);
        say!(
            "fold {fold}: {} train, {} validation photos",
            s.train.len(),
            s.val.len()
        );
    }
    say!("wrote {}", out.display());
    Ok(())
}
