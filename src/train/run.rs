//! A training run: a Kaggle-format catalogue → a model that tells its individuals apart,
//! validated every epoch by MAP@5 on a held-out fold that includes unseen individuals.
//!
//! Two modes, both real training. `Full` fine-tunes every layer on freshly augmented photos.
//! `Fast` freezes the backbone's early stages: their outputs are computed once per augmentation
//! pass (and for the validation views) and cached, and only the last stages, GeM, the neck and
//! ArcFace train on them — a fraction of the cost on a CPU.
//!
//! A run folder holds `train_config.json`, `metrics.jsonl` (one line per epoch), `last/` and
//! `best/` checkpoints (model, optimiser state, `state.json`) and `summary.json`. Every random
//! draw is seeded from the run's seed and the epoch, so `--resume` after a kill gives the same
//! weights as an uninterrupted run.

use super::augment::{batch_with, item_rng, resize, AugmentConfig, Pipeline};
use super::optim::{lr_at, AdamW, Group};
use crate::crops::sets::{self as crop_sets, load_sets, CropSet};
use crate::data::folds::{assign_folds, split};
use crate::data::{image::load_rgb, read_train_csv, KaggleDir, NEW_INDIVIDUAL};
use crate::embed::{embed_images, fuse, input_tensor, to_vec, unit_with_flip};
use crate::fsio;
use crate::model::happywhale::{pretrained_weights, HappyWhaleModel, ModelConfig};
use crate::model::heads::ArcFaceConfig;
use crate::predict::{
    best_threshold, best_thresholds, choose_fusion_weight, fuse_all, head_candidates,
    rank_candidates, Candidate, Thresholds, FUSION_DEPTH, MIN_SPECIES_QUERIES,
};
use crate::runtime::{configure_threads, prefetched};
use crate::search::{Aggregation, FlatIndex, Index, Storage};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Tensor;

/// Which layers train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Fine-tune every layer.
    Full,
    /// Freeze (and cache) the backbone's early stages; train the rest.
    Fast,
    /// Freeze whole pretrained backbones (`--model` may list several, comma-separated): their
    /// GeM features, concatenated, through a whitening learnt in closed form on the training
    /// identities (see [`super::frozen`]). No gradient steps: seconds after one pass over the
    /// photos, and the best mode when there are few photos per animal.
    Frozen,
}

/// Everything a run needs; also the form of `--config FILE.json` (missing keys: defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// A folder in Kaggle's layout.
    pub data: PathBuf,
    /// A backbone of the registry.
    pub model: String,
    /// The fold that validates, of `folds`.
    pub fold: usize,
    pub folds: usize,
    /// Share of the validation fold's individuals kept out of training.
    pub new_share: f64,
    pub epochs: usize,
    /// Square input size; the backbone's own when absent.
    pub img_size: Option<i64>,
    pub batch_size: usize,
    /// Learning rate of the backbone; the heads get `lr × head_lr_mult`.
    pub lr: f64,
    pub head_lr_mult: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// The cosine decays to `lr × min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Largest global gradient norm (0: no clipping).
    pub grad_clip: f64,
    pub mode: Mode,
    /// Fast mode: backbone stages that stay frozen (default: all but the last).
    pub freeze_stages: Option<usize>,
    /// Fast mode: augmented views cached per photo; epoch `e` trains on view `e mod passes`.
    pub aug_passes: usize,
    pub embedding_size: i64,
    pub arcface: ArcFaceConfig,
    pub augment: AugmentConfig,
    /// Start from the backbone's ImageNet weights.
    pub pretrained: bool,
    pub seed: u64,
    /// libtorch threads (default: the free cores).
    pub threads: Option<usize>,
    /// Validate every this many epochs (and after the last).
    pub val_every: usize,
    /// Validate with the mean embedding of each photo and its mirror image.
    pub flip_tta: bool,
    /// Kinds of crop mixed in training by their shares; validation uses the first (the one
    /// `predict` should be given). None: whole photos.
    #[serde(default)]
    pub crops: Vec<CropSet>,
    /// Fuse the trained embedding with the pretrained backbone's own GeM features, at the
    /// weight validation finds best (0 when they do not help): on few animals the ImageNet
    /// features still carry what training has not learnt.
    pub fuse_pretrained: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("synth"),
            model: "efficientnet_lite0".into(),
            fold: 0,
            folds: 5,
            new_share: 0.2,
            epochs: 10,
            img_size: None,
            batch_size: 16,
            lr: 3e-4,
            head_lr_mult: 10.0,
            weight_decay: 1e-4,
            warmup_epochs: 1.0,
            min_lr_ratio: 0.01,
            grad_clip: 5.0,
            mode: Mode::Full,
            freeze_stages: None,
            aug_passes: 4,
            embedding_size: 512,
            arcface: ArcFaceConfig::default(),
            augment: AugmentConfig::default(),
            pretrained: true,
            seed: 0,
            threads: None,
            val_every: 1,
            flip_tta: false,
            crops: Vec::new(),
            fuse_pretrained: true,
        }
    }
}

impl TrainConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: not a training config", path.display()))
    }
}

/// One epoch's line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 0 is the pretrained backbone's zero-shot baseline, before any training.
    pub epoch: usize,
    pub train_loss: Option<f64>,
    pub lr: Option<f64>,
    /// Validation MAP@5 as `predict` answers: kNN blended with the head at the chosen weight,
    /// new_individual at the best global threshold (`threshold`).
    pub val_map5: Option<f64>,
    pub threshold: Option<f32>,
    /// The same with kNN scores alone, and with per-species thresholds.
    #[serde(default)]
    pub val_map5_knn: Option<f64>,
    #[serde(default)]
    pub val_map5_species: Option<f64>,
    #[serde(default)]
    pub fusion_weight: Option<f32>,
    /// Weight of the pretrained features fused with the trained embedding (see
    /// [`TrainConfig::fuse_pretrained`]).
    #[serde(default)]
    pub pretrained_weight: Option<f32>,
    pub images_per_s: Option<f64>,
    pub seconds: f64,
}

/// What `state.json` of a checkpoint records.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct RunState {
    /// Epochs completed.
    pub epoch: usize,
    pub best_map5: f64,
    pub best_epoch: usize,
    pub threshold: f32,
    pub zero_shot_map5: Option<f64>,
    #[serde(default)]
    pub species_thresholds: BTreeMap<String, f32>,
    #[serde(default)]
    pub fusion_weight: f32,
    #[serde(default)]
    pub pretrained_weight: f32,
}

/// The outcome of a run (also `summary.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_map5: f64,
    /// The new_individual threshold chosen on the validation fold at the best epoch.
    pub threshold: f32,
    pub zero_shot_map5: Option<f64>,
    pub train_images: usize,
    pub val_images: usize,
    pub classes: usize,
    pub seconds: f64,
}

pub const CONFIG_FILE: &str = "train_config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";

/// The photos of one run, decoded once and resized to the model's input size.
pub(super) struct Photos {
    /// `views[set][photo]`: each crop set's crop of each photo, at the model's input size.
    views: Vec<Vec<RgbImage>>,
    /// Each crop set's share of the training draws.
    shares: Vec<f64>,
    /// Class of each training photo.
    pub train: Vec<(usize, i64)>,
    /// Photo index and true id (`new_individual` when its animal is not trained on).
    pub val: Vec<(usize, String)>,
    pub classes: Vec<String>,
    class_counts: Vec<usize>,
    /// Each training individual's species.
    species_of: HashMap<String, String>,
}

impl Photos {
    fn len(&self) -> usize {
        self.views[0].len()
    }

    /// The photo as validated and predicted: its crop of the first set.
    fn eval_view(&self, photo: usize) -> RgbImage {
        self.views[0][photo].clone()
    }

    /// The photo for training draw `draw`: a crop set drawn by the shares.
    fn train_view(&self, photo: usize, draw: u64) -> RgbImage {
        let set = match self.views.len() {
            1 => 0,
            _ => crop_sets::draw(&self.shares, &mut item_rng(draw, photo as u64)),
        };
        self.views[set][photo].clone()
    }
}

pub(super) fn load_photos(cfg: &TrainConfig, size: u32) -> Result<Photos> {
    let kaggle = KaggleDir::new(&cfg.data);
    let set = read_train_csv(&kaggle.train_csv())?;
    anyhow::ensure!(cfg.folds >= 2, "--folds must be at least 2");
    anyhow::ensure!(
        cfg.fold < cfg.folds,
        "--fold {} is not below --folds {}",
        cfg.fold,
        cfg.folds
    );
    let assignments = assign_folds(&set.rows, cfg.folds, cfg.new_share, cfg.seed);
    let s = split(&assignments, cfg.fold);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &s.train {
        *counts.entry(&set.rows[i].individual_id).or_default() += 1;
    }
    let classes: Vec<String> = counts.keys().map(|s| s.to_string()).collect();
    let class_of: BTreeMap<&str, i64> = counts
        .keys()
        .enumerate()
        .map(|(c, &id)| (id, c as i64))
        .collect();

    let wanted: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
    let sets = load_sets(&cfg.crops)?;
    let bar = bar(wanted.len() as u64, "decoding photos");
    let dir = kaggle.train_images();
    let decoded: Vec<Vec<RgbImage>> = wanted
        .par_iter()
        .map(|&i| {
            let name = &set.rows[i].image;
            let img = load_rgb(&dir.join(name))?;
            bar.inc(1);
            Ok(sets
                .iter()
                .map(|c| resize(&c.apply(name, &img), size, size))
                .collect())
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let mut views: Vec<Vec<RgbImage>> = vec![Vec::with_capacity(decoded.len()); sets.len()];
    for photo in decoded {
        for (view, img) in views.iter_mut().zip(photo) {
            view.push(img);
        }
    }
    let n_train = s.train.len();
    Ok(Photos {
        views,
        shares: sets.iter().map(|c| c.set.share).collect(),
        train: s
            .train
            .iter()
            .enumerate()
            .map(|(k, &i)| (k, class_of[set.rows[i].individual_id.as_str()]))
            .collect(),
        val: s
            .val
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let id = &set.rows[i].individual_id;
                let truth = if class_of.contains_key(id.as_str()) {
                    id.clone()
                } else {
                    NEW_INDIVIDUAL.to_string()
                };
                (n_train + k, truth)
            })
            .collect(),
        class_counts: counts.values().copied().collect(),
        species_of: s
            .train
            .iter()
            .map(|&i| {
                (
                    set.rows[i].individual_id.clone(),
                    set.rows[i].species.clone(),
                )
            })
            .collect(),
        classes,
    })
}

pub(super) fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(what.to_string());
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// What validation measured and chose: see [`EpochMetrics`].
pub(super) struct Validation {
    pub map5: f64,
    pub map5_knn: f64,
    pub map5_species: f64,
    pub fusion_weight: f32,
    pub pretrained_weight: f32,
    pub thresholds: Thresholds,
}

/// Weights of the pretrained features tried by validation (see [`TrainConfig::fuse_pretrained`]).
pub const PRETRAINED_WEIGHTS: [f32; 5] = [0.0, 0.5, 0.75, 1.0, 1.5];

/// Unit embeddings of the training photos (gallery) and the validation photos (queries).
pub(super) struct Views {
    pub gallery: Vec<f32>,
    pub queries: Vec<f32>,
    pub dim: usize,
}

impl Views {
    /// The rows of `parts` concatenated at `weights` (see [`fuse`]).
    pub(super) fn concat(parts: &[&Views], weights: &[f32]) -> Views {
        let join = |rows: Vec<Vec<f32>>| {
            let n = rows[0].len() / parts[0].dim;
            fuse(&rows, weights, n)
        };
        Views {
            gallery: join(parts.iter().map(|v| v.gallery.clone()).collect()),
            queries: join(parts.iter().map(|v| v.queries.clone()).collect()),
            dim: parts.iter().map(|v| v.dim).sum(),
        }
    }

    /// Each row of `self` concatenated with `other`'s at `weight`.
    fn fused(&self, other: &Views, weight: f32) -> Views {
        Views::concat(&[self, other], &[1.0, weight])
    }
}

/// Validation queries against the training photos as gallery: the kNN ranking `knn` (see
/// [`knn_ranking`]), blended with the ArcFace head's scores at the weight that serves best (when
/// `head` gives a model with its queries' embeddings), and the best new_individual thresholds,
/// global and per species.
pub(super) fn validation(
    photos: &Photos,
    head: Option<(&HappyWhaleModel, &[f32])>,
    knn: Vec<Vec<Candidate>>,
) -> Result<Validation> {
    let truths: Vec<String> = photos.val.iter().map(|(_, t)| t.clone()).collect();
    let heads = match head {
        Some((m, queries)) => head_candidates(&[m], &[1.0], queries, truths.len(), FUSION_DEPTH)?,
        None => None,
    };
    let (fusion_weight, tried) = match &heads {
        Some(h) => choose_fusion_weight(&knn, h, &truths),
        None => (0.0, Vec::new()),
    };
    let fused: Vec<_> = fuse_all(knn, heads.as_deref(), fusion_weight)
        .into_iter()
        .zip(truths.iter().cloned())
        .collect();
    let map5 = best_threshold(&fused).1;
    // The first weight tried is 0, kNN alone; without a head, `fused` is kNN alone.
    let map5_knn = tried.first().map_or(map5, |&(_, m)| m);
    let (thresholds, map5_species) =
        best_thresholds(&fused, &photos.species_of, MIN_SPECIES_QUERIES);
    Ok(Validation {
        map5,
        map5_knn,
        map5_species,
        fusion_weight,
        pretrained_weight: 0.0,
        thresholds,
    })
}

/// Each validation query's candidates by kNN over the training photos.
pub(super) fn knn_ranking(photos: &Photos, views: &Views) -> Result<Vec<Vec<Candidate>>> {
    let mut index = FlatIndex::new(views.dim, Storage::F32);
    index.add(&views.gallery)?;
    let labels: Vec<u32> = photos.train.iter().map(|&(_, c)| c as u32).collect();
    rank_candidates(
        &index,
        &labels,
        &photos.classes,
        &views.queries,
        Aggregation::Max,
        FUSION_DEPTH,
    )
}

/// MAP@5 (at the best threshold) of a ranking of the validation queries.
pub(super) fn map5_of(photos: &Photos, ranked: &[Vec<Candidate>]) -> f64 {
    let truths = photos.val.iter().map(|(_, t)| t.clone());
    let queries: Vec<_> = ranked.iter().cloned().zip(truths).collect();
    best_threshold(&queries).1
}

/// The run folder's checkpoint files.
pub(super) struct Checkpoints {
    pub root: PathBuf,
}

impl Checkpoints {
    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Write a checkpoint of a trained model (see [`Self::save_with`]).
    fn save(
        &self,
        name: &str,
        model: &HappyWhaleModel,
        opt: &AdamW,
        state: &RunState,
    ) -> Result<()> {
        self.save_with(name, state, |tmp| {
            model.save(tmp)?;
            opt.save(&tmp.join("optimizer.safetensors"))
        })
    }

    /// Write `name/` whole (`state.json` and what `write` puts in the folder it is given), then
    /// swap it in: a kill leaves the previous one (or `name.old/`).
    pub(super) fn save_with(
        &self,
        name: &str,
        state: &RunState,
        write: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let tmp = self.root.join(format!("{name}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        write(&tmp)?;
        fsio::write_bytes_atomic(&tmp.join("state.json"), &serde_json::to_vec_pretty(state)?)?;
        let (target, old) = (self.dir(name), self.root.join(format!("{name}.old")));
        let _ = std::fs::remove_dir_all(&old);
        if target.exists() {
            std::fs::rename(&target, &old)
                .with_context(|| format!("cannot move {}", target.display()))?;
        }
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("cannot write {}", target.display()))?;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }

    /// The newest complete `name/` checkpoint folder, if any.
    pub(super) fn find(&self, name: &str) -> Option<PathBuf> {
        [self.dir(name), self.root.join(format!("{name}.old"))]
            .into_iter()
            .find(|d| d.join("state.json").is_file())
    }
}

/// Train as `cfg` says into the run folder `out`; with `resume`, continue the run there from its
/// last checkpoint (its saved config wins over `cfg`).
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool) -> Result<TrainSummary> {
    let started = Instant::now();
    let ckpt = Checkpoints {
        root: out.to_path_buf(),
    };
    let cfg = if resume {
        TrainConfig::load(&out.join(CONFIG_FILE))
            .context("--resume needs the run's train_config.json")?
    } else {
        if ckpt.find("last").is_some() {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        cfg.clone()
    };
    let threads = configure_threads(cfg.threads);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    fsio::write_bytes_atomic(&out.join(CONFIG_FILE), &serde_json::to_vec_pretty(&cfg)?)?;
    if cfg.mode == Mode::Frozen {
        return super::frozen::train(&cfg, &ckpt, started);
    }
    anyhow::ensure!(
        !cfg.model.contains(','),
        "--model {:?}: only --mode frozen fuses several backbones",
        cfg.model
    );

    let variant = crate::model::variant(&cfg.model)
        .with_context(|| format!("unknown backbone {:?}", cfg.model))?;
    let size = cfg.img_size.unwrap_or(variant.input_size);
    let photos = load_photos(&cfg, size as u32)?;
    anyhow::ensure!(
        !photos.train.is_empty() && !photos.val.is_empty(),
        "fold {} leaves no training or no validation photos",
        cfg.fold
    );
    eprintln!(
        "training {} ({:?} mode) on {} photos of {} individuals, validating on {} photos; {} threads",
        cfg.model,
        cfg.mode,
        photos.train.len(),
        photos.classes.len(),
        photos.val.len(),
        threads
    );

    let mut mcfg = ModelConfig::for_backbone(
        &cfg.model,
        photos.classes.clone(),
        photos.class_counts.clone(),
    )?;
    mcfg.img_size = size;
    mcfg.embedding_size = cfg.embedding_size;
    mcfg.arcface = cfg.arcface.clone();
    tch::manual_seed(cfg.seed as i64);
    let mut model = HappyWhaleModel::new(mcfg, crate::runtime::device())?;
    if cfg.pretrained {
        model.load_backbone_weights(&pretrained_weights(&cfg.model)?)?;
    }
    let mut opt = AdamW::new(param_groups(&model, &cfg));

    let mut state = RunState::default();
    let mut metrics = Vec::new();
    if resume {
        let dir = ckpt
            .find("last")
            .with_context(|| format!("{} has no checkpoint to resume", out.display()))?;
        model
            .vs
            .load(dir.join(crate::model::happywhale::WEIGHTS_FILE))
            .with_context(|| format!("cannot load {}", dir.display()))?;
        opt.load(&dir.join("optimizer.safetensors"))?;
        state = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        metrics = read_metrics(&out.join(METRICS_FILE))?
            .into_iter()
            .filter(|m| m.epoch <= state.epoch)
            .collect();
        eprintln!("resuming after epoch {} of {}", state.epoch, cfg.epochs);
    }

    let t = Instant::now();
    let mut trainer = Trainer::new(&cfg, &model, &photos)?;
    let pretrained = match cfg.pretrained && (cfg.fuse_pretrained || !resume) {
        true => Some(pretrained_views(&cfg.model, size, cfg.flip_tta, &photos)?),
        false => None,
    };
    if let (false, Some(views)) = (resume, &pretrained) {
        let zs = map5_of(&photos, &knn_ranking(&photos, views)?);
        state.zero_shot_map5 = Some(zs);
        metrics.push(EpochMetrics {
            epoch: 0,
            train_loss: None,
            lr: None,
            val_map5: Some(zs),
            threshold: None,
            val_map5_knn: Some(zs),
            val_map5_species: None,
            fusion_weight: None,
            pretrained_weight: None,
            images_per_s: None,
            seconds: t.elapsed().as_secs_f64(),
        });
        write_metrics(&out.join(METRICS_FILE), &metrics)?;
        eprintln!("zero-shot (pretrained GeM features) validation MAP@5 {zs:.4}");
    }
    trainer.pretrained = pretrained.filter(|_| cfg.fuse_pretrained);

    let steps_per_epoch = photos.train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let warmup = (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize;
    for epoch in state.epoch + 1..=cfg.epochs {
        let t = Instant::now();
        tch::manual_seed(
            (cfg.seed as i64)
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as i64),
        );
        let progress = ProgressBar::new(steps_per_epoch as u64);
        progress.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len} {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        progress.set_prefix(format!("{epoch}/{}", cfg.epochs));
        let schedule = |step: usize| lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr_ratio);
        let (loss, lr) = trainer.epoch(&model, &mut opt, &photos, epoch, schedule, &progress)?;
        progress.finish_and_clear();
        let seconds = t.elapsed().as_secs_f64();
        let images_per_s = photos.train.len() as f64 / seconds;

        let validate = epoch % cfg.val_every.max(1) == 0 || epoch == cfg.epochs;
        let v = if validate {
            Some(trainer.validate(&model, &photos)?)
        } else {
            None
        };
        let map = v.as_ref().map(|v| v.map5);
        let line = EpochMetrics {
            epoch,
            train_loss: Some(loss),
            lr: Some(lr),
            val_map5: map,
            threshold: v.as_ref().map(|v| v.thresholds.global),
            val_map5_knn: v.as_ref().map(|v| v.map5_knn),
            val_map5_species: v.as_ref().map(|v| v.map5_species),
            fusion_weight: v.as_ref().map(|v| v.fusion_weight),
            pretrained_weight: v.as_ref().map(|v| v.pretrained_weight),
            images_per_s: Some(images_per_s),
            seconds: t.elapsed().as_secs_f64(),
        };
        eprintln!(
            "epoch {epoch}/{}: loss {loss:.4}, lr {lr:.2e}, {images_per_s:.1} img/s{}",
            cfg.epochs,
            map.map_or(String::new(), |m| format!(", val MAP@5 {m:.4}"))
        );
        metrics.push(line);
        state.epoch = epoch;
        let improved = map.is_some_and(|m| m > state.best_map5 || state.best_epoch == 0);
        if let (true, Some(v)) = (improved, v) {
            state.best_map5 = v.map5;
            state.best_epoch = epoch;
            state.threshold = v.thresholds.global;
            state.species_thresholds = v.thresholds.by_species;
            state.fusion_weight = v.fusion_weight;
            state.pretrained_weight = v.pretrained_weight;
        }
        write_metrics(&out.join(METRICS_FILE), &metrics)?;
        if improved {
            ckpt.save("best", &model, &opt, &state)?;
        }
        ckpt.save("last", &model, &opt, &state)?;
    }

    write_summary(out, cfg.epochs, &state, &photos, started)
}

/// The run's outcome from its final state, written to `summary.json`.
pub(super) fn write_summary(
    out: &Path,
    epochs: usize,
    state: &RunState,
    photos: &Photos,
    started: Instant,
) -> Result<TrainSummary> {
    let summary = TrainSummary {
        epochs,
        best_epoch: state.best_epoch,
        best_map5: state.best_map5,
        threshold: state.threshold,
        zero_shot_map5: state.zero_shot_map5,
        train_images: photos.train.len(),
        val_images: photos.val.len(),
        classes: photos.classes.len(),
        seconds: started.elapsed().as_secs_f64(),
    };
    fsio::write_bytes_atomic(
        &out.join(SUMMARY_FILE),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// Backbone parameters at the base rate, heads at `head_lr_mult`; weight decay on weight
/// matrices and kernels only (not on biases, norms or GeM's p).
fn param_groups(model: &HappyWhaleModel, cfg: &TrainConfig) -> Vec<Group> {
    let mut vars: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut groups: Vec<Group> = [
        (1.0, cfg.weight_decay),
        (1.0, 0.0),
        (cfg.head_lr_mult, cfg.weight_decay),
        (cfg.head_lr_mult, 0.0),
    ]
    .into_iter()
    .map(|(lr_mult, weight_decay)| Group {
        params: Vec::new(),
        lr_mult,
        weight_decay,
    })
    .collect();
    for (name, t) in vars {
        let head = !name.starts_with("model.");
        let decays = t.dim() >= 2;
        groups[usize::from(head) * 2 + usize::from(!decays)]
            .params
            .push((name, t));
    }
    groups
}

/// The per-mode machinery of one run.
struct Trainer {
    cfg: TrainConfig,
    pipeline: Pipeline,
    /// Fast mode: the frozen stages, and their cached outputs per augmentation pass.
    frozen: usize,
    train_cache: Vec<Tensor>,
    /// Fast mode: frozen-stage outputs of every photo's validation view.
    eval_cache: Option<Tensor>,
    /// The pretrained backbone's features, fused with the trained ones at validation.
    pretrained: Option<Views>,
}

impl Trainer {
    fn new(cfg: &TrainConfig, model: &HappyWhaleModel, photos: &Photos) -> Result<Self> {
        let s = model.config.img_size as u32;
        let mean = model.config.mean.map(|v| v as f32);
        let std = model.config.std.map(|v| v as f32);
        let pipeline = Pipeline::train(&cfg.augment, (s, s), mean, std)?;
        let stages = model.backbone().num_stages();
        let frozen = match cfg.mode {
            Mode::Full => 0,
            Mode::Fast => cfg.freeze_stages.unwrap_or(stages - 1).min(stages),
            Mode::Frozen => bail!("the frozen mode has no gradient steps (see train::frozen)"),
        };
        let mut t = Self {
            cfg: cfg.clone(),
            pipeline,
            frozen,
            train_cache: Vec::new(),
            eval_cache: None,
            pretrained: None,
        };
        if frozen > 0 {
            let eval = Pipeline::eval((s, s), mean, std)?;
            let all: Vec<usize> = (0..photos.len()).collect();
            t.eval_cache = Some(t.frozen_features(
                model,
                photos,
                &all,
                &eval,
                u64::MAX,
                "caching validation features",
            )?);
            for pass in 0..cfg.aug_passes.max(1) {
                let idx: Vec<usize> = photos.train.iter().map(|&(i, _)| i).collect();
                let what = format!(
                    "caching augmented features {}/{}",
                    pass + 1,
                    cfg.aug_passes.max(1)
                );
                let seed = cfg.seed.wrapping_mul(7919).wrapping_add(pass as u64);
                let cache = t.frozen_features(model, photos, &idx, &t.pipeline, seed, &what)?;
                t.train_cache.push(cache);
            }
        }
        Ok(t)
    }

    /// Outputs of the frozen stages for photos `idx` under `pipeline` (their training views
    /// drawn with `seed`, their eval views when `seed` is `u64::MAX`).
    fn frozen_features(
        &self,
        model: &HappyWhaleModel,
        photos: &Photos,
        idx: &[usize],
        pipeline: &Pipeline,
        seed: u64,
        what: &str,
    ) -> Result<Tensor> {
        let batch = 32;
        let progress = bar(idx.len() as u64, what);
        let mut parts = Vec::new();
        prefetched(
            idx.len().div_ceil(batch),
            2,
            |b| {
                let chunk = &idx[b * batch..((b + 1) * batch).min(idx.len())];
                batch_with(
                    pipeline,
                    chunk.len(),
                    seed.wrapping_add(b as u64 * 1_000_003),
                    |i| {
                        Ok(match seed {
                            u64::MAX => photos.eval_view(chunk[i]),
                            _ => photos.train_view(chunk[i], seed),
                        })
                    },
                )
                .map(|chw| (chw, chunk.len()))
            },
            |_, (chw, n)| {
                let xs = input_tensor(model, &chw, n);
                parts.push(tch::no_grad(|| {
                    model.backbone().forward_stages(&xs, false, 0, self.frozen)
                }));
                progress.inc(n as u64);
                Ok(())
            },
        )?;
        progress.finish_and_clear();
        Ok(Tensor::cat(&parts, 0))
    }

    /// Embeddings `[n, E]` from the trainable stages on (cached) inputs.
    fn head_forward(&self, model: &HappyWhaleModel, xs: &Tensor, train: bool) -> Tensor {
        let stages = model.backbone().num_stages();
        let map = model
            .backbone()
            .forward_stages(xs, train, self.frozen, stages);
        model.neck(&model.pool(&map), train)
    }

    /// One epoch; returns the mean loss and the last learning rate.
    fn epoch(
        &mut self,
        model: &HappyWhaleModel,
        opt: &mut AdamW,
        photos: &Photos,
        epoch: usize,
        schedule: impl Fn(usize) -> f64,
        progress: &ProgressBar,
    ) -> Result<(f64, f64)> {
        let bs = self.cfg.batch_size.max(2);
        let mut order: Vec<usize> = (0..photos.train.len()).collect();
        order.shuffle(&mut item_rng(self.cfg.seed ^ 0x5AFF1E, epoch as u64));
        // A batch of one breaks BatchNorm: fold a last single photo into the previous batch.
        let mut batches: Vec<&[usize]> = order.chunks(bs).collect();
        if batches.len() > 1 && batches.last().is_some_and(|b| b.len() < 2) {
            batches.pop();
        }
        let steps_before = (epoch - 1) * photos.train.len().div_ceil(bs);
        let (mut loss_sum, mut seen, mut lr) = (0.0, 0usize, 0.0);
        let started = Instant::now();
        let device = model.vs.device();
        let mut step_on = |b: usize, xs: Tensor, labels: Tensor, from_cache: bool| -> Result<()> {
            lr = schedule(steps_before + b);
            opt.zero_grad();
            let emb = if from_cache {
                self.head_forward(model, &xs, true)
            } else {
                model.embed(&xs, true)
            };
            let loss = model
                .head()
                .forward(&emb, &labels)
                .cross_entropy_for_logits(&labels);
            loss.backward();
            if self.cfg.grad_clip > 0.0 {
                opt.clip_grad_norm(self.cfg.grad_clip);
            }
            opt.step(lr);
            let n = labels.size()[0] as usize;
            let l = loss.double_value(&[]);
            anyhow::ensure!(
                l.is_finite(),
                "the loss diverged at epoch {epoch}, step {b}: lower --lr"
            );
            loss_sum += l * n as f64;
            seen += n;
            progress.inc(1);
            progress.set_message(format!(
                "loss {:.4} lr {lr:.2e} {:.1} img/s",
                loss_sum / seen as f64,
                seen as f64 / started.elapsed().as_secs_f64()
            ));
            Ok(())
        };
        let labels_of = |batch: &[usize]| {
            let l: Vec<i64> = batch.iter().map(|&k| photos.train[k].1).collect();
            Tensor::from_slice(&l).to_device(device)
        };
        if self.frozen > 0 {
            let cache = &self.train_cache[(epoch - 1) % self.train_cache.len()];
            for (b, batch) in batches.iter().enumerate() {
                let idx: Vec<i64> = batch.iter().map(|&k| k as i64).collect();
                let xs = cache.index_select(0, &Tensor::from_slice(&idx).to_device(cache.device()));
                step_on(b, xs, labels_of(batch), true)?;
            }
        } else {
            let seed = self
                .cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as u64);
            let pipeline = &self.pipeline;
            prefetched(
                batches.len(),
                2,
                |b| {
                    let batch = batches[b];
                    batch_with(
                        pipeline,
                        batch.len(),
                        seed.wrapping_add(b as u64 * 7919),
                        |i| Ok(photos.train_view(photos.train[batch[i]].0, seed)),
                    )
                },
                |b, chw| {
                    step_on(
                        b,
                        input_tensor(model, &chw, batches[b].len()),
                        labels_of(batches[b]),
                        false,
                    )
                },
            )?;
        }
        Ok((loss_sum / seen.max(1) as f64, lr))
    }

    /// Unit embeddings of photos `idx` in eval mode (flip TTA as configured).
    fn embeddings(
        &self,
        model: &HappyWhaleModel,
        photos: &Photos,
        idx: &[usize],
    ) -> Result<Vec<f32>> {
        if let Some(cache) = &self.eval_cache {
            let mut out = Vec::new();
            for chunk in idx.chunks(64) {
                let ids: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
                let xs = cache.index_select(0, &Tensor::from_slice(&ids).to_device(cache.device()));
                let e = unit_with_flip(&xs, self.cfg.flip_tta, |x| {
                    self.head_forward(model, x, false)
                });
                out.extend(to_vec(&e)?);
            }
            Ok(out)
        } else {
            let progress = bar(idx.len() as u64, "embedding for validation");
            let e = embed_images(
                model,
                idx.len(),
                |i| Ok(photos.eval_view(idx[i])),
                32,
                self.cfg.flip_tta,
                &progress,
            );
            progress.finish_and_clear();
            e
        }
    }

    /// Validation of the trained embeddings, fused with the pretrained features at the weight
    /// that serves kNN best when there are some.
    fn validate(&self, model: &HappyWhaleModel, photos: &Photos) -> Result<Validation> {
        let train: Vec<usize> = photos.train.iter().map(|&(i, _)| i).collect();
        let val: Vec<usize> = photos.val.iter().map(|(i, _)| *i).collect();
        let trained = Views {
            gallery: self.embeddings(model, photos, &train)?,
            queries: self.embeddings(model, photos, &val)?,
            dim: model.config.embedding_size as usize,
        };
        let head = Some((model, trained.queries.as_slice()));
        let Some(pretrained) = &self.pretrained else {
            return validation(photos, head, knn_ranking(photos, &trained)?);
        };
        // (weight, MAP@5, ranking) of the best weight so far; weight 0 is the trained alone.
        let mut best: Option<(f32, f64, Vec<Vec<Candidate>>)> = None;
        for w in PRETRAINED_WEIGHTS {
            let ranked = match w > 0.0 {
                true => knn_ranking(photos, &trained.fused(pretrained, w))?,
                false => knn_ranking(photos, &trained)?,
            };
            let map5 = map5_of(photos, &ranked);
            if best.as_ref().is_none_or(|b| map5 > b.1) {
                best = Some((w, map5, ranked));
            }
        }
        let (weight, _, knn) = best.context("no pretrained weight to try")?;
        Ok(Validation {
            pretrained_weight: weight,
            ..validation(photos, head, knn)?
        })
    }
}

/// GeM-pooled features (p = 3) of a pretrained backbone, for the training and validation
/// photos: the zero-shot baseline, and what [`TrainConfig::fuse_pretrained`] fuses.
pub(super) fn pretrained_views(
    backbone: &str,
    size: i64,
    flip_tta: bool,
    photos: &Photos,
) -> Result<Views> {
    let model = HappyWhaleModel::zero_shot(backbone, Some(size), crate::runtime::device())?;
    let idx: Vec<usize> = photos
        .train
        .iter()
        .map(|&(i, _)| i)
        .chain(photos.val.iter().map(|(i, _)| *i))
        .collect();
    let progress = bar(idx.len() as u64, "pretrained features");
    let all = embed_images(
        &model,
        idx.len(),
        |i| Ok(photos.eval_view(idx[i])),
        32,
        flip_tta,
        &progress,
    )?;
    progress.finish_and_clear();
    let dim = model.config.embedding_size as usize;
    let mut gallery = all;
    let queries = gallery.split_off(photos.train.len() * dim);
    Ok(Views {
        gallery,
        queries,
        dim,
    })
}

pub fn read_metrics(path: &Path) -> Result<Vec<EpochMetrics>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not a metrics line", path.display(), i + 1))
        })
        .collect()
}

pub(super) fn write_metrics(path: &Path, metrics: &[EpochMetrics]) -> Result<()> {
    fsio::write_atomic(path, |w| {
        for m in metrics {
            writeln!(w, "{}", serde_json::to_string(m)?)?;
        }
        Ok(())
    })
}

/// The checkpoint folder of a trained model: `path` itself when it holds a model, else the
/// run's `best/`, else its `last/`.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    let holds_model = |d: &Path| {
        d.join(crate::model::happywhale::CONFIG_FILE).is_file()
            || d.join(super::frozen::MEMBERS_FILE).is_file()
    };
    if holds_model(path) {
        return Ok(path.to_path_buf());
    }
    let ckpt = Checkpoints {
        root: path.to_path_buf(),
    };
    ckpt.find("best")
        .or_else(|| ckpt.find("last"))
        .filter(|d| holds_model(d))
        .with_context(|| {
            format!(
                "{} holds no trained model (no config.json, best/ or last/)",
                path.display()
            )
        })
}

/// The crop set a run validated on (none: whole photos), from its `train_config.json`; `run`
/// may also be one of its checkpoint folders.
pub fn validation_crops(run: &Path) -> Result<Vec<CropSet>> {
    let found = [Some(run), run.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(CONFIG_FILE))
        .find(|p| p.is_file());
    Ok(match found {
        Some(path) => TrainConfig::load(&path)?
            .crops
            .into_iter()
            .take(1)
            .collect(),
        None => Vec::new(),
    })
}

/// How a checkpoint's answers are decided, as chosen on validation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decision {
    /// new_individual thresholds, global and per species (0 when the run never validated).
    pub thresholds: Thresholds,
    /// Weight of the ArcFace head's scores against the kNN scores.
    pub fusion_weight: f32,
    /// Weight of the pretrained backbone's features fused with the trained embedding (0: none).
    pub pretrained_weight: f32,
}

/// The decision chosen on validation for the checkpoint in `dir`.
pub fn saved_decision(dir: &Path) -> Result<Decision> {
    let path = dir.join("state.json");
    if !path.is_file() {
        return Ok(Decision::default());
    }
    let state: RunState = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("{}: not a run state", path.display()))?;
    Ok(Decision {
        thresholds: Thresholds {
            global: state.threshold,
            by_species: state.species_thresholds,
        },
        fusion_weight: state.fusion_weight,
        pretrained_weight: state.pretrained_weight,
    })
}
