//! The backbones: the trait every CNN implements, and one registry of variants, each a few
//! config lines (as timm's).

use super::efficientnet::{self, EfficientNetConfig};
use super::efficientnet_lite::{self, LiteConfig};
use super::nfnet::{self, NfNetConfig};
use crate::onnx::{Graph, Value};
use tch::Tensor;

/// A CNN that maps a normalised image batch `[N, 3, H, W]` to a feature map `[N, C, H', W']`.
///
/// It runs in stages so that a cheaper training mode can freeze (and cache) the early ones:
/// stage 0 is the stem, the last stage ends with the head convolution, and
/// `forward_stages(x, 0, num_stages())` is the whole network.
pub trait Backbone: std::fmt::Debug + Send {
    /// Run stages `start..end` on `xs` (the input of stage `start`).
    fn forward_stages(&self, xs: &Tensor, train: bool, start: usize, end: usize) -> Tensor;
    fn num_stages(&self) -> usize;
    /// Channels of the final feature map.
    fn num_features(&self) -> i64;
    /// The whole network.
    fn forward_features(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_stages(xs, train, 0, self.num_stages())
    }
    /// The whole network in eval mode, in an ONNX graph: the feature map of the image batch
    /// `x` (an error for a backbone that cannot be written yet).
    fn emit(&self, g: &mut Graph, x: &Value) -> anyhow::Result<Value>;
}

/// Which network a variant is, with its configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arch {
    /// timm's EfficientNet-B and EfficientNetV2 ([`efficientnet`]).
    EfficientNet(EfficientNetConfig),
    /// EfficientNet-Lite in lukemelas' layout ([`efficientnet_lite`]).
    EfficientNetLite(LiteConfig),
    /// timm's ECA-NFNets ([`nfnet`]).
    NfNet(NfNetConfig),
}

/// A backbone of the registry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub name: &'static str,
    pub arch: Arch,
    /// Default (square) input size in pixels.
    pub input_size: i64,
    /// Per-channel mean and standard deviation in 0..1 units: the network sees
    /// `(x / 255 − mean) / std`.
    pub mean: [f64; 3],
    pub std: [f64; 3],
    /// Whether pretrained weights ship: `weights/NAME.safetensors`, fetched and converted by
    /// `tools/fetch_weights.sh` ([`Variant::weights_file`]).
    pub pretrained: bool,
}

impl Variant {
    /// The file name, in `weights/`, of this variant's converted pretrained weights, if any.
    pub fn weights_file(&self) -> Option<String> {
        self.pretrained
            .then(|| format!("{}.safetensors", self.name))
    }

    /// Build this backbone's variables under `p`.
    pub fn build(&self, p: &tch::nn::Path) -> Box<dyn Backbone> {
        match &self.arch {
            Arch::EfficientNet(cfg) => Box::new(efficientnet::efficientnet(p, cfg)),
            Arch::EfficientNetLite(cfg) => Box::new(efficientnet_lite::efficientnet_lite(p, cfg)),
            Arch::NfNet(cfg) => Box::new(nfnet::nfnet(p, cfg)),
        }
    }

    /// Normalise `[N, 3, H, W]` pixels in 0..255 (any kind) to this network's float input.
    pub fn normalize(&self, pixels: &Tensor) -> Tensor {
        let options = (tch::Kind::Float, pixels.device());
        let mean = Tensor::from_slice(&self.mean)
            .to_kind(tch::Kind::Float)
            .view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&self.std)
            .to_kind(tch::Kind::Float)
            .view([1, 3, 1, 1]);
        (pixels.to_kind(options.0) / 255. - mean.to_device(options.1)) / std.to_device(options.1)
    }
}

const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// TF-Lite's `(x − 127) / 128` on 0..255 pixels.
const LITE_MEAN: [f64; 3] = [127. / 255.; 3];
const LITE_STD: [f64; 3] = [128. / 255.; 3];
const INCEPTION_MEAN: [f64; 3] = [0.5; 3];
const INCEPTION_STD: [f64; 3] = [0.5; 3];

/// A registry entry: `norm` is the input's (mean, std); `pretrained` whether weights ship.
const fn entry(
    name: &'static str,
    arch: Arch,
    size: i64,
    norm: ([f64; 3], [f64; 3]),
    pretrained: bool,
) -> Variant {
    Variant {
        name,
        arch,
        input_size: size,
        mean: norm.0,
        std: norm.1,
        pretrained,
    }
}

const fn lite(name: &'static str, cfg: LiteConfig, size: i64, pretrained: bool) -> Variant {
    let norm = (LITE_MEAN, LITE_STD);
    entry(name, Arch::EfficientNetLite(cfg), size, norm, pretrained)
}

const fn tf_b(name: &'static str, cfg: EfficientNetConfig, size: i64) -> Variant {
    let norm = (IMAGENET_MEAN, IMAGENET_STD);
    entry(name, Arch::EfficientNet(cfg), size, norm, false)
}

const fn tf_v2(name: &'static str, cfg: EfficientNetConfig, size: i64) -> Variant {
    let norm = (INCEPTION_MEAN, INCEPTION_STD);
    entry(name, Arch::EfficientNet(cfg), size, norm, false)
}

const fn eca_nfnet(name: &'static str, cfg: NfNetConfig, size: i64) -> Variant {
    entry(
        name,
        Arch::NfNet(cfg),
        size,
        (IMAGENET_MEAN, IMAGENET_STD),
        false,
    )
}

/// Every backbone finprint can build. Sizes and normalisation are those of the pretrained
/// weights: timm's `tf_efficientnet_bN.ns_jft_in1k`, `tf_efficientnetv2_*.in21k_ft_in1k` and
/// `eca_nfnet_l0/l1.ra2_in1k`, `eca_nfnet_l2.ra3_in1k` (train sizes), and the EfficientNet-Lite
/// packages.
static VARIANTS: [Variant; 19] = [
    lite("efficientnet_lite0", LiteConfig::LITE0, 224, true),
    lite("efficientnet_lite1", LiteConfig::LITE1, 240, true),
    lite("efficientnet_lite2", LiteConfig::LITE2, 260, true),
    lite("efficientnet_lite3", LiteConfig::LITE3, 280, false),
    lite("efficientnet_lite4", LiteConfig::LITE4, 300, false),
    tf_b("tf_efficientnet_b0_ns", EfficientNetConfig::TF_B0, 224),
    tf_b("tf_efficientnet_b1_ns", EfficientNetConfig::TF_B1, 240),
    tf_b("tf_efficientnet_b2_ns", EfficientNetConfig::TF_B2, 260),
    tf_b("tf_efficientnet_b3_ns", EfficientNetConfig::TF_B3, 300),
    tf_b("tf_efficientnet_b4_ns", EfficientNetConfig::TF_B4, 380),
    tf_b("tf_efficientnet_b5_ns", EfficientNetConfig::TF_B5, 456),
    tf_b("tf_efficientnet_b6_ns", EfficientNetConfig::TF_B6, 528),
    tf_b("tf_efficientnet_b7_ns", EfficientNetConfig::TF_B7, 600),
    tf_v2("tf_efficientnetv2_s", EfficientNetConfig::TF_V2_S, 300),
    tf_v2("tf_efficientnetv2_m", EfficientNetConfig::TF_V2_M, 384),
    tf_v2("tf_efficientnetv2_l", EfficientNetConfig::TF_V2_L, 384),
    eca_nfnet("eca_nfnet_l0", NfNetConfig::ECA_NFNET_L0, 224),
    eca_nfnet("eca_nfnet_l1", NfNetConfig::ECA_NFNET_L1, 256),
    eca_nfnet("eca_nfnet_l2", NfNetConfig::ECA_NFNET_L2, 320),
];

/// All variants, in registry order.
pub fn variants() -> &'static [Variant] {
    &VARIANTS
}

/// The variant called `name`.
pub fn variant(name: &str) -> Option<&'static Variant> {
    VARIANTS.iter().find(|v| v.name == name)
}

/// Build the backbone `name` under `p`; an unknown name is an error listing the known ones.
pub fn build_backbone(name: &str, p: &tch::nn::Path) -> anyhow::Result<Box<dyn Backbone>> {
    let known = || {
        VARIANTS
            .iter()
            .map(|v| v.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let v = variant(name)
        .ok_or_else(|| anyhow::anyhow!("unknown backbone {name:?}; known: {}", known()))?;
    Ok(v.build(p))
}
