//! timm's TensorFlow-ported EfficientNets with timm's variable names: `tf_efficientnet_b0…b7`
//! (the `_ns` Noisy-Student weights are `tf_efficientnet_bN.ns_jft_in1k` in timm ≥ 0.9) and
//! `tf_efficientnetv2_s/m/l`. Variables: `conv_stem`, `bn1`, `blocks.S.B.*`, `conv_head`, `bn2`
//! (the classifier is not part of the backbone).
//!
//! Widths and repeats are scaled exactly as timm's `round_channels` and `_scale_stage_depth`
//! ("ceil") do, so a configuration with other multipliers has the same shapes as timm's
//! `_gen_efficientnet(…, channel_multiplier, depth_multiplier)`.

use super::layers::{
    make_divisible, Act, Block, BnCfg, ConvBnAct, FusedMbConv, LayerCfg, MbConv, MbConvCfg,
    Padding, StagedNet, TIMM_DEPTHWISE_SEPARABLE, TIMM_INVERTED_RESIDUAL,
};
use tch::nn;

/// The kinds of block in timm's architecture strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `ds`: depthwise-separable (MBConv without expansion).
    DepthwiseSeparable,
    /// `ir`: inverted residual (MBConv).
    InvertedResidual,
    /// `er`: fused MBConv (timm's `EdgeResidual`).
    FusedMbConv,
    /// `cn`: convolution + BatchNorm + activation.
    ConvBnAct,
}

/// One stage of an architecture definition, e.g. `ir_r2_k3_s2_e6_c24_se0.25`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageDef {
    pub kind: BlockKind,
    pub repeats: usize,
    pub kernel: i64,
    pub stride: i64,
    pub expand: f64,
    pub c_out: i64,
    /// Squeeze-excitation ratio relative to the block's input channels.
    pub se_ratio: Option<f64>,
    /// Whether blocks of equal input and output shape have a residual connection (`cn` blocks
    /// have one only when asked, `_skip`; the others unless told `_noskip`).
    pub skip: bool,
}

const fn stage(
    kind: BlockKind,
    repeats: usize,
    kernel: i64,
    stride: i64,
    expand: f64,
    c_out: i64,
    se_ratio: Option<f64>,
) -> StageDef {
    let skip = !matches!(kind, BlockKind::ConvBnAct);
    StageDef {
        kind,
        repeats,
        kernel,
        stride,
        expand,
        c_out,
        se_ratio,
        skip,
    }
}

use BlockKind::{
    ConvBnAct as Cn, DepthwiseSeparable as Ds, FusedMbConv as Er, InvertedResidual as Ir,
};

/// timm `_gen_efficientnet` (B0 before scaling).
pub const ARCH_B: &[StageDef] = &[
    stage(Ds, 1, 3, 1, 1., 16, Some(0.25)),
    stage(Ir, 2, 3, 2, 6., 24, Some(0.25)),
    stage(Ir, 2, 5, 2, 6., 40, Some(0.25)),
    stage(Ir, 3, 3, 2, 6., 80, Some(0.25)),
    stage(Ir, 3, 5, 1, 6., 112, Some(0.25)),
    stage(Ir, 4, 5, 2, 6., 192, Some(0.25)),
    stage(Ir, 1, 3, 1, 6., 320, Some(0.25)),
];

const fn cn_skip(repeats: usize, c_out: i64) -> StageDef {
    StageDef {
        skip: true,
        ..stage(Cn, repeats, 3, 1, 1., c_out, None)
    }
}

/// timm `_gen_efficientnetv2_s`.
pub const ARCH_V2_S: &[StageDef] = &[
    cn_skip(2, 24),
    stage(Er, 4, 3, 2, 4., 48, None),
    stage(Er, 4, 3, 2, 4., 64, None),
    stage(Ir, 6, 3, 2, 4., 128, Some(0.25)),
    stage(Ir, 9, 3, 1, 6., 160, Some(0.25)),
    stage(Ir, 15, 3, 2, 6., 256, Some(0.25)),
];

/// timm `_gen_efficientnetv2_m`.
pub const ARCH_V2_M: &[StageDef] = &[
    cn_skip(3, 24),
    stage(Er, 5, 3, 2, 4., 48, None),
    stage(Er, 5, 3, 2, 4., 80, None),
    stage(Ir, 7, 3, 2, 4., 160, Some(0.25)),
    stage(Ir, 14, 3, 1, 6., 176, Some(0.25)),
    stage(Ir, 18, 3, 2, 6., 304, Some(0.25)),
    stage(Ir, 5, 3, 1, 6., 512, Some(0.25)),
];

/// timm `_gen_efficientnetv2_l`.
pub const ARCH_V2_L: &[StageDef] = &[
    cn_skip(4, 32),
    stage(Er, 7, 3, 2, 4., 64, None),
    stage(Er, 7, 3, 2, 4., 96, None),
    stage(Ir, 10, 3, 2, 4., 192, Some(0.25)),
    stage(Ir, 19, 3, 1, 6., 224, Some(0.25)),
    stage(Ir, 25, 3, 2, 6., 384, Some(0.25)),
    stage(Ir, 7, 3, 1, 6., 640, Some(0.25)),
];

/// An EfficientNet (B or V2) as timm builds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EfficientNetConfig {
    pub arch: &'static [StageDef],
    pub channel_multiplier: f64,
    pub depth_multiplier: f64,
    /// Stem channels before scaling.
    pub stem_size: i64,
    /// Channels of the head convolution.
    pub num_features: i64,
    /// Whether `num_features` scales with the channel multiplier (B and V2-S; not V2-M/L).
    pub scale_num_features: bool,
    /// Stochastic-depth rate of the last block; earlier blocks get proportionally less.
    pub drop_path_rate: f64,
    pub act: Act,
    pub bn_eps: f64,
    pub padding: Padding,
}

impl EfficientNetConfig {
    const fn tf(arch: &'static [StageDef], stem_size: i64, scale_num_features: bool) -> Self {
        EfficientNetConfig {
            arch,
            channel_multiplier: 1.0,
            depth_multiplier: 1.0,
            stem_size,
            num_features: 1280,
            scale_num_features,
            drop_path_rate: 0.2,
            act: Act::Silu,
            bn_eps: 1e-3,
            padding: Padding::Same,
        }
    }

    /// `tf_efficientnet_bN` with its channel and depth multipliers.
    pub const fn tf_b(channel_multiplier: f64, depth_multiplier: f64) -> Self {
        EfficientNetConfig::tf(ARCH_B, 32, true)
            .with_multipliers(channel_multiplier, depth_multiplier)
    }
    pub const TF_B0: Self = Self::tf_b(1.0, 1.0);
    pub const TF_B1: Self = Self::tf_b(1.0, 1.1);
    pub const TF_B2: Self = Self::tf_b(1.1, 1.2);
    pub const TF_B3: Self = Self::tf_b(1.2, 1.4);
    pub const TF_B4: Self = Self::tf_b(1.4, 1.8);
    pub const TF_B5: Self = Self::tf_b(1.6, 2.2);
    pub const TF_B6: Self = Self::tf_b(1.8, 2.6);
    pub const TF_B7: Self = Self::tf_b(2.0, 3.1);
    pub const TF_V2_S: Self = Self::tf(ARCH_V2_S, 24, true);
    pub const TF_V2_M: Self = Self::tf(ARCH_V2_M, 24, false);
    pub const TF_V2_L: Self = Self::tf(ARCH_V2_L, 32, false);

    /// The same network with other channel and depth multipliers.
    pub const fn with_multipliers(self, channel_multiplier: f64, depth_multiplier: f64) -> Self {
        EfficientNetConfig {
            channel_multiplier,
            depth_multiplier,
            ..self
        }
    }

    /// timm's `round_channels`.
    pub fn round_channels(&self, channels: i64) -> i64 {
        make_divisible(channels as f64 * self.channel_multiplier, 8, 0.9)
    }

    /// timm's `_scale_stage_depth` with "ceil" for a stage of one block definition.
    pub fn stage_repeats(&self, stage: &StageDef) -> usize {
        (stage.repeats as f64 * self.depth_multiplier).ceil() as usize
    }

    pub fn head_channels(&self) -> i64 {
        if self.scale_num_features {
            self.round_channels(self.num_features)
        } else {
            self.num_features
        }
    }
}

/// Squeeze-excitation width as timm computes it: the ratio is relative to the block input, and
/// Python's `round` rounds half to even.
fn se_channels(mid: i64, se_ratio: f64, expand: f64) -> i64 {
    (mid as f64 * (se_ratio / expand)).round_ties_even() as i64
}

/// Build a timm EfficientNet under `p` (the checkpoint's root).
pub fn efficientnet(p: &nn::Path, cfg: &EfficientNetConfig) -> StagedNet {
    let layer = LayerCfg {
        act: cfg.act,
        bn: BnCfg {
            eps: cfg.bn_eps,
            momentum: 0.1,
        },
        padding: cfg.padding,
    };
    let stem_size = cfg.round_channels(cfg.stem_size);
    let stem = ConvBnAct::new(p / "conv_stem", p / "bn1", 3, stem_size, 3, 2, layer);
    let total: usize = cfg.arch.iter().map(|s| cfg.stage_repeats(s)).sum();
    let mut index = 0;
    let mut c_in = stem_size;
    let mut stages = Vec::with_capacity(cfg.arch.len());
    for (s, def) in cfg.arch.iter().enumerate() {
        let repeats = cfg.stage_repeats(def);
        let c_out = cfg.round_channels(def.c_out);
        let mut blocks = Vec::with_capacity(repeats);
        for b in 0..repeats {
            let bp = p / "blocks" / s / b;
            let stride = if b == 0 { def.stride } else { 1 };
            let drop_path = cfg.drop_path_rate * index as f64 / total as f64;
            let mid = make_divisible(c_in as f64 * def.expand, 8, 0.9);
            let mut block = MbConvCfg {
                c_in,
                c_out,
                expand_to: Some(mid),
                kernel: def.kernel,
                stride,
                se: def.se_ratio.map(|r| se_channels(mid, r, def.expand)),
                skip: def.skip,
                drop_path,
            };
            blocks.push(match def.kind {
                BlockKind::DepthwiseSeparable => {
                    block.expand_to = None;
                    block.se = def.se_ratio.map(|r| se_channels(c_in, r, 1.));
                    Block::MbConv(MbConv::new(bp, &TIMM_DEPTHWISE_SEPARABLE, &block, layer))
                }
                BlockKind::InvertedResidual => {
                    Block::MbConv(MbConv::new(bp, &TIMM_INVERTED_RESIDUAL, &block, layer))
                }
                BlockKind::FusedMbConv => Block::Fused(FusedMbConv::new(bp, &block, layer)),
                BlockKind::ConvBnAct => {
                    let (conv, bn) = (&bp / "conv", &bp / "bn1");
                    let block = ConvBnAct::new(conv, bn, c_in, c_out, def.kernel, stride, layer);
                    Block::Conv(block.with_skip(def.skip, drop_path))
                }
            });
            c_in = c_out;
            index += 1;
        }
        stages.push(blocks);
    }
    let num_features = cfg.head_channels();
    let head = ConvBnAct::new(p / "conv_head", p / "bn2", c_in, num_features, 1, 1, layer);
    StagedNet {
        stem,
        stages,
        head,
        num_features,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_and_depths_follow_timm() {
        let b4 = EfficientNetConfig::TF_B4;
        let widths: Vec<i64> = ARCH_B.iter().map(|s| b4.round_channels(s.c_out)).collect();
        assert_eq!(widths, [24, 32, 56, 112, 160, 272, 448]);
        let repeats: Vec<usize> = ARCH_B.iter().map(|s| b4.stage_repeats(s)).collect();
        assert_eq!(repeats, [2, 4, 4, 6, 6, 8, 2]);
        assert_eq!(b4.round_channels(32), 48);
        assert_eq!(b4.head_channels(), 1792);
        assert_eq!(EfficientNetConfig::TF_B7.head_channels(), 2560);
        assert_eq!(EfficientNetConfig::TF_V2_M.head_channels(), 1280);
        assert_eq!(se_channels(96, 0.25, 6.), 4);
        assert_eq!(se_channels(32, 0.25, 1.), 8);
    }
}
