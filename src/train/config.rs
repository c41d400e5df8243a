//! The training config: every setting of a run, the form of `--config FILE.json` and of a run's
//! `train_config.json`.

use super::augment::AugmentConfig;
use crate::args::{defaults_of, merge_flags};
use crate::crops::CropSet;
use crate::data::DataFolders;
use crate::model::config::ArcFaceConfig;
use crate::model::Variant;
use crate::transforms::{Fit, Flips, ImgSize};
use anyhow::{Context, Result};
use clap::ArgAction;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// identities (the `frozen` module). No gradient steps: seconds after one pass over the
    /// photos, and the best mode when there are few photos per animal.
    Frozen,
}

/// Which epoch's model a gradient-mode run keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The last epoch's.
    Last,
    /// The epoch with the best validation MAP@5.
    Best,
}

/// Everything a run needs: the `finprint train` flags, the form of `--config FILE.json` and of
/// a run's `train_config.json` (missing keys: defaults). Each option is defined here once; its
/// default is the one its flag shows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct TrainConfig {
    /// A folder in Kaggle's layout (train.csv, train_images/), or several, comma-separated,
    /// trained on as one catalogue: each folder's ids get its name as a prefix, so that the
    /// animals of different folders stay apart.
    #[arg(long, default_value = "synth")]
    pub data: DataFolders,
    /// Backbone of the registry; with --mode frozen one or more, comma-separated (e.g.
    /// efficientnet_lite0,efficientnet_lite1,efficientnet_lite2).
    #[arg(long, default_value = "efficientnet_lite0")]
    pub model: String,
    /// full: fine-tune every layer; fast: freeze and cache the early backbone stages; frozen: no
    /// gradient step, the pretrained features whitened on the training identities.
    #[arg(long, value_enum, default_value_t = Mode::Full)]
    pub mode: Mode,
    /// The fold that validates, of --folds.
    #[arg(long, default_value_t = 0)]
    pub fold: usize,
    /// Folds of the individuals (each animal's photos stay in one fold).
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Share of the validation fold's individuals kept out of training (unseen animals).
    #[arg(long, default_value_t = 0.2)]
    pub new_share: f64,
    /// Passes over the training photos.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Input size in pixels: 224 (square) or WIDTHxHEIGHT, e.g. 448x160 for animals seen long
    /// and narrow [default: the backbone's own, square].
    #[arg(long)]
    pub img_size: Option<ImgSize>,
    /// How a photo fits the input size: squash (stretch) or pad (keep its aspect).
    #[arg(long, value_enum, default_value_t = Fit::Squash)]
    pub fit: Fit,
    /// The mirror images that still show the same animal, which the augmentations and the
    /// flip TTA use: none for a flank, horizontal for a fin, both for a whale seen from above.
    #[arg(long, value_enum, default_value_t = Flips::Horizontal)]
    pub flips: Flips,
    /// Photos per training step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Learning rate of the backbone; the heads get lr × head-lr-mult.
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,
    /// The heads' (GeM, neck, ArcFace) learning rate as a multiple of --lr.
    #[arg(long, default_value_t = 10.0)]
    pub head_lr_mult: f64,
    /// AdamW weight decay, on weight matrices and kernels only.
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Linear warm-up, in epochs (may be fractional).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_epochs: f64,
    /// The cosine decays to lr × min-lr-ratio.
    #[arg(long, default_value_t = 0.01)]
    pub min_lr_ratio: f64,
    /// Largest global gradient norm (0: no clipping).
    #[arg(long, default_value_t = 5.0)]
    pub grad_clip: f64,
    /// Fast mode: backbone stages that stay frozen [default: all but the last].
    #[arg(long)]
    pub freeze_stages: Option<usize>,
    /// Fast mode: augmented views cached per photo; epoch e trains on view e mod passes.
    #[arg(long, default_value_t = 4)]
    pub aug_passes: usize,
    /// Length of the embedding (the neck's output).
    #[arg(long, default_value_t = 512)]
    pub embedding_size: i64,
    #[command(flatten)]
    pub arcface: ArcFaceConfig,
    #[command(flatten)]
    pub augment: AugmentConfig,
    /// Start from the backbone's ImageNet weights.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub pretrained: bool,
    /// Seeds every random draw (folds, augmentations, initialisation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// libtorch threads [default: the free cores, read again at each epoch].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Validate every this many epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    pub val_every: usize,
    /// The model a gradient-mode run keeps in `best/`: the last epoch's, with its validation's
    /// threshold and weights, or the best-validated epoch's. A few dozen validation queries
    /// pick an epoch by noise: over five folds of each real set the last epoch lost on none
    /// and found more right whales (BENCHMARKS.md).
    #[arg(long, value_enum, default_value_t = Keep::Last)]
    pub keep: Keep,
    /// Validate with the mean embedding of each photo and its mirror image.
    #[arg(long, default_value_t = false, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub flip_tta: bool,
    /// Crop sets mixed in training by share, NAME=BOXES.csv[+MORE.csv][:SHARE] or
    /// full[:SHARE], comma-separated; validation (and predict) use the first [default: whole
    /// photos].
    #[arg(long, value_delimiter = ',')]
    pub crops: Vec<CropSet>,
    /// Fuse the trained embedding with the pretrained backbone's own GeM features, at the
    /// weight validation finds best (0 is among those tried): on few animals the ImageNet
    /// features still carry what training has not learnt.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    pub fuse_pretrained: bool,
    /// Weight of a species head's loss beside ArcFace's (gradient modes; 0: no species head).
    /// The head classifies the species from the embedding; validation and predict then move
    /// candidates of other species than the predicted one behind the rest, and pick the
    /// per-species threshold by it.
    #[arg(long, default_value_t = 0.0)]
    pub species_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        defaults_of()
    }
}

impl TrainConfig {
    /// The flips of the validation TTA: the allowed ones with `flip_tta`, else none.
    pub fn tta_flips(&self) -> Flips {
        match self.flip_tta {
            true => self.flips,
            false => Flips::None,
        }
    }

    /// The config with its data folder and box files made absolute, so that a run (and the
    /// crop set `predict` takes from it) works from any working folder.
    pub fn with_absolute_paths(mut self) -> Result<Self> {
        let absolute = |p: &Path| {
            std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
        };
        self.data = self.data.absolute()?;
        for set in &mut self.crops {
            for boxes in &mut set.boxes {
                *boxes = absolute(boxes)?;
            }
        }
        Ok(self)
    }

    /// The input size for `variant`: `img_size`, else the backbone's own.
    pub fn input_size(&self, variant: &Variant) -> ImgSize {
        self.img_size
            .unwrap_or(ImgSize::square(variant.input_size as u32))
    }
}

/// `finprint train`: the options, over `--config` when given.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: TrainConfig,
    /// The run folder (checkpoints, metrics, summary); never overwritten without --resume.
    #[arg(long)]
    pub out: PathBuf,
    /// A JSON training config (the form of any run's train_config.json); flags given override
    /// it.
    #[arg(long = "config", id = "config_file", value_name = "FILE.json")]
    pub config_file: Option<PathBuf>,
    /// Continue the run in --out from its last checkpoint (its saved config wins).
    #[arg(long)]
    pub resume: bool,
}

impl TrainArgs {
    /// The config: `--config` overridden by the flags given in `matches` (the `train`
    /// subcommand's).
    pub fn resolve(&self, matches: &clap::ArgMatches) -> Result<TrainConfig> {
        merge_flags(&self.config, matches, self.config_file.as_deref())
    }
}
