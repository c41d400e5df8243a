//! Building blocks shared by the EfficientNet families: convolutions with TensorFlow "SAME" or
//! symmetric padding, BatchNorm + activation, squeeze-excitation, the inverted-residual (MBConv,
//! also its depthwise-separable form without expansion), fused-MBConv and conv blocks, drop-path,
//! and [`StagedNet`], the stem / block stages / head layout every backbone here shares.
//!
//! Layers take the `nn::Path` of each checkpoint name explicitly, because timm and the lukemelas
//! port name the same layers differently.

use super::Backbone;
use crate::onnx::{Conv, Graph, Value};
use tch::nn::{self, ModuleT};
use tch::{Kind, Tensor};

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// TensorFlow "SAME": the output has `ceil(input / stride)` pixels and the padding is
    /// computed from the input size, the odd pixel going to the bottom / right (timm's
    /// `pad_same`). Stride-1 odd kernels pad symmetrically, as it comes to the same.
    Same,
    /// PyTorch-style symmetric padding of `(stride - 1 + dilation * (kernel - 1)) / 2`.
    Symmetric,
}

/// Padding actually applied: a fixed amount on every side, or TF "SAME" computed per input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pad {
    Fixed(i64),
    Same,
}

/// Options of a square 2-D convolution; `ConvCfg::new(padding)` is stride 1, no groups, no bias.
#[derive(Debug, Clone, Copy)]
pub struct ConvCfg {
    pub stride: i64,
    pub dilation: i64,
    pub groups: i64,
    pub bias: bool,
    pub padding: Padding,
}

impl ConvCfg {
    pub const fn new(padding: Padding) -> Self {
        ConvCfg {
            stride: 1,
            dilation: 1,
            groups: 1,
            bias: false,
            padding,
        }
    }
    pub const fn stride(self, stride: i64) -> Self {
        ConvCfg { stride, ..self }
    }
    pub const fn groups(self, groups: i64) -> Self {
        ConvCfg { groups, ..self }
    }
    pub const fn bias(self, bias: bool) -> Self {
        ConvCfg { bias, ..self }
    }
}

/// The dotted checkpoint path of `p`.
pub fn path_name(p: &nn::Path) -> String {
    p.components().collect::<Vec<_>>().join(".")
}

/// TF "SAME" total padding along one axis (timm's `get_same_padding`).
pub fn same_padding(size: i64, kernel: i64, stride: i64, dilation: i64) -> i64 {
    let out = (size + stride - 1) / stride;
    ((out - 1) * stride + (kernel - 1) * dilation + 1 - size).max(0)
}

/// Pad `xs` `[N, C, H, W]` as TF "SAME" would for this convolution (timm's `pad_same`).
pub fn pad_same(xs: &Tensor, kernel: i64, stride: i64, dilation: i64) -> Tensor {
    let size = xs.size();
    let (h, w) = (size[size.len() - 2], size[size.len() - 1]);
    let ph = same_padding(h, kernel, stride, dilation);
    let pw = same_padding(w, kernel, stride, dilation);
    if ph == 0 && pw == 0 {
        xs.shallow_clone()
    } else {
        xs.constant_pad_nd([pw / 2, pw - pw / 2, ph / 2, ph - ph / 2])
    }
}

/// A square 2-D convolution with variables `weight` (and `bias`) under its path.
#[derive(Debug)]
pub struct Conv2d {
    pub ws: Tensor,
    pub bs: Option<Tensor>,
    /// The checkpoint path, e.g. `_blocks.0._depthwise_conv` (names the ONNX node).
    name: String,
    kernel: i64,
    stride: i64,
    dilation: i64,
    groups: i64,
    pad: Pad,
}

impl Conv2d {
    /// Weights start as He-normal over fan-out and biases at zero, as timm initialises them.
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, cfg: ConvCfg) -> Self {
        let init = nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        };
        let ws = p.var("weight", &[c_out, c_in / cfg.groups, kernel, kernel], init);
        let bs = cfg
            .bias
            .then(|| p.var("bias", &[c_out], nn::Init::Const(0.)));
        let span = cfg.dilation * (kernel - 1);
        let symmetric = (cfg.stride - 1 + span) / 2;
        let pad = match cfg.padding {
            Padding::Symmetric => Pad::Fixed(symmetric),
            Padding::Same if cfg.stride == 1 && span % 2 == 0 => Pad::Fixed(symmetric),
            Padding::Same => Pad::Same,
        };
        Conv2d {
            ws,
            bs,
            name: path_name(&p),
            kernel,
            stride: cfg.stride,
            dilation: cfg.dilation,
            groups: cfg.groups,
            pad,
        }
    }
}

impl Conv2d {
    /// This convolution's geometry with other weights and bias; TF "SAME" padding on a padded
    /// copy of the input (what training differentiates through: contiguous outputs).
    fn conv_with(&self, xs: &Tensor, ws: &Tensor, bs: Option<&Tensor>) -> Tensor {
        match self.pad {
            Pad::Fixed(pad) => self.conv_padded(xs, ws, bs, [pad, pad]),
            Pad::Same => {
                let xs = pad_same(xs, self.kernel, self.stride, self.dilation);
                self.conv_padded(&xs, ws, bs, [0, 0])
            }
        }
    }

    /// [`Self::conv_with`] for inference, the same outputs without the padded copy.
    fn conv_eval(&self, xs: &Tensor, ws: &Tensor, bs: Option<&Tensor>) -> Tensor {
        if let Pad::Fixed(pad) = self.pad {
            return self.conv_padded(xs, ws, bs, [pad, pad]);
        }
        // TF "SAME" without a padded copy of the input: libtorch pads symmetrically, so an axis
        // whose padding is odd (one more at the end) gets `stride` more at the start, which
        // shifts its outputs by exactly one, and the first output is dropped.
        let size = xs.size();
        let axes = [size[size.len() - 2], size[size.len() - 1]].map(|n| {
            let total = same_padding(n, self.kernel, self.stride, self.dilation);
            let odd = total % 2 == 1;
            let out = (n + self.stride - 1) / self.stride;
            (total / 2 + if odd { self.stride } else { 0 }, odd, out)
        });
        let ys = self.conv_padded(xs, ws, bs, axes.map(|a| a.0));
        let dims = [ys.dim() as i64 - 2, ys.dim() as i64 - 1];
        dims.into_iter().zip(axes).fold(
            ys,
            |ys, (dim, (_, odd, out))| {
                if odd {
                    ys.narrow(dim, 1, out)
                } else {
                    ys
                }
            },
        )
    }

    fn conv_padded(&self, xs: &Tensor, ws: &Tensor, bs: Option<&Tensor>, pad: [i64; 2]) -> Tensor {
        xs.conv2d(
            ws,
            bs,
            [self.stride, self.stride],
            pad,
            [self.dilation, self.dilation],
            self.groups,
        )
    }
}

/// A float tensor's values, row-major.
pub fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view(-1))
        .expect("a float tensor converts to a vector")
}

impl Conv2d {
    /// ONNX `Conv` of `x` with this geometry and weights `ws`, bias `bs`, under the
    /// convolution's checkpoint name (the padding of TF "SAME" fixed by `x`'s size).
    fn emit_with(&self, g: &mut Graph, x: &Value, ws: &Tensor, bs: Option<&Tensor>) -> Value {
        let [_, _, h, w] = x.nchw();
        let axis = |size: i64| match self.pad {
            Pad::Fixed(p) => (p, p),
            Pad::Same => {
                let total = same_padding(size, self.kernel, self.stride, self.dilation);
                (total / 2, total - total / 2)
            }
        };
        let ((top, bottom), (left, right)) = (axis(h), axis(w));
        let geometry = Conv {
            kernel: self.kernel,
            stride: self.stride,
            dilation: self.dilation,
            groups: self.groups,
            pads: [top, left, bottom, right],
        };
        let bias = bs.map(values);
        let weights = (&ws.size()[..], &values(ws)[..]);
        g.conv2d(&self.name, x, weights, bias.as_deref(), geometry)
    }

    /// This convolution in an ONNX graph.
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        self.emit_with(g, x, &self.ws, self.bs.as_ref())
    }
}

impl nn::Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.conv_with(xs, &self.ws, self.bs.as_ref())
    }
}

/// An activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Relu6,
    /// x · sigmoid(x), also called swish.
    Silu,
}

impl Act {
    pub fn apply(self, xs: &Tensor) -> Tensor {
        match self {
            Act::Relu6 => xs.relu6(),
            Act::Silu => xs.silu(),
        }
    }

    /// This activation in an ONNX graph, after the node `x` (named after it).
    pub fn emit(self, g: &mut Graph, x: &Value) -> Value {
        let name = format!("{}.act", x.name);
        match self {
            Act::Relu6 => {
                let lo = g.scalar("relu6.min", 0.0);
                let hi = g.scalar("relu6.max", 6.0);
                g.node("Clip", &name, &[&x.name, &lo, &hi], &[], x.shape.clone())
            }
            Act::Silu => {
                let gate = g.node("Sigmoid", &name, &[&x.name], &[], x.shape.clone());
                g.node("Mul", &name, &[&x.name, &gate.name], &[], x.shape.clone())
            }
        }
    }

    /// [`Self::apply`] in place, on a fresh tensor that nothing else reads (no new activation
    /// to allocate and write).
    pub fn apply_(self, mut xs: Tensor) -> Tensor {
        match self {
            Act::Relu6 => xs.relu6_(),
            Act::Silu => xs.silu_(),
        }
    }
}

/// BatchNorm options: TF-trained weights use `eps = 1e-3`; PyTorch's momentum is `1 - TF's`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BnCfg {
    pub eps: f64,
    pub momentum: f64,
}

/// BatchNorm2d with variables `weight`, `bias`, `running_mean`, `running_var` under `p`.
pub fn batch_norm2d(p: nn::Path, channels: i64, cfg: BnCfg) -> nn::BatchNorm {
    let config = nn::BatchNormConfig {
        eps: cfg.eps,
        momentum: cfg.momentum,
        ..Default::default()
    };
    nn::batch_norm2d(p, channels, config)
}

/// BatchNorm followed by an optional activation (timm's `BatchNormAct2d`).
#[derive(Debug)]
pub struct BnAct {
    pub bn: nn::BatchNorm,
    pub act: Option<Act>,
    eps: f64,
}

impl BnAct {
    pub fn new(p: nn::Path, channels: i64, cfg: BnCfg, act: Option<Act>) -> Self {
        BnAct {
            bn: batch_norm2d(p, channels, cfg),
            act,
            eps: cfg.eps,
        }
    }

    /// `conv`, then this BatchNorm and activation. In eval mode the BatchNorm is folded into
    /// the convolution's weights and bias — one pass over the activations instead of two. The
    /// folding is computed per call (on the small weight tensors), so it follows training.
    pub fn after_conv(&self, conv: &Conv2d, xs: &Tensor, train: bool) -> Tensor {
        let folded = if train { None } else { self.folded(conv) };
        let Some((ws, bias)) = folded else {
            return self.forward_t(&xs.apply(conv), train);
        };
        let ys = conv.conv_eval(xs, &ws, Some(&bias));
        match self.act {
            Some(act) => act.apply_(ys),
            None => ys,
        }
    }

    /// `conv`'s weights and bias with this (affine) BatchNorm's running statistics folded in.
    fn folded(&self, conv: &Conv2d) -> Option<(Tensor, Tensor)> {
        let (gamma, beta) = (self.bn.ws.as_ref()?, self.bn.bs.as_ref()?);
        let scale = gamma / (&self.bn.running_var + self.eps).sqrt();
        let ws = &conv.ws * scale.view([-1, 1, 1, 1]);
        let shift = beta - &self.bn.running_mean * &scale;
        let bias = match &conv.bs {
            Some(b) => shift + b * &scale,
            None => shift,
        };
        Some((ws, bias))
    }

    /// `conv`, this BatchNorm and activation in an ONNX graph, as [`Self::after_conv`] runs them
    /// in eval mode: one `Conv` with the BatchNorm folded in (its weights are named after the
    /// convolution).
    pub fn emit_after_conv(&self, g: &mut Graph, conv: &Conv2d, x: &Value) -> Value {
        let (ws, bias) = tch::no_grad(|| self.folded(conv)).expect("an affine BatchNorm");
        let ys = conv.emit_with(g, x, &ws, Some(&bias));
        match self.act {
            Some(act) => act.emit(g, &ys),
            None => ys,
        }
    }
}

impl ModuleT for BnAct {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = self.bn.forward_t(xs, train);
        match self.act {
            Some(act) => act.apply(&ys),
            None => ys,
        }
    }
}

/// Zero whole samples of a residual branch with probability `rate`, scaling the kept ones by
/// `1 / (1 - rate)` (stochastic depth). Only in training; the identity otherwise.
pub fn drop_path(xs: &Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate <= 0. {
        return xs.shallow_clone();
    }
    let keep = 1. - rate;
    let mask = Tensor::rand([xs.size()[0], 1, 1, 1], (xs.kind(), xs.device()))
        .ge(rate)
        .to_kind(xs.kind());
    xs * mask / keep
}

/// A block's output `ys` plus its input `xs`, through [`drop_path`] in training; in eval mode
/// added in place into `ys`, the block's fresh output.
fn residual(mut ys: Tensor, xs: &Tensor, rate: f64, train: bool) -> Tensor {
    if train {
        drop_path(&ys, rate, train) + xs
    } else {
        ys += xs;
        ys
    }
}

/// A block's output plus its input, in an ONNX graph.
pub fn emit_residual(g: &mut Graph, ys: Value, xs: &Value) -> Value {
    let name = format!("{}.residual", ys.name);
    g.node("Add", &name, &[&ys.name, &xs.name], &[], ys.shape.clone())
}

/// The end of an (fused) MBConv block in an ONNX graph, after its expansion `ys`: the
/// squeeze-excitation, the linear projection and the residual connection to the input `x`.
fn emit_block_end(
    g: &mut Graph,
    se: Option<&SqueezeExcite>,
    (conv, bn): (&Conv2d, &BnAct),
    skip: bool,
    mut ys: Value,
    x: &Value,
) -> Value {
    if let Some(se) = se {
        ys = se.emit(g, &ys);
    }
    ys = bn.emit_after_conv(g, conv, &ys);
    if skip {
        emit_residual(g, ys, x)
    } else {
        ys
    }
}

/// Options shared by every layer of a network.
#[derive(Debug, Clone, Copy)]
pub struct LayerCfg {
    pub act: Act,
    pub bn: BnCfg,
    pub padding: Padding,
}

/// Convolution + BatchNorm + activation, with an optional residual connection: a stem, a head,
/// or timm's `ConvBnAct` block (EfficientNetV2's first stage).
#[derive(Debug)]
pub struct ConvBnAct {
    conv: Conv2d,
    bn: BnAct,
    /// Stride 1 and as many output as input channels: a residual connection is possible.
    same_shape: bool,
    has_skip: bool,
    drop_path: f64,
}

impl ConvBnAct {
    /// `conv` and `bn` are the two layers' paths. No residual connection (see [`Self::with_skip`]).
    pub fn new(
        conv: nn::Path,
        bn: nn::Path,
        c_in: i64,
        c_out: i64,
        kernel: i64,
        stride: i64,
        cfg: LayerCfg,
    ) -> Self {
        let conv_cfg = ConvCfg::new(cfg.padding).stride(stride);
        ConvBnAct {
            conv: Conv2d::new(conv, c_in, c_out, kernel, conv_cfg),
            bn: BnAct::new(bn, c_out, cfg.bn, Some(cfg.act)),
            same_shape: stride == 1 && c_in == c_out,
            has_skip: false,
            drop_path: 0.,
        }
    }

    /// Add a residual connection (with this drop-path rate) when `skip` and the shapes allow it.
    pub fn with_skip(self, skip: bool, drop_path: f64) -> Self {
        ConvBnAct {
            has_skip: skip && self.same_shape,
            drop_path,
            ..self
        }
    }
}

impl ConvBnAct {
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        let ys = self.bn.emit_after_conv(g, &self.conv, x);
        if self.has_skip {
            emit_residual(g, ys, x)
        } else {
            ys
        }
    }
}

impl ModuleT for ConvBnAct {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = self.bn.after_conv(&self.conv, xs, train);
        if self.has_skip {
            residual(ys, xs, self.drop_path, train)
        } else {
            ys
        }
    }
}

/// Squeeze-and-excitation: channel gates from the global average through a bottleneck of
/// 1×1 convolutions (with bias) and a sigmoid.
#[derive(Debug)]
pub struct SqueezeExcite {
    reduce: Conv2d,
    expand: Conv2d,
    act: Act,
}

impl SqueezeExcite {
    pub fn new(reduce: nn::Path, expand: nn::Path, channels: i64, reduced: i64, act: Act) -> Self {
        let cfg = ConvCfg::new(Padding::Symmetric).bias(true);
        SqueezeExcite {
            reduce: Conv2d::new(reduce, channels, reduced, 1, cfg),
            expand: Conv2d::new(expand, reduced, channels, 1, cfg),
            act,
        }
    }
}

impl SqueezeExcite {
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        let [n, c, _, _] = x.nchw();
        let name = format!("{}.squeeze", self.reduce.name);
        let mean = g.node(
            "GlobalAveragePool",
            &name,
            &[&x.name],
            &[],
            vec![n, c, 1, 1],
        );
        let s = self.reduce.emit(g, &mean);
        let s = self.act.emit(g, &s);
        let s = self.expand.emit(g, &s);
        let name = format!("{}.gate", self.expand.name);
        let gate = g.node("Sigmoid", &name, &[&s.name], &[], s.shape.clone());
        g.node("Mul", &name, &[&x.name, &gate.name], &[], x.shape.clone())
    }
}

impl nn::Module for SqueezeExcite {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let s = xs
            .mean_dim([2i64, 3].as_slice(), true, None::<Kind>)
            .apply(&self.reduce);
        let s = self.act.apply(&s).apply(&self.expand);
        xs * s.sigmoid()
    }
}

/// Checkpoint names of the layers of an MBConv block, relative to the block.
#[derive(Debug, Clone, Copy)]
pub struct MbConvNames {
    pub expand_conv: &'static str,
    pub expand_bn: &'static str,
    pub dw_conv: &'static str,
    pub dw_bn: &'static str,
    /// Sub-module holding the squeeze-excitation convolutions, or `None` for the block itself.
    pub se: Option<&'static str>,
    pub se_reduce: &'static str,
    pub se_expand: &'static str,
    pub project_conv: &'static str,
    pub project_bn: &'static str,
}

/// timm's `InvertedResidual`.
pub const TIMM_INVERTED_RESIDUAL: MbConvNames = MbConvNames {
    expand_conv: "conv_pw",
    expand_bn: "bn1",
    dw_conv: "conv_dw",
    dw_bn: "bn2",
    se: Some("se"),
    se_reduce: "conv_reduce",
    se_expand: "conv_expand",
    project_conv: "conv_pwl",
    project_bn: "bn3",
};

/// timm's `DepthwiseSeparableConv` (an MBConv without expansion; no `expand_*` layers).
pub const TIMM_DEPTHWISE_SEPARABLE: MbConvNames = MbConvNames {
    expand_conv: "",
    expand_bn: "",
    dw_conv: "conv_dw",
    dw_bn: "bn1",
    se: Some("se"),
    se_reduce: "conv_reduce",
    se_expand: "conv_expand",
    project_conv: "conv_pw",
    project_bn: "bn2",
};

/// lukemelas' `MBConvBlock` (EfficientNet-PyTorch, and the EfficientNet-Lite port of it).
pub const LUKEMELAS_MBCONV: MbConvNames = MbConvNames {
    expand_conv: "_expand_conv",
    expand_bn: "_bn0",
    dw_conv: "_depthwise_conv",
    dw_bn: "_bn1",
    se: None,
    se_reduce: "_se_reduce",
    se_expand: "_se_expand",
    project_conv: "_project_conv",
    project_bn: "_bn2",
};

/// Shape of an MBConv block.
#[derive(Debug, Clone, Copy)]
pub struct MbConvCfg {
    pub c_in: i64,
    pub c_out: i64,
    /// Channels after the 1×1 expansion, or `None` for no expansion layer (depthwise-separable).
    pub expand_to: Option<i64>,
    pub kernel: i64,
    pub stride: i64,
    /// Squeeze-excitation bottleneck channels, if any.
    pub se: Option<i64>,
    /// Whether the block may have a residual connection (it also needs stride 1 and
    /// `c_in == c_out`).
    pub skip: bool,
    pub drop_path: f64,
}

/// Inverted residual (MBConv): optional 1×1 expansion, depthwise k×k, optional
/// squeeze-excitation, linear 1×1 projection, residual connection when the shapes allow. Without
/// expansion it is the depthwise-separable block.
#[derive(Debug)]
pub struct MbConv {
    expand: Option<(Conv2d, BnAct)>,
    dw: Conv2d,
    dw_bn: BnAct,
    se: Option<SqueezeExcite>,
    project: Conv2d,
    project_bn: BnAct,
    has_skip: bool,
    drop_path: f64,
}

impl MbConv {
    pub fn new(p: nn::Path, names: &MbConvNames, cfg: &MbConvCfg, layer: LayerCfg) -> Self {
        let pad = ConvCfg::new(layer.padding);
        let act = Some(layer.act);
        let mid = cfg.expand_to.unwrap_or(cfg.c_in);
        let expand = cfg.expand_to.map(|mid| {
            (
                Conv2d::new(&p / names.expand_conv, cfg.c_in, mid, 1, pad),
                BnAct::new(&p / names.expand_bn, mid, layer.bn, act),
            )
        });
        let dw_cfg = pad.stride(cfg.stride).groups(mid);
        let se = cfg.se.map(|reduced| {
            let q = match names.se {
                Some(name) => &p / name,
                None => p.clone(),
            };
            SqueezeExcite::new(
                &q / names.se_reduce,
                &q / names.se_expand,
                mid,
                reduced,
                layer.act,
            )
        });
        MbConv {
            expand,
            dw: Conv2d::new(&p / names.dw_conv, mid, mid, cfg.kernel, dw_cfg),
            dw_bn: BnAct::new(&p / names.dw_bn, mid, layer.bn, act),
            se,
            project: Conv2d::new(&p / names.project_conv, mid, cfg.c_out, 1, pad),
            project_bn: BnAct::new(&p / names.project_bn, cfg.c_out, layer.bn, None),
            has_skip: cfg.skip && cfg.stride == 1 && cfg.c_in == cfg.c_out,
            drop_path: cfg.drop_path,
        }
    }
}

impl MbConv {
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        let ys = match &self.expand {
            Some((conv, bn)) => bn.emit_after_conv(g, conv, x),
            None => x.clone(),
        };
        let ys = self.dw_bn.emit_after_conv(g, &self.dw, &ys);
        let project = (&self.project, &self.project_bn);
        emit_block_end(g, self.se.as_ref(), project, self.has_skip, ys, x)
    }
}

impl ModuleT for MbConv {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = match &self.expand {
            Some((conv, bn)) => bn.after_conv(conv, xs, train),
            None => xs.shallow_clone(),
        };
        ys = self.dw_bn.after_conv(&self.dw, &ys, train);
        if let Some(se) = &self.se {
            ys = ys.apply(se);
        }
        ys = self.project_bn.after_conv(&self.project, &ys, train);
        if self.has_skip {
            residual(ys, xs, self.drop_path, train)
        } else {
            ys
        }
    }
}

/// Fused MBConv (timm's `EdgeResidual`): a k×k expansion convolution in place of the 1×1
/// expansion and the depthwise one, optional squeeze-excitation, linear 1×1 projection.
/// Names: `conv_exp`, `bn1`, `se.conv_reduce`, `se.conv_expand`, `conv_pwl`, `bn2`.
#[derive(Debug)]
pub struct FusedMbConv {
    conv_exp: Conv2d,
    bn1: BnAct,
    se: Option<SqueezeExcite>,
    conv_pwl: Conv2d,
    bn2: BnAct,
    has_skip: bool,
    drop_path: f64,
}

impl FusedMbConv {
    /// `cfg.expand_to` is the expanded width (`None`: as many channels as the input).
    pub fn new(p: nn::Path, cfg: &MbConvCfg, layer: LayerCfg) -> Self {
        let pad = ConvCfg::new(layer.padding);
        let mid = cfg.expand_to.unwrap_or(cfg.c_in);
        let se = cfg.se.map(|reduced| {
            SqueezeExcite::new(
                &p / "se" / "conv_reduce",
                &p / "se" / "conv_expand",
                mid,
                reduced,
                layer.act,
            )
        });
        FusedMbConv {
            conv_exp: Conv2d::new(
                &p / "conv_exp",
                cfg.c_in,
                mid,
                cfg.kernel,
                pad.stride(cfg.stride),
            ),
            bn1: BnAct::new(&p / "bn1", mid, layer.bn, Some(layer.act)),
            se,
            conv_pwl: Conv2d::new(&p / "conv_pwl", mid, cfg.c_out, 1, pad),
            bn2: BnAct::new(&p / "bn2", cfg.c_out, layer.bn, None),
            has_skip: cfg.skip && cfg.stride == 1 && cfg.c_in == cfg.c_out,
            drop_path: cfg.drop_path,
        }
    }
}

impl FusedMbConv {
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        let ys = self.bn1.emit_after_conv(g, &self.conv_exp, x);
        let project = (&self.conv_pwl, &self.bn2);
        emit_block_end(g, self.se.as_ref(), project, self.has_skip, ys, x)
    }
}

impl ModuleT for FusedMbConv {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = self.bn1.after_conv(&self.conv_exp, xs, train);
        if let Some(se) = &self.se {
            ys = ys.apply(se);
        }
        ys = self.bn2.after_conv(&self.conv_pwl, &ys, train);
        if self.has_skip {
            residual(ys, xs, self.drop_path, train)
        } else {
            ys
        }
    }
}

/// Any block of a stage. (Built once and kept in a `Vec`, so variant sizes do not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Block {
    Conv(ConvBnAct),
    MbConv(MbConv),
    Fused(FusedMbConv),
}

impl Block {
    pub fn emit(&self, g: &mut Graph, x: &Value) -> Value {
        match self {
            Block::Conv(b) => b.emit(g, x),
            Block::MbConv(b) => b.emit(g, x),
            Block::Fused(b) => b.emit(g, x),
        }
    }
}

impl ModuleT for Block {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Block::Conv(b) => b.forward_t(xs, train),
            Block::MbConv(b) => b.forward_t(xs, train),
            Block::Fused(b) => b.forward_t(xs, train),
        }
    }
}

/// A stem, stages of blocks and a head: stage 0 is the stem, stages `1..=n` the block stages and
/// stage `n + 1` the head convolution with its BatchNorm and activation.
#[derive(Debug)]
pub struct StagedNet {
    pub stem: ConvBnAct,
    pub stages: Vec<Vec<Block>>,
    pub head: ConvBnAct,
    pub num_features: i64,
}

impl Backbone for StagedNet {
    fn forward_stages(&self, xs: &Tensor, train: bool, start: usize, end: usize) -> Tensor {
        assert!(
            start <= end && end <= self.num_stages(),
            "stages {start}..{end} of a {}-stage backbone",
            self.num_stages()
        );
        let mut ys = xs.shallow_clone();
        for stage in start..end {
            ys = if stage == 0 {
                self.stem.forward_t(&ys, train)
            } else if stage <= self.stages.len() {
                self.stages[stage - 1]
                    .iter()
                    .fold(ys, |ys, block| block.forward_t(&ys, train))
            } else {
                self.head.forward_t(&ys, train)
            };
        }
        ys
    }

    fn num_stages(&self) -> usize {
        self.stages.len() + 2
    }

    fn emit(&self, g: &mut Graph, x: &Value) -> anyhow::Result<Value> {
        let ys = self.stem.emit(g, x);
        let ys = self
            .stages
            .iter()
            .flatten()
            .fold(ys, |ys, b| b.emit(g, &ys));
        Ok(self.head.emit(g, &ys))
    }

    fn num_features(&self) -> i64 {
        self.num_features
    }
}

/// Round `v` to a multiple of `divisor` (at least `divisor`), never dropping below
/// `round_limit · v` (timm's `make_divisible`, lukemelas' `round_filters`).
pub fn make_divisible(v: f64, divisor: i64, round_limit: f64) -> i64 {
    let mut new_v = divisor.max((v + divisor as f64 / 2.) as i64 / divisor * divisor);
    if (new_v as f64) < round_limit * v {
        new_v += divisor;
    }
    new_v
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::Module, Device};

    #[test]
    fn same_padding_matches_tensorflow() {
        // 224 → 112 with k3 s2 pads 1 (all at the bottom/right); 225 → 113 pads 2.
        assert_eq!(same_padding(224, 3, 2, 1), 1);
        assert_eq!(same_padding(225, 3, 2, 1), 2);
        assert_eq!(same_padding(57, 5, 2, 1), 4);
        assert_eq!(same_padding(56, 5, 2, 1), 3);
        assert_eq!(same_padding(7, 3, 1, 1), 2);
        assert_eq!(same_padding(1, 1, 2, 1), 0);
    }

    #[test]
    fn same_conv_output_sizes_and_asymmetric_pad() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut conv = Conv2d::new(
            vs.root() / "c",
            1,
            1,
            3,
            ConvCfg::new(Padding::Same).stride(2),
        );
        let _ = tch::no_grad(|| conv.ws.fill_(1.));
        // A 4×4 input of ones: TF pads one row/column at the bottom/right only, so the top-left
        // output sees 9 ones and the bottom-right one 4.
        let ys = conv.forward(&Tensor::ones([1, 1, 4, 4], (Kind::Float, Device::Cpu)));
        assert_eq!(ys.size(), [1, 1, 2, 2]);
        assert_eq!(ys.double_value(&[0, 0, 0, 0]), 9.);
        assert_eq!(ys.double_value(&[0, 0, 1, 1]), 4.);
        let ys = conv.forward(&Tensor::ones([1, 1, 5, 7], (Kind::Float, Device::Cpu)));
        assert_eq!(ys.size(), [1, 1, 3, 4]);
    }

    #[test]
    fn same_conv_equals_the_padded_copy_then_convolution() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        for (kernel, stride, groups) in [(3, 2, 1), (5, 2, 4), (3, 1, 4), (4, 1, 1), (5, 3, 1)] {
            let cfg = ConvCfg::new(Padding::Same).stride(stride).groups(groups);
            let conv = Conv2d::new(vs.root() / "c", 4, 8, kernel, cfg);
            for (h, w) in [(16, 16), (15, 17), (7, 10)] {
                let xs = Tensor::randn([2, 4, h, w], (Kind::Float, Device::Cpu));
                let want = pad_same(&xs, kernel, stride, 1).conv2d(
                    &conv.ws,
                    None::<Tensor>,
                    [stride, stride],
                    [0, 0],
                    [1, 1],
                    groups,
                );
                let got = conv.conv_eval(&xs, &conv.ws, conv.bs.as_ref());
                assert_eq!(got.size(), want.size(), "k{kernel} s{stride} {h}×{w}");
                let diff = (got - want).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "k{kernel} s{stride} {h}×{w}: {diff}");
            }
        }
    }

    #[test]
    fn make_divisible_matches_timm() {
        assert_eq!(make_divisible(32. * 1.1, 8, 0.9), 32);
        assert_eq!(make_divisible(16. * 0.25, 8, 0.9), 8);
        assert_eq!(make_divisible(40. * 1.4, 8, 0.9), 56);
        assert_eq!(make_divisible(1280. * 1.8, 8, 0.9), 2304);
        assert_eq!(make_divisible(24. * 1.1, 8, 0.9), 24);
    }

    #[test]
    fn drop_path_is_identity_in_eval_and_keeps_the_mean_in_training() {
        tch::manual_seed(0);
        let xs = Tensor::ones([4000, 1, 1, 1], (Kind::Float, Device::Cpu));
        assert_eq!(
            drop_path(&xs, 0.2, false)
                .sum(Kind::Float)
                .double_value(&[]),
            4000.
        );
        let ys = drop_path(&xs, 0.2, true);
        let kept = ys.gt(0.).sum(Kind::Float).double_value(&[]) / 4000.;
        assert!((kept - 0.8).abs() < 0.03, "kept {kept}");
        assert!((ys.max().double_value(&[]) - 1.25).abs() < 1e-6);
    }
}
