//! Inference transforms: the photo as the network sees it. A bilinear resize with OpenCV's
//! `INTER_LINEAR` semantics, normalisation into a CHW `f32` buffer, and the [`Pipeline`] of
//! optional steps that runs before them; [`batch_with`] runs it over many photos in parallel,
//! each with its own random stream. Training adds its random augmentations as steps
//! (`train::augment`); validation, prediction and detection use [`Pipeline::eval`] alone.

use anyhow::{ensure, Result};
use clap::ValueEnum;
use image::RgbImage;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One augmentation. `apply` draws its parameters from `rng` and transforms `img`, in place
/// where it can.
pub trait Transform: Send + Sync + fmt::Debug {
    /// Transform `img` with parameters drawn from `rng`.
    fn apply(&self, img: RgbImage, rng: &mut dyn RngCore) -> RgbImage;
}

/// A crop rectangle in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropWindow {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// Bilinear resize of the whole image to `size` (`cv2.resize`, `INTER_LINEAR`).
#[derive(Clone, Debug, PartialEq)]
pub struct Resize {
    /// Output (width, height).
    pub size: (u32, u32),
}

impl Transform for Resize {
    fn apply(&self, img: RgbImage, _rng: &mut dyn RngCore) -> RgbImage {
        if img.dimensions() == self.size {
            return img;
        }
        resize(&img, self.size.0, self.size.1)
    }
}

/// Bilinear resize of the whole image (`cv2.resize`, `INTER_LINEAR`).
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let window = CropWindow {
        x: 0,
        y: 0,
        width: img.width(),
        height: img.height(),
    };
    resize_window(img, window, width, height)
}

/// A network's input size in pixels: `224` (square) or `448x160` (width × height), for
/// animals seen long and narrow (a beluga from above).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImgSize {
    pub width: u32,
    pub height: u32,
}

impl ImgSize {
    pub const fn square(side: u32) -> Self {
        Self {
            width: side,
            height: side,
        }
    }
}

impl std::str::FromStr for ImgSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let side = |v: &str| {
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| (1..=4096).contains(&n))
                .ok_or_else(|| format!("image size {s:?}: {v:?} is not a side of 1 to 4096 pixels"))
        };
        match s.split_once(['x', 'X']) {
            Some((w, h)) => Ok(Self {
                width: side(w)?,
                height: side(h)?,
            }),
            None => Ok(Self::square(side(s)?)),
        }
    }
}

impl fmt::Display for ImgSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.width == self.height {
            true => write!(f, "{}", self.width),
            false => write!(f, "{}x{}", self.width, self.height),
        }
    }
}

/// A square size is written as its side (the form of older configs), any other as `WxH`.
impl Serialize for ImgSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.width == self.height {
            true => s.serialize_u32(self.width),
            false => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for ImgSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Side(u32),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Side(n) => Ok(Self::square(n)),
            Form::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// How a photo fits the input size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Fit {
    /// Stretch the photo to the input size.
    #[default]
    Squash,
    /// Keep the photo's aspect: scale it to fit inside, centred, and fill the rest with the
    /// network's mean colour (zero after normalisation).
    Pad,
}

/// The mirror images of a photo that still show the same animal, for the augmentations and the
/// flip TTA: none for a flank (its mirror image looks like the other flank), left–right for a
/// fin, left–right and end over end for a whale seen from above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Flips {
    None,
    /// Mirrored left–right.
    #[default]
    Horizontal,
    /// Mirrored top–bottom.
    Vertical,
    /// Either, or both (the photo turned by 180°).
    Both,
}

impl Flips {
    pub fn horizontal(self) -> bool {
        matches!(self, Flips::Horizontal | Flips::Both)
    }

    pub fn vertical(self) -> bool {
        matches!(self, Flips::Vertical | Flips::Both)
    }

    /// The views a flip TTA averages, as the axes of an NCHW batch each flips (none: the photo
    /// itself, first).
    pub fn views(self) -> Vec<Vec<i64>> {
        let mut views = vec![vec![]];
        if self.horizontal() {
            views.push(vec![3]);
        }
        if self.vertical() {
            views.push(vec![2]);
        }
        if self == Flips::Both {
            views.push(vec![2, 3]);
        }
        views
    }
}

/// The photo at `size` as `fit` says; `fill` is the colour of the padding.
pub fn fit_to(img: &RgbImage, size: ImgSize, fit: Fit, fill: [u8; 3]) -> RgbImage {
    match fit {
        Fit::Squash => resize(img, size.width, size.height),
        Fit::Pad => letterbox(img, size, fill),
    }
}

/// `img` scaled (bilinear) to fit inside `size` with its aspect kept, centred on `fill`.
pub fn letterbox(img: &RgbImage, size: ImgSize, fill: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let scale = (f64::from(size.width) / f64::from(w)).min(f64::from(size.height) / f64::from(h));
    let sw = ((f64::from(w) * scale).round() as u32).clamp(1, size.width);
    let sh = ((f64::from(h) * scale).round() as u32).clamp(1, size.height);
    let mut out = RgbImage::from_pixel(size.width, size.height, image::Rgb(fill));
    if img.width() == 0 || img.height() == 0 {
        return out;
    }
    let scaled = resize(img, sw, sh);
    image::imageops::replace(
        &mut out,
        &scaled,
        i64::from((size.width - sw) / 2),
        i64::from((size.height - sh) / 2),
    );
    out
}

/// [`fit_to`] as a pipeline step.
#[derive(Clone, Debug, PartialEq)]
pub struct FitTo {
    pub size: ImgSize,
    pub fit: Fit,
    pub fill: [u8; 3],
}

impl Transform for FitTo {
    fn apply(&self, img: RgbImage, _rng: &mut dyn RngCore) -> RgbImage {
        if img.dimensions() == (self.size.width, self.size.height) {
            return img;
        }
        fit_to(&img, self.size, self.fit, self.fill)
    }
}

/// The mean colour of a normalisation (`mean` in 0..1 units) as 8-bit pixels: padding of this
/// colour normalises to zero.
pub fn mean_colour(mean: [f32; 3]) -> [u8; 3] {
    mean.map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8)
}

/// Weights of a linear resize, in 1/2048 (OpenCV's `INTER_RESIZE_COEF_BITS` = 11).
const RESIZE_BITS: u32 = 11;

/// Source taps of a linear resize along one axis: pixel centres aligned
/// (`src = (dst + 0.5)·scale − 0.5`), edges replicated, as `cv2.resize` with `INTER_LINEAR`.
/// Each tap is (first index, second index, weight of the second in 1/2048).
pub(crate) fn linear_taps(src_len: u32, dst_len: u32, offset: u32) -> Vec<(usize, usize, u32)> {
    let scale = f64::from(src_len) / f64::from(dst_len);
    let last = i64::from(src_len) - 1;
    (0..dst_len)
        .map(|d| {
            let f = (f64::from(d) + 0.5) * scale - 0.5;
            let f0 = f.floor();
            let i0 = f0 as i64;
            let a = i0.clamp(0, last) as usize + offset as usize;
            let b = (i0 + 1).clamp(0, last) as usize + offset as usize;
            let weight = ((f - f0) * f64::from(1u32 << RESIZE_BITS)).round() as u32;
            (a, b, weight)
        })
        .collect()
}

/// `window` clipped to a `width × height` image: (x, y, w, h).
pub(crate) fn clip_window(window: CropWindow, width: u32, height: u32) -> (u32, u32, u32, u32) {
    let x = window.x.min(width);
    let y = window.y.min(height);
    (
        x,
        y,
        window.width.min(width - x),
        window.height.min(height - y),
    )
}

/// Crop `window` out of `img` and resize it bilinearly to `width × height` in one pass
/// (`cv2.resize(img[y:y+h, x:x+w], (width, height), INTER_LINEAR)`). The window is clipped to
/// the image; an empty window gives a black image.
pub fn resize_window(img: &RgbImage, window: CropWindow, width: u32, height: u32) -> RgbImage {
    let mut out = RgbImage::new(width, height);
    let (x0, y0, ww, wh) = clip_window(window, img.width(), img.height());
    if ww == 0 || wh == 0 || width == 0 || height == 0 {
        return out;
    }
    let xs = linear_taps(ww, width, x0);
    let ys = linear_taps(wh, height, y0);
    resize_taps(img.as_raw(), img.width() as usize * 3, &xs, &ys, &mut out);
    out
}

/// The bilinear resize proper: output row `j` blends source rows `ys[j]`, output column `i`
/// blends source columns `xs[i]` of `src` (rows `stride` bytes apart).
pub(crate) fn resize_taps(
    src: &[u8],
    stride: usize,
    xs: &[(usize, usize, u32)],
    ys: &[(usize, usize, u32)],
    out: &mut RgbImage,
) {
    let one = 1u32 << RESIZE_BITS;
    let out_stride = out.width() as usize * 3;
    for (row, &(r0, r1, fy)) in out.chunks_exact_mut(out_stride).zip(ys) {
        let top = &src[r0 * stride..(r0 + 1) * stride];
        let bottom = &src[r1 * stride..(r1 + 1) * stride];
        for (px, &(c0, c1, fx)) in row.chunks_exact_mut(3).zip(xs) {
            let (t0, t1) = (&top[c0 * 3..c0 * 3 + 3], &top[c1 * 3..c1 * 3 + 3]);
            let (b0, b1) = (&bottom[c0 * 3..c0 * 3 + 3], &bottom[c1 * 3..c1 * 3 + 3]);
            for c in 0..3 {
                let t = u32::from(t0[c]) * (one - fx) + u32::from(t1[c]) * fx;
                let b = u32::from(b0[c]) * (one - fx) + u32::from(b1[c]) * fx;
                px[c] = ((t * (one - fy) + b * fy + (1 << (2 * RESIZE_BITS - 1)))
                    >> (2 * RESIZE_BITS)) as u8;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Normalisation and the pipeline

/// `(v/255 − mean) / std` per channel, written channel-major (CHW) as `f32`
/// (albumentations `Normalize(max_pixel_value=255)` then `ToTensorV2`).
#[derive(Clone)]
pub struct Normalize {
    lut: [[f32; 256]; 3],
    mean: [f32; 3],
    std: [f32; 3],
}

impl fmt::Debug for Normalize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Normalize")
            .field("mean", &self.mean)
            .field("std", &self.std)
            .finish()
    }
}

impl Normalize {
    /// `mean` and `std` in 0..1 units; every std must be positive.
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Result<Self> {
        ensure!(
            mean.iter().all(|m| m.is_finite()) && std.iter().all(|s| s.is_finite() && *s > 0.0),
            "augment: normalisation needs finite means and positive stds, got {mean:?} / {std:?}"
        );
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            let m = mean[c] * 255.0;
            let inv = 1.0 / (std[c] * 255.0);
            for (v, entry) in table.iter_mut().enumerate() {
                *entry = (v as f32 - m) * inv;
            }
        }
        Ok(Normalize { lut, mean, std })
    }

    /// Write `img` as normalised CHW into `out` (length `3·w·h`).
    pub fn write_chw(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = img.width() as usize * img.height() as usize;
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in img.chunks_exact(3).enumerate() {
            r[i] = self.lut[0][usize::from(px[0])];
            g[i] = self.lut[1][usize::from(px[1])];
            b[i] = self.lut[2][usize::from(px[2])];
        }
    }
}

#[derive(Debug)]
struct Step {
    p: f64,
    transform: Box<dyn Transform>,
}

/// Transforms, each run with its probability, then a resize to `size` if the image is not
/// already that size, then [`Normalize`].
#[derive(Debug)]
pub struct Pipeline {
    steps: Vec<Step>,
    size: (u32, u32),
    normalize: Normalize,
}

impl Pipeline {
    /// A pipeline without steps: resize to `size` = (width, height) and normalise.
    pub fn new(size: (u32, u32), mean: [f32; 3], std: [f32; 3]) -> Result<Self> {
        ensure!(
            size.0 > 0 && size.1 > 0,
            "augment: the model's input size must be positive, got {size:?}"
        );
        Ok(Pipeline {
            steps: Vec::new(),
            size,
            normalize: Normalize::new(mean, std)?,
        })
    }

    /// Append `transform`, run with probability `p`.
    pub fn push(&mut self, p: f64, transform: impl Transform + 'static) -> Result<&mut Self> {
        ensure!(
            (0.0..=1.0).contains(&p),
            "transforms: a step probability must lie in [0, 1], got {p}"
        );
        self.steps.push(Step {
            p,
            transform: Box::new(transform),
        });
        Ok(self)
    }

    /// Validation: the photo fitted to `size` (bilinear) and normalised.
    pub fn eval(size: ImgSize, fit: Fit, mean: [f32; 3], std: [f32; 3]) -> Result<Self> {
        let mut p = Pipeline::new((size.width, size.height), mean, std)?;
        let fill = mean_colour(mean);
        p.push(1.0, FitTo { size, fit, fill })?;
        Ok(p)
    }

    /// Output (width, height).
    pub fn size(&self) -> (u32, u32) {
        self.size
    }

    /// Length of one output, `3·w·h`.
    pub fn output_len(&self) -> usize {
        3 * self.size.0 as usize * self.size.1 as usize
    }

    /// The probability of every step, in order.
    pub fn probabilities(&self) -> Vec<f64> {
        self.steps.iter().map(|s| s.p).collect()
    }

    /// Run every step on `img` (one uniform draw per step decides whether it runs) and resize
    /// to the output size if needed: the augmented 8-bit image.
    pub fn augment(&self, img: &RgbImage, rng: &mut dyn RngCore) -> RgbImage {
        match self.augment_steps(img, rng) {
            Some(out) if out.dimensions() == self.size => out,
            Some(out) => resize(&out, self.size.0, self.size.1),
            None if img.dimensions() == self.size => img.clone(),
            None => resize(img, self.size.0, self.size.1),
        }
    }

    /// `None` when no step ran.
    fn augment_steps(&self, img: &RgbImage, rng: &mut dyn RngCore) -> Option<RgbImage> {
        let mut current: Option<RgbImage> = None;
        for step in &self.steps {
            if rng.gen::<f64>() < step.p {
                let input = current.take().unwrap_or_else(|| img.clone());
                current = Some(step.transform.apply(input, rng));
            }
        }
        current
    }

    /// Augment and normalise `img`: CHW `f32`, length [`Pipeline::output_len`].
    pub fn run(&self, img: &RgbImage, rng: &mut dyn RngCore) -> Vec<f32> {
        let mut out = vec![0f32; self.output_len()];
        self.run_into(img, rng, &mut out);
        out
    }

    /// [`Pipeline::run`] into `out` (length [`Pipeline::output_len`]).
    pub fn run_into(&self, img: &RgbImage, rng: &mut dyn RngCore, out: &mut [f32]) {
        match self.augment_steps(img, rng) {
            Some(done) if done.dimensions() == self.size => self.normalize.write_chw(&done, out),
            Some(done) => self
                .normalize
                .write_chw(&resize(&done, self.size.0, self.size.1), out),
            None if img.dimensions() == self.size => self.normalize.write_chw(img, out),
            None => self
                .normalize
                .write_chw(&resize(img, self.size.0, self.size.1), out),
        }
    }
}

/// The random stream of item `index` of a batch drawn with `seed`: ChaCha8 seeded from `seed`,
/// stream `index`.
pub fn item_rng(seed: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    rng
}

/// Run `pipeline` on every image in parallel (rayon): `N·3·h·w` values, item `i` at
/// `i·output_len`, drawn from [`item_rng`]`(seed, i)`, whatever the number of threads.
pub fn batch(pipeline: &Pipeline, images: &[&RgbImage], seed: u64) -> Vec<f32> {
    let len = pipeline.output_len();
    let mut out = vec![0f32; len * images.len()];
    out.par_chunks_mut(len)
        .zip(images.par_iter())
        .enumerate()
        .for_each(|(i, (chunk, img))| {
            pipeline.run_into(img, &mut item_rng(seed, i as u64), chunk);
        });
    out
}

/// Like [`batch`], but item `i` is first loaded (decoded) by `load(i)`, in the same parallel
/// pass. The first error (by index) is returned.
pub fn batch_with<F>(pipeline: &Pipeline, count: usize, seed: u64, load: F) -> Result<Vec<f32>>
where
    F: Fn(usize) -> Result<RgbImage> + Sync,
{
    let mut views = batch_views(std::slice::from_ref(pipeline), count, seed, load)?;
    Ok(views.pop().unwrap_or_default())
}

/// [`batch_with`] for several pipelines at once: one batch per pipeline, each photo loaded once
/// and run through every pipeline before the next is loaded (so one decoded photo per thread is
/// held, whatever the number of pipelines). Pipeline `k`'s batch equals
/// `batch_with(&pipelines[k], count, seed, load)`.
pub fn batch_views<F>(
    pipelines: &[Pipeline],
    count: usize,
    seed: u64,
    load: F,
) -> Result<Vec<Vec<f32>>>
where
    F: Fn(usize) -> Result<RgbImage> + Sync,
{
    let mut views: Vec<Vec<f32>> = pipelines
        .iter()
        .map(|p| vec![0f32; p.output_len() * count])
        .collect();
    // Item i's slot in every view, so that one task fills all of them from one decoded photo.
    let mut slots: Vec<Vec<&mut [f32]>> = (0..count).map(|_| Vec::new()).collect();
    for (view, pipeline) in views.iter_mut().zip(pipelines) {
        for (item, slot) in slots.iter_mut().zip(view.chunks_mut(pipeline.output_len())) {
            item.push(slot);
        }
    }
    let results: Vec<Result<()>> = slots
        .into_par_iter()
        .enumerate()
        .map(|(i, item)| {
            let img = load(i)?;
            for (pipeline, out) in pipelines.iter().zip(item) {
                pipeline.run_into(&img, &mut item_rng(seed, i as u64), out);
            }
            Ok(())
        })
        .collect();
    results.into_iter().collect::<Result<()>>()?;
    Ok(views)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];

    #[test]
    fn batch_views_load_each_photo_once_for_all_pipelines() {
        let photos: Vec<RgbImage> = (0..5u32)
            .map(|k| {
                RgbImage::from_fn(30 + k, 20, |x, y| {
                    Rgb([(x * 7 + k) as u8, (y * 11) as u8, (x + y) as u8])
                })
            })
            .collect();
        let std = [0.229, 0.224, 0.225];
        let pipelines = [
            Pipeline::eval(ImgSize::square(16), Fit::Squash, MEAN, std).expect("size"),
            Pipeline::eval(
                ImgSize {
                    width: 24,
                    height: 8,
                },
                Fit::Pad,
                MEAN,
                std,
            )
            .expect("size"),
        ];
        let loads = std::sync::atomic::AtomicUsize::new(0);
        let views = batch_views(&pipelines, photos.len(), 3, |i| {
            loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(photos[i].clone())
        })
        .expect("photos");
        assert_eq!(loads.into_inner(), photos.len());
        assert_eq!(views.len(), 2);
        let refs: Vec<&RgbImage> = photos.iter().collect();
        for (view, pipeline) in views.iter().zip(&pipelines) {
            assert_eq!(view, &batch(pipeline, &refs, 3));
        }
        let failed = batch_views(&pipelines, 3, 0, |i| {
            ensure!(i != 2, "cannot decode photo {i}");
            Ok(photos[i].clone())
        });
        assert!(failed.is_err_and(|e| e.to_string() == "cannot decode photo 2"));
    }

    #[test]
    fn resize_matches_opencv_linear() {
        let img = RgbImage::from_fn(40, 30, |x, y| Rgb([(x * 6) as u8, (y * 8) as u8, 7]));
        assert_eq!(resize(&img, 40, 30), img, "same size is the identity");
        // Halving: every output pixel averages a 2×2 block (taps at 2d + 0.5).
        let img = RgbImage::from_fn(4, 2, |x, _| Rgb([(x * 40) as u8, 0, 0]));
        let out = resize(&img, 2, 1);
        assert_eq!(out.get_pixel(0, 0)[0], 20);
        assert_eq!(out.get_pixel(1, 0)[0], 100);
        // Upscaling replicates the edges: 2 → 4 gives taps −0.25, 0.25, 0.75, 1.25.
        let img = RgbImage::from_fn(2, 1, |x, _| Rgb([(x * 100) as u8, 0, 0]));
        let out = resize(&img, 4, 1);
        let row: Vec<u8> = out.pixels().map(|p| p[0]).collect();
        assert_eq!(row, vec![0, 25, 75, 100]);
        // A window resizes only what it covers.
        let img = RgbImage::from_fn(10, 10, |x, _| Rgb([if x >= 5 { 200 } else { 0 }, 0, 0]));
        let win = CropWindow {
            x: 5,
            y: 0,
            width: 5,
            height: 10,
        };
        assert!(resize_window(&img, win, 3, 3).pixels().all(|p| p[0] == 200));
    }

    #[test]
    fn image_sizes_parse_print_and_keep_old_configs() {
        let wide: ImgSize = "448x160".parse().unwrap();
        assert_eq!((wide.width, wide.height), (448, 160));
        assert_eq!("224".parse::<ImgSize>().unwrap(), ImgSize::square(224));
        assert_eq!(wide.to_string(), "448x160");
        assert_eq!(ImgSize::square(224).to_string(), "224");
        for bad in ["0", "x", "448x", "12x0", "5000", "axb"] {
            assert!(bad.parse::<ImgSize>().is_err(), "{bad}");
        }
        assert_eq!(serde_json::to_string(&ImgSize::square(96)).unwrap(), "96");
        assert_eq!(serde_json::to_string(&wide).unwrap(), "\"448x160\"");
        let back: ImgSize = serde_json::from_str("\"448x160\"").unwrap();
        assert_eq!(back, wide);
        assert_eq!(
            serde_json::from_str::<ImgSize>("96").unwrap(),
            ImgSize::square(96)
        );
    }

    #[test]
    fn flips_list_the_views_a_tta_averages() {
        assert_eq!(Flips::None.views(), vec![Vec::<i64>::new()]);
        assert_eq!(Flips::Horizontal.views(), vec![vec![], vec![3]]);
        assert_eq!(Flips::Vertical.views(), vec![vec![], vec![2]]);
        assert_eq!(
            Flips::Both.views(),
            vec![vec![], vec![3], vec![2], vec![2, 3]]
        );
        assert_eq!(
            Flips::default(),
            Flips::Horizontal,
            "older runs flipped left–right"
        );
    }

    #[test]
    fn letterbox_keeps_the_aspect_and_pads_with_the_fill() {
        // A 40×10 white photo into 20×20: scaled to 20×5, rows 7..12, the rest the fill.
        let img = RgbImage::from_pixel(40, 10, Rgb([255, 255, 255]));
        let out = letterbox(&img, ImgSize::square(20), [1, 2, 3]);
        assert_eq!(out.dimensions(), (20, 20));
        for (x, y, p) in out.enumerate_pixels() {
            let inside = (7..12).contains(&y);
            assert_eq!(p.0, if inside { [255; 3] } else { [1, 2, 3] }, "({x}, {y})");
        }
        // Tall into wide: 10×40 into 40×20 is scaled to 5×20, columns 17..22.
        let tall = RgbImage::from_pixel(10, 40, Rgb([9, 9, 9]));
        let out = letterbox(&tall, "40x20".parse().unwrap(), [0; 3]);
        let row: Vec<u8> = (0..40).map(|x| out.get_pixel(x, 10)[0]).collect();
        assert!(row[17..22].iter().all(|&v| v == 9) && row[..17].iter().all(|&v| v == 0));
        // Squash stretches instead; the eval pipeline fits as asked and pads with the mean,
        // which normalises to zero.
        assert_eq!(
            fit_to(&img, ImgSize::square(20), Fit::Squash, [0; 3]).dimensions(),
            (20, 20)
        );
        let pipe = Pipeline::eval(ImgSize::square(20), Fit::Pad, MEAN, [0.5; 3]).unwrap();
        let chw = pipe.run(&img, &mut rand::rngs::mock::StepRng::new(0, 1));
        let padded = chw[..20].iter().all(|v| v.abs() < 0.01);
        assert!(padded, "{:?}", &chw[..20]);
    }

    #[test]
    fn normalize_centres_the_mean_and_writes_chw() {
        let norm = Normalize::new([0.4, 0.2, 0.6], [0.2, 0.5, 0.25]).expect("valid");
        let img = RgbImage::from_fn(3, 2, |x, y| Rgb([(x * 10 + y) as u8, 51, 153 + x as u8]));
        let mut out = vec![f32::NAN; 18];
        norm.write_chw(&img, &mut out);
        for (x, y, p) in img.enumerate_pixels() {
            let i = (y * 3 + x) as usize;
            let r = (f32::from(p[0]) - 102.0) / 51.0;
            assert!((out[i] - r).abs() < 1e-6);
            assert_eq!(out[6 + i], 0.0, "0.2·255 = 51 maps to 0");
            assert!((out[12 + i] - x as f32 / 63.75).abs() < 1e-6);
        }
        let grey = RgbImage::from_pixel(1, 1, Rgb([102, 51, 153]));
        let mut out = vec![1.0; 3];
        norm.write_chw(&grey, &mut out);
        assert_eq!(out, vec![0.0, 0.0, 0.0]);
        assert!(Normalize::new(MEAN, [0.2, 0.0, 0.2]).is_err());
    }
}
