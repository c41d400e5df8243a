//! The reference solution's training augmentations, with albumentations' (OpenCV's) semantics,
//! as steps of a [`crate::transforms::Pipeline`].
//!
//! Training, in order, each step run with its own probability (one uniform draw per step,
//! drawn whether or not the step runs, as `albumentations.Compose` does):
//!
//! | step | p | what |
//! |---|---|---|
//! | [`Affine`] | 0.5 | rotate ±15°, translate 0–25 % of width/height, shear ±3° (x and y), bilinear, border 0 |
//! | [`RandomResizedCrop`] | 1 | area 0.9–1.0, aspect 3/4–4/3 (log-uniform), 10 tries then a centre crop, bilinear resize to the model's size |
//! | [`ToGray`] | 0.1 | OpenCV's luma to all three channels |
//! | [`GaussianBlur`] | 0.07 | kernel 3, 5 or 7, OpenCV's kernel for `sigma = 0` |
//! | [`GaussNoise`] | 0.07 | variance 10–50 (0..255 units), per pixel and channel |
//! | [`RandomGridShuffle`] | 0.28 | 2×2 tiles permuted (only tiles of equal size swap) |
//! | [`BrightnessContrast`] | 0.5 | `alpha·v + beta·255`, alpha ∈ 1 ± 0.2, beta ∈ ±0.2 |
//! | [`HorizontalFlip`] | 0.1 | mirror left–right |
//!
//! then the pipeline's normalisation with the backbone's mean and std into a CHW `f32` buffer.
//! The first two run as one step, [`AffineResizedCrop`], which warps only the pixels the crop's
//! resize reads (same pixels, a fraction of the work). Validation is the pipeline's bilinear
//! resize and the same normalisation alone ([`Pipeline::eval`]).
//!
//! Images stay 8-bit between steps, rounded and clamped where albumentations rounds and clamps
//! (and truncated where its `clip(...).astype(uint8)` truncates), so each step sees what it
//! would see in the reference. [`crate::transforms::batch`] runs a pipeline over many photos in parallel, each
//! photo with its own random stream, so a batch does not depend on the number of threads.

use crate::transforms::{
    clip_window, linear_taps, resize_taps, resize_window, CropWindow, Flips, Pipeline, Transform,
};
use anyhow::{ensure, Result};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

/// Every probability and range of the training augmentations; the defaults are the
/// reference's. Ranges (pairs) are set in a `--config` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct AugmentConfig {
    /// Probability of the affine warp (rotate, translate, shear).
    #[arg(long, id = "augment.affine_p", value_name = "P", default_value_t = 0.5)]
    pub affine_p: f64,
    /// Rotation drawn from ±rotate-deg degrees.
    #[arg(
        long,
        id = "augment.rotate_deg",
        value_name = "DEG",
        default_value_t = 15.0
    )]
    pub rotate_deg: f64,
    /// Translation range as a fraction of width (x) and height (y), each axis drawn on its own.
    /// albumentations' `translate_percent=(0, 0.25)` draws from this range as given: shifts are
    /// right/down only. Use `(-0.25, 0.25)` for shifts both ways.
    #[arg(skip = (0.0, 0.25))]
    pub translate: (f64, f64),
    /// Shear drawn from ±shear-deg degrees, independently along x and y.
    #[arg(
        long,
        id = "augment.shear_deg",
        value_name = "DEG",
        default_value_t = 3.0
    )]
    pub shear_deg: f64,
    /// Share of the area kept by [`RandomResizedCrop`].
    #[arg(skip = (0.9, 1.0))]
    pub crop_scale: (f64, f64),
    /// Aspect ratio (width / height) range of the crop, drawn log-uniformly.
    #[arg(skip = (0.75, 4.0 / 3.0))]
    pub crop_ratio: (f64, f64),
    /// Probability of turning the photo grey.
    #[arg(long, id = "augment.gray_p", value_name = "P", default_value_t = 0.1)]
    pub gray_p: f64,
    /// Probability of a Gaussian blur.
    #[arg(long, id = "augment.blur_p", value_name = "P", default_value_t = 0.07)]
    pub blur_p: f64,
    /// Smallest and largest odd kernel size of the blur.
    #[arg(skip = (3, 7))]
    pub blur_kernel: (u32, u32),
    /// Probability of Gaussian noise.
    #[arg(long, id = "augment.noise_p", value_name = "P", default_value_t = 0.07)]
    pub noise_p: f64,
    /// Range of the noise variance, in 0..255 units.
    #[arg(skip = (10.0, 50.0))]
    pub noise_var: (f64, f64),
    /// Probability of shuffling the tiles of a grid.
    #[arg(
        long,
        id = "augment.grid_shuffle_p",
        value_name = "P",
        default_value_t = 0.28
    )]
    pub grid_shuffle_p: f64,
    /// Grid of the shuffle, (rows, columns).
    #[arg(skip = (2, 2))]
    pub grid: (u32, u32),
    /// Probability of a brightness and contrast change.
    #[arg(
        long,
        id = "augment.brightness_contrast_p",
        value_name = "P",
        default_value_t = 0.5
    )]
    pub brightness_contrast_p: f64,
    /// Brightness: beta is drawn from ±brightness.
    #[arg(
        long,
        id = "augment.brightness",
        value_name = "X",
        default_value_t = 0.2
    )]
    pub brightness: f64,
    /// Contrast: alpha is drawn from 1 ± contrast.
    #[arg(long, id = "augment.contrast", value_name = "X", default_value_t = 0.2)]
    pub contrast: f64,
    /// Horizontal-flip probability, where --flips allows that mirror.
    #[arg(long, id = "augment.hflip_p", value_name = "P", default_value_t = 0.1)]
    pub hflip_p: f64,
    /// Vertical-flip probability, where --flips allows that mirror.
    #[arg(long, id = "augment.vflip_p", value_name = "P", default_value_t = 0.1)]
    pub vflip_p: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        crate::args::defaults_of()
    }
}

impl AugmentConfig {
    /// Check that probabilities lie in [0, 1] and every range is ordered and usable.
    pub fn validate(&self) -> Result<()> {
        for (name, p) in [
            ("affine_p", self.affine_p),
            ("gray_p", self.gray_p),
            ("blur_p", self.blur_p),
            ("noise_p", self.noise_p),
            ("grid_shuffle_p", self.grid_shuffle_p),
            ("brightness_contrast_p", self.brightness_contrast_p),
            ("hflip_p", self.hflip_p),
            ("vflip_p", self.vflip_p),
        ] {
            check_probability(name, p)?;
        }
        for (name, v) in [
            ("rotate_deg", self.rotate_deg),
            ("shear_deg", self.shear_deg),
            ("brightness", self.brightness),
            ("contrast", self.contrast),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "augment: {name} must be finite and >= 0, got {v}"
            );
        }
        check_range("translate", self.translate, f64::NEG_INFINITY)?;
        check_range("crop_scale", self.crop_scale, 0.0)?;
        ensure!(
            self.crop_scale.0 > 0.0,
            "augment: crop_scale must be > 0, got {:?}",
            self.crop_scale
        );
        check_range("crop_ratio", self.crop_ratio, 0.0)?;
        ensure!(
            self.crop_ratio.0 > 0.0,
            "augment: crop_ratio must be > 0, got {:?}",
            self.crop_ratio
        );
        check_range("noise_var", self.noise_var, 0.0)?;
        let (k0, k1) = self.blur_kernel;
        ensure!(
            k0 % 2 == 1 && k1 % 2 == 1 && k0 <= k1,
            "augment: blur_kernel must be two odd sizes, smallest first, got {:?}",
            self.blur_kernel
        );
        ensure!(
            self.grid.0 >= 1 && self.grid.1 >= 1,
            "augment: grid must have at least one row and one column, got {:?}",
            self.grid
        );
        Ok(())
    }
}

fn check_probability(name: &str, p: f64) -> Result<()> {
    ensure!(
        (0.0..=1.0).contains(&p),
        "augment: {name} must be a probability in [0, 1], got {p}"
    );
    Ok(())
}

fn check_range(name: &str, (lo, hi): (f64, f64), min: f64) -> Result<()> {
    ensure!(
        lo.is_finite() && hi.is_finite() && lo >= min && lo <= hi,
        "augment: {name} must be a finite range (low, high) with low <= high and low >= {min}, \
         got ({lo}, {hi})"
    );
    Ok(())
}

/// Python's `random.uniform(lo, hi)`.
fn uniform(rng: &mut dyn RngCore, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.gen::<f64>()
}

// ---------------------------------------------------------------------------------------------
// Affine

/// Random rotation, translation and shear about the image centre (albumentations `Affine`
/// with `scale=1`, `fit_output=False`, bilinear, constant border 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Affine {
    /// Rotation drawn from `±rotate_deg`.
    pub rotate_deg: f64,
    /// Translation range, a fraction of width (x) and of height (y), drawn per axis.
    pub translate: (f64, f64),
    /// Shear drawn from `±shear_deg`, independently along x and y.
    pub shear_deg: f64,
}

/// The parameters of one affine warp.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AffineParams {
    /// Degrees; positive turns the picture counter-clockwise on screen.
    pub rotate_deg: f64,
    /// Pixels; positive moves the content right.
    pub translate_x: f64,
    /// Pixels; positive moves the content down.
    pub translate_y: f64,
    /// Degrees; positive moves the lower half of the picture right.
    pub shear_x_deg: f64,
    /// Degrees; positive moves the right half of the picture up.
    pub shear_y_deg: f64,
}

impl Affine {
    /// Draw the parameters for an image of `width × height`, in albumentations' order.
    pub fn sample(&self, width: u32, height: u32, rng: &mut dyn RngCore) -> AffineParams {
        let tx = uniform(rng, self.translate.0, self.translate.1) * f64::from(width);
        let ty = uniform(rng, self.translate.0, self.translate.1) * f64::from(height);
        let shear_x = uniform(rng, -self.shear_deg, self.shear_deg);
        let shear_y = uniform(rng, -self.shear_deg, self.shear_deg);
        let rotate = uniform(rng, -self.rotate_deg, self.rotate_deg);
        AffineParams {
            rotate_deg: rotate,
            translate_x: tx,
            translate_y: ty,
            shear_x_deg: shear_x,
            shear_y_deg: shear_y,
        }
    }
}

impl Transform for Affine {
    fn apply(&self, img: RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        let params = self.sample(img.width(), img.height(), rng);
        warp_affine(&img, &affine_matrix(&params, img.width(), img.height()))
    }
}

/// The forward 2×3 matrix `[a, b, c, d, e, f]` (source pixel `(x, y)` goes to
/// `(a·x + b·y + c, d·x + e·y + f)`) that albumentations builds: y-shear, then rotation with
/// x-shear, about the pixel centre `(w/2 − 0.5, h/2 − 0.5)`, then the translation. Angles are
/// negated as albumentations ≥ 1.2 does, so that positive means counter-clockwise on screen.
pub fn affine_matrix(params: &AffineParams, width: u32, height: u32) -> [f64; 6] {
    let r = -params.rotate_deg.to_radians();
    let sx = -params.shear_x_deg.to_radians();
    let sy = -params.shear_y_deg.to_radians();
    // skimage's AffineTransform(rotation=r, shear=sx) times the y-shear (a rotated x-shear).
    let l00 = r.cos() * sy.cos() - (r + sx).sin() * sy.sin();
    let l01 = -(r + sx).sin();
    let l10 = r.sin() * sy.cos() + (r + sx).cos() * sy.sin();
    let l11 = (r + sx).cos();
    let cx = f64::from(width) / 2.0 - 0.5;
    let cy = f64::from(height) / 2.0 - 0.5;
    [
        l00,
        l01,
        cx + params.translate_x - (l00 * cx + l01 * cy),
        l10,
        l11,
        cy + params.translate_y - (l10 * cx + l11 * cy),
    ]
}

fn invert_affine(m: &[f64; 6]) -> Option<[f64; 6]> {
    let det = m[0] * m[4] - m[1] * m[3];
    if det.abs() < 1e-12 || !det.is_finite() {
        return None;
    }
    let (a, b, d, e) = (m[4] / det, -m[1] / det, -m[3] / det, m[0] / det);
    Some([a, b, -(a * m[2] + b * m[5]), d, e, -(d * m[2] + e * m[5])])
}

/// `cv2.warpAffine(img, forward, (w, h), INTER_LINEAR, BORDER_CONSTANT, 0)`: each output pixel
/// samples the source bilinearly at its inverse image; taps outside the source count as 0.
/// Like OpenCV it works in fixed point: source coordinates to 1/65536 px, interpolation
/// weights to 1/256 (OpenCV: 1/32).
pub fn warp_affine(img: &RgbImage, forward: &[f64; 6]) -> RgbImage {
    let (w, h) = img.dimensions();
    let Some(inv) = invert_affine(forward) else {
        return RgbImage::new(w, h);
    };
    let cols: Vec<usize> = (0..w as usize).collect();
    let rows: Vec<usize> = (0..h as usize).collect();
    let buf = warp_affine_at(img, &inv, &cols, &rows);
    RgbImage::from_raw(w, h, buf).unwrap_or_else(|| RgbImage::new(w, h))
}

/// The warped image (inverse matrix `inv`) at output columns `cols` × rows `rows` only, as a
/// compact row-major RGB buffer of `cols.len() × rows.len()` pixels.
fn warp_affine_at(img: &RgbImage, inv: &[f64; 6], cols: &[usize], rows: &[usize]) -> Vec<u8> {
    const FRAC: u32 = 16;
    let mut out = vec![0u8; cols.len() * rows.len() * 3];
    let (w, h) = img.dimensions();
    if out.is_empty() || w == 0 || h == 0 {
        return out;
    }
    let one = f64::from(1u32 << FRAC);
    // `as` saturates (and maps NaN to 0), so absurd coordinates just land outside.
    let fixed = |v: f64| (v * one).round() as i64;
    let ax: Vec<i64> = cols.iter().map(|&x| fixed(inv[0] * x as f64)).collect();
    let ay: Vec<i64> = cols.iter().map(|&x| fixed(inv[3] * x as f64)).collect();
    let (wi, hi) = (i64::from(w), i64::from(h));
    let stride = w as usize * 3;
    let src = img.as_raw();
    let tap = |x: i64, y: i64, c: usize| -> u8 {
        if x >= 0 && y >= 0 && x < wi && y < hi {
            src[y as usize * stride + x as usize * 3 + c]
        } else {
            0
        }
    };
    for (&y, row) in rows.iter().zip(out.chunks_exact_mut(cols.len() * 3)) {
        let bx = fixed(inv[1] * y as f64 + inv[2]);
        let by = fixed(inv[4] * y as f64 + inv[5]);
        for ((px, &dx), &dy) in row.chunks_exact_mut(3).zip(&ax).zip(&ay) {
            let (sx, sy) = (dx.saturating_add(bx), dy.saturating_add(by));
            let (xi, yi) = (sx >> FRAC, sy >> FRAC);
            let fx = ((sx >> (FRAC - 8)) & 0xFF) as u32;
            let fy = ((sy >> (FRAC - 8)) & 0xFF) as u32;
            if xi >= 0 && yi >= 0 && xi + 1 < wi && yi + 1 < hi {
                let i = yi as usize * stride + xi as usize * 3;
                let top = &src[i..i + 6];
                let bottom = &src[i + stride..i + stride + 6];
                for c in 0..3 {
                    px[c] = bilerp8(top[c], top[c + 3], bottom[c], bottom[c + 3], fx, fy);
                }
            } else if xi >= -1 && yi >= -1 && xi < wi && yi < hi {
                for (c, v) in px.iter_mut().enumerate() {
                    *v = bilerp8(
                        tap(xi, yi, c),
                        tap(xi + 1, yi, c),
                        tap(xi, yi + 1, c),
                        tap(xi + 1, yi + 1, c),
                        fx,
                        fy,
                    );
                }
            }
        }
    }
    out
}

/// Bilinear interpolation with 8-bit weights (`fx`, `fy` in 0..256), rounded half up.
#[inline]
fn bilerp8(p00: u8, p01: u8, p10: u8, p11: u8, fx: u32, fy: u32) -> u8 {
    let top = u32::from(p00) * (256 - fx) + u32::from(p01) * fx;
    let bottom = u32::from(p10) * (256 - fx) + u32::from(p11) * fx;
    ((top * (256 - fy) + bottom * fy + (1 << 15)) >> 16) as u8
}

/// Round half up and saturate, as OpenCV's fixed-point paths do.
#[inline]
fn round_u8(v: f32) -> u8 {
    (v + 0.5).clamp(0.0, 255.0) as u8
}

// ---------------------------------------------------------------------------------------------
// RandomResizedCrop and resizing

/// A random crop of a share of the area at a random aspect ratio, resized (bilinear) to `size`
/// (albumentations/torchvision `RandomResizedCrop`).
#[derive(Clone, Debug, PartialEq)]
pub struct RandomResizedCrop {
    /// Output (width, height).
    pub size: (u32, u32),
    /// Share of the area kept.
    pub scale: (f64, f64),
    /// Aspect ratio (width / height), drawn log-uniformly.
    pub ratio: (f64, f64),
}

impl Transform for RandomResizedCrop {
    fn apply(&self, img: RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        let window = sample_crop_window(img.width(), img.height(), self.scale, self.ratio, rng);
        resize_window(&img, window, self.size.0, self.size.1)
    }
}

/// The crop window of torchvision/albumentations `RandomResizedCrop`: up to 10 draws of an
/// area share and a log-uniform aspect ratio (sides rounded half to even, like Python's
/// `round`); the first that fits is placed uniformly. If none fits, the largest centred
/// window whose aspect ratio is clamped into `ratio`.
pub fn sample_crop_window(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut dyn RngCore,
) -> CropWindow {
    let area = f64::from(width) * f64::from(height);
    let log_ratio = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = uniform(rng, scale.0, scale.1) * area;
        let aspect = uniform(rng, log_ratio.0, log_ratio.1).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= f64::from(width) && h > 0.0 && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            let y = rng.gen_range(0..=height - h);
            let x = rng.gen_range(0..=width - w);
            return CropWindow {
                x,
                y,
                width: w,
                height: h,
            };
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (min_ratio, max_ratio) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < min_ratio {
        let h = (f64::from(width) / min_ratio).round_ties_even() as u32;
        (width, h.min(height))
    } else if in_ratio > max_ratio {
        let w = (f64::from(height) * max_ratio).round_ties_even() as u32;
        (w.min(width), height)
    } else {
        (width, height)
    };
    CropWindow {
        x: (width - w) / 2,
        y: (height - h) / 2,
        width: w,
        height: h,
    }
}

/// `resize_window(&warp_affine(img, forward), window, width, height)`, bit for bit, but the
/// warp is computed only at the (at most `2·width × 2·height`) pixels the resize reads.
pub fn warp_resize_window(
    img: &RgbImage,
    forward: &[f64; 6],
    window: CropWindow,
    width: u32,
    height: u32,
) -> RgbImage {
    let mut out = RgbImage::new(width, height);
    let (x0, y0, ww, wh) = clip_window(window, img.width(), img.height());
    let Some(inv) = invert_affine(forward) else {
        return out;
    };
    if ww == 0 || wh == 0 || width == 0 || height == 0 {
        return out;
    }
    let mut xs = linear_taps(ww, width, x0);
    let mut ys = linear_taps(wh, height, y0);
    let distinct = |taps: &[(usize, usize, u32)]| -> Vec<usize> {
        let mut v: Vec<usize> = taps.iter().flat_map(|&(a, b, _)| [a, b]).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let (cols, rows) = (distinct(&xs), distinct(&ys));
    let compact = warp_affine_at(img, &inv, &cols, &rows);
    for (taps, kept) in [(&mut xs, &cols), (&mut ys, &rows)] {
        for t in taps.iter_mut() {
            t.0 = kept.partition_point(|&i| i < t.0);
            t.1 = kept.partition_point(|&i| i < t.1);
        }
    }
    resize_taps(&compact, cols.len() * 3, &xs, &ys, &mut out);
    out
}

/// [`Affine`] with probability `affine_p`, then [`RandomResizedCrop`], fused: the warp is
/// computed only where the crop's resize reads it, which gives the same pixels as the two
/// steps in a row at a fraction of the cost (the warp of a whole photo dominates otherwise).
/// Draws: the affine's coin, its parameters if it runs, then the crop window.
#[derive(Clone, Debug, PartialEq)]
pub struct AffineResizedCrop {
    /// Probability of the affine warp.
    pub affine_p: f64,
    pub affine: Affine,
    pub crop: RandomResizedCrop,
}

impl Transform for AffineResizedCrop {
    fn apply(&self, img: RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        let (w, h) = img.dimensions();
        let forward = if rng.gen::<f64>() < self.affine_p {
            Some(affine_matrix(&self.affine.sample(w, h, rng), w, h))
        } else {
            None
        };
        let window = sample_crop_window(w, h, self.crop.scale, self.crop.ratio, rng);
        let (ow, oh) = self.crop.size;
        match forward {
            Some(m) => warp_resize_window(&img, &m, window, ow, oh),
            None => resize_window(&img, window, ow, oh),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Colour and noise

/// Grey from OpenCV's `RGB2GRAY` (0.299 R + 0.587 G + 0.114 B, 14-bit fixed point) copied to
/// all three channels.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ToGray;

impl Transform for ToGray {
    fn apply(&self, mut img: RgbImage, _rng: &mut dyn RngCore) -> RgbImage {
        to_gray(&mut img);
        img
    }
}

/// Replace every pixel by its luma, in place.
pub fn to_gray(img: &mut RgbImage) {
    for px in img.chunks_exact_mut(3) {
        let y =
            (u32::from(px[0]) * 4899 + u32::from(px[1]) * 9617 + u32::from(px[2]) * 1868 + 8192)
                >> 14;
        let y = y.min(255) as u8;
        px.fill(y);
    }
}

/// Gaussian blur with a random odd kernel size (albumentations `GaussianBlur` with
/// `sigma_limit=0`, i.e. `cv2.GaussianBlur(img, (k, k), 0)`, border reflect-101).
#[derive(Clone, Debug, PartialEq)]
pub struct GaussianBlur {
    /// Smallest and largest odd kernel size; the size is drawn uniformly among the odd ones.
    pub kernel: (u32, u32),
}

impl GaussianBlur {
    /// Draw the kernel size: uniform among the odd sizes of the range.
    pub fn sample_kernel(&self, rng: &mut dyn RngCore) -> u32 {
        let choices = (self.kernel.1.saturating_sub(self.kernel.0)) / 2 + 1;
        self.kernel.0 + 2 * rng.gen_range(0..choices)
    }
}

impl Transform for GaussianBlur {
    fn apply(&self, img: RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        let k = self.sample_kernel(rng);
        gaussian_blur(&img, k)
    }
}

/// OpenCV's 1-D Gaussian kernel for `sigma <= 0`: for sizes 1, 3, 5 and 7 its fixed binomial
/// tables (what albumentations' default actually runs), otherwise the Gaussian of
/// `sigma = 0.3·((k − 1)·0.5 − 1) + 0.8`, normalised.
pub fn gaussian_kernel(k: u32) -> Vec<f32> {
    match k {
        1 => vec![1.0],
        3 => vec![0.25, 0.5, 0.25],
        5 => vec![0.0625, 0.25, 0.375, 0.25, 0.0625],
        7 => vec![
            0.03125, 0.109375, 0.21875, 0.28125, 0.21875, 0.109375, 0.03125,
        ],
        _ => {
            let sigma = 0.3 * ((f64::from(k) - 1.0) * 0.5 - 1.0) + 0.8;
            let centre = (f64::from(k) - 1.0) / 2.0;
            let raw: Vec<f64> = (0..k)
                .map(|i| (-(f64::from(i) - centre).powi(2) / (2.0 * sigma * sigma)).exp())
                .collect();
            let sum: f64 = raw.iter().sum();
            raw.iter().map(|v| (v / sum) as f32).collect()
        }
    }
}

/// OpenCV's `BORDER_REFLECT_101` index (`gfedcb|abcdefgh|gfedcba`).
fn reflect101(mut i: i64, n: i64) -> usize {
    if n <= 1 {
        return 0;
    }
    while i < 0 || i >= n {
        if i < 0 {
            i = -i;
        }
        if i >= n {
            i = 2 * (n - 1) - i;
        }
    }
    i as usize
}

/// Separable Gaussian blur with kernel size `k` (odd), border reflect-101.
pub fn gaussian_blur(img: &RgbImage, k: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return img.clone();
    }
    let kernel = gaussian_kernel(k);
    let radius = i64::from(k / 2);
    let stride = w as usize * 3;
    let src = img.as_raw();
    // Horizontal pass: each row padded by reflection, then one multiply-add sweep per tap.
    let pad_cols: Vec<usize> = (-radius..i64::from(w) + radius)
        .map(|i| reflect101(i, i64::from(w)))
        .collect();
    let mut padded = vec![0f32; pad_cols.len() * 3];
    let mut tmp = vec![0f32; src.len()];
    for (src_row, tmp_row) in src.chunks_exact(stride).zip(tmp.chunks_exact_mut(stride)) {
        for (p, &sx) in padded.chunks_exact_mut(3).zip(&pad_cols) {
            for (pv, &sv) in p.iter_mut().zip(&src_row[sx * 3..sx * 3 + 3]) {
                *pv = f32::from(sv);
            }
        }
        for (j, &kv) in kernel.iter().enumerate() {
            for (t, &v) in tmp_row.iter_mut().zip(&padded[j * 3..j * 3 + stride]) {
                *t += kv * v;
            }
        }
    }
    // Vertical pass over whole rows of the intermediate.
    let mut out = RgbImage::new(w, h);
    let mut acc = vec![0f32; stride];
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        acc.fill(0.0);
        for (j, &kv) in kernel.iter().enumerate() {
            let sy = reflect101(y as i64 + j as i64 - radius, i64::from(h));
            for (a, &t) in acc.iter_mut().zip(&tmp[sy * stride..(sy + 1) * stride]) {
                *a += kv * t;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = round_u8(a);
        }
    }
    out
}

/// Additive Gaussian noise, per pixel and channel, with a variance drawn from `var`
/// (albumentations `GaussNoise(var_limit=(10, 50), mean=0, per_channel=True)`); the sum is
/// clipped to 0..255 and truncated, as albumentations' `clip(...).astype(uint8)` does.
#[derive(Clone, Debug, PartialEq)]
pub struct GaussNoise {
    /// Variance range in 0..255 units.
    pub var: (f64, f64),
}

impl Transform for GaussNoise {
    fn apply(&self, mut img: RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        let sigma = uniform(rng, self.var.0, self.var.1).sqrt() as f32;
        add_gauss_noise(&mut img, sigma, rng);
        img
    }
}

/// Add `N(0, sigma²)` to every value, clip to 0..255 and truncate, in place.
/// The normals come from a ChaCha8 generator seeded by one draw from `rng` (as albumentations
/// seeds a NumPy `RandomState` from `random`), which is much faster than a dynamic `rng`.
pub fn add_gauss_noise(img: &mut RgbImage, sigma: f32, rng: &mut dyn RngCore) {
    let mut local = ChaCha8Rng::seed_from_u64(rng.next_u64());
    for v in img.iter_mut() {
        let n: f32 = StandardNormal.sample(&mut local);
        *v = (f32::from(*v) + sigma * n).clamp(0.0, 255.0) as u8;
    }
}

/// Brightness and contrast: `v ↦ alpha·v + beta·255`, clipped to 0..255 and truncated
/// (albumentations `RandomBrightnessContrast` with `brightness_by_max=True`, its uint8 LUT).
#[derive(Clone, Debug, PartialEq)]
pub struct BrightnessContrast {
    /// `beta` is drawn from `±brightness`.
    pub brightness: f64,
    /// `alpha` is drawn from `1 ± contrast`.
    pub contrast: f64,
}

impl Transform for BrightnessContrast {
    fn apply(&self, mut img: RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        let alpha = 1.0 + uniform(rng, -self.contrast, self.contrast);
        let beta = uniform(rng, -self.brightness, self.brightness);
        brightness_contrast(&mut img, alpha as f32, beta as f32);
        img
    }
}

/// Apply `v ↦ trunc(clip(alpha·v + beta·255, 0, 255))` through a 256-entry table, in place.
pub fn brightness_contrast(img: &mut RgbImage, alpha: f32, beta: f32) {
    let mut lut = [0u8; 256];
    for (v, entry) in lut.iter_mut().enumerate() {
        *entry = (v as f32 * alpha + beta * 255.0).clamp(0.0, 255.0) as u8;
    }
    for v in img.iter_mut() {
        *v = lut[usize::from(*v)];
    }
}

// ---------------------------------------------------------------------------------------------
// Geometry without interpolation

/// Split the image into a grid and permute the tiles (albumentations `RandomGridShuffle`).
/// Tile edges are `floor(i·len / n)`; only tiles of the same size are exchanged, so with odd
/// sides some (or all) tiles stay in place.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomGridShuffle {
    /// (rows, columns).
    pub grid: (u32, u32),
}

/// One tile of a grid, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The tiles of a `rows × cols` grid over `width × height`, row-major.
pub fn grid_tiles(width: u32, height: u32, rows: u32, cols: u32) -> Vec<Tile> {
    let edges = |len: u32, n: u32| -> Vec<u32> {
        (0..=n)
            .map(|i| (u64::from(i) * u64::from(len) / u64::from(n.max(1))) as u32)
            .collect()
    };
    let (ys, xs) = (edges(height, rows), edges(width, cols));
    let mut tiles = Vec::with_capacity((rows * cols) as usize);
    for r in ys.windows(2) {
        for c in xs.windows(2) {
            tiles.push(Tile {
                x: c[0],
                y: r[0],
                width: c[1] - c[0],
                height: r[1] - r[0],
            });
        }
    }
    tiles
}

impl RandomGridShuffle {
    /// Draw `perm` with `perm[dst] = src`: tiles grouped by size (groups in ascending
    /// (height, width) order, as `np.unique` sorts them), each group shuffled.
    pub fn sample(&self, width: u32, height: u32, rng: &mut dyn RngCore) -> Vec<usize> {
        let tiles = grid_tiles(width, height, self.grid.0, self.grid.1);
        let mut sizes: Vec<(u32, u32)> = tiles.iter().map(|t| (t.height, t.width)).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut perm: Vec<usize> = (0..tiles.len()).collect();
        for size in sizes {
            let members: Vec<usize> = (0..tiles.len())
                .filter(|&i| (tiles[i].height, tiles[i].width) == size)
                .collect();
            let mut shuffled = members.clone();
            shuffled.shuffle(rng);
            for (&dst, &src) in members.iter().zip(&shuffled) {
                perm[dst] = src;
            }
        }
        perm
    }
}

impl Transform for RandomGridShuffle {
    fn apply(&self, img: RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        let perm = self.sample(img.width(), img.height(), rng);
        shuffle_tiles(&img, self.grid, &perm)
    }
}

/// Copy tile `perm[i]` of `img` into tile `i` of the output.
fn shuffle_tiles(img: &RgbImage, grid: (u32, u32), perm: &[usize]) -> RgbImage {
    let tiles = grid_tiles(img.width(), img.height(), grid.0, grid.1);
    let mut out = img.clone();
    let stride = img.width() as usize * 3;
    let src = img.as_raw();
    let buf: &mut [u8] = &mut out;
    for (dst, &from) in tiles.iter().zip(perm) {
        let Some(src_tile) = tiles.get(from) else {
            continue;
        };
        let width = dst.width.min(src_tile.width) as usize * 3;
        for row in 0..dst.height.min(src_tile.height) as usize {
            let s = (src_tile.y as usize + row) * stride + src_tile.x as usize * 3;
            let d = (dst.y as usize + row) * stride + dst.x as usize * 3;
            buf[d..d + width].copy_from_slice(&src[s..s + width]);
        }
    }
    out
}

/// Mirror left–right: pixel `(x, y)` goes to `(w − 1 − x, y)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HorizontalFlip;

impl Transform for HorizontalFlip {
    fn apply(&self, mut img: RgbImage, _rng: &mut dyn RngCore) -> RgbImage {
        hflip(&mut img);
        img
    }
}

/// Mirror top–bottom: pixel `(x, y)` goes to `(x, h − 1 − y)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VerticalFlip;

impl Transform for VerticalFlip {
    fn apply(&self, img: RgbImage, _rng: &mut dyn RngCore) -> RgbImage {
        image::imageops::flip_vertical(&img)
    }
}

/// Mirror left–right, in place.
pub fn hflip(img: &mut RgbImage) {
    let stride = img.width() as usize * 3;
    if stride == 0 {
        return;
    }
    for row in img.chunks_exact_mut(stride) {
        let w = row.len() / 3;
        for x in 0..w / 2 {
            let (left, right) = row.split_at_mut((w - 1 - x) * 3);
            left[x * 3..x * 3 + 3].swap_with_slice(&mut right[..3]);
        }
    }
}

/// The reference's training augmentations for a model of input `size` = (width, height)
/// whose backbone normalises with `mean` and `std` (0..1 units). Seven steps: the fused
/// affine + crop (p = 1; the affine's own probability inside), then gray, blur, noise,
/// grid shuffle, brightness/contrast and the horizontal flip (p = 0 where `flips` does not
/// allow it); an eighth, the vertical flip, where `flips` allows it.
pub fn train_pipeline(
    cfg: &AugmentConfig,
    flips: Flips,
    size: (u32, u32),
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<Pipeline> {
    cfg.validate()?;
    ensure!(
        cfg.grid.0 <= size.1 / 2 && cfg.grid.1 <= size.0 / 2,
        "augment: a {:?} grid is too fine for a {}×{} image (albumentations refuses it)",
        cfg.grid,
        size.0,
        size.1
    );
    let mut p = Pipeline::new(size, mean, std)?;
    p.push(
        1.0,
        AffineResizedCrop {
            affine_p: cfg.affine_p,
            affine: Affine {
                rotate_deg: cfg.rotate_deg,
                translate: cfg.translate,
                shear_deg: cfg.shear_deg,
            },
            crop: RandomResizedCrop {
                size,
                scale: cfg.crop_scale,
                ratio: cfg.crop_ratio,
            },
        },
    )?
    .push(cfg.gray_p, ToGray)?
    .push(
        cfg.blur_p,
        GaussianBlur {
            kernel: cfg.blur_kernel,
        },
    )?
    .push(cfg.noise_p, GaussNoise { var: cfg.noise_var })?
    .push(cfg.grid_shuffle_p, RandomGridShuffle { grid: cfg.grid })?
    .push(
        cfg.brightness_contrast_p,
        BrightnessContrast {
            brightness: cfg.brightness,
            contrast: cfg.contrast,
        },
    )?
    .push(
        if flips.horizontal() { cfg.hflip_p } else { 0.0 },
        HorizontalFlip,
    )?;
    if flips.vertical() {
        p.push(cfg.vflip_p, VerticalFlip)?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transforms::{batch, batch_with, item_rng, resize, Fit, ImgSize, Normalize};
    use image::Rgb;

    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];

    /// A deterministic, textured test photo.
    fn photo(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let n = x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503);
            Rgb([
                ((x * 255) / w.max(1)) as u8,
                ((y * 255) / h.max(1)) as u8,
                (n >> 7) as u8,
            ])
        })
    }

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    fn channel_stats(img: &RgbImage) -> (f64, f64) {
        let n = img.as_raw().len() as f64;
        let mean = img.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = img
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var)
    }

    fn centroid(img: &RgbImage) -> (f64, f64) {
        let (mut sx, mut sy, mut s) = (0.0, 0.0, 0.0);
        for (x, y, p) in img.enumerate_pixels() {
            let v = f64::from(p[0]);
            sx += v * f64::from(x);
            sy += v * f64::from(y);
            s += v;
        }
        (sx / s, sy / s)
    }

    #[test]
    fn affine_zero_params_is_identity() {
        let img = photo(37, 29);
        let m = affine_matrix(&AffineParams::default(), 37, 29);
        assert_eq!(warp_affine(&img, &m), img);
    }

    #[test]
    fn affine_translation_moves_a_dot() {
        let mut img = RgbImage::new(64, 48);
        img.put_pixel(20, 15, Rgb([255, 128, 7]));
        let params = AffineParams {
            translate_x: 10.0,
            ..Default::default()
        };
        let out = warp_affine(&img, &affine_matrix(&params, 64, 48));
        assert_eq!(out.get_pixel(30, 15), &Rgb([255, 128, 7]));
        assert_eq!(out.get_pixel(20, 15), &Rgb([0, 0, 0]));
        assert_eq!(out.iter().filter(|&&v| v > 0).count(), 3);
        let params = AffineParams {
            translate_y: -7.0,
            ..Default::default()
        };
        let out = warp_affine(&img, &affine_matrix(&params, 64, 48));
        assert_eq!(out.get_pixel(20, 8), &Rgb([255, 128, 7]));
    }

    #[test]
    fn affine_rotation_by_90_turns_corners_counter_clockwise() {
        let mut img = RgbImage::new(32, 32);
        img.put_pixel(0, 0, Rgb([255, 0, 0]));
        img.put_pixel(31, 0, Rgb([0, 255, 0]));
        let params = AffineParams {
            rotate_deg: 90.0,
            ..Default::default()
        };
        let out = warp_affine(&img, &affine_matrix(&params, 32, 32));
        assert_eq!(
            out.get_pixel(0, 31),
            &Rgb([255, 0, 0]),
            "top-left → bottom-left"
        );
        assert_eq!(
            out.get_pixel(0, 0),
            &Rgb([0, 255, 0]),
            "top-right → top-left"
        );
        assert_eq!(out.get_pixel(31, 0), &Rgb([0, 0, 0]));
    }

    #[test]
    fn affine_shear_moves_a_point_by_the_hand_computed_amount() {
        // Centre (50, 50); x-shear of 30°: (dx, dy) ↦ (dx + sin30°·dy, cos30°·dy).
        let params = AffineParams {
            shear_x_deg: 30.0,
            ..Default::default()
        };
        let m = affine_matrix(&params, 101, 101);
        let (x, y) = (50.0, 90.0);
        let (fx, fy) = (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]);
        assert!((fx - 70.0).abs() < 1e-9, "{fx}");
        assert!(
            (fy - (50.0 + 40.0 * 30f64.to_radians().cos())).abs() < 1e-9,
            "{fy}"
        );

        let mut img = RgbImage::new(101, 101);
        for dy in 0..3 {
            for dx in 0..3 {
                img.put_pixel(49 + dx, 89 + dy, Rgb([255, 255, 255]));
            }
        }
        let (cx, cy) = centroid(&warp_affine(&img, &m));
        assert!(
            (cx - 70.0).abs() < 0.3 && (cy - fy).abs() < 0.3,
            "{cx} {cy}"
        );

        // y-shear of 30°: (dx, dy) ↦ (cos30°·dx, dy − sin30°·dx).
        let params = AffineParams {
            shear_y_deg: 30.0,
            ..Default::default()
        };
        let m = affine_matrix(&params, 101, 101);
        let (x, y) = (90.0, 50.0);
        let (fx, fy) = (m[0] * x + m[1] * y + m[2], m[3] * x + m[4] * y + m[5]);
        assert!((fx - (50.0 + 40.0 * 30f64.to_radians().cos())).abs() < 1e-9);
        assert!((fy - 30.0).abs() < 1e-9, "{fy}");
    }

    #[test]
    fn affine_fills_borders_with_zero() {
        let img = RgbImage::from_pixel(80, 60, Rgb([200, 200, 200]));
        let params = AffineParams {
            rotate_deg: 15.0,
            ..Default::default()
        };
        let out = warp_affine(&img, &affine_matrix(&params, 80, 60));
        for (x, y) in [(0, 0), (79, 0), (0, 59), (79, 59)] {
            assert_eq!(out.get_pixel(x, y), &Rgb([0, 0, 0]));
        }
        assert_eq!(out.get_pixel(40, 30), &Rgb([200, 200, 200]));
        let params = AffineParams {
            translate_x: 10.0,
            ..Default::default()
        };
        let out = warp_affine(&img, &affine_matrix(&params, 80, 60));
        for (x, y, p) in out.enumerate_pixels() {
            let want = if x < 10 { 0 } else { 200 };
            assert_eq!(p, &Rgb([want; 3]), "({x}, {y})");
        }
    }

    #[test]
    fn affine_sampler_stays_in_its_ranges() {
        let aug = Affine {
            rotate_deg: 15.0,
            translate: (0.0, 0.25),
            shear_deg: 3.0,
        };
        let mut r = rng(1);
        let (mut min_t, mut max_t) = (f64::MAX, f64::MIN);
        for _ in 0..2000 {
            let p = aug.sample(200, 100, &mut r);
            assert!(p.rotate_deg.abs() <= 15.0);
            assert!(p.shear_x_deg.abs() <= 3.0 && p.shear_y_deg.abs() <= 3.0);
            assert!((0.0..=50.0).contains(&p.translate_x));
            assert!((0.0..=25.0).contains(&p.translate_y));
            min_t = min_t.min(p.translate_x);
            max_t = max_t.max(p.translate_x);
        }
        assert!(min_t < 2.0 && max_t > 48.0);
    }

    #[test]
    fn crop_window_stays_in_scale_and_ratio() {
        let mut r = rng(2);
        let ratio = (0.75, 4.0 / 3.0);
        // The seed's ranges (a 10:9 photo constrains the aspect to about 1.0–1.23), then a
        // wider area range where the aspect can reach both ends.
        for (w, h, scale, want_share, want_aspect) in [
            (1000u32, 900u32, (0.9, 1.0), 0.91, (1.01, 1.2)),
            (1000, 1000, (0.2, 0.5), 0.21, (0.77, 1.3)),
        ] {
            let (mut min_share, mut min_aspect, mut max_aspect) = (f64::MAX, f64::MAX, f64::MIN);
            for _ in 0..5000 {
                let c = sample_crop_window(w, h, scale, ratio, &mut r);
                assert!(c.x + c.width <= w && c.y + c.height <= h, "{c:?}");
                let share = f64::from(c.width * c.height) / f64::from(w * h);
                let aspect = f64::from(c.width) / f64::from(c.height);
                assert!(
                    (scale.0 - 2e-3..=scale.1 + 2e-3).contains(&share),
                    "{share}"
                );
                assert!(
                    (0.75 - 2e-3..=4.0 / 3.0 + 2e-3).contains(&aspect),
                    "{aspect}"
                );
                min_share = min_share.min(share);
                min_aspect = min_aspect.min(aspect);
                max_aspect = max_aspect.max(aspect);
            }
            assert!(min_share < want_share, "{min_share}");
            assert!(
                min_aspect < want_aspect.0 && max_aspect > want_aspect.1,
                "{min_aspect} {max_aspect}"
            );
        }
    }

    #[test]
    fn crop_window_falls_back_to_a_centre_crop() {
        // 3:2 photos never fit 90–100 % of their area within aspect 3/4–4/3.
        let mut r = rng(3);
        for _ in 0..20 {
            let c = sample_crop_window(768, 512, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut r);
            assert_eq!(
                c,
                CropWindow {
                    x: 42,
                    y: 0,
                    width: 683,
                    height: 512
                }
            );
        }
        let c = sample_crop_window(300, 1000, (1.0, 1.0), (0.75, 4.0 / 3.0), &mut r);
        assert_eq!((c.width, c.height, c.x, c.y), (300, 400, 0, 300));
    }

    #[test]
    fn random_resized_crop_has_the_target_size_and_keeps_constants() {
        let rrc = RandomResizedCrop {
            size: (224, 200),
            scale: (0.9, 1.0),
            ratio: (0.75, 4.0 / 3.0),
        };
        let mut r = rng(4);
        let img = RgbImage::from_pixel(300, 280, Rgb([10, 120, 250]));
        for _ in 0..10 {
            let out = rrc.apply(img.clone(), &mut r);
            assert_eq!(out.dimensions(), (224, 200));
            assert!(out.pixels().all(|p| *p == Rgb([10, 120, 250])));
        }
        let out = rrc.apply(photo(768, 512), &mut r);
        assert_eq!(out.dimensions(), (224, 200));
    }

    #[test]
    fn fused_warp_and_crop_equal_the_two_steps() {
        let img = photo(157, 103);
        let affine = Affine {
            rotate_deg: 15.0,
            translate: (-0.25, 0.25),
            shear_deg: 3.0,
        };
        let mut r = rng(11);
        for (ow, oh) in [(64, 48), (200, 150), (31, 97)] {
            for _ in 0..10 {
                let m = affine_matrix(&affine.sample(157, 103, &mut r), 157, 103);
                let win = sample_crop_window(157, 103, (0.3, 1.0), (0.75, 4.0 / 3.0), &mut r);
                assert_eq!(
                    warp_resize_window(&img, &m, win, ow, oh),
                    resize_window(&warp_affine(&img, &m), win, ow, oh)
                );
            }
        }
        let step = AffineResizedCrop {
            affine_p: 0.5,
            affine: affine.clone(),
            crop: RandomResizedCrop {
                size: (64, 64),
                scale: (0.5, 1.0),
                ratio: (0.75, 4.0 / 3.0),
            },
        };
        let (mut warped, mut plain) = (0, 0);
        for s in 0..40 {
            let got = step.apply(img.clone(), &mut rng(s));
            let mut r = rng(s);
            let mut source = img.clone();
            if r.gen::<f64>() < 0.5 {
                source = affine.apply(source, &mut r);
                warped += 1;
            } else {
                plain += 1;
            }
            let win = sample_crop_window(157, 103, (0.5, 1.0), (0.75, 4.0 / 3.0), &mut r);
            assert_eq!(got, resize_window(&source, win, 64, 64), "seed {s}");
        }
        assert!(warped > 5 && plain > 5, "{warped} {plain}");
    }

    #[test]
    fn to_gray_writes_the_luma_to_every_channel() {
        let mut img = RgbImage::from_pixel(3, 2, Rgb([200, 100, 50]));
        img.put_pixel(1, 1, Rgb([255, 255, 255]));
        to_gray(&mut img);
        // 0.299·200 + 0.587·100 + 0.114·50 = 124.2
        assert_eq!(img.get_pixel(0, 0), &Rgb([124, 124, 124]));
        assert_eq!(img.get_pixel(1, 1), &Rgb([255, 255, 255]));
    }

    #[test]
    fn gaussian_kernels_are_opencvs() {
        for k in [1, 3, 5, 7, 9, 11] {
            let kern = gaussian_kernel(k);
            assert_eq!(kern.len(), k as usize);
            assert!((kern.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            for i in 0..kern.len() / 2 {
                assert_eq!(kern[i], kern[kern.len() - 1 - i]);
            }
        }
        // k = 9: sigma = 0.3·(4 − 1) + 0.8 = 1.7.
        let k9 = gaussian_kernel(9);
        let ratio = f64::from(k9[3] / k9[4]);
        assert!((ratio - (-1.0f64 / (2.0 * 1.7 * 1.7)).exp()).abs() < 1e-6);
    }

    #[test]
    fn gaussian_blur_preserves_means_and_smooths() {
        let flat = RgbImage::from_pixel(30, 20, Rgb([77, 0, 255]));
        for k in [3, 5, 7] {
            assert_eq!(gaussian_blur(&flat, k), flat);
        }
        // A checkerboard of 8-px squares, 128 ± 64, whose squares tile the image.
        let board = RgbImage::from_fn(64, 64, |x, y| {
            let v = if (x / 8 + y / 8) % 2 == 0 { 192 } else { 64 };
            Rgb([v, v, v])
        });
        let (m0, v0) = channel_stats(&board);
        for k in [3, 5, 7] {
            let (m1, v1) = channel_stats(&gaussian_blur(&board, k));
            assert!((m1 - m0).abs() < 0.5, "k={k}: mean {m0} → {m1}");
            assert!(v1 < 0.95 * v0, "k={k}: variance {v0} → {v1}");
        }
        // Impulse with k = 3: weights 1/4, 1/8 and 1/16 of 255.
        let mut imp = RgbImage::new(9, 9);
        imp.put_pixel(4, 4, Rgb([255, 255, 255]));
        let out = gaussian_blur(&imp, 3);
        assert_eq!(out.get_pixel(4, 4)[0], 64);
        assert_eq!(out.get_pixel(3, 4)[0], 32);
        assert_eq!(out.get_pixel(4, 5)[1], 32);
        assert_eq!(out.get_pixel(5, 5)[2], 16);
        assert_eq!(out.get_pixel(6, 4)[0], 0);
    }

    #[test]
    fn gaussian_blur_draws_odd_kernels_in_range() {
        let blur = GaussianBlur { kernel: (3, 7) };
        let mut r = rng(5);
        let mut seen = [0usize; 3];
        for _ in 0..300 {
            let k = blur.sample_kernel(&mut r);
            seen[((k - 3) / 2) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn gauss_noise_keeps_the_mean_and_has_the_configured_variance() {
        let grey = RgbImage::from_pixel(64, 64, Rgb([128, 128, 128]));
        let mut r = rng(6);
        let noise = GaussNoise { var: (10.0, 50.0) };
        let (mut lo, mut hi) = (f64::MAX, f64::MIN);
        for _ in 0..40 {
            let (m, v) = channel_stats(&noise.apply(grey.clone(), &mut r));
            // Truncation lowers the mean by about half a level.
            assert!((m - 128.0).abs() < 1.0, "{m}");
            assert!((10.0 * 0.9..=50.0 * 1.1).contains(&v), "{v}");
            lo = lo.min(v);
            hi = hi.max(v);
        }
        assert!(lo < 20.0 && hi > 40.0, "{lo} {hi}");
        let fixed = GaussNoise { var: (30.0, 30.0) };
        let (_, v) = channel_stats(&fixed.apply(grey, &mut r));
        assert!((v - 30.0).abs() < 2.5, "{v}");
    }

    #[test]
    fn grid_shuffle_permutes_whole_tiles() {
        let img = photo(224, 224);
        let tiles = grid_tiles(224, 224, 2, 2);
        let tile_pixels = |im: &RgbImage, t: &Tile| -> Vec<u8> {
            image::imageops::crop_imm(im, t.x, t.y, t.width, t.height)
                .to_image()
                .into_raw()
        };
        let originals: Vec<Vec<u8>> = tiles.iter().map(|t| tile_pixels(&img, t)).collect();
        let shuffle = RandomGridShuffle { grid: (2, 2) };
        let mut r = rng(7);
        let mut moved = 0;
        for _ in 0..20 {
            let out = shuffle.apply(img.clone(), &mut r);
            let mut used = [false; 4];
            for t in &tiles {
                let got = tile_pixels(&out, t);
                let i = originals
                    .iter()
                    .position(|o| *o == got)
                    .expect("every output tile is an input tile");
                assert!(!used[i], "tile {i} used twice");
                used[i] = true;
            }
            let mut a = img.as_raw().clone();
            let mut b = out.as_raw().clone();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "histogram unchanged");
            moved += usize::from(out != img);
        }
        assert!(moved >= 15, "{moved}");
    }

    #[test]
    fn grid_shuffle_swaps_only_tiles_of_equal_size() {
        let shuffle = RandomGridShuffle { grid: (2, 2) };
        let mut r = rng(8);
        // 225 × 223: tile sizes 112/113 × 111/112 are all different, so nothing moves.
        let img = photo(225, 223);
        for _ in 0..10 {
            assert_eq!(shuffle.apply(img.clone(), &mut r), img);
        }
        // 224 × 225: rows of 112 and 113 px; tiles only swap within their row.
        let tiles = grid_tiles(224, 225, 2, 2);
        assert_eq!(
            tiles
                .iter()
                .map(|t| (t.height, t.width))
                .collect::<Vec<_>>(),
            vec![(112, 112), (112, 112), (113, 112), (113, 112)]
        );
        for _ in 0..20 {
            let perm = shuffle.sample(224, 225, &mut r);
            assert!(
                perm[0] < 2 && perm[1] < 2 && perm[2] >= 2 && perm[3] >= 2,
                "{perm:?}"
            );
        }
    }

    #[test]
    fn brightness_contrast_maps_known_pixels() {
        let mut img = RgbImage::from_fn(2, 1, |x, _| {
            if x == 0 {
                Rgb([100, 220, 30])
            } else {
                Rgb([200, 0, 255])
            }
        });
        let mut dark = img.clone();
        // 100·1.2 + 25.5 = 145.5 → 145; 220·1.2 + 25.5 → 255; 30·1.2 + 25.5 = 61.5 → 61.
        brightness_contrast(&mut img, 1.2, 0.1);
        assert_eq!(img.get_pixel(0, 0), &Rgb([145, 255, 61]));
        assert_eq!(img.get_pixel(1, 0), &Rgb([255, 25, 255]));
        // 200·0.8 − 51 = 109; 0 → 0; 255·0.8 − 51 = 153; 30·0.8 − 51 < 0 → 0.
        brightness_contrast(&mut dark, 0.8, -0.2);
        assert_eq!(dark.get_pixel(1, 0), &Rgb([109, 0, 153]));
        assert_eq!(dark.get_pixel(0, 0)[2], 0);
    }

    #[test]
    fn hflip_mirrors_columns() {
        for w in [1u32, 6, 7] {
            let img = photo(w, 5);
            let mut out = img.clone();
            hflip(&mut out);
            for (x, y, p) in img.enumerate_pixels() {
                assert_eq!(out.get_pixel(w - 1 - x, y), p);
            }
        }
    }

    #[test]
    fn pipeline_is_deterministic_per_seed() {
        let pipe = train_pipeline(
            &AugmentConfig::default(),
            Flips::Horizontal,
            (224, 224),
            MEAN,
            STD,
        )
        .expect("ok");
        let img = photo(300, 260);
        let a = pipe.run(&img, &mut rng(9));
        let b = pipe.run(&img, &mut rng(9));
        assert_eq!(a.len(), 3 * 224 * 224);
        assert_eq!(a, b);
        let differ = (10..20)
            .filter(|&s| pipe.run(&img, &mut rng(s)) != a)
            .count();
        assert_eq!(differ, 10);

        let eval = Pipeline::eval(ImgSize::square(224), Fit::Squash, MEAN, STD).expect("ok");
        let e1 = eval.run(&img, &mut rng(1));
        assert_eq!(e1, eval.run(&img, &mut rng(2)));
        let resized = resize(&img, 224, 224);
        let mut want = vec![0f32; e1.len()];
        Normalize::new(MEAN, STD)
            .expect("ok")
            .write_chw(&resized, &mut want);
        assert_eq!(e1, want);
    }

    #[test]
    fn batch_equals_per_item_runs_on_any_thread_count() {
        let pipe = train_pipeline(
            &AugmentConfig::default(),
            Flips::Horizontal,
            (64, 48),
            MEAN,
            STD,
        )
        .expect("ok");
        let owned: Vec<RgbImage> = (0..7).map(|i| photo(90 + i * 7, 70 + i * 3)).collect();
        let images: Vec<&RgbImage> = owned.iter().collect();
        let run_on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(|| batch(&pipe, &images, 42))
        };
        let one = run_on(1);
        assert_eq!(one, run_on(3));
        let len = pipe.output_len();
        for (i, img) in images.iter().enumerate() {
            let item = pipe.run(img, &mut item_rng(42, i as u64));
            assert_eq!(&one[i * len..(i + 1) * len], &item[..], "item {i}");
        }
        assert_ne!(one, batch(&pipe, &images, 43));
        let loaded = batch_with(&pipe, owned.len(), 42, |i| Ok(owned[i].clone())).expect("ok");
        assert_eq!(loaded, one);
        let failed = batch_with(&pipe, 3, 42, |i| {
            ensure!(i != 1, "cannot decode {i}");
            Ok(owned[i].clone())
        });
        assert!(failed.is_err());
    }

    #[test]
    fn step_probabilities_follow_the_config() {
        let cfg = AugmentConfig::default();
        let pipe = train_pipeline(&cfg, Flips::Horizontal, (224, 224), MEAN, STD).expect("ok");
        assert_eq!(
            pipe.probabilities(),
            vec![1.0, 0.1, 0.07, 0.07, 0.28, 0.5, 0.1]
        );
        // Every optional step off, a crop of the whole (square) image: the eval transform.
        let off = AugmentConfig {
            affine_p: 0.0,
            crop_scale: (1.0, 1.0),
            crop_ratio: (1.0, 1.0),
            gray_p: 0.0,
            blur_p: 0.0,
            noise_p: 0.0,
            grid_shuffle_p: 0.0,
            brightness_contrast_p: 0.0,
            hflip_p: 0.0,
            ..cfg.clone()
        };
        let img = photo(200, 200);
        let eval = Pipeline::eval(ImgSize::square(96), Fit::Squash, MEAN, STD).expect("ok");
        let want = eval.augment(&img, &mut rng(0));
        let pipe = train_pipeline(&off, Flips::Horizontal, (96, 96), MEAN, STD).expect("ok");
        for s in 0..20 {
            assert_eq!(pipe.augment(&img, &mut rng(s)), want);
        }
        // Flip always, where the flips allow it; a flank (no flip allowed) is never mirrored.
        let always = AugmentConfig {
            hflip_p: 1.0,
            vflip_p: 1.0,
            ..off.clone()
        };
        let flip = train_pipeline(&always, Flips::Horizontal, (96, 96), MEAN, STD).expect("ok");
        let mut flipped = want.clone();
        hflip(&mut flipped);
        let flank = train_pipeline(&always, Flips::None, (96, 96), MEAN, STD).expect("ok");
        let both = train_pipeline(&always, Flips::Both, (96, 96), MEAN, STD).expect("ok");
        let turned = image::imageops::rotate180(&want);
        for s in 0..20 {
            assert_eq!(flip.augment(&img, &mut rng(s)), flipped);
            assert_eq!(flank.augment(&img, &mut rng(s)), want);
            assert_eq!(both.augment(&img, &mut rng(s)), turned);
        }
        assert_eq!(flank.probabilities().last(), Some(&0.0));
        assert_eq!(both.probabilities().len(), 8);
        // Grey always: the three channels agree for every draw.
        let gray = train_pipeline(
            &AugmentConfig {
                gray_p: 1.0,
                affine_p: 1.0,
                ..off.clone()
            },
            Flips::Horizontal,
            (96, 96),
            MEAN,
            STD,
        )
        .expect("ok");
        for s in 0..20 {
            let out = gray.augment(&img, &mut rng(s));
            assert!(out.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        }
        // Brightness/contrast always: never the plain crop.
        let bc = train_pipeline(
            &AugmentConfig {
                brightness_contrast_p: 1.0,
                ..off.clone()
            },
            Flips::Horizontal,
            (96, 96),
            MEAN,
            STD,
        )
        .expect("ok");
        let changed = (0..20)
            .filter(|&s| bc.augment(&img, &mut rng(s)) != want)
            .count();
        assert_eq!(changed, 20);
    }

    #[test]
    fn config_validates_and_round_trips_through_json() {
        let cfg = AugmentConfig::default();
        cfg.validate().expect("default is valid");
        let json = serde_json::to_string(&cfg).expect("serialise");
        let back: AugmentConfig = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, cfg);
        let partial: AugmentConfig = serde_json::from_str(r#"{"hflip_p": 0.5}"#).expect("parse");
        assert_eq!(partial.hflip_p, 0.5);
        assert_eq!(partial.affine_p, 0.5);
        for bad in [
            AugmentConfig {
                gray_p: 1.5,
                ..cfg.clone()
            },
            AugmentConfig {
                blur_kernel: (3, 6),
                ..cfg.clone()
            },
            AugmentConfig {
                crop_scale: (1.0, 0.9),
                ..cfg.clone()
            },
            AugmentConfig {
                crop_ratio: (0.0, 1.0),
                ..cfg.clone()
            },
            AugmentConfig {
                noise_var: (-1.0, 5.0),
                ..cfg.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert!(
            train_pipeline(&cfg, Flips::Horizontal, (3, 3), MEAN, STD).is_err(),
            "grid too fine"
        );
        assert!(train_pipeline(&cfg, Flips::Horizontal, (0, 224), MEAN, STD).is_err());
    }

    /// `cargo test --release --lib train::augment -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn train_throughput() {
        /// Seconds this thread has run on a CPU (Linux), so that other load on the machine
        /// does not count; wall time elsewhere.
        fn cpu_seconds() -> Option<f64> {
            let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
            let ns: f64 = stat.split_whitespace().next()?.parse().ok()?;
            Some(ns * 1e-9)
        }
        fn per_second(n: u32, mut f: impl FnMut()) -> f64 {
            let (start, cpu) = (std::time::Instant::now(), cpu_seconds());
            for _ in 0..n {
                f();
            }
            let secs = match (cpu, cpu_seconds()) {
                (Some(a), Some(b)) => b - a,
                _ => start.elapsed().as_secs_f64(),
            };
            f64::from(n) / secs
        }
        let photo_768 = photo(768, 512);
        let small = photo(224, 224);
        let mut r = rng(0);
        let steps: Vec<(&str, &RgbImage, Box<dyn Transform>)> = vec![
            (
                "affine",
                &photo_768,
                Box::new(Affine {
                    rotate_deg: 15.0,
                    translate: (0.0, 0.25),
                    shear_deg: 3.0,
                }),
            ),
            (
                "crop",
                &photo_768,
                Box::new(RandomResizedCrop {
                    size: (224, 224),
                    scale: (0.9, 1.0),
                    ratio: (0.75, 4.0 / 3.0),
                }),
            ),
            ("gray", &small, Box::new(ToGray)),
            ("blur", &small, Box::new(GaussianBlur { kernel: (3, 7) })),
            ("noise", &small, Box::new(GaussNoise { var: (10.0, 50.0) })),
            (
                "shuffle",
                &small,
                Box::new(RandomGridShuffle { grid: (2, 2) }),
            ),
            (
                "bright",
                &small,
                Box::new(BrightnessContrast {
                    brightness: 0.2,
                    contrast: 0.2,
                }),
            ),
            ("flip", &small, Box::new(HorizontalFlip)),
        ];
        for (name, input, t) in &steps {
            let rate = per_second(100, || {
                std::hint::black_box(t.apply((*input).clone(), &mut r));
            });
            println!("{name}: {:.2} ms", 1e3 / rate);
        }
        let mut out = vec![0f32; 3 * 224 * 224];
        let train = train_pipeline(
            &AugmentConfig::default(),
            Flips::Horizontal,
            (224, 224),
            MEAN,
            STD,
        )
        .expect("ok");
        let always = AugmentConfig {
            affine_p: 1.0,
            ..AugmentConfig::default()
        };
        let always = train_pipeline(&always, Flips::Horizontal, (224, 224), MEAN, STD).expect("ok");
        let eval = Pipeline::eval(ImgSize::square(224), Fit::Squash, MEAN, STD).expect("ok");
        for (name, pipe) in [
            ("train", &train),
            ("train, affine always", &always),
            ("eval", &eval),
        ] {
            let rate = per_second(300, || pipe.run_into(&photo_768, &mut r, &mut out));
            println!("768×512 → 224×224, one thread, {name}: {rate:.0} images/s");
        }
    }
}
