//! From ranked individuals to answers: `new_individual` inserted by a similarity threshold, and
//! the threshold chosen on validation queries to maximise MAP@5.

use crate::crops::LoadedCropSet;
use crate::crossval::Protocol;
use crate::data::image::list_photos;
use crate::data::pseudo::write_pseudo_labelled;
use crate::data::{read_solution, read_train_csv, write_submission, KaggleDir, Prediction};
use crate::decide::{answers, best_threshold, threshold_for_new_share, Candidate};
use crate::embed::EmbedOptions;
use crate::fusion::{calibrate, LocalScores};
use crate::linalg::top_k;
use crate::local::calibration::Calibration;
use crate::local::LocalArgs;
use crate::metrics::{average_precision_at_5, K};
use crate::model::config::ModelConfig;
use crate::network::{ClassHead, Heads};
use crate::runs::{Ensemble, ModelArgs};
use crate::search::{rank_labels, Aggregation, Index, IndexSpec, Neighbor};
use anyhow::Context;
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The best `top` individuals for each query (row-major `queries`), best first, from a catalogue
/// index whose row `i` shows individual `ids[labels[i]]`.
pub fn rank_candidates(
    index: &dyn Index,
    labels: &[u32],
    ids: &[String],
    queries: &[f32],
    how: Aggregation,
    top: usize,
) -> anyhow::Result<Vec<Vec<Candidate>>> {
    // Enough photos that `top` distinct individuals are almost always among them.
    let k = (top * 20).max(100).min(index.len());
    let found = index.search(queries, k)?;
    Ok(found
        .iter()
        .map(|neighbors| {
            rank_labels(neighbors, labels, how, top)
                .into_iter()
                .map(|(label, score)| Candidate {
                    id: ids[label as usize].clone(),
                    score,
                })
                .collect()
        })
        .collect())
}

/// Queries of a species below which it keeps the global threshold (too few to choose one).
pub const MIN_SPECIES_QUERIES: usize = 20;

/// new_individual thresholds: one global, and per species where validation had enough queries.
/// A query's species is that of its best candidate, since test photos carry no species.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub global: f32,
    #[serde(default)]
    pub by_species: BTreeMap<String, f32>,
}

impl Thresholds {
    pub fn global(t: f32) -> Self {
        Self {
            global: t,
            by_species: BTreeMap::new(),
        }
    }

    /// The threshold for a query whose best candidate is of `species`.
    pub fn for_species(&self, species: Option<&str>) -> f32 {
        species
            .and_then(|s| self.by_species.get(s))
            .copied()
            .unwrap_or(self.global)
    }

    /// The answers of a query: `species_of` maps an individual to its species.
    pub fn answers(
        &self,
        candidates: &[Candidate],
        species_of: &HashMap<String, String>,
    ) -> Vec<String> {
        let species = candidates
            .first()
            .and_then(|c| species_of.get(&c.id))
            .map(String::as_str);
        answers(candidates, self.for_species(species))
    }
}

impl From<&Ensemble> for Thresholds {
    fn from(e: &Ensemble) -> Self {
        Self {
            global: e.threshold,
            by_species: e.species_thresholds.clone(),
        }
    }
}

/// A model of an ensemble as its heads see it: its config (embedding size and class lists)
/// and its heads.
pub type Member<'a> = (&'a ModelConfig, &'a Heads);

/// The cosines `[count, classes]` of the rows of `fused` (row-major `[count, Σ dims]`, the
/// ensemble's fused unit embeddings) to the classes of the heads that `head` picks from
/// `models`, averaged with the squared model weights `weights` (as the fused cosine averages
/// the models' cosines), with those classes. Rows may go on past the models' dimensions (other
/// crop sets), which are ignored, as are members without such a head. `None` when no model has
/// one or those with one do not share one class list.
fn head_cosines<'a>(
    models: &[Member<'a>],
    weights: &[f32],
    fused: &[f32],
    count: usize,
    head: impl Fn(&Member<'a>) -> Option<(&'a ClassHead, &'a [String])>,
) -> Option<(Vec<f32>, &'a [String])> {
    let (_, first) = models.iter().find_map(&head)?;
    if count == 0
        || models
            .iter()
            .any(|m| head(m).is_some_and(|(_, c)| c != first))
    {
        return None;
    }
    let dim = fused.len() / count;
    let norm: f32 = models
        .iter()
        .zip(weights)
        .filter(|(m, _)| head(m).is_some())
        .map(|(_, w)| w * w)
        .sum();
    let mut total = vec![0.0f32; count * first.len()];
    let mut offset = 0;
    for (m, &w) in models.iter().zip(weights) {
        let d = m.0.embedding_size as usize;
        let start = offset;
        offset += d;
        let Some((h, _)) = head(m) else {
            continue;
        };
        let part: Vec<f32> = fused
            .chunks(dim)
            .flat_map(|row| &row[start..start + d])
            .copied()
            .collect();
        let scale = w * w / norm;
        for (t, c) in total.iter_mut().zip(h.cosines(&part, count)) {
            *t += c * scale;
        }
    }
    Some((total, first))
}

/// The `top` best classes of the models' ArcFace heads for each row of `fused` (see
/// [`head_cosines`]); `None` when no model has a head or those with one do not share one
/// class list.
pub fn head_candidates(
    models: &[Member],
    weights: &[f32],
    fused: &[f32],
    count: usize,
    top: usize,
) -> Option<Vec<Vec<Candidate>>> {
    fn identities<'a>(&(c, h): &Member<'a>) -> Option<(&'a ClassHead, &'a [String])> {
        h.identities.as_ref().map(|h| (h, &c.classes[..]))
    }
    let (total, first) = head_cosines(models, weights, fused, count, identities)?;
    Some(
        total
            .chunks(first.len())
            .map(|row| {
                top_k(row, top)
                    .into_iter()
                    .map(|(j, score)| Candidate {
                        id: first[j].clone(),
                        score,
                    })
                    .collect()
            })
            .collect(),
    )
}

/// The species of each row of `fused` by the models' species heads (see [`head_cosines`]);
/// `None` when no model has one.
pub fn species_predictions(
    models: &[Member],
    weights: &[f32],
    fused: &[f32],
    count: usize,
) -> Option<Vec<String>> {
    fn species<'a>(&(c, h): &Member<'a>) -> Option<(&'a ClassHead, &'a [String])> {
        h.species.as_ref().map(|h| (h, &c.species[..]))
    }
    let (total, names) = head_cosines(models, weights, fused, count, species)?;
    Some(
        total
            .chunks(names.len())
            .map(|row| names[top_k(row, 1).first().map_or(0, |&(j, _)| j)].clone())
            .collect(),
    )
}

/// Each query's candidates of `ranked` with those of another species than its `species`
/// moved behind the rest, each part in its order. An individual of unknown species stays with
/// the rest.
pub fn prefer_species(
    ranked: Vec<Vec<Candidate>>,
    species: &[String],
    species_of: &HashMap<String, String>,
) -> Vec<Vec<Candidate>> {
    ranked
        .into_iter()
        .zip(species)
        .map(|(candidates, species)| {
            let (same, other): (Vec<_>, Vec<_>) = candidates
                .into_iter()
                .partition(|c| species_of.get(&c.id).is_none_or(|s| s == species));
            same.into_iter().chain(other).collect()
        })
        .collect()
}

/// The global threshold that maximises MAP@5 over all validation queries, and for each species
/// with at least `min_queries` queries (by its best candidate's species) the one that maximises
/// it over that species' queries. Returns the thresholds and the MAP@5 they give together.
pub fn best_thresholds(
    queries: &[(Vec<Candidate>, String)],
    species_of: &HashMap<String, String>,
    min_queries: usize,
) -> (Thresholds, f64) {
    let (global, _) = best_threshold(queries);
    let mut by_group: BTreeMap<&str, Vec<(Vec<Candidate>, String)>> = BTreeMap::new();
    for q in queries {
        if let Some(s) = q.0.first().and_then(|c| species_of.get(&c.id)) {
            by_group.entry(s).or_default().push(q.clone());
        }
    }
    let by_species = by_group
        .into_iter()
        .filter(|(_, qs)| qs.len() >= min_queries)
        .map(|(s, qs)| (s.to_string(), best_threshold(&qs).0))
        .collect();
    let t = Thresholds { global, by_species };
    let map = queries
        .iter()
        .map(|(c, truth)| average_precision_at_5(truth, &t.answers(c, species_of)))
        .sum::<f64>()
        / queries.len().max(1) as f64;
    (t, map)
}

/// kNN and ArcFace-head scores blended per individual, `(1 − weight)·knn + weight·head`, best
/// first, the `top` best. `knn` and `head` are each a query's best candidates by that score;
/// an individual missing from one list takes that list's lowest score (an upper bound of its
/// own, which is below the list).
pub fn fuse_with_head(
    knn: &[Candidate],
    head: &[Candidate],
    weight: f32,
    top: usize,
) -> Vec<Candidate> {
    let floor = |list: &[Candidate]| list.iter().map(|c| c.score).fold(f32::INFINITY, f32::min);
    let (knn_floor, head_floor) = (floor(knn), floor(head));
    let knn_of: HashMap<&str, f32> = knn.iter().map(|c| (c.id.as_str(), c.score)).collect();
    let head_of: HashMap<&str, f32> = head.iter().map(|c| (c.id.as_str(), c.score)).collect();
    let mut ids: Vec<&str> = knn.iter().chain(head).map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut fused: Vec<Candidate> = ids
        .into_iter()
        .map(|id| {
            let k = knn_of.get(id).copied().unwrap_or(knn_floor);
            let h = head_of.get(id).copied().unwrap_or(head_floor);
            Candidate {
                id: id.to_string(),
                score: (1.0 - weight) * k + weight * h,
            }
        })
        .collect();
    fused.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    fused.truncate(top);
    fused
}

/// Where `new_individual` goes in the answers.
#[derive(Clone, Debug, PartialEq)]
pub enum NewRule {
    /// With local re-scoring: at the calibration's threshold on the fused probability.
    Calibrated,
    /// Before the first candidate whose similarity is below the threshold (of its species).
    Threshold(Thresholds),
    /// First for this share of the queries, those whose best candidate is weakest (the
    /// winners' fixed share of new predictions).
    Share(f64),
}

/// `finprint predict`.
#[derive(Clone, Debug, clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A folder in Kaggle's layout: train.csv and train_images/ are the catalogue,
    /// test_images/ the photos to identify.
    #[arg(long)]
    pub data: PathBuf,
    /// The submission to write (image,predictions).
    #[arg(long)]
    pub out: PathBuf,
    /// The new_individual threshold [default: the one chosen on the models' validation; 0 for
    /// --zero-shot].
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Instead of a threshold: put new_individual first for this share of the test photos
    /// (those whose best candidate is weakest).
    #[arg(long, conflicts_with = "threshold")]
    pub new_share: Option<f64>,
    /// Weight of the ArcFace heads' scores against the kNN scores [default: the one chosen on
    /// the models' validation]; 0: kNN alone.
    #[arg(long)]
    pub fusion_weight: Option<f32>,
    /// The catalogue's search index: flat (exact), flat-f16 or hnsw[:M[,EF]].
    #[arg(long, default_value_t = IndexSpec::default())]
    pub index: IndexSpec,
    #[command(flatten)]
    pub options: EmbedOptions,
    #[command(flatten)]
    pub local: LocalArgs,
    /// With --local: a calibration saved by `predict` or `evaluate --save-calibration`, fitted
    /// for the same model and local settings [default: fitted on the catalogue's own photos
    /// (whole animals, up to 1000 photos) and saved as OUT.calibration.json].
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// With --local: the features file (safetensors) where the catalogue's local features are
    /// read from and stored once extracted; without, they are extracted on every run.
    #[arg(long, value_name = "FILE")]
    pub local_features: Option<PathBuf>,
    /// Also write pseudo-labels: a Kaggle folder whose training photos are the catalogue's and
    /// the test photos identified with a best score of at least --pseudo-min-score, as photos
    /// of that individual. `train --data DIR` on it is the second round.
    #[arg(long, value_name = "DIR")]
    pub pseudo_labels: Option<PathBuf>,
    /// The least score of a pseudo-labelled photo's best candidate (the fused probability with
    /// --local, else the similarity); photos answered new_individual first never count.
    #[arg(long, default_value_t = 0.7)]
    pub pseudo_min_score: f32,
}

/// Test photos labelled for a second round of training.
#[derive(Clone, Debug)]
pub struct Pseudo {
    pub dir: PathBuf,
    pub count: usize,
    /// The share labelled right, where the catalogue has a test solution (synthetic data).
    pub precision: Option<f64>,
}

/// What [`predict_submission`] answers: each test photo's answers and best candidate.
pub struct Submission {
    pub predictions: Vec<Prediction>,
    pub best: Vec<Option<Candidate>>,
    /// With local re-scoring, the calibration used.
    pub calibration: Option<Calibration>,
}

impl Submission {
    /// `(image, individual)` of the photos whose first answer is their best candidate, with
    /// a score of at least `min_score`.
    pub fn confident(&self, min_score: f32) -> Vec<(String, String)> {
        self.predictions
            .iter()
            .zip(&self.best)
            .filter_map(|(p, best)| {
                let best = best.as_ref()?;
                (p.ids.first() == Some(&best.id) && best.score >= min_score)
                    .then(|| (p.image.clone(), best.id.clone()))
            })
            .collect()
    }
}

/// What `finprint predict` did.
#[derive(Debug)]
pub struct Predicted {
    pub count: usize,
    pub rule: NewRule,
    /// With --local: the calibration used, and where it was saved when fitted on the catalogue.
    pub calibration: Option<Calibration>,
    pub calibration_file: Option<PathBuf>,
    pub pseudo: Option<Pseudo>,
}

impl std::fmt::Display for Predicted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.rule, &self.calibration) {
            (NewRule::Calibrated, Some(c)) => write!(
                f,
                "new_individual below a fused probability of {:.3} (calibrated on {} photos, MAP@5 {:.4} there)",
                c.threshold, c.photos, c.map5
            )?,
            (NewRule::Share(share), _) => write!(
                f,
                "new_individual first for the {:.1}% of photos whose best candidate is weakest",
                share * 100.0
            )?,
            (NewRule::Threshold(t), _) => {
                write!(f, "new_individual below a similarity of {:.3}", t.global)?;
                if !t.by_species.is_empty() {
                    let each: Vec<String> = t
                        .by_species
                        .iter()
                        .map(|(species, v)| format!("{species} {v:.3}"))
                        .collect();
                    write!(f, " ({} for its species)", each.join(", "))?;
                }
            }
            (NewRule::Calibrated, None) => write!(f, "new_individual at the calibration's threshold")?,
        }
        if let Some(path) = &self.calibration_file {
            write!(f, "; calibration saved to {}", path.display())?;
        }
        if let Some(p) = &self.pseudo {
            write!(
                f,
                "\npseudo-labels: {} test photos added to the catalogue's in {}",
                p.count,
                p.dir.display()
            )?;
            if let Some(precision) = p.precision {
                write!(
                    f,
                    " ({:.1}% of them right by the test solution)",
                    100.0 * precision
                )?;
            }
        }
        Ok(())
    }
}

/// Local re-scoring in [`predict_submission`].
pub struct LocalPlan<'a> {
    pub args: &'a LocalArgs,
    /// The catalogue's features file.
    pub features: Option<&'a Path>,
    /// A saved calibration to use, or else where to save the one fitted on the catalogue.
    pub calibration: Result<&'a Path, PathBuf>,
    /// The embedding model's identity, which a calibration is fitted for.
    pub model: String,
}

/// Catalogue photos the calibration is fitted on, at most (whole animals).
pub const CALIBRATION_PHOTOS: usize = 1000;

/// Predict `test_images/` of `args.data` and write the submission; returns the rule that
/// placed new_individual and the number of predictions.
pub fn run(args: &PredictArgs, progress: &ProgressBar) -> anyhow::Result<Predicted> {
    let spec = args.model.spec();
    let mut ensemble = spec.load(None)?;
    if let Some(w) = args.fusion_weight {
        ensemble.fusion_weight = w;
    }
    let local = match args.local.enabled() {
        true => Some(LocalPlan {
            args: &args.local,
            features: args.local_features.as_deref(),
            calibration: args
                .calibration
                .as_deref()
                .ok_or_else(|| args.out.with_extension("calibration.json")),
            model: spec.identity()?,
        }),
        false => None,
    };
    let rule = match (args.new_share, args.threshold) {
        (Some(share), _) => NewRule::Share(share),
        (None, Some(t)) => NewRule::Threshold(Thresholds::global(t)),
        (None, None) if local.is_some() => NewRule::Calibrated,
        (None, None) => NewRule::Threshold((&ensemble).into()),
    };
    let sets = args.options.crop_sets(&spec)?;
    let data = KaggleDir::new(&args.data);
    let submission = predict_submission(
        &ensemble,
        &data,
        &sets,
        &rule,
        &args.options,
        args.index,
        local.as_ref(),
        progress,
    )?;
    write_submission(&args.out, &submission.predictions)?;
    let pseudo = match &args.pseudo_labels {
        Some(dir) => {
            let labels = submission.confident(args.pseudo_min_score);
            write_pseudo_labelled(&data, &labels, dir)?;
            let precision = match data.test_solution().is_file() {
                true => {
                    let truth: HashMap<String, String> = read_solution(&data.test_solution())?
                        .into_iter()
                        .map(|r| (r.image, r.individual_id))
                        .collect();
                    let right = labels.iter().filter(|(i, id)| truth.get(i) == Some(id));
                    Some(right.count() as f64 / labels.len().max(1) as f64)
                }
                false => None,
            };
            Some(Pseudo {
                dir: dir.clone(),
                count: labels.len(),
                precision,
            })
        }
        None => None,
    };
    Ok(Predicted {
        count: submission.predictions.len(),
        rule,
        calibration: submission.calibration,
        calibration_file: local.and_then(|l| l.calibration.err()),
        pseudo,
    })
}

/// A Kaggle submission for `test_images/` of `data`: every photo of `train.csv` is the
/// catalogue (searched through an index of kind `index`), ranked per individual by its best
/// photo (after local re-scoring of the shortlist, with `local`), `new_individual` by the rule.
#[allow(clippy::too_many_arguments)]
pub fn predict_submission(
    ensemble: &Ensemble,
    data: &KaggleDir,
    sets: &[LoadedCropSet],
    new_rule: &NewRule,
    options: &EmbedOptions,
    index: IndexSpec,
    local: Option<&LocalPlan>,
    progress: &ProgressBar,
) -> anyhow::Result<Submission> {
    let train = read_train_csv(&data.train_csv())?;
    let tests = list_photos(&data.test_images())?;
    anyhow::ensure!(
        !train.rows.is_empty(),
        "{} lists no photo",
        data.train_csv().display()
    );
    anyhow::ensure!(
        !tests.is_empty(),
        "{} holds no photo to predict (.jpg, .jpeg or .png)",
        data.test_images().display()
    );
    let names: Vec<String> = train.rows.iter().map(|r| r.image.clone()).collect();
    progress.set_message("embedding the catalogue");
    let gallery = options.embed(ensemble, sets, &data.train_images(), &names, progress)?;
    progress.set_message("embedding the test photos");
    let queries = options.embed(ensemble, sets, &data.test_images(), &tests, progress)?;
    let mut ids: Vec<String> = train.rows.iter().map(|r| r.individual_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let labels: Vec<u32> = train
        .rows
        .iter()
        .map(|r| ids.binary_search(&r.individual_id).map_or(0, |i| i as u32))
        .collect();
    let index = index.build_with(gallery.len() / names.len(), &gallery)?;
    let encounters: Vec<Option<String>> = train.rows.iter().map(|r| r.encounter.clone()).collect();
    let models: Vec<Member> = ensemble
        .models
        .iter()
        .map(|m| (&m.config, &m.heads))
        .collect();
    let (ranked, calibrated) = match local {
        Some(plan) => {
            let dim = gallery.len() / names.len();
            let (ranked, c) = rank_with_local(
                plan,
                data,
                &names,
                &tests,
                &train_ids(&train),
                &encounters,
                &gallery,
                &queries,
                dim,
                index.as_ref(),
                &labels,
                &ids,
                progress,
            )?;
            (ranked, Some(c))
        }
        None => {
            let knn = rank_candidates(
                index.as_ref(),
                &labels,
                &ids,
                &queries,
                Aggregation::Max,
                FUSION_DEPTH,
            )?;
            let heads = if ensemble.fusion_weight > 0.0 {
                head_candidates(
                    &models,
                    &ensemble.weights,
                    &queries,
                    tests.len(),
                    FUSION_DEPTH,
                )
            } else {
                None
            };
            (
                fuse_all(knn, heads.as_deref(), ensemble.fusion_weight),
                None,
            )
        }
    };
    let species_of: HashMap<String, String> = train
        .rows
        .iter()
        .map(|r| (r.individual_id.clone(), r.species.clone()))
        .collect();
    let ranked = match species_predictions(&models, &ensemble.weights, &queries, tests.len()) {
        Some(species) => prefer_species(ranked, &species, &species_of),
        None => ranked,
    };
    let thresholds = match new_rule {
        NewRule::Threshold(t) => t.clone(),
        NewRule::Calibrated => Thresholds::global(
            calibrated
                .as_ref()
                .context("new_individual by a calibration needs local re-scoring")?
                .threshold,
        ),
        NewRule::Share(share) => {
            let best: Vec<f32> = ranked
                .iter()
                .filter_map(|c| c.first().map(|c| c.score))
                .collect();
            Thresholds::global(threshold_for_new_share(&best, *share))
        }
    };
    let best = ranked.iter().map(|c| c.first().cloned()).collect();
    let predictions = tests
        .into_iter()
        .zip(ranked)
        .map(|(image, c)| Prediction {
            image,
            ids: thresholds.answers(&c, &species_of),
        })
        .collect();
    Ok(Submission {
        predictions,
        best,
        calibration: calibrated,
    })
}

fn train_ids(train: &crate::data::TrainSet) -> Vec<String> {
    train.rows.iter().map(|r| r.individual_id.clone()).collect()
}

/// Each test photo's candidates ranked by the fused probabilities of its shortlist (the
/// `plan.args.shortlist` catalogue photos nearest by the embedding), with the calibration used.
/// `gallery` and `queries` are the embeddings of the catalogue photos `names` (identities
/// `photo_ids`, encounters `encounters`, labels `labels` into `ids`) and of the test photos
/// `tests`.
#[allow(clippy::too_many_arguments)]
fn rank_with_local(
    plan: &LocalPlan,
    data: &KaggleDir,
    names: &[String],
    tests: &[String],
    photo_ids: &[String],
    encounters: &[Option<String>],
    gallery: &[f32],
    queries: &[f32],
    dim: usize,
    index: &dyn Index,
    labels: &[u32],
    ids: &[String],
    progress: &ProgressBar,
) -> anyhow::Result<(Vec<Vec<Candidate>>, Calibration)> {
    let a = plan.args;
    let mut local = LocalScores::extract(a, plan.features, &data.train_images(), names, progress)?;
    let calibration = match &plan.calibration {
        Ok(path) => {
            let c = Calibration::load(path)?;
            c.check(path, &plan.model, a)?;
            c
        }
        Err(save_to) => {
            progress.set_message("calibrating on the catalogue");
            let rows = calibration_rows(photo_ids, CALIBRATION_PHOTOS);
            let sample_ids: Vec<String> = rows.iter().map(|&i| photo_ids[i].clone()).collect();
            let emb: Vec<f32> = rows
                .iter()
                .flat_map(|&i| gallery[i * dim..(i + 1) * dim].iter().copied())
                .collect();
            // Photos of one encounter are not matched against each other, as in training.
            let encounters: Option<Vec<String>> = rows
                .iter()
                .map(|&i| encounters.get(i).cloned().flatten())
                .collect();
            let protocol = Protocol {
                exclude: encounters.as_deref(),
                ..Default::default()
            };
            let c = calibrate(
                local.select(&rows),
                &emb,
                dim,
                &sample_ids,
                &protocol,
                a,
                plan.model.clone(),
            )
            .context("calibrating local matching on the catalogue")?;
            c.save(save_to)?;
            c
        }
    };
    local.append(LocalScores::extract(
        a,
        None,
        &data.test_images(),
        tests,
        progress,
    )?);
    if let Some(w) = &calibration.whitening {
        local = local.whitened(w)?;
    }
    progress.set_message("re-scoring the shortlists");
    let found = index.search(queries, a.shortlist.min(index.len()))?;
    let ranked = found
        .into_par_iter()
        .enumerate()
        .map(|(t, neighbors)| {
            let short: Vec<(usize, f32)> = neighbors
                .iter()
                .map(|nb| (nb.id as usize, nb.score))
                .collect();
            let scores = local.scores(Some(&calibration.fusion), names.len() + t, &short);
            let rescored: Vec<Neighbor> = neighbors
                .iter()
                .zip(scores)
                .map(|(nb, score)| Neighbor { id: nb.id, score })
                .collect();
            rank_labels(&rescored, labels, a.identity_score.aggregation(), K)
                .into_iter()
                .map(|(label, score)| Candidate {
                    id: ids[label as usize].clone(),
                    score,
                })
                .collect()
        })
        .collect();
    Ok((ranked, calibration))
}

/// Rows of whole animals, at most `max` photos, in an order fixed by the animals' names (a
/// hash, so neither alphabetical nor by size).
fn calibration_rows(photo_ids: &[String], max: usize) -> Vec<usize> {
    let mut by_animal: BTreeMap<(u64, &str), Vec<usize>> = BTreeMap::new();
    for (i, id) in photo_ids.iter().enumerate() {
        let key = (crate::fsio::fnv1a(id.as_bytes(), 0), id.as_str());
        by_animal.entry(key).or_default().push(i);
    }
    let mut rows = Vec::new();
    for photos in by_animal.values() {
        if rows.len() + photos.len() <= max {
            rows.extend(photos);
        }
    }
    rows.sort_unstable();
    rows
}

/// Candidates kept per query before blending kNN and head scores.
pub const FUSION_DEPTH: usize = 20;

/// The five candidates of each query: kNN scores blended with the heads' (`fuse_with_head`)
/// where `heads` are given and `weight` is positive, the kNN ranking alone otherwise.
pub fn fuse_all(
    knn: Vec<Vec<Candidate>>,
    heads: Option<&[Vec<Candidate>]>,
    weight: f32,
) -> Vec<Vec<Candidate>> {
    match heads {
        Some(heads) if weight > 0.0 => knn
            .iter()
            .zip(heads)
            .map(|(k, h)| fuse_with_head(k, h, weight, K))
            .collect(),
        _ => knn
            .into_iter()
            .map(|mut c| {
                c.truncate(K);
                c
            })
            .collect(),
    }
}

/// Head weights tried on validation.
pub const FUSION_WEIGHTS: [f32; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// The blend weight of kNN and head scores that maximises MAP@5 (with its best global
/// threshold) over validation queries; the lowest weight among equals. Returns the weight and
/// the MAP@5 of every weight tried.
pub fn choose_fusion_weight(
    knn: &[Vec<Candidate>],
    heads: &[Vec<Candidate>],
    truths: &[String],
) -> (f32, Vec<(f32, f64)>) {
    let tried: Vec<(f32, f64)> = FUSION_WEIGHTS
        .iter()
        .map(|&w| {
            let ranked = fuse_all(knn.to_vec(), Some(heads), w);
            let queries: Vec<_> = ranked.into_iter().zip(truths.iter().cloned()).collect();
            (w, best_threshold(&queries).1)
        })
        .collect();
    let best = tried.iter().fold(
        (0.0, f64::NEG_INFINITY),
        |b, &(w, m)| if m > b.1 { (w, m) } else { b },
    );
    (best.0, tried)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::NEW_INDIVIDUAL;
    use crate::decide::tests::candidates as cands;

    #[test]
    fn the_new_individual_rule_reads_as_words() {
        let said = |rule| {
            Predicted {
                count: 3,
                rule,
                calibration: None,
                calibration_file: None,
                pseudo: None,
            }
            .to_string()
        };
        let mut t = Thresholds::global(0.42);
        t.by_species.insert("beluga".into(), 0.3);
        assert_eq!(
            said(NewRule::Threshold(t)),
            "new_individual below a similarity of 0.420 (beluga 0.300 for its species)"
        );
        assert_eq!(
            said(NewRule::Share(0.157)),
            "new_individual first for the 15.7% of photos whose best candidate is weakest"
        );
    }

    #[test]
    fn candidates_of_other_species_go_behind_the_rest_in_their_order() {
        let species: HashMap<String, String> = [("a", "beluga"), ("b", "dolphin"), ("c", "beluga")]
            .map(|(i, s)| (i.to_string(), s.to_string()))
            .into();
        let ranked = cands(&[("b", 0.9), ("a", 0.8), ("x", 0.7), ("d", 0.6), ("c", 0.5)]);
        let ids = |c: &[Candidate]| c.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
        // Two queries alike, predicted beluga and dolphin; "x" and "d" have no known species:
        // they stay with the rest.
        let predicted = ["beluga".to_string(), "dolphin".to_string()];
        let preferred = prefer_species(vec![ranked.clone(), ranked], &predicted, &species);
        assert_eq!(ids(&preferred[0]), ["a", "x", "d", "c", "b"]);
        assert_eq!(ids(&preferred[1]), ["b", "x", "d", "a", "c"]);
    }

    #[cfg(feature = "torch")]
    #[test]
    fn the_species_head_names_the_species_nearest_each_embedding() {
        use crate::model::happywhale::HappyWhaleModel;
        use tch::Tensor;
        let mut config =
            ModelConfig::for_backbone("efficientnet_lite0", vec!["w1".into()], vec![1]).unwrap();
        config.embedding_size = 3;
        config.species = vec!["beluga".into(), "dolphin".into()];
        let model = HappyWhaleModel::new(config.clone(), tch::Device::Cpu).unwrap();
        let centres = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0, 0.0, 2.0]).view([2, 3]);
        tch::no_grad(|| {
            model
                .species_head()
                .unwrap()
                .weight
                .shallow_clone()
                .copy_(&centres)
        });
        // Rows of 3 + 2 values: the model's 3, then another crop set's, ignored.
        let fused = [0.1f32, 0.9, 0.1, 9.0, 9.0, 0.0, -0.2, 0.8, 9.0, 9.0];
        let heads = Heads::of(&model).unwrap();
        let predicted = species_predictions(&[(&config, &heads)], &[1.0], &fused, 2);
        assert_eq!(predicted.unwrap(), ["beluga", "dolphin"]);
        config.species.clear();
        let plain = HappyWhaleModel::new(config.clone(), tch::Device::Cpu).unwrap();
        let heads = Heads::of(&plain).unwrap();
        assert!(heads.species.is_none());
        assert!(species_predictions(&[(&config, &heads)], &[1.0], &fused, 2).is_none());
    }

    #[test]
    fn per_species_thresholds_separate_what_one_threshold_cannot() {
        // Dolphins score high, belugas low: known dolphin 0.8, new dolphin 0.7, known beluga
        // 0.4, new beluga 0.3 (two queries each), species told by the best candidate.
        let species: HashMap<String, String> = [
            ("d1", "dolphin"),
            ("d2", "dolphin"),
            ("b1", "beluga"),
            ("b2", "beluga"),
        ]
        .iter()
        .map(|&(i, s)| (i.to_string(), s.to_string()))
        .collect();
        let mut q = Vec::new();
        for _ in 0..2 {
            q.push((cands(&[("d1", 0.8), ("d2", 0.1)]), "d1".to_string()));
            q.push((
                cands(&[("d2", 0.7), ("d1", 0.1)]),
                NEW_INDIVIDUAL.to_string(),
            ));
            q.push((cands(&[("b1", 0.4), ("b2", 0.1)]), "b1".to_string()));
            q.push((
                cands(&[("b2", 0.3), ("b1", 0.1)]),
                NEW_INDIVIDUAL.to_string(),
            ));
        }
        let (_, global_map) = best_threshold(&q);
        assert!(global_map < 0.95, "{global_map}");
        let (t, map) = best_thresholds(&q, &species, 2);
        assert!((map - 1.0).abs() < 1e-12, "{map}");
        let d = t.by_species["dolphin"];
        let b = t.by_species["beluga"];
        assert!(d > 0.7 && d <= 0.8, "{d}");
        assert!(b > 0.3 && b <= 0.4, "{b}");
        // Too few queries per species: the global threshold alone.
        let (t, m) = best_thresholds(&q, &species, 5);
        assert!(t.by_species.is_empty());
        assert!((m - global_map).abs() < 1e-12);
    }

    #[test]
    fn knn_and_head_scores_blend_per_individual() {
        let knn = cands(&[("a", 0.9), ("b", 0.8)]);
        let head = cands(&[("b", 0.9), ("c", 0.5)]);
        let fused = fuse_with_head(&knn, &head, 0.5, 5);
        let got: Vec<(&str, f32)> = fused.iter().map(|c| (c.id.as_str(), c.score)).collect();
        // a: (0.9 + 0.5 floor) / 2, b: (0.8 + 0.9) / 2, c: (0.8 floor + 0.5) / 2.
        let want = [("b", 0.85), ("a", 0.7), ("c", 0.65)];
        for ((id, s), (wid, ws)) in got.iter().zip(want) {
            assert_eq!(*id, wid);
            assert!((s - ws).abs() < 1e-6, "{id} {s}");
        }
        // Weight 0 is the kNN ranking; equal scores go to the lower id.
        let ids: Vec<String> = fuse_with_head(&knn, &head, 0.0, 2)
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let ids: Vec<String> = fuse_with_head(&knn, &head, 1.0, 1)
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["b"]);
    }
}
