//! What a model is, without its weights: the config a checkpoint saves beside them, and the
//! names of the checkpoint's files. Free of libtorch: a build without it reads checkpoints.

use crate::transforms::{Fit, Flips, ImgSize};
use serde::{Deserialize, Serialize};

/// Everything needed to rebuild a model before its weights are loaded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// A backbone variant of the registry, e.g. `efficientnet_lite0`.
    pub backbone: String,
    /// Input size in pixels (a number for a square, `WxH` otherwise).
    pub img_size: ImgSize,
    /// How a photo fits the input size (older checkpoints: squashed).
    #[serde(default)]
    pub fit: Fit,
    /// The mirror images that show the same animal, for the flip TTA (older checkpoints:
    /// left–right).
    #[serde(default)]
    pub flips: Flips,
    /// Normalisation of 0..1 pixel values: `(x − mean) / std` per channel.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    pub embedding_size: i64,
    /// Initial GeM exponent.
    pub gem_p: f64,
    pub arcface: ArcFaceConfig,
    /// Individual ids; a class is an index into this list.
    pub classes: Vec<String>,
    /// Training images per class (sets dynamic margins).
    pub class_counts: Vec<usize>,
    /// The species head's classes (empty: no species head).
    #[serde(default)]
    pub species: Vec<String>,
}

#[cfg(feature = "torch")]
impl ModelConfig {
    /// A config with the backbone's own input size and normalisation.
    pub fn for_backbone(
        backbone: &str,
        classes: Vec<String>,
        class_counts: Vec<usize>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let v =
            super::variant(backbone).with_context(|| format!("unknown backbone {backbone:?}"))?;
        Ok(Self {
            backbone: backbone.to_string(),
            img_size: ImgSize::square(v.input_size as u32),
            fit: Fit::Squash,
            flips: Flips::Horizontal,
            mean: v.mean,
            std: v.std,
            embedding_size: 512,
            gem_p: 3.0,
            arcface: ArcFaceConfig::default(),
            classes,
            class_counts,
            species: Vec::new(),
        })
    }
}

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The margin of each class: a constant, or the winners' dynamic margin `a·n^(−λ) + b` from the
/// class's image count `n` (rare classes get larger margins).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynamicMargin {
    pub a: f64,
    pub lambda: f64,
    pub b: f64,
}

impl Default for DynamicMargin {
    fn default() -> Self {
        Self {
            a: 0.271,
            lambda: 0.364,
            b: 0.05,
        }
    }
}

impl DynamicMargin {
    pub fn margin(&self, count: usize) -> f64 {
        self.a * (count.max(1) as f64).powf(-self.lambda) + self.b
    }
}

/// ArcFace exactly as the seed's `ArcMarginProduct` defines it, plus sub-centers and dynamic
/// margins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct ArcFaceConfig {
    /// ArcFace: scale of the logits.
    #[arg(
        long = "arc-s",
        id = "arcface.s",
        value_name = "S",
        default_value_t = 30.0
    )]
    pub s: f64,
    /// ArcFace: additive angular margin (when no dynamic margins are configured).
    #[arg(
        long = "arc-m",
        id = "arcface.m",
        value_name = "M",
        default_value_t = 0.5
    )]
    pub m: f64,
    /// ArcFace: apply the margin only where cos θ > 0 (else: the seed's `cos θ − sin(π−m)·m`
    /// beyond π−m).
    #[arg(long = "arc-easy-margin", id = "arcface.easy_margin", value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub easy_margin: bool,
    /// ArcFace: label smoothing of the one-hot target.
    #[arg(
        long = "arc-ls-eps",
        id = "arcface.ls_eps",
        value_name = "EPS",
        default_value_t = 0.0
    )]
    pub ls_eps: f64,
    /// ArcFace: centers per class; the class cosine is the best of its centers.
    #[arg(
        long = "arc-subcenters",
        id = "arcface.subcenters",
        value_name = "N",
        default_value_t = 1
    )]
    pub subcenters: i64,
    /// Per-class margins from image counts, replacing `m` (config file only).
    #[arg(skip)]
    pub dynamic: Option<DynamicMargin>,
}

impl Default for ArcFaceConfig {
    fn default() -> Self {
        crate::args::defaults_of()
    }
}
