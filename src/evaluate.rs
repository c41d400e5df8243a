//! `finprint evaluate`: leave-one-out identification over a labelled folder (see
//! [`crate::crossval`]), with bootstrap intervals, the gain over a zero-shot baseline and the
//! gain of local re-scoring (see [`crate::fusion`]), printed and written as JSON.

use crate::crops::LoadedCropSet;
use crate::crossval::{leave_one_out, Bootstrap, Difference, LooReport, Protocol, Rescorer};
use crate::data::CsvFile;
use crate::embed::EmbedOptions;
use crate::fsio;
use crate::fusion::{self, LocalCost, LocalScores};
use crate::local::calibration::Calibration;
use crate::local::{IdentityScore, LocalArgs};
use crate::runs::{Ensemble, ModelArgs, ModelSpec, ZeroShot};
use crate::search::{Aggregation, IndexSpec};
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use serde::Serialize;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `finprint evaluate`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// CSV with columns image,individual_id (image paths relative to --images).
    #[arg(long)]
    pub labels: PathBuf,
    /// The folder of the photos.
    #[arg(long)]
    pub images: PathBuf,
    /// A column whose value is part of the identity and restricts the gallery (e.g. view).
    #[arg(long)]
    pub group: Option<String>,
    /// A column (e.g. encounter) whose value a query's gallery never shares: photos taken
    /// minutes apart are not matched against each other. Queries whose identity has no photo
    /// outside their own value are new individuals there, and counted.
    #[arg(long, value_name = "COLUMN")]
    pub exclude_same: Option<String>,
    /// The new_individual threshold [default: the one the models saved; 0 for --zero-shot].
    #[arg(long)]
    pub threshold: Option<f32>,
    /// 95% bootstrap intervals from this many resamples of the animals (individual_id,
    /// whatever --group adds to the identity); 0 for none.
    #[arg(long, default_value_t = 0)]
    pub bootstrap: usize,
    /// Seed of the bootstrap's draws.
    #[arg(long, default_value_t = 0)]
    pub bootstrap_seed: u64,
    /// Also evaluate a baseline on the same photos and give the gain over it, with 95%
    /// paired-bootstrap intervals (with --bootstrap): a pretrained backbone's zero-shot
    /// features (a registry name), or another trained run (a folder).
    #[arg(long, value_name = "BACKBONE|RUN")]
    pub baseline: Option<String>,
    /// Also write the figures (and intervals) to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also write each query's outcome to this CSV (image,animal,rank, then embedding_rank
    /// with local features and baseline_rank with --baseline): the rank (1–5) of its true
    /// identity, 0 when not among the first five; queries whose identity has another photo.
    /// Folds evaluated apart pool into one table, for one bootstrap over all their animals.
    #[arg(long, value_name = "CSV")]
    pub queries: Option<PathBuf>,
    /// The search index: flat (exact), flat-f16 or hnsw[:M[,EF]]; an approximate one also
    /// reports its recall of the exact neighbours.
    #[arg(long, default_value_t = IndexSpec::default())]
    pub index: IndexSpec,
    #[command(flatten)]
    pub options: EmbedOptions,
    #[command(flatten)]
    pub local: LocalArgs,
    /// With --local: fuse it with the embedding by probabilities calibrated on these labelled
    /// photos (image,individual_id, in --images) of animals that are not evaluated; without,
    /// the shortlist is ranked by the local score alone.
    #[arg(long, value_name = "CSV", conflicts_with = "calibration")]
    pub calibration_labels: Option<PathBuf>,
    /// With --calibration-labels: save the fitted calibration (JSON) for `predict`, `serve`
    /// and later evaluations.
    #[arg(long, value_name = "FILE", requires = "calibration_labels")]
    pub save_calibration: Option<PathBuf>,
    /// With --local: a calibration saved by --save-calibration (or by `predict`), fitted for
    /// the same model and local settings.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// With --local: the features file (safetensors) where local features are read from and
    /// stored once extracted; without, they are extracted on every run.
    #[arg(long, value_name = "FILE")]
    pub local_features: Option<PathBuf>,
}

/// Fit the fusion on the labelled photos of `labels` (animals that are not evaluated), in
/// `--images`, queried as the evaluation queries.
fn fit_calibration(
    args: &EvaluateArgs,
    labels: &Path,
    spec: &ModelSpec,
    ensemble: &Ensemble,
    sets: &[LoadedCropSet],
    progress: &ProgressBar,
) -> Result<Calibration> {
    let labelled = read_labels(args, labels)?;
    let local = LocalScores::extract(
        &args.local,
        args.local_features.as_deref(),
        &args.images,
        &labelled.names,
        progress,
    )?;
    progress.reset();
    let emb = args
        .options
        .embed(ensemble, sets, &args.images, &labelled.names, progress)?;
    let protocol = Protocol {
        groups: labelled.groups.as_deref(),
        exclude: labelled.excluded.as_deref(),
        index: args.index,
        ..Default::default()
    };
    let model = spec.identity()?;
    fusion::calibrate(
        local,
        &emb,
        ensemble.dim(),
        &labelled.ids,
        &protocol,
        &args.local,
        model,
    )
    .with_context(|| format!("calibrating on {}", labels.display()))
}

/// What `finprint evaluate` found.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub report: LooReport,
    pub bootstrap: Option<Bootstrap>,
    pub baseline: Option<Baseline>,
    /// With `--local`: the embedding's figures alone, and the gain of local re-scoring.
    pub local: Option<LocalGain>,
}

/// What local features add to the embedding, on the same queries.
#[derive(Clone, Debug, Serialize)]
pub struct LocalGain {
    pub embedding: LooReport,
    pub gain: Difference,
    /// Whether the local score was fused with the embedding (else it ranks the shortlist alone).
    pub fused: bool,
    /// Whether the descriptors were whitened (`--local-whitening`).
    pub whitened: bool,
    pub cost: LocalCost,
}

/// The gain over a baseline: a pretrained backbone's zero-shot features, or another run.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// The backbone's name, or the run's folder.
    pub backbone: String,
    /// Whether `backbone` is a trained run.
    pub run: bool,
    pub report: LooReport,
    pub gain: Difference,
}

/// The labelled photos of an evaluation.
struct Labelled {
    names: Vec<String>,
    /// The identity of each photo: its animal, and its group when there is one.
    ids: Vec<String>,
    groups: Option<Vec<String>>,
    /// Each photo's value of the `--exclude-same` column.
    excluded: Option<Vec<String>>,
    /// Each photo's animal: the unit the bootstrap resamples.
    animals: Vec<String>,
}

fn read_labels(args: &EvaluateArgs, path: &Path) -> Result<Labelled> {
    let table = CsvFile::read(path)?;
    let (ci, cid) = (table.column("image")?, table.column("individual_id")?);
    let cg = args.group.as_deref().map(|g| table.column(g)).transpose()?;
    let cx = args
        .exclude_same
        .as_deref()
        .map(|c| table.column(c))
        .transpose()?;
    let mut l = Labelled {
        names: Vec::new(),
        ids: Vec::new(),
        groups: cg.map(|_| Vec::new()),
        excluded: cx.map(|_| Vec::new()),
        animals: Vec::new(),
    };
    for row in table.rows() {
        if let (Some(c), Some(excluded)) = (cx, l.excluded.as_mut()) {
            excluded.push(row.field(c)?.to_string());
        }
        let animal = row.field(cid)?.to_string();
        l.names.push(row.field(ci)?.to_string());
        match (cg, l.groups.as_mut()) {
            (Some(c), Some(groups)) => {
                let g = row.field(c)?;
                l.ids.push(match g.is_empty() {
                    true => animal.clone(),
                    false => format!("{animal}/{g}"),
                });
                groups.push(g.to_string());
            }
            _ => l.ids.push(animal.clone()),
        }
        l.animals.push(animal);
    }
    Ok(l)
}

/// Evaluate the models of `args` by leave-one-out over the labelled photos.
pub fn run(args: &EvaluateArgs, progress: &ProgressBar) -> Result<Evaluation> {
    let calibrated = args.calibration.is_some() || args.calibration_labels.is_some();
    anyhow::ensure!(
        args.local.identity_score == IdentityScore::Best || calibrated,
        "--identity-score {} combines fused probabilities: give --calibration-labels or --calibration",
        args.local.identity_score
    );
    let spec = args.model.spec();
    let ensemble = spec.load(args.threshold)?;
    let labelled = read_labels(args, &args.labels)?;
    let sets = args.options.crop_sets(&spec)?;
    let local = match args.local.enabled() {
        true => Some(LocalScores::extract(
            &args.local,
            args.local_features.as_deref(),
            &args.images,
            &labelled.names,
            progress,
        )?),
        false => None,
    };
    let calibration = match (&local, &args.calibration, &args.calibration_labels) {
        (Some(_), Some(path), _) => {
            let c = Calibration::load(path)?;
            c.check(path, &spec.identity()?, &args.local)?;
            Some(c)
        }
        (Some(_), None, Some(labels)) => {
            let c = fit_calibration(args, labels, &spec, &ensemble, &sets, progress)?;
            if let Some(path) = &args.save_calibration {
                c.save(path)?;
            }
            Some(c)
        }
        _ => None,
    };
    // The calibration's whitening; without one, a whitening fitted on the evaluated photos'
    // own descriptors (no labels needed), as `serve` fits one on its catalogue.
    let whitening = match (&calibration, &local) {
        (Some(c), _) => c.whitening.clone(),
        (None, Some(l)) => l.fit_whitening(args.local.local_whitening)?,
        (None, None) => None,
    };
    let local = match (local, &whitening) {
        (Some(l), Some(w)) => Some(l.whitened(w)?),
        (local, _) => local,
    };
    let fusion = calibration.as_ref().map(|c| c.fusion);
    let local_score = local.as_ref().map(|l| {
        move |query: usize, shortlist: &[(usize, f32)]| l.scores(fusion.as_ref(), query, shortlist)
    });
    let rescorer = local_score.as_ref().map(|s| Rescorer {
        shortlist: args.local.shortlist,
        aggregation: match fusion {
            Some(_) => args.local.identity_score.aggregation(),
            None => Aggregation::Max,
        },
        score: s,
    });
    // Fused scores are probabilities: their threshold is the calibration's.
    let local_threshold = match (&calibration, args.threshold) {
        (Some(c), None) => c.threshold,
        _ => ensemble.threshold,
    };
    let evaluate = |ensemble: &Ensemble, threshold: f32| {
        progress.reset();
        let emb = args
            .options
            .embed(ensemble, &sets, &args.images, &labelled.names, progress)?;
        let protocol = Protocol {
            groups: labelled.groups.as_deref(),
            exclude: labelled.excluded.as_deref(),
            threshold,
            index: args.index,
            rescore: None,
        };
        let embedding = leave_one_out(&emb, ensemble.dim(), &labelled.ids, &protocol)?;
        match &rescorer {
            None => Ok((embedding, None)),
            Some(r) => {
                let local = leave_one_out(
                    &emb,
                    ensemble.dim(),
                    &labelled.ids,
                    &Protocol {
                        rescore: Some(r),
                        threshold: local_threshold,
                        ..protocol
                    },
                )?;
                Ok::<_, anyhow::Error>((local, Some(embedding)))
            }
        }
    };
    // The baseline is loaded before any photo is embedded: a wrong name fails at once.
    let other = match &args.baseline {
        Some(backbone) => {
            let run = Path::new(backbone).is_dir();
            let other = match run {
                true => Ensemble::load(&[backbone.into()], args.model.engine)?,
                false => ModelSpec::ZeroShot(ZeroShot::new(backbone), args.model.engine)
                    .load(Some(0.0))?,
            };
            Some((other, run))
        }
        None => None,
    };
    let (resamples, seed) = (args.bootstrap, args.bootstrap_seed);
    let (report, embedding) = evaluate(&ensemble, ensemble.threshold)?;
    let local = match (embedding, &local) {
        (Some(embedding), Some(scores)) => Some(LocalGain {
            gain: report.paired_bootstrap(&embedding, &labelled.animals, resamples, seed)?,
            embedding,
            fused: calibration.is_some(),
            whitened: whitening.is_some(),
            cost: scores.cost(args.local.shortlist),
        }),
        _ => None,
    };
    let bootstrap = (resamples > 0).then(|| report.bootstrap(&labelled.animals, resamples, seed));
    let baseline = match (&args.baseline, other) {
        (Some(backbone), Some((other, run))) => {
            // A run decides new_individual at its own threshold, zero-shot features at ours.
            let threshold = match run {
                true => args.threshold.unwrap_or(other.threshold),
                false => report.threshold,
            };
            let (base, _) = evaluate(&other, threshold)?;
            let gain = report.paired_bootstrap(&base, &labelled.animals, resamples, seed)?;
            Some(Baseline {
                backbone: backbone.clone(),
                run,
                report: base,
                gain,
            })
        }
        _ => None,
    };
    let evaluation = Evaluation {
        report,
        bootstrap,
        baseline,
        local,
    };
    if let Some(path) = &args.json {
        fsio::write_bytes_atomic(path, serde_json::to_string_pretty(&evaluation)?.as_bytes())?;
    }
    if let Some(path) = &args.queries {
        write_queries(path, &labelled, &evaluation)?;
    }
    Ok(evaluation)
}

/// Each known query's rank of its true identity, by each system of `e` (see
/// [`EvaluateArgs::queries`]).
fn write_queries(path: &Path, labelled: &Labelled, e: &Evaluation) -> Result<()> {
    let mut systems = vec![("rank", &e.report)];
    if let Some(l) = &e.local {
        systems.push(("embedding_rank", &l.embedding));
    }
    if let Some(b) = &e.baseline {
        systems.push(("baseline_rank", &b.report));
    }
    let ranks: Vec<std::collections::HashMap<usize, usize>> = systems
        .iter()
        .map(|(_, r)| {
            let of =
                |rank: &Option<usize>| rank.filter(|&k| k < crate::metrics::K).map_or(0, |k| k + 1);
            r.known_ranks
                .iter()
                .map(|(row, rank)| (*row, of(rank)))
                .collect()
        })
        .collect();
    fsio::write_atomic(path, |w| {
        let names: Vec<&str> = systems.iter().map(|(n, _)| *n).collect();
        writeln!(w, "image,animal,{}", names.join(","))?;
        for (row, _) in &e.report.known_ranks {
            let cells: Vec<String> = ranks
                .iter()
                .map(|r| r.get(row).map_or(String::new(), usize::to_string))
                .collect();
            let (image, animal) = (&labelled.names[*row], &labelled.animals[*row]);
            writeln!(w, "{image},{animal},{}", cells.join(","))?;
        }
        Ok(())
    })
}

impl fmt::Display for Evaluation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.report;
        write!(
            f,
            "{} photos, {} with another photo of their identity",
            r.queries, r.known_queries
        )?;
        match r.skipped {
            0 => writeln!(f)?,
            n => writeln!(
                f,
                " to be found by ({n} more have one only in their own encounter)"
            )?,
        }
        writeln!(
            f,
            "top-1 {:.4}  top-5 {:.4}  MAP@5 {:.4}  (identities ranked, known queries)",
            r.top1, r.top5, r.map5_known
        )?;
        write!(
            f,
            "MAP@5 {:.4} with new_individual at threshold {:.3} (best threshold here {:.3}: {:.4})",
            r.map5, r.threshold, r.best_threshold, r.best_map5
        )?;
        if let Some(recall) = r.recall {
            write!(f, "\nrecall of the exact nearest photos: {recall:.4}")?;
        }
        if let Some(b) = &self.bootstrap {
            write!(
                f,
                "\n95% intervals over {} animals ({} resamples): top-1 {:.4}–{:.4}  top-5 {:.4}–{:.4}  MAP@5 {:.4}–{:.4}",
                b.units, b.resamples, b.top1[0], b.top1[1], b.top5[0], b.top5[1], b.map5[0], b.map5[1]
            )?;
        }
        let ci = |v: [f64; 2]| match self.bootstrap {
            None => String::new(),
            Some(_) => format!(" ({:+.4} to {:+.4})", v[0], v[1]),
        };
        let gains = |d: &Difference| {
            format!(
                "top-1 {:+.4}{}  top-5 {:+.4}{}  MAP@5 {:+.4}{}",
                d.top1,
                ci(d.interval.top1),
                d.top5,
                ci(d.interval.top5),
                d.map5,
                ci(d.interval.map5)
            )
        };
        if let Some(local) = &self.local {
            let e = &local.embedding;
            write!(
                f,
                "\nthe embedding alone: top-1 {:.4}  top-5 {:.4}  MAP@5 {:.4}; local re-scoring{}{} gains {}",
                e.top1,
                e.top5,
                e.map5_known,
                if local.whitened { " (whitened)" } else { "" },
                if local.fused { " (fused, calibrated)" } else { "" },
                gains(&local.gain)
            )?;
            let c = &local.cost;
            let extracted = match c.extracted {
                0 => "all read from the features file".to_string(),
                n => format!(
                    "{:.0} ms to decode and extract each of {n} photos",
                    c.extract_ms
                ),
            };
            write!(
                f,
                "\nlocal features: {:.0} keypoints, {:.0} KB per photo; {extracted}; {:.0} ms to re-score a shortlist of {} (one core)",
                c.keypoints,
                c.bytes_per_photo / 1024.0,
                c.rescore_ms,
                c.shortlist
            )?;
        }
        if let Some(base) = &self.baseline {
            write!(
                f,
                "\ngain over {} (MAP@5 {:.4}): {}",
                match base.run {
                    true => format!("the run {}", base.backbone),
                    false => format!("zero-shot {}", base.backbone),
                },
                base.report.map5_known,
                gains(&base.gain)
            )?;
        }
        Ok(())
    }
}
