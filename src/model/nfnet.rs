//! timm's ECA-NFNets `eca_nfnet_l0`, `l1`, `l2` (timm's `NormFreeNet` with `_nfnet_cfg`):
//! normalisation-free pre-activation bottleneck ResNets with grouped 3×3 convolutions, efficient
//! channel attention (ECA) after each block and SiLU, with timm's variable names: `stem.conv1…4`,
//! `stages.S.B.{downsample.conv, conv1, conv2, conv2b, conv3, attn_last.conv}` and `final_conv`
//! (the classifier is not part of the backbone). Every convolution has a `weight`, a `bias` and a
//! `gain`.
//!
//! Without BatchNorm, activations keep their scale through weight standardisation
//! ([`ScaledStdConv2d`]) and explicitly scaled residuals: a block computes
//! `shortcut + α · branch(act(x) · β)` with `β = 1 / sqrt(Var x)` as expected at init — the
//! variance grows by `α²` a block, and is back to 1 after each stage's first block, whose shortcut
//! is a convolution of `act(x) · β`.

use super::layers::{drop_path, emit_residual, make_divisible, path_name, values, Act};
use super::Backbone;
use crate::onnx::{Attr, Conv, Graph, Value};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// An ECA-NFNet as timm builds it: a "deep quad" stem, four stages of [`NfBlock`]s, a 1×1
/// final convolution and its activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NfNetConfig {
    /// Blocks per stage.
    pub depths: [usize; 4],
    /// Output channels per stage (before rounding to `ch_div`).
    pub channels: [i64; 4],
    /// Output channels of the stem: four 3×3 convolutions to ⅛, ¼, ½ and all of them, strides
    /// 2, 1, 1, 2 (timm's `stem_type='deep_quad'`).
    pub stem_chs: i64,
    /// Channels per group of the 3×3 convolutions.
    pub group_size: i64,
    /// Bottleneck width relative to a block's output channels.
    pub bottle_ratio: f64,
    /// Channels of the final convolution relative to the last stage's.
    pub feat_mult: f64,
    /// Scale α of every residual branch.
    pub alpha: f64,
    /// Scale of the attention's output (timm's `attn_gain`).
    pub attn_gain: f64,
    /// Channel counts are rounded to multiples of this.
    pub ch_div: i64,
    /// Epsilon of the weight standardisation.
    pub std_conv_eps: f64,
    pub act: Act,
    /// Stochastic-depth rate of the last block, from 0 at the first (timm's `linspace`).
    pub drop_path_rate: f64,
}

impl NfNetConfig {
    /// timm's `_nfnet_cfg` for the "light" ECA variants; stochastic depth 0.2 as finprint's
    /// EfficientNets have (timm's default is none; it changes training only).
    const fn eca_l(depths: [usize; 4], feat_mult: f64) -> Self {
        NfNetConfig {
            depths,
            channels: [256, 512, 1536, 1536],
            stem_chs: 128,
            group_size: 64,
            bottle_ratio: 0.25,
            feat_mult,
            alpha: 0.2,
            attn_gain: 2.0,
            ch_div: 8,
            std_conv_eps: 1e-5,
            act: Act::Silu,
            drop_path_rate: 0.2,
        }
    }
    pub const ECA_NFNET_L0: Self = Self::eca_l([1, 2, 6, 3], 1.5);
    pub const ECA_NFNET_L1: Self = Self::eca_l([2, 4, 12, 6], 2.0);
    pub const ECA_NFNET_L2: Self = Self::eca_l([3, 6, 18, 9], 2.0);

    /// Options of every convolution: the activation's gamma and this epsilon.
    fn conv(&self) -> StdConvCfg {
        StdConvCfg {
            stride: 1,
            groups: 1,
            gamma: nonlin_gamma(self.act),
            eps: self.std_conv_eps,
            gain_init: 1.,
        }
    }

    fn round(&self, channels: f64) -> i64 {
        make_divisible(channels, self.ch_div, 0.9)
    }

    /// Output channels of stage `s`.
    pub fn stage_channels(&self, s: usize) -> i64 {
        self.round(self.channels[s] as f64)
    }

    /// Bottleneck channels and groups of a block with `c_out` output channels (timm's
    /// `NormFreeBlock`: rounded, then made a whole number of groups).
    pub fn bottleneck(&self, c_out: i64) -> (i64, i64) {
        let mid = self.round(c_out as f64 * self.bottle_ratio);
        let groups = mid / self.group_size;
        if self.group_size % self.ch_div == 0 {
            (self.group_size * groups, groups)
        } else {
            (mid, groups)
        }
    }

    /// Channels of the final convolution.
    pub fn num_features(&self) -> i64 {
        let c = (self.channels[3] as f64 * self.feat_mult) as i64;
        self.round(c as f64)
    }
}

/// timm's `_nonlin_gamma` (from DeepMind's NFNets): the factor that brings the activation of a
/// unit Gaussian back to unit variance. timm folds it into the next convolution's weights.
fn nonlin_gamma(act: Act) -> f64 {
    match act {
        Act::Silu => 1.7881293296813965,
        Act::Relu6 => 1.7131484746932983,
    }
}

/// Options of a [`ScaledStdConv2d`].
#[derive(Debug, Clone, Copy)]
pub struct StdConvCfg {
    pub stride: i64,
    pub groups: i64,
    /// Gain of the activation before the convolution ([`nonlin_gamma`]).
    pub gamma: f64,
    pub eps: f64,
    /// Initial value of the per-channel `gain`.
    pub gain_init: f64,
}

impl StdConvCfg {
    pub const fn stride(self, stride: i64) -> Self {
        StdConvCfg { stride, ..self }
    }
    pub const fn groups(self, groups: i64) -> Self {
        StdConvCfg { groups, ..self }
    }
    pub const fn gain_init(self, gain_init: f64) -> Self {
        StdConvCfg { gain_init, ..self }
    }
}

/// Convolution with scaled weight standardisation (timm's `ScaledStdConv2d`, PyTorch padding):
/// each output channel's weights are standardised over their fan-in (biased variance, `eps`)
/// and scaled by `gain · gamma / sqrt(fan_in)`, on every call, so that training sees it.
#[derive(Debug)]
pub struct ScaledStdConv2d {
    /// The checkpoint path (names the ONNX node).
    name: String,
    ws: Tensor,
    bs: Tensor,
    gain: Tensor,
    /// `gamma / sqrt(fan_in)`.
    scale: f64,
    eps: f64,
    stride: i64,
    padding: i64,
    groups: i64,
}

impl ScaledStdConv2d {
    /// As timm initialises it: weights normal with variance `1 / fan_in`, biases 0, gains
    /// `gain_init`.
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, cfg: StdConvCfg) -> Self {
        let init = nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanIn,
            non_linearity: nn::init::NonLinearity::Linear,
        };
        let fan_in = c_in / cfg.groups * kernel * kernel;
        ScaledStdConv2d {
            name: path_name(&p),
            ws: p.var("weight", &[c_out, c_in / cfg.groups, kernel, kernel], init),
            bs: p.var("bias", &[c_out], nn::Init::Const(0.)),
            gain: p.var("gain", &[c_out, 1, 1, 1], nn::Init::Const(cfg.gain_init)),
            scale: cfg.gamma / (fan_in as f64).sqrt(),
            eps: cfg.eps,
            stride: cfg.stride,
            padding: (cfg.stride - 1 + kernel - 1) / 2,
            groups: cfg.groups,
        }
    }

    /// The standardised, scaled weights (computed as timm does, by a training-mode batch norm
    /// over `[1, c_out, fan_in]`).
    pub fn weight(&self) -> Tensor {
        let c_out = self.ws.size()[0];
        let gain = (&self.gain * self.scale).view([-1]);
        self.ws
            .reshape([1, c_out, -1])
            .batch_norm(
                Some(&gain),
                None::<&Tensor>,
                None::<&Tensor>,
                None::<&Tensor>,
                true,
                0.,
                self.eps,
                true,
            )
            .reshape_as(&self.ws)
    }
}

impl ScaledStdConv2d {
    /// This convolution in an ONNX graph, its standardised weights computed once.
    fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        let ws = tch::no_grad(|| self.weight());
        let geometry = Conv {
            kernel: ws.size()[2],
            stride: self.stride,
            dilation: 1,
            groups: self.groups,
            pads: [self.padding; 4],
        };
        let weights = (&ws.size()[..], &values(&ws)[..]);
        g.conv2d(&self.name, x, weights, Some(&values(&self.bs)), geometry)
    }
}

impl nn::Module for ScaledStdConv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d(
            &self.weight(),
            Some(&self.bs),
            [self.stride],
            [self.padding],
            [1],
            self.groups,
        )
    }
}

/// Efficient channel attention (timm's `EcaModule`): channel gates from a 1-D convolution, without
/// bias, over the channels' global averages, then a sigmoid. Variable `conv.weight` `[1, 1, k]`.
#[derive(Debug)]
pub struct Eca {
    name: String,
    ws: Tensor,
}

/// ECA's kernel size for `channels`: `|log2(C) + 1| / 2`, truncated, made odd upwards, at least 3.
pub fn eca_kernel(channels: i64) -> i64 {
    // Python's `math.log(x, 2)` is `ln x / ln 2`.
    let t = (((channels as f64).ln() / 2f64.ln() + 1.).abs() / 2.) as i64;
    (if t % 2 == 1 { t } else { t + 1 }).max(3)
}

impl Eca {
    /// PyTorch's default `Conv1d` initialisation (timm leaves it): uniform in ±1/sqrt(k).
    pub fn new(p: nn::Path, channels: i64) -> Self {
        let k = eca_kernel(channels);
        let bound = 1. / (k as f64).sqrt();
        let init = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        Eca {
            name: path_name(&p),
            ws: p.var("weight", &[1, 1, k], init),
        }
    }
}

impl Eca {
    fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        let (n, c) = (x.shape[0], x.shape[1]);
        let k = self.ws.size()[2];
        let name = &self.name;
        let mean = g.node("GlobalAveragePool", name, &[&x.name], &[], vec![n, c, 1, 1]);
        let row = g.ints("eca.row", &[-1, 1, c]);
        let mean = g.node("Reshape", name, &[&mean.name, &row], &[], vec![n, 1, c]);
        let weight = g.weight(&format!("{name}.weight"), &[1, 1, k], &values(&self.ws));
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![k])),
            ("pads", Attr::Ints(vec![(k - 1) / 2; 2])),
        ];
        let conv = g.node("Conv", name, &[&mean.name, &weight], &attrs, vec![n, 1, c]);
        let gates = g.node("Sigmoid", name, &[&conv.name], &[], vec![n, 1, c]);
        let column = g.ints("eca.column", &[-1, c, 1, 1]);
        let gates = g.node(
            "Reshape",
            name,
            &[&gates.name, &column],
            &[],
            vec![n, c, 1, 1],
        );
        g.node("Mul", name, &[&x.name, &gates.name], &[], x.shape.clone())
    }
}

impl nn::Module for Eca {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let n = xs.size()[0];
        let k = self.ws.size()[2];
        let gates = xs
            .mean_dim([2i64, 3].as_slice(), false, None::<Kind>)
            .view([n, 1, -1])
            .conv1d(&self.ws, None::<&Tensor>, [1], [(k - 1) / 2], [1], 1)
            .sigmoid()
            .view([n, -1, 1, 1]);
        xs * gates
    }
}

/// The shortcut of a block that changes the shape: 2×2 average pooling (ceil mode, padding not
/// counted) when it strides, then a 1×1 convolution (timm's `DownsampleAvg`).
#[derive(Debug)]
struct DownsampleAvg {
    pool: bool,
    conv: ScaledStdConv2d,
}

impl DownsampleAvg {
    fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        if !self.pool {
            return self.conv.emit(g, x);
        }
        let [n, c, h, w] = x.nchw();
        let attrs = [
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
            ("ceil_mode", Attr::Int(1)),
        ];
        let name = format!("{}.pool", self.conv.name);
        let shape = vec![n, c, (h + 1) / 2, (w + 1) / 2];
        let pooled = g.node("AveragePool", &name, &[&x.name], &attrs, shape);
        self.conv.emit(g, &pooled)
    }
}

impl nn::Module for DownsampleAvg {
    fn forward(&self, xs: &Tensor) -> Tensor {
        if self.pool {
            xs.avg_pool2d([2, 2], [2, 2], [0, 0], true, false, None)
                .apply(&self.conv)
        } else {
            xs.apply(&self.conv)
        }
    }
}

/// timm's `NormFreeBlock` (ResNet form, `extra_conv`, attention last): pre-activation scaled by
/// β, 1×1 reduction, two grouped 3×3 (the first strides), 1×1 expansion, ECA scaled by
/// `attn_gain`, drop-path, then `· α + shortcut`.
#[derive(Debug)]
pub struct NfBlock {
    downsample: Option<DownsampleAvg>,
    conv1: ScaledStdConv2d,
    conv2: ScaledStdConv2d,
    conv2b: ScaledStdConv2d,
    conv3: ScaledStdConv2d,
    attn_last: Eca,
    act: Act,
    alpha: f64,
    beta: f64,
    attn_gain: f64,
    drop_path: f64,
}

/// Where a block sits: its shapes, and the scales that depend on its depth.
#[derive(Debug, Clone, Copy)]
struct BlockCfg {
    c_in: i64,
    c_out: i64,
    stride: i64,
    /// `1 / sqrt(expected variance of the input)`.
    beta: f64,
    drop_path: f64,
}

impl NfBlock {
    fn new(p: nn::Path, cfg: &NfNetConfig, block: BlockCfg) -> Self {
        let BlockCfg {
            c_in,
            c_out,
            stride,
            ..
        } = block;
        let (mid, groups) = cfg.bottleneck(c_out);
        let conv = cfg.conv();
        let downsample = (c_in != c_out || stride != 1).then(|| DownsampleAvg {
            pool: stride > 1,
            conv: ScaledStdConv2d::new(&p / "downsample" / "conv", c_in, c_out, 1, conv),
        });
        let grouped = conv.groups(groups);
        NfBlock {
            downsample,
            conv1: ScaledStdConv2d::new(&p / "conv1", c_in, mid, 1, conv),
            conv2: ScaledStdConv2d::new(&p / "conv2", mid, mid, 3, grouped.stride(stride)),
            conv2b: ScaledStdConv2d::new(&p / "conv2b", mid, mid, 3, grouped),
            // timm starts the residual branch at zero (without skipinit).
            conv3: ScaledStdConv2d::new(&p / "conv3", mid, c_out, 1, conv.gain_init(0.)),
            attn_last: Eca::new(&p / "attn_last" / "conv", c_out),
            act: cfg.act,
            alpha: cfg.alpha,
            beta: block.beta,
            attn_gain: cfg.attn_gain,
            drop_path: block.drop_path,
        }
    }
}

/// `x · k` in an ONNX graph.
fn emit_scale(g: &mut Graph, x: &Value, k: f64, what: &str) -> Value {
    let k = g.scalar(what, k as f32);
    let name = format!("{}.{what}", x.name);
    g.node("Mul", &name, &[&x.name, &k], &[], x.shape.clone())
}

impl NfBlock {
    fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        let act = self.act;
        let out = act.emit(g, x);
        let out = emit_scale(g, &out, self.beta, "beta");
        let shortcut = match &self.downsample {
            Some(downsample) => downsample.emit(g, &out),
            None => x.clone(),
        };
        let out = self.conv1.emit(g, &out);
        let out = act.emit(g, &out);
        let out = self.conv2.emit(g, &out);
        let out = act.emit(g, &out);
        let out = self.conv2b.emit(g, &out);
        let out = act.emit(g, &out);
        let out = self.conv3.emit(g, &out);
        let out = self.attn_last.emit(g, &out);
        let out = emit_scale(g, &out, self.attn_gain, "attn_gain");
        let out = emit_scale(g, &out, self.alpha, "alpha");
        emit_residual(g, out, &shortcut)
    }
}

impl ModuleT for NfBlock {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let act = self.act;
        let out = act.apply(xs) * self.beta;
        let shortcut = match &self.downsample {
            Some(downsample) => out.apply(downsample),
            None => xs.shallow_clone(),
        };
        let out = out.apply(&self.conv1);
        let out = act.apply(&out).apply(&self.conv2);
        let out = act.apply(&out).apply(&self.conv2b);
        let out = act.apply(&out).apply(&self.conv3);
        let out = self.attn_gain * out.apply(&self.attn_last);
        drop_path(&out, self.drop_path, train) * self.alpha + shortcut
    }
}

/// An ECA-NFNet: stage 0 is the stem, stages 1–4 the block stages and stage 5 the final
/// convolution with its activation.
#[derive(Debug)]
pub struct NfNet {
    stem: Vec<ScaledStdConv2d>,
    stages: Vec<Vec<NfBlock>>,
    final_conv: ScaledStdConv2d,
    act: Act,
    num_features: i64,
}

/// Build an ECA-NFNet under `p` (the checkpoint's root).
pub fn nfnet(p: &nn::Path, cfg: &NfNetConfig) -> NfNet {
    let conv = cfg.conv();
    let stem_chs = cfg.round(cfg.stem_chs as f64);
    let widths = [stem_chs / 8, stem_chs / 4, stem_chs / 2, stem_chs];
    let mut c_in = 3;
    let mut stem = Vec::with_capacity(4);
    for (i, (c_out, stride)) in widths.into_iter().zip([2, 1, 1, 2]).enumerate() {
        let path = p / "stem" / format!("conv{}", i + 1);
        stem.push(ScaledStdConv2d::new(
            path,
            c_in,
            c_out,
            3,
            conv.stride(stride),
        ));
        c_in = c_out;
    }
    let total: usize = cfg.depths.iter().sum();
    let mut index = 0;
    let mut expected_var = 1.0f64;
    let mut stages = Vec::with_capacity(4);
    for (s, &depth) in cfg.depths.iter().enumerate() {
        // The stem has stride 4 already: the first stage keeps the resolution.
        let stride = if s == 0 { 1 } else { 2 };
        let c_out = cfg.stage_channels(s);
        let mut blocks = Vec::with_capacity(depth);
        for b in 0..depth {
            let drop_path = if total > 1 {
                cfg.drop_path_rate * index as f64 / (total - 1) as f64
            } else {
                0.
            };
            let block = BlockCfg {
                c_in,
                c_out,
                stride: if b == 0 { stride } else { 1 },
                beta: 1. / expected_var.powf(0.5),
                drop_path,
            };
            blocks.push(NfBlock::new(p / "stages" / s / b, cfg, block));
            if b == 0 {
                expected_var = 1.;
            }
            expected_var += cfg.alpha * cfg.alpha;
            c_in = c_out;
            index += 1;
        }
        stages.push(blocks);
    }
    let num_features = cfg.num_features();
    let final_conv = ScaledStdConv2d::new(p / "final_conv", c_in, num_features, 1, conv);
    NfNet {
        stem,
        stages,
        final_conv,
        act: cfg.act,
        num_features,
    }
}

impl Backbone for NfNet {
    fn forward_stages(&self, xs: &Tensor, train: bool, start: usize, end: usize) -> Tensor {
        assert!(
            start <= end && end <= self.num_stages(),
            "stages {start}..{end} of a {}-stage backbone",
            self.num_stages()
        );
        let mut ys = xs.shallow_clone();
        for stage in start..end {
            ys = if stage == 0 {
                // An activation between the stem's convolutions, none after the last.
                let last = self.stem.len() - 1;
                self.stem.iter().enumerate().fold(ys, |ys, (i, conv)| {
                    let ys = ys.apply(conv);
                    if i < last {
                        self.act.apply(&ys)
                    } else {
                        ys
                    }
                })
            } else if stage <= self.stages.len() {
                self.stages[stage - 1]
                    .iter()
                    .fold(ys, |ys, block| block.forward_t(&ys, train))
            } else {
                self.act.apply(&ys.apply(&self.final_conv))
            };
        }
        ys
    }

    fn num_stages(&self) -> usize {
        self.stages.len() + 2
    }

    fn emit(&self, g: &mut Graph, x: &Value) -> anyhow::Result<Value> {
        let last = self.stem.len() - 1;
        let mut ys = x.clone();
        for (i, conv) in self.stem.iter().enumerate() {
            ys = conv.emit(g, &ys);
            if i < last {
                ys = self.act.emit(g, &ys);
            }
        }
        let ys = self
            .stages
            .iter()
            .flatten()
            .fold(ys, |ys, b| b.emit(g, &ys));
        let ys = self.final_conv.emit(g, &ys);
        Ok(self.act.emit(g, &ys))
    }

    fn num_features(&self) -> i64 {
        self.num_features
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn widths_follow_timm() {
        let l0 = NfNetConfig::ECA_NFNET_L0;
        let mids: Vec<(i64, i64)> = (0..4)
            .map(|s| l0.bottleneck(l0.stage_channels(s)))
            .collect();
        assert_eq!(mids, [(64, 1), (128, 2), (384, 6), (384, 6)]);
        assert_eq!(l0.num_features(), 2304);
        assert_eq!(NfNetConfig::ECA_NFNET_L2.num_features(), 3072);
        // timm: 8 → 3, 64 → 3, 128 → 5, 256 → 5, 1536 → 5, 2048 → 7.
        let kernels: Vec<i64> = [8, 64, 128, 256, 1536, 2048].map(eca_kernel).to_vec();
        assert_eq!(kernels, [3, 3, 5, 5, 5, 7]);
    }

    #[test]
    fn standardised_weights_have_the_scaled_unit_variance() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = StdConvCfg {
            stride: 1,
            groups: 2,
            gamma: 2.0,
            eps: 0.,
            gain_init: 1.0,
        };
        let conv = ScaledStdConv2d::new(vs.root(), 4, 6, 3, cfg);
        let w = conv.weight().view([6, -1]);
        let mean = w
            .mean_dim(1, false, Kind::Double)
            .abs()
            .max()
            .double_value(&[]);
        let var = w.var_dim(1, false, false).to_kind(Kind::Double);
        // fan-in 2 · 3 · 3 = 18: variance (2 / sqrt 18)² = 4 / 18.
        let off = (var - 4. / 18.).abs().max().double_value(&[]);
        assert!(mean < 1e-6 && off < 1e-6, "{mean} {off}");
    }
}
