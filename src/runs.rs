//! Run folders: what `finprint train` writes and what every command that takes `--models`
//! reads. One module reads and writes them, so training, embedding, prediction and the
//! catalogue agree on the layout:
//!
//! ```text
//! RUN/train_config.json   the training config (any form the trainer serialises)
//! RUN/metrics.jsonl       one EpochMetrics line per epoch (0: the zero-shot baseline)
//! RUN/summary.json        TrainSummary
//! RUN/best/, RUN/last/    checkpoint folders: state.json (RunState) and either a trained model
//!                         (config.json, model.safetensors) or a frozen-mode whitening
//!                         (frozen.json, whitening.safetensors)
//! ```
//!
//! [`Ensemble::load`] turns run folders into the models that embed photos; [`ModelSpec`] is the
//! `--models RUN,... | --zero-shot BACKBONE` choice every embedding command takes.

use crate::crops::CropSet;
use crate::fsio::{self, fnv1a};
use crate::model::config::{ModelConfig, CONFIG_FILE as MODEL_CONFIG_FILE, WEIGHTS_FILE};
#[cfg(feature = "torch")]
use crate::model::happywhale::{pretrained_weights, HappyWhaleModel};
use crate::model::whitening::Whitening;
use crate::network::{onnx_name, Engine, Network, ONNX_DIR};
use crate::transforms::{Fit, Flips, ImgSize};
use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "train_config.json";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const SUMMARY_FILE: &str = "summary.json";
/// A checkpoint's [`RunState`].
pub const STATE_FILE: &str = "state.json";
/// A frozen-mode checkpoint's [`Frozen`].
pub const MEMBERS_FILE: &str = "frozen.json";
/// A frozen-mode checkpoint's whitening.
pub const WHITENING_FILE: &str = "whitening.safetensors";

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
    /// The species head's accuracy on the validation photos (runs with one).
    #[serde(default)]
    pub val_species_accuracy: Option<f64>,
    #[serde(default)]
    pub fusion_weight: Option<f32>,
    /// Weight of the pretrained features fused with the trained embedding.
    #[serde(default)]
    pub pretrained_weight: Option<f32>,
    pub images_per_s: Option<f64>,
    pub seconds: f64,
}

/// What a checkpoint's `state.json` records: the progress of the run and the decisions chosen
/// on validation (thresholds, head and pretrained-feature weights).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Epochs completed.
    pub epoch: usize,
    pub best_map5: f64,
    pub best_epoch: usize,
    /// The global new_individual threshold (0 when the run never validated).
    pub threshold: f32,
    pub zero_shot_map5: Option<f64>,
    #[serde(default)]
    pub species_thresholds: BTreeMap<String, f32>,
    /// Weight of the ArcFace head's scores against the kNN scores.
    #[serde(default)]
    pub fusion_weight: f32,
    /// Weight of the pretrained backbone's features fused with the trained embedding (0: none).
    #[serde(default)]
    pub pretrained_weight: f32,
}

impl RunState {
    /// The threshold of `species`, the global one where it has none.
    pub fn threshold_for(&self, species: &str) -> f32 {
        self.species_thresholds
            .get(species)
            .copied()
            .unwrap_or(self.threshold)
    }
}

/// The outcome of a run (also `summary.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_map5: f64,
    /// The epoch whose model the run keeps in `best/` (`--keep`), and its validation MAP@5
    /// (0: a summary written before `--keep`, which kept the best epoch).
    #[serde(default)]
    pub kept_epoch: usize,
    #[serde(default)]
    pub kept_map5: f64,
    /// The new_individual threshold chosen on the validation fold at the kept epoch.
    pub threshold: f32,
    pub zero_shot_map5: Option<f64>,
    pub train_images: usize,
    pub val_images: usize,
    pub classes: usize,
    pub seconds: f64,
}

impl std::fmt::Display for TrainSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; best validation MAP@5 {:.4} at epoch {} of {} (zero-shot {}); new_individual threshold {:.3}",
            self.kept(),
            self.best_map5,
            self.best_epoch,
            self.epochs,
            self.zero_shot_map5.map_or("-".into(), |z| format!("{z:.4}")),
            self.threshold
        )
    }
}

impl TrainSummary {
    /// Which model the run kept, in words.
    pub fn kept(&self) -> String {
        let (epoch, map5) = match self.kept_epoch {
            0 => (self.best_epoch, self.best_map5),
            e => (e, self.kept_map5),
        };
        format!("kept the model of epoch {epoch} (validation MAP@5 {map5:.4})")
    }
}

/// A pretrained backbone at its input size: a member of a frozen-mode checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub backbone: String,
    pub img_size: ImgSize,
    #[serde(default)]
    pub fit: Fit,
    #[serde(default)]
    pub flips: Flips,
}

/// What [`MEMBERS_FILE`] records: the members, and the whitening validation chose.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Frozen {
    pub members: Vec<Member>,
    pub shrink: f64,
    pub dim: usize,
}

/// A run folder.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// Create the folder (and its parents).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create {}", self.root.display()))
    }

    pub fn write_config<T: Serialize>(&self, config: &T) -> Result<()> {
        write_json(&self.root.join(CONFIG_FILE), config)
    }

    pub fn read_config<T: DeserializeOwned>(&self) -> Result<T> {
        read_json(&self.root.join(CONFIG_FILE), "training config")
    }

    pub fn read_metrics(&self) -> Result<Vec<EpochMetrics>> {
        read_metrics(&self.root.join(METRICS_FILE))
    }

    pub fn write_metrics(&self, metrics: &[EpochMetrics]) -> Result<()> {
        fsio::write_atomic(&self.root.join(METRICS_FILE), |w| {
            for m in metrics {
                writeln!(w, "{}", serde_json::to_string(m)?)?;
            }
            Ok(())
        })
    }

    /// `summary.json`, or `None` when the run has not finished.
    pub fn read_summary(&self) -> Result<Option<TrainSummary>> {
        let path = self.root.join(SUMMARY_FILE);
        match path.is_file() {
            true => read_json(&path, "run summary").map(Some),
            false => Ok(None),
        }
    }

    pub fn write_summary(&self, summary: &TrainSummary) -> Result<()> {
        write_json(&self.root.join(SUMMARY_FILE), summary)
    }

    /// Write checkpoint `name/` whole (`state.json` and what `write` puts in the folder it is
    /// given), then swap it in: a kill leaves the previous one (or `name.old/`).
    pub fn save_checkpoint(
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
        write_json(&tmp.join(STATE_FILE), state)?;
        let (target, old) = (self.root.join(name), self.root.join(format!("{name}.old")));
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
    pub fn find_checkpoint(&self, name: &str) -> Option<PathBuf> {
        [self.root.join(name), self.root.join(format!("{name}.old"))]
            .into_iter()
            .find(|d| d.join(STATE_FILE).is_file())
    }
}

/// A frozen-mode checkpoint written into `dir`: its members and whitening.
pub fn save_frozen(dir: &Path, frozen: &Frozen, whitening: &Whitening) -> Result<()> {
    whitening.save(&dir.join(WHITENING_FILE))?;
    write_json(&dir.join(MEMBERS_FILE), frozen)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    fsio::write_bytes_atomic(path, &serde_json::to_vec_pretty(value)?)
}

fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a {what}", path.display()))
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

/// The checkpoint folder of a trained model: `path` itself when it holds a model, else the
/// run's `best/`, else its `last/`.
pub fn checkpoint_dir(path: &Path) -> Result<PathBuf> {
    let holds_model =
        |d: &Path| d.join(MODEL_CONFIG_FILE).is_file() || d.join(MEMBERS_FILE).is_file();
    if holds_model(path) {
        return Ok(path.to_path_buf());
    }
    let run = RunDir::new(path);
    run.find_checkpoint("best")
        .or_else(|| run.find_checkpoint("last"))
        .filter(|d| holds_model(d))
        .with_context(|| {
            format!(
                "{} holds no trained model (no config.json, best/ or last/)",
                path.display()
            )
        })
}

/// The state saved with the checkpoint in `dir` (the default when it has none).
pub fn saved_state(dir: &Path) -> Result<RunState> {
    let path = dir.join(STATE_FILE);
    match path.is_file() {
        true => read_json(&path, "run state"),
        false => Ok(RunState::default()),
    }
}

/// The crop set a run validated on (none: whole photos), from its `train_config.json`; `run`
/// may also be one of its checkpoint folders.
pub fn validation_crops(run: &Path) -> Result<Vec<CropSet>> {
    /// The part of a training config that inference needs.
    #[derive(Deserialize)]
    struct Crops {
        #[serde(default)]
        crops: Vec<CropSet>,
    }
    let found = [Some(run), run.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(CONFIG_FILE))
        .find(|p| p.is_file());
    Ok(match found {
        Some(path) => read_json::<Crops>(&path, "training config")?
            .crops
            .into_iter()
            .take(1)
            .collect(),
        None => Vec::new(),
    })
}

/// The frozen-mode checkpoint in `dir` (its members and whitening), or `None` when `dir` holds
/// a trained model instead.
pub fn load_frozen(dir: &Path) -> Result<Option<(Frozen, Whitening)>> {
    let path = dir.join(MEMBERS_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let frozen: Frozen = read_json(&path, "frozen-mode checkpoint")?;
    let whitening = Whitening::load(&dir.join(WHITENING_FILE))?;
    Ok(Some((frozen, whitening)))
}

/// A network of an ensemble before it is loaded: the trained model of checkpoint `dir`, or a
/// pretrained backbone's features; `index` is its place in the ensemble of `dir` alone (which
/// names its ONNX file).
struct Part {
    dir: PathBuf,
    index: usize,
    features: Option<ZeroShot>,
}

impl Part {
    /// The part run by `engine`. An ONNX engine reads the network training wrote into the
    /// checkpoint's [`ONNX_DIR`]; where a checkpoint has none (trained before finprint wrote
    /// them, or not finished), a build with libtorch writes it in memory from the weights.
    fn load(&self, engine: Engine) -> Result<Network> {
        #[cfg(any(feature = "onnx", feature = "onnxruntime"))]
        if engine != Engine::Libtorch {
            if let Some((path, config, weights)) = self.onnx_files()? {
                return Network::from_onnx(&path, config, weights.as_deref(), engine);
            }
        }
        self.by_weights(engine)
    }

    /// The model of the checkpoint's weights (or the pretrained features), run by `engine`.
    #[cfg(feature = "torch")]
    fn by_weights(&self, engine: Engine) -> Result<Network> {
        let device = crate::runtime::device();
        let model = match &self.features {
            Some(features) => features.load(device)?,
            None => HappyWhaleModel::load(&self.dir, device)?,
        };
        Network::of_model(model, engine)
    }

    #[cfg(not(feature = "torch"))]
    fn by_weights(&self, engine: Engine) -> Result<Network> {
        let dir = self.dir.display();
        match engine {
            Engine::Libtorch => {
                bail!("this finprint was built without libtorch: use --engine tract or onnxruntime")
            }
            _ => bail!(
                "{dir} has no networks in ONNX (checkpoints trained before finprint wrote them \
                 get them from `finprint export-onnx --models {dir} --out {dir}/onnx`, with \
                 libtorch)"
            ),
        }
    }

    /// The network's ONNX file in the checkpoint's [`ONNX_DIR`], the config written beside it
    /// and the weights file holding its heads (none for pretrained features); `None` when the
    /// checkpoint has none.
    #[cfg(any(feature = "onnx", feature = "onnxruntime"))]
    fn onnx_files(&self) -> Result<Option<(PathBuf, ModelConfig, Option<PathBuf>)>> {
        let (backbone, size, weights) = match &self.features {
            Some(f) => {
                let size = f
                    .img_size
                    .context("pretrained features need an input size")?;
                (f.backbone.clone(), size, None)
            }
            None => {
                let c = read_model_config(&self.dir)?;
                (c.backbone, c.img_size, Some(self.dir.join(WEIGHTS_FILE)))
            }
        };
        let stem = self
            .dir
            .join(ONNX_DIR)
            .join(onnx_name(self.index, &backbone, size));
        let (path, config) = (stem.with_extension("onnx"), stem.with_extension("json"));
        if !path.is_file() || !config.is_file() {
            return Ok(None);
        }
        let config = read_json(&config, "finprint model config")?;
        Ok(Some((path, config, weights)))
    }
}

/// The model config saved in checkpoint `dir`.
pub fn read_model_config(dir: &Path) -> Result<ModelConfig> {
    read_json(&dir.join(MODEL_CONFIG_FILE), "finprint model config")
}

/// Trained models whose embeddings are fused: each L2-normalised and weighted, concatenated,
/// and normalised again, so the fused cosine is the weighted mean of the models' cosines
/// (`Ensemble::embed`, in [`crate::embed`]).
pub struct Ensemble {
    pub models: Vec<Network>,
    pub weights: Vec<f32>,
    /// The new_individual threshold: the mean of the models' own thresholds.
    pub threshold: f32,
    /// Per-species thresholds: for each species, the mean over the models (a model without
    /// one for that species counts its global threshold).
    pub species_thresholds: BTreeMap<String, f32>,
    /// Weight of the ArcFace heads' scores against the kNN scores (the models' mean; 0 = kNN).
    pub fusion_weight: f32,
    /// Runs of the frozen mode: groups of members whose fused features a learnt whitening maps
    /// to one embedding.
    pub whitened: Vec<Whitened>,
}

/// Members `first..first + count` of an ensemble, fused with equal weights and whitened into
/// one part (weighted as member `first`).
pub struct Whitened {
    pub first: usize,
    pub count: usize,
    pub whitening: Whitening,
}

impl Ensemble {
    /// Load run folders (or checkpoint folders) with equal weights, run by `engine`; a run
    /// whose validation chose to fuse the pretrained backbone's features brings them as a
    /// member of its own, at the chosen weight (one member for runs sharing a backbone and
    /// size); a frozen-mode run brings its backbones and their whitening.
    pub fn load(runs: &[PathBuf], engine: Engine) -> Result<Self> {
        anyhow::ensure!(!runs.is_empty(), "no model given");
        let mut parts = Vec::new();
        let mut saved = Vec::new();
        let mut whitened = Vec::new();
        let mut pretrained: Vec<(ZeroShot, f32, PathBuf)> = Vec::new();
        for run in runs {
            let dir = checkpoint_dir(run)?;
            let state = saved_state(&dir)?;
            if let Some((frozen, whitening)) = load_frozen(&dir)? {
                whitened.push(Whitened {
                    first: parts.len(),
                    count: frozen.members.len(),
                    whitening,
                });
                parts.extend(frozen.members.iter().enumerate().map(|(index, m)| Part {
                    dir: dir.clone(),
                    index,
                    features: Some(ZeroShot {
                        backbone: m.backbone.clone(),
                        img_size: Some(m.img_size),
                        fit: m.fit,
                        flips: m.flips,
                    }),
                }));
                saved.push(state);
                continue;
            }
            if state.pretrained_weight > 0.0 {
                let c = read_model_config(&dir)?;
                let key = ZeroShot {
                    backbone: c.backbone.clone(),
                    img_size: Some(c.img_size),
                    fit: c.fit,
                    flips: c.flips,
                };
                match pretrained.iter_mut().find(|(k, _, _)| *k == key) {
                    // Fused cosines add as squared weights.
                    Some((_, w, _)) => *w = w.hypot(state.pretrained_weight),
                    None => pretrained.push((key, state.pretrained_weight, dir.clone())),
                }
            }
            parts.push(Part {
                dir,
                index: 0,
                features: None,
            });
            saved.push(state);
        }
        let mut weights = vec![1.0; parts.len()];
        for (features, w, dir) in pretrained {
            parts.push(Part {
                dir,
                index: 1,
                features: Some(features),
            });
            weights.push(w);
        }
        let models = parts
            .iter()
            .map(|p| p.load(engine))
            .collect::<Result<Vec<_>>>()?;
        for g in &whitened {
            let dims: usize = models[g.first..g.first + g.count]
                .iter()
                .map(|m| m.config.embedding_size as usize)
                .sum();
            if dims != g.whitening.dim_in {
                bail!(
                    "{}: the members' features have {dims} dimensions, the whitening takes {}",
                    parts[g.first].dir.display(),
                    g.whitening.dim_in
                );
            }
        }
        let n = saved.len() as f32;
        let species: BTreeSet<&String> = saved
            .iter()
            .flat_map(|s| s.species_thresholds.keys())
            .collect();
        let species_thresholds = species
            .into_iter()
            .map(|sp| {
                let sum: f32 = saved.iter().map(|s| s.threshold_for(sp)).sum();
                (sp.clone(), sum / n)
            })
            .collect();
        Ok(Self {
            weights,
            models,
            threshold: saved.iter().map(|s| s.threshold).sum::<f32>() / n,
            species_thresholds,
            fusion_weight: saved.iter().map(|s| s.fusion_weight).sum::<f32>() / n,
            whitened,
        })
    }

    /// A pretrained backbone's GeM-pooled features run by `engine` (new_individual threshold 0).
    #[cfg(feature = "torch")]
    pub fn zero_shot(features: &ZeroShot, engine: Engine) -> Result<Self> {
        let model = features.load(crate::runtime::device())?;
        Ok(Self {
            models: vec![Network::of_model(model, engine)?],
            weights: vec![1.0],
            threshold: 0.0,
            species_thresholds: BTreeMap::new(),
            fusion_weight: 0.0,
            whitened: Vec::new(),
        })
    }

    /// Length of the fused embedding.
    pub fn dim(&self) -> usize {
        let whitened: usize = self.whitened.iter().map(|g| g.whitening.dim_out).sum();
        let members: usize = (0..self.models.len())
            .filter(|&i| {
                !self
                    .whitened
                    .iter()
                    .any(|g| (g.first..g.first + g.count).contains(&i))
            })
            .map(|i| self.models[i].config.embedding_size as usize)
            .sum();
        whitened + members
    }
}

/// The models that embed photos: trained runs, or a pretrained backbone's features.
#[derive(Clone, Debug)]
pub enum ModelSpec {
    /// Trained run (or checkpoint) folders, fused, run by an engine.
    Runs(Vec<PathBuf>, Engine),
    /// A pretrained backbone's pooled features, run by an engine.
    ZeroShot(ZeroShot, Engine),
}

/// A pretrained backbone's GeM-pooled features as an embedding, untrained.
#[derive(Clone, Debug, PartialEq)]
pub struct ZeroShot {
    pub backbone: String,
    /// The input size (the backbone's own when `None`).
    pub img_size: Option<ImgSize>,
    pub fit: Fit,
    /// The mirror images the flip TTA averages.
    pub flips: Flips,
}

impl ZeroShot {
    /// The backbone at its own input size, photos squashed, the flip TTA left–right.
    pub fn new(backbone: &str) -> Self {
        Self {
            backbone: backbone.to_string(),
            img_size: None,
            fit: Fit::Squash,
            flips: Flips::Horizontal,
        }
    }

    #[cfg(feature = "torch")]
    pub fn load(&self, device: tch::Device) -> Result<HappyWhaleModel> {
        let mut model =
            HappyWhaleModel::zero_shot(&self.backbone, self.img_size, self.fit, device)?;
        model.config.flips = self.flips;
        Ok(model)
    }

    /// A name that changes whenever the weights or the input change.
    #[cfg(feature = "torch")]
    fn identity(&self) -> Result<String> {
        let weights = pretrained_weights(&self.backbone)?;
        let bytes = std::fs::read(&weights)
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let size = self.img_size.map_or("default".into(), |s| s.to_string());
        let fitted = match self.fit {
            Fit::Squash => String::new(),
            Fit::Pad => ":pad".into(),
        };
        Ok(format!(
            "zero-shot:{}:{size}{fitted}:{:016x}",
            self.backbone,
            fnv1a(&bytes, 0)
        ))
    }
}

/// `--models RUN[,RUN...]` or `--zero-shot BACKBONE [--img-size N]`: the argument group of
/// every command that embeds photos.
#[derive(Clone, Debug, clap::Args)]
pub struct ModelArgs {
    /// Trained models (run or checkpoint folders), fused by concatenating their embeddings.
    #[arg(long, value_delimiter = ',', required_unless_present = "zero_shot")]
    pub models: Vec<PathBuf>,
    /// Instead of trained models: a pretrained backbone's GeM features (the baseline; no
    /// training needed), e.g. efficientnet_lite0.
    #[arg(long, conflicts_with = "models")]
    pub zero_shot: Option<String>,
    /// Input size for --zero-shot: 224 or WIDTHxHEIGHT [default: the backbone's own].
    #[arg(long, requires = "zero_shot")]
    pub img_size: Option<ImgSize>,
    /// How a photo fits --zero-shot's input: squash (stretch) or pad (keep its aspect).
    #[arg(long, value_enum, default_value_t = Fit::Squash, requires = "zero_shot")]
    pub fit: Fit,
    /// The mirror images that show the same animal, for --zero-shot's --flip-tta.
    #[arg(long, value_enum, default_value_t = Flips::Horizontal, requires = "zero_shot")]
    pub flips: Flips,
    /// What runs the networks: libtorch (from their weights), or tract or onnxruntime (from
    /// the ONNX files training writes into each checkpoint's onnx/, or that a build with
    /// libtorch writes in memory where there are none; no libtorch needed where there are).
    #[arg(long, value_enum, default_value_t = Engine::default())]
    pub engine: Engine,
}

impl ModelArgs {
    pub fn spec(&self) -> ModelSpec {
        match &self.zero_shot {
            Some(backbone) => ModelSpec::ZeroShot(
                ZeroShot {
                    backbone: backbone.clone(),
                    img_size: self.img_size,
                    fit: self.fit,
                    flips: self.flips,
                },
                self.engine,
            ),
            None => ModelSpec::Runs(self.models.clone(), self.engine),
        }
    }
}

/// Why a build without libtorch has no zero-shot features.
#[cfg(not(feature = "torch"))]
const NO_ZERO_SHOT: &str = "--zero-shot needs libtorch (the full build): it loads the \
     pretrained weights; a build without it runs trained --models";

/// The fingerprint of every file of a folder (names and bytes, in name order).
fn folder_fingerprint(dir: &Path) -> Result<u64> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut h = 0;
    for path in names {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        h = fnv1a(path.file_name().unwrap_or_default().as_encoded_bytes(), h);
        h = fnv1a(&bytes, h);
    }
    Ok(h)
}

impl ModelSpec {
    /// A name that changes whenever the model's weights or input size change.
    pub fn identity(&self) -> Result<String> {
        match self {
            ModelSpec::Runs(runs, _) => {
                let parts = runs
                    .iter()
                    .map(|run| {
                        let dir = checkpoint_dir(run)?;
                        Ok(format!("{:016x}", folder_fingerprint(&dir)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(format!("runs:{}", parts.join("+")))
            }
            #[cfg(feature = "torch")]
            ModelSpec::ZeroShot(z, _) => z.identity(),
            #[cfg(not(feature = "torch"))]
            ModelSpec::ZeroShot(..) => bail!(NO_ZERO_SHOT),
        }
    }

    /// The crop set the models validated on (the first run's; none for zero-shot features).
    pub fn validation_crops(&self) -> Result<Vec<CropSet>> {
        match self {
            ModelSpec::Runs(runs, _) => validation_crops(&runs[0]),
            ModelSpec::ZeroShot(..) => Ok(Vec::new()),
        }
    }

    /// Load the models; `threshold` replaces the saved new_individual threshold when given
    /// (zero-shot features have none: 0 then).
    pub fn load(&self, threshold: Option<f32>) -> Result<Ensemble> {
        let mut ensemble = match self {
            ModelSpec::Runs(runs, engine) => Ensemble::load(runs, *engine)?,
            #[cfg(feature = "torch")]
            ModelSpec::ZeroShot(z, engine) => Ensemble::zero_shot(z, *engine)?,
            #[cfg(not(feature = "torch"))]
            ModelSpec::ZeroShot(..) => bail!(NO_ZERO_SHOT),
        };
        if let Some(t) = threshold {
            ensemble.threshold = t;
        }
        Ok(ensemble)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_swapped_in_whole_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        assert_eq!(run.find_checkpoint("best"), None);
        let state = RunState {
            epoch: 3,
            threshold: 0.4,
            species_thresholds: BTreeMap::from([("beluga".to_string(), 0.6)]),
            ..RunState::default()
        };
        run.save_checkpoint("best", &state, |d| {
            fsio::write_bytes_atomic(&d.join("weights.bin"), b"1")
        })
        .unwrap();
        let found = run.find_checkpoint("best").unwrap();
        assert_eq!(found, dir.path().join("best"));
        assert_eq!(saved_state(&found).unwrap(), state);
        assert_eq!(saved_state(&found).unwrap().threshold_for("beluga"), 0.6);
        assert_eq!(saved_state(&found).unwrap().threshold_for("orca"), 0.4);
        assert!(!dir.path().join("best.tmp").exists());
        assert_eq!(saved_state(dir.path()).unwrap(), RunState::default());
    }

    #[test]
    fn validation_crops_read_only_the_crops_of_any_config() {
        let dir = tempfile::tempdir().unwrap();
        assert!(validation_crops(dir.path()).unwrap().is_empty());
        let full = serde_json::json!({"name": "full", "boxes": [], "share": 0.5});
        let config = serde_json::json!({"model": "x", "crops": [full, full]});
        fsio::write_bytes_atomic(&dir.path().join(CONFIG_FILE), config.to_string().as_bytes())
            .unwrap();
        let crops = validation_crops(&dir.path().join("best")).unwrap();
        assert_eq!(crops, vec!["full:0.5".parse::<CropSet>().unwrap()]);
    }
}
