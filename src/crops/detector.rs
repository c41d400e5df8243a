//! A YOLO-family detector exported to ONNX (YOLOv5's `export.py --include onnx`, ultralytics'
//! YOLOv8 `export(format="onnx")`, or `tools/train_fin_detector.py`), run by tract in pure Rust.
//!
//! As ultralytics does it: the photo is letterboxed (resized to fit a square keeping its
//! aspect, bilinear as `cv2.resize`, centred on grey 114), fed as RGB in 0..1 (NCHW), and the
//! first output decoded in either layout:
//! - v5 `[1, N, 5+C]`: `cx cy w h obj cls…`, a row's score is `obj·cls` of its best class;
//! - v8 `[1, 4+C, N]`: `cx cy w h cls…`, no objectness.
//!
//! Boxes above the confidence are kept by class-wise greedy NMS and mapped back to the photo.
//! The geometry, decoding and NMS are plain functions; [`Detector`] (tract) needs the
//! `detector` feature (on by default).

use super::{iou, BoxPx};
use crate::transforms::resize;
use anyhow::{bail, ensure, Result};
use image::{Rgb, RgbImage};
use std::path::Path;
#[cfg(feature = "detector")]
use {anyhow::Context, tract_onnx::prelude::*};

/// The grey of the letterbox's padding (ultralytics' `color=(114, 114, 114)`).
pub const PAD_GREY: u8 = 114;
/// Most detections kept per photo (ultralytics' `max_det`).
pub const MAX_DET: usize = 300;
/// Most candidates, the most confident, that enter NMS (ultralytics' `max_nms`).
pub const MAX_NMS: usize = 30_000;

/// How the detector's output is laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Told by the output's shape: the longer axis holds the candidates.
    #[default]
    Auto,
    /// `[1, N, 5+C]`: `cx cy w h obj cls…` (YOLOv5).
    V5,
    /// `[1, 4+C, N]`: `cx cy w h cls…` (YOLOv8 and later).
    V8,
}

/// How a [`Detector`] runs and what it keeps.
#[derive(Clone, Debug, PartialEq)]
pub struct DetectorConfig {
    /// Side of the square input; `None` takes the model's own where its input shape is fixed,
    /// else 640.
    pub input_size: Option<u32>,
    /// Least score kept (strictly above).
    pub conf: f32,
    /// NMS drops a box whose IoU with a more confident box of its class is above this.
    pub iou: f32,
    pub layout: Layout,
    /// Keep only these classes (`None`: all).
    pub class_filter: Option<Vec<usize>>,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            input_size: None,
            conf: 0.25,
            iou: 0.45,
            layout: Layout::Auto,
            class_filter: None,
        }
    }
}

/// One detection: a box in pixels, its score and class.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YoloBox {
    pub bbox: BoxPx,
    pub conf: f32,
    pub class: usize,
}

/// Where a `width`×`height` photo lies in its `size`×`size` letterbox: scaled by `scale` to
/// `new_width`×`new_height` and placed at (`left`, `top`), as ultralytics' `letterbox`
/// (`auto=False`, `scaleup=True`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Letterbox {
    pub width: u32,
    pub height: u32,
    pub size: u32,
    pub scale: f64,
    pub new_width: u32,
    pub new_height: u32,
    pub left: u32,
    pub top: u32,
}

impl Letterbox {
    /// The geometry of ultralytics: `r = min(S/h, S/w)`, the new size rounded, the padding
    /// split with `round(d − 0.1)` before and the rest after (Python rounds half to even).
    pub fn new(width: u32, height: u32, size: u32) -> Self {
        let (w, h, s) = (f64::from(width), f64::from(height), f64::from(size));
        let scale = (s / h).min(s / w);
        let fit = |v: f64| ((v * scale).round_ties_even() as u32).clamp(1, size);
        let (new_width, new_height) = (fit(w), fit(h));
        let before = |new: u32| ((f64::from(size - new) / 2.0 - 0.1).round_ties_even()) as u32;
        Self {
            width,
            height,
            size,
            scale,
            new_width,
            new_height,
            left: before(new_width),
            top: before(new_height),
        }
    }

    /// `b`, in letterbox pixels, in the photo's pixels, clipped to the photo.
    pub fn to_original(&self, b: &BoxPx) -> BoxPx {
        let back = |v: f32, pad: u32, limit: u32| {
            ((f64::from(v) - f64::from(pad)) / self.scale).clamp(0.0, f64::from(limit)) as f32
        };
        BoxPx {
            x0: back(b.x0, self.left, self.width),
            y0: back(b.y0, self.top, self.height),
            x1: back(b.x1, self.left, self.width),
            y1: back(b.y1, self.top, self.height),
        }
    }
}

/// `img` letterboxed to `size`×`size` (see [`Letterbox`]), with its geometry.
pub fn letterbox(img: &RgbImage, size: u32) -> (RgbImage, Letterbox) {
    let geometry = Letterbox::new(img.width(), img.height(), size);
    let resized = if (geometry.new_width, geometry.new_height) == img.dimensions() {
        img.clone()
    } else {
        resize(img, geometry.new_width, geometry.new_height)
    };
    let mut out = RgbImage::from_pixel(size, size, Rgb([PAD_GREY; 3]));
    image::imageops::replace(
        &mut out,
        &resized,
        i64::from(geometry.left),
        i64::from(geometry.top),
    );
    (out, geometry)
}

/// An RGB image as a `1×3×H×W` tensor of values in 0..1, channel-major.
pub fn to_nchw(img: &RgbImage) -> Vec<f32> {
    let plane = (img.width() * img.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        for (c, &v) in p.0.iter().enumerate() {
            out[c * plane + i] = f32::from(v) / 255.0;
        }
    }
    out
}

/// The layout (v5 or v8) of an output of shape `shape`, with its candidate and class counts.
pub fn resolve_layout(shape: &[usize], layout: Layout) -> Result<(Layout, usize, usize)> {
    let &[batch, a, b] = shape else {
        bail!(
            "the detector's output has shape {shape:?}, not [1, N, 5+C] (v5) or [1, 4+C, N] (v8)"
        );
    };
    ensure!(
        batch == 1,
        "the detector's output has shape {shape:?}: a batch of {batch}, not 1"
    );
    let layout = match layout {
        Layout::Auto if a > b => Layout::V5,
        Layout::Auto if a < b => Layout::V8,
        Layout::Auto => bail!(
            "the detector's output shape {shape:?} does not tell its layout: give --layout v5 \
             ([1, N, 5+C]) or v8 ([1, 4+C, N])"
        ),
        l => l,
    };
    match layout {
        Layout::V5 if b >= 6 => Ok((Layout::V5, a, b - 5)),
        Layout::V8 if a >= 5 => Ok((Layout::V8, b, a - 4)),
        _ => bail!(
            "the detector's output shape {shape:?} is not the {layout:?} layout ([1, N, 5+C] for \
             v5, [1, 4+C, N] for v8, at least one class)"
        ),
    }
}

/// The candidates of a raw output (`data` in `shape`, laid out as `layout`) whose score is
/// above `conf` and whose best class is in `classes`, in input pixels, in output order.
pub fn decode(
    shape: &[usize],
    data: &[f32],
    layout: Layout,
    conf: f32,
    classes: Option<&[usize]>,
) -> Result<Vec<YoloBox>> {
    let (layout, n, nc) = resolve_layout(shape, layout)?;
    ensure!(
        data.len() == shape.iter().product::<usize>(),
        "the detector's output holds {} values, not the {} of its shape {shape:?}",
        data.len(),
        shape.iter().product::<usize>()
    );
    // Value `k` of candidate `i`.
    let at = |i: usize, k: usize| match layout {
        Layout::V5 => data[i * (nc + 5) + k],
        _ => data[k * n + i],
    };
    let first_class = if layout == Layout::V5 { 5 } else { 4 };
    let mut out = Vec::new();
    for i in 0..n {
        let objectness = if layout == Layout::V5 { at(i, 4) } else { 1.0 };
        if objectness <= conf {
            continue;
        }
        // The first of the best classes, as `argmax`.
        let (class, score) = (0..nc)
            .map(|c| (c, objectness * at(i, first_class + c)))
            .fold(
                (0, f32::NEG_INFINITY),
                |best, x| if x.1 > best.1 { x } else { best },
            );
        if score <= conf || classes.is_some_and(|keep| !keep.contains(&class)) {
            continue;
        }
        let (cx, cy, w, h) = (at(i, 0), at(i, 1), at(i, 2), at(i, 3));
        out.push(YoloBox {
            bbox: BoxPx {
                x0: cx - w / 2.0,
                y0: cy - h / 2.0,
                x1: cx + w / 2.0,
                y1: cy + h / 2.0,
            },
            conf: score,
            class,
        });
    }
    Ok(out)
}

/// Class-wise greedy NMS: from the most confident down (ties in input order), a box is kept
/// unless its IoU with a kept box of its class is above `iou_threshold`. The kept boxes, most
/// confident first, at most [`MAX_DET`].
pub fn nms(mut boxes: Vec<YoloBox>, iou_threshold: f32) -> Vec<YoloBox> {
    boxes.sort_by(|a, b| b.conf.total_cmp(&a.conf));
    boxes.truncate(MAX_NMS);
    let mut kept: Vec<YoloBox> = Vec::new();
    for b in boxes {
        if kept.len() == MAX_DET {
            break;
        }
        let suppressed = kept
            .iter()
            .any(|k| k.class == b.class && iou(&k.bbox, &b.bbox) > iou_threshold);
        if !suppressed {
            kept.push(b);
        }
    }
    kept
}

/// A YOLO detector loaded from ONNX, optimised for one input size.
#[cfg(feature = "detector")]
pub struct Detector {
    model: TypedRunnableModel<TypedModel>,
    config: DetectorConfig,
    size: u32,
    /// The output's shape and resolved layout.
    output_shape: Vec<usize>,
    layout: Layout,
}

#[cfg(feature = "detector")]
impl Detector {
    /// Load `path` for `1×3×S×S` input; an unreadable model, one whose input is not an image,
    /// or whose output is in no known layout, is an error naming the file.
    pub fn load(path: &Path, config: DetectorConfig) -> Result<Self> {
        Self::build(path, config).with_context(|| format!("detector {}", path.display()))
    }

    fn build(path: &Path, config: DetectorConfig) -> Result<Self> {
        ensure!(
            config.conf.is_finite() && (0.0..1.0).contains(&config.conf),
            "the confidence threshold must lie in [0, 1), not {}",
            config.conf
        );
        ensure!(
            config.iou.is_finite() && (0.0..=1.0).contains(&config.iou),
            "the NMS IoU threshold must lie in [0, 1], not {}",
            config.iou
        );
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .context("cannot read the ONNX model")?;
        ensure!(
            model.inputs.len() == 1,
            "the model has {} inputs, not one image",
            model.inputs.len()
        );
        let declared = model.input_fact(0)?.shape.as_concrete_finite()?;
        let own = match declared.as_deref() {
            Some(&[1, 3, h, w]) if h == w => Some(h as u32),
            Some(s) => bail!("the model's input has shape {s:?}, not [1, 3, S, S]"),
            None => None,
        };
        let size = match (config.input_size, own) {
            (Some(s), Some(o)) if s != o => bail!(
                "the model takes {o}×{o} photos (its input is fixed), not an input size of {s}"
            ),
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => 640,
        };
        ensure!(size >= 1, "the input size must be at least 1");
        let s = size as usize;
        let model = model
            .with_input_fact(0, f32::fact([1, 3, s, s]).into())?
            .into_optimized()
            .context("cannot prepare the model for its input")?;
        let output_shape = model
            .output_fact(0)?
            .shape
            .as_concrete()
            .map(<[usize]>::to_vec)
            .context("the model's output shape is not fixed by its input shape")?;
        let (layout, _, _) = resolve_layout(&output_shape, config.layout)?;
        let model = model.into_runnable()?;
        Ok(Self {
            model,
            config,
            size,
            output_shape,
            layout,
        })
    }

    /// The side of the square input.
    pub fn input_size(&self) -> u32 {
        self.size
    }

    /// The output's layout (v5 or v8).
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The raw first output (its shape and values) for a `1×3×S×S` input.
    pub fn forward(&self, input: &[f32]) -> Result<(Vec<usize>, Vec<f32>)> {
        let s = self.size as usize;
        let tensor = Tensor::from_shape(&[1, 3, s, s], input)?;
        let outputs = self.model.run(tvec!(tensor.into()))?;
        let output = outputs[0].to_array_view::<f32>()?;
        Ok((output.shape().to_vec(), output.iter().copied().collect()))
    }

    /// The detections of an already letterboxed image, mapped back through `geometry`.
    pub fn detect_letterboxed(
        &self,
        input: &RgbImage,
        geometry: &Letterbox,
    ) -> Result<Vec<YoloBox>> {
        ensure!(
            input.dimensions() == (self.size, self.size),
            "the letterboxed image is {}×{}, not {s}×{s}",
            input.width(),
            input.height(),
            s = self.size
        );
        let (shape, data) = self.forward(&to_nchw(input))?;
        ensure!(
            shape == self.output_shape,
            "the model's output changed shape"
        );
        let candidates = decode(
            &shape,
            &data,
            self.layout,
            self.config.conf,
            self.config.class_filter.as_deref(),
        )?;
        Ok(nms(candidates, self.config.iou)
            .into_iter()
            .map(|d| YoloBox {
                bbox: geometry.to_original(&d.bbox),
                ..d
            })
            .collect())
    }

    /// The detections in `img`, in its pixels, most confident first.
    pub fn detect(&self, img: &RgbImage) -> Result<Vec<YoloBox>> {
        let (input, geometry) = letterbox(img, self.size);
        self.detect_letterboxed(&input, &geometry)
    }
}

/// Without the `detector` feature: a detector that cannot be loaded.
#[cfg(not(feature = "detector"))]
pub struct Detector(std::convert::Infallible);

#[cfg(not(feature = "detector"))]
impl Detector {
    /// Always an error: finprint was built without the `detector` feature.
    pub fn load(path: &Path, _config: DetectorConfig) -> Result<Self> {
        bail!(
            "cannot run the detector {}: finprint was built without the `detector` feature",
            path.display()
        )
    }

    /// Never called: no detector exists.
    pub fn detect(&self, _img: &RgbImage) -> Result<Vec<YoloBox>> {
        match self.0 {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x0: f32, y0: f32, x1: f32, y1: f32) -> BoxPx {
        BoxPx { x0, y0, x1, y1 }
    }

    fn det(bbox: BoxPx, conf: f32, class: usize) -> YoloBox {
        YoloBox { bbox, conf, class }
    }

    #[test]
    fn letterbox_geometry_and_its_inverse() {
        let g = Letterbox::new(640, 320, 320);
        assert_eq!(
            (g.scale, g.new_width, g.new_height, g.left, g.top),
            (0.5, 320, 160, 0, 80)
        );
        assert_eq!(
            g.to_original(&b(10.0, 90.0, 110.0, 190.0)),
            b(20.0, 20.0, 220.0, 220.0)
        );
        // Clipped to the photo.
        assert_eq!(
            g.to_original(&b(-4.0, 70.0, 330.0, 250.0)),
            b(0.0, 0.0, 640.0, 320.0)
        );
        // An odd padding puts the extra pixel after: 100×61 in 64 → 64×39, 12 above, 13 below.
        let g = Letterbox::new(100, 61, 64);
        assert_eq!((g.new_width, g.new_height, g.left, g.top), (64, 39, 0, 12));
        // Small photos are scaled up.
        let g = Letterbox::new(20, 40, 80);
        assert_eq!(
            (g.scale, g.new_width, g.new_height, g.left, g.top),
            (2.0, 40, 80, 20, 0)
        );
        assert_eq!(
            g.to_original(&b(30.0, 10.0, 50.0, 30.0)),
            b(5.0, 5.0, 15.0, 15.0)
        );
    }

    #[test]
    fn letterbox_pads_with_grey_and_keeps_the_pixels() {
        let img = RgbImage::from_fn(8, 4, |x, y| Rgb([x as u8, y as u8, 200]));
        let (out, g) = letterbox(&img, 8);
        assert_eq!((g.left, g.top, g.scale), (0, 2, 1.0));
        for (x, y, p) in out.enumerate_pixels() {
            let expected = if (2..6).contains(&y) {
                *img.get_pixel(x, y - 2)
            } else {
                Rgb([PAD_GREY; 3])
            };
            assert_eq!(*p, expected, "({x}, {y})");
        }
        let t = to_nchw(&out);
        assert_eq!(t.len(), 3 * 64);
        // Pixel (3, 2) is the photo's (3, 0): red 3, green 0, blue 200.
        let i = 2 * 8 + 3;
        assert_eq!(
            [t[i], t[64 + i], t[128 + i]],
            [3.0 / 255.0, 0.0, 200.0 / 255.0]
        );
        assert_eq!(t[0], 114.0 / 255.0);
    }

    #[test]
    fn layouts_are_told_by_shape() {
        assert_eq!(
            resolve_layout(&[1, 25200, 85], Layout::Auto).unwrap(),
            (Layout::V5, 25200, 80)
        );
        assert_eq!(
            resolve_layout(&[1, 84, 8400], Layout::Auto).unwrap(),
            (Layout::V8, 8400, 80)
        );
        assert_eq!(
            resolve_layout(&[1, 6, 6], Layout::V5).unwrap(),
            (Layout::V5, 6, 1)
        );
        let ambiguous = resolve_layout(&[1, 6, 6], Layout::Auto).unwrap_err();
        assert!(ambiguous.to_string().contains("--layout"), "{ambiguous}");
        for bad in [&[1, 100, 5][..], &[2, 100, 6], &[100, 6], &[1, 4, 100]] {
            assert!(resolve_layout(bad, Layout::Auto).is_err(), "{bad:?}");
        }
        assert!(resolve_layout(&[1, 4, 100], Layout::V8).is_err());
        assert!(resolve_layout(&[1, 100, 5], Layout::V5).is_err());
    }

    #[test]
    fn v5_rows_score_objectness_times_class() {
        // Three candidates, two classes: cx cy w h obj c0 c1 (too few rows for Auto to tell).
        let data = [
            10.0, 20.0, 4.0, 6.0, 0.9, 0.2, 0.5, // 0.45, class 1
            30.0, 30.0, 2.0, 2.0, 0.2, 1.0, 1.0, // objectness below the threshold
            50.0, 40.0, 10.0, 10.0, 0.5, 0.8, 0.4, // 0.40, class 0
        ];
        let found = decode(&[1, 3, 7], &data, Layout::V5, 0.3, None).unwrap();
        assert_eq!(
            found,
            vec![
                det(b(8.0, 17.0, 12.0, 23.0), 0.45, 1),
                det(b(45.0, 35.0, 55.0, 45.0), 0.4, 0)
            ]
        );
        let found = decode(&[1, 3, 7], &data, Layout::V5, 0.42, None).unwrap();
        assert_eq!(found.len(), 1);
        let found = decode(&[1, 3, 7], &data, Layout::V5, 0.3, Some(&[0])).unwrap();
        assert_eq!(found, vec![det(b(45.0, 35.0, 55.0, 45.0), 0.4, 0)]);
        assert!(decode(&[1, 3, 7], &data[1..], Layout::V5, 0.3, None).is_err());
    }

    #[test]
    fn v8_columns_have_no_objectness() {
        // Four candidates (columns), one class: rows cx, cy, w, h, c0.
        let data = [
            10.0, 20.0, 30.0, 40.0, // cx
            10.0, 20.0, 30.0, 40.0, // cy
            2.0, 4.0, 6.0, 8.0, // w
            2.0, 2.0, 2.0, 2.0, // h
            0.1, 0.9, 0.25, 0.6, // class 0
        ];
        let found = decode(&[1, 5, 4], &data, Layout::V8, 0.25, None).unwrap();
        assert_eq!(
            found,
            vec![
                det(b(18.0, 19.0, 22.0, 21.0), 0.9, 0),
                det(b(36.0, 39.0, 44.0, 41.0), 0.6, 0)
            ]
        );
    }

    #[test]
    fn nms_keeps_by_iou_threshold_and_class() {
        // IoU 60/100 = 0.6.
        let a = det(b(0.0, 0.0, 10.0, 10.0), 0.8, 0);
        let c = det(b(0.0, 0.0, 10.0, 6.0), 0.9, 0);
        let far = det(b(50.0, 50.0, 60.0, 60.0), 0.3, 0);
        assert!((iou(&a.bbox, &c.bbox) - 0.6).abs() < 1e-6);
        assert_eq!(nms(vec![a, c, far], 0.5), vec![c, far]);
        assert_eq!(nms(vec![a, c, far], 0.7), vec![c, a, far]);
        // Another class is not suppressed.
        let other = YoloBox { class: 1, ..a };
        assert_eq!(nms(vec![other, c], 0.5), vec![c, other]);
        // Suppression is by kept boxes only: the middle box is dropped, so the last survives.
        let row = |x: f32, conf: f32| det(b(x, 0.0, x + 10.0, 10.0), conf, 0);
        let kept = nms(vec![row(0.0, 0.9), row(4.0, 0.8), row(8.0, 0.7)], 0.3);
        assert_eq!(kept, vec![row(0.0, 0.9), row(8.0, 0.7)]);
        assert!(nms(Vec::new(), 0.5).is_empty());
    }
}
