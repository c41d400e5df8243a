//! Crops of the animal from each photo: boxes from the community CSVs ([`boxes`]), from the
//! built-in saliency crop ([`saliency`]) or from a YOLO detector in ONNX ([`detector`]),
//! expanded by a margin, clipped to the photo, and the whole photo where there is no usable box.

pub mod boxes;
pub mod detector;
pub mod saliency;
pub mod sets;

use crate::data::image::{list_photos, load_rgb};
use crate::fsio;
use anyhow::{bail, Context, Result};
use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;
use rayon::prelude::*;
use std::fmt;
use std::path::{Path, PathBuf};

pub use boxes::{read_boxes, write_boxes, BoxFormat, BoxPx, BoxRow};
pub use detector::{Detector, DetectorConfig, Layout};
pub use saliency::{auto_box, Detection};
pub use sets::{CropSet, LoadedCropSet};

/// JPEG quality of the written crops.
pub const JPEG_QUALITY: u8 = 95;

/// Why a photo was kept whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// The box file (or the saliency crop) found nothing in the photo.
    NoBox,
    /// The box is not finite, empty, inverted, or wholly outside the photo.
    InvalidBox,
}

/// What [`crop`] did with a box.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropOutcome {
    /// The expanded box lies inside the photo.
    Inside,
    /// The expanded box reached past the photo's edge and was cut at it.
    Clipped,
    /// The whole photo was kept.
    Fallback(Fallback),
}

/// A rectangle of whole pixels inside an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The pixels [`crop`] takes from a `width`×`height` photo: `bbox` grown by `margin` of its
/// width (height) on the left and right (top and bottom), rounded outwards to whole pixels and
/// clipped to the photo; the whole photo where there is no box or it is unusable.
pub fn crop_rect(
    width: u32,
    height: u32,
    bbox: Option<&BoxPx>,
    margin: f32,
) -> (Rect, CropOutcome) {
    let whole = Rect {
        x: 0,
        y: 0,
        width,
        height,
    };
    let Some(b) = bbox else {
        return (whole, CropOutcome::Fallback(Fallback::NoBox));
    };
    let invalid = (whole, CropOutcome::Fallback(Fallback::InvalidBox));
    let coords = [b.x0, b.y0, b.x1, b.y1].map(f64::from);
    let [x0, y0, x1, y1] = coords;
    let (w, h) = (f64::from(width), f64::from(height));
    if coords.iter().any(|c| !c.is_finite()) || x1 <= x0 || y1 <= y0 {
        return invalid;
    }
    if x1 <= 0.0 || y1 <= 0.0 || x0 >= w || y0 >= h {
        return invalid;
    }
    let m = f64::from(margin).max(0.0);
    let (mx, my) = (m * (x1 - x0), m * (y1 - y0));
    // Outwards to whole pixels, forgiving the rounding error of `margin` (0.1 is not exact).
    let floor = |v: f64| (v + 1e-4).floor();
    let ceil = |v: f64| (v - 1e-4).ceil();
    let (ex0, ey0, ex1, ey1) = (floor(x0 - mx), floor(y0 - my), ceil(x1 + mx), ceil(y1 + my));
    let (cx0, cy0, cx1, cy1) = (ex0.max(0.0), ey0.max(0.0), ex1.min(w), ey1.min(h));
    if cx1 <= cx0 || cy1 <= cy0 {
        return invalid;
    }
    let clipped = ex0 < 0.0 || ey0 < 0.0 || ex1 > w || ey1 > h;
    let rect = Rect {
        x: cx0 as u32,
        y: cy0 as u32,
        width: (cx1 - cx0) as u32,
        height: (cy1 - cy0) as u32,
    };
    let outcome = if clipped {
        CropOutcome::Clipped
    } else {
        CropOutcome::Inside
    };
    (rect, outcome)
}

/// Crop `img` to `bbox` grown by `margin` (see [`crop_rect`]); never panics.
pub fn crop(img: &RgbImage, bbox: Option<&BoxPx>, margin: f32) -> (RgbImage, CropOutcome) {
    let (r, outcome) = crop_rect(img.width(), img.height(), bbox, margin);
    let out = image::imageops::crop_imm(img, r.x, r.y, r.width, r.height).to_image();
    (out, outcome)
}

/// Intersection over union of two boxes (0 where both are empty).
pub fn iou(a: &BoxPx, b: &BoxPx) -> f32 {
    let area = |b: &BoxPx| (b.x1 - b.x0).max(0.0) * (b.y1 - b.y0).max(0.0);
    let iw = (a.x1.min(b.x1) - a.x0.max(b.x0)).max(0.0);
    let ih = (a.y1.min(b.y1) - a.y0.max(b.y0)).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// `finprint crop`: crop every photo of a folder to its box.
#[derive(clap::Args, Clone, Debug)]
#[command(group(clap::ArgGroup::new("finder").args(["auto", "detector"])))]
pub struct CropArgs {
    /// Box file in a community format: `image,bbox,conf` (`[[x0 y0 x1 y1]]`) or `image,box`
    /// (`x0 y0 x1 y1`).
    #[arg(long, required_unless_present = "finder", conflicts_with = "finder")]
    pub boxes: Option<PathBuf>,
    /// Find the boxes with the built-in saliency crop instead of reading a box file.
    #[arg(long)]
    pub auto: bool,
    #[command(flatten)]
    pub detector: DetectorArgs,
    /// Folder of photos (.jpg, .jpeg, .png).
    #[arg(long)]
    pub images: PathBuf,
    /// Folder for the crops: JPEGs named as the photos (a .png becomes .jpg).
    #[arg(long)]
    pub out: PathBuf,
    /// Share of the box's width (height) added on each side.
    #[arg(long, default_value_t = 0.1)]
    pub margin: f32,
    /// With --auto or --detector: write the boxes found, in the community `bbox` format.
    #[arg(long, requires = "finder")]
    pub write_boxes: Option<PathBuf>,
    /// A box file of the true boxes (e.g. a synthetic catalogue's `fin_boxes.csv`): report the
    /// mean IoU of the boxes used against it, a photo without a box counting as the whole photo.
    #[arg(long)]
    pub truth: Option<PathBuf>,
}

/// The `--detector` flags of `finprint crop`.
#[derive(clap::Args, Clone, Debug)]
pub struct DetectorArgs {
    /// Find the boxes with a YOLO detector exported to ONNX (v5 or v8 output layout); each
    /// photo is cropped to its most confident detection.
    #[arg(long, conflicts_with = "auto")]
    pub detector: Option<PathBuf>,
    /// With --detector: least confidence of a detection.
    #[arg(long, default_value_t = 0.25, requires = "detector")]
    pub conf: f32,
    /// With --detector: IoU above which NMS drops the less confident of two boxes of a class.
    #[arg(long, default_value_t = 0.45, requires = "detector")]
    pub iou: f32,
    /// With --detector: input size [default: the model's own where fixed, else 640].
    #[arg(long, requires = "detector")]
    pub img_size: Option<u32>,
    /// With --detector: the output layout, v5 `[1,N,5+C]` or v8 `[1,4+C,N]`.
    #[arg(long, value_enum, default_value_t = Layout::Auto, requires = "detector")]
    pub layout: Layout,
}

/// No detector, and the command line's defaults.
impl Default for DetectorArgs {
    fn default() -> Self {
        let c = DetectorConfig::default();
        Self {
            detector: None,
            conf: c.conf,
            iou: c.iou,
            img_size: c.input_size,
            layout: c.layout,
        }
    }
}

/// What [`run`] did, photo by photo.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CropSummary {
    pub photos: usize,
    /// Cropped to a box (clipped ones included).
    pub cropped: usize,
    pub clipped: usize,
    pub no_box: usize,
    pub invalid_box: usize,
    /// Photos the box file does not list (kept whole).
    pub missing: usize,
    /// With `--truth`: the boxes used against the true boxes.
    pub iou: Option<IouReport>,
}

/// Mean IoU against the true boxes over the photos that have one, beside the whole photo's.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IouReport {
    /// Photos with a true box.
    pub photos: usize,
    /// The box found (the whole photo where none was used).
    pub found: f64,
    pub whole_photo: f64,
}

impl fmt::Display for CropSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} photos: {} cropped ({} clipped), {} fell back to the whole photo ({} no box, {} \
             invalid box), {} missing from the box file",
            self.photos,
            self.cropped,
            self.clipped,
            self.no_box + self.invalid_box,
            self.no_box,
            self.invalid_box,
            self.missing
        )?;
        if let Some(r) = &self.iou {
            write!(
                f,
                "\nmean IoU against the true boxes of {} photos: {:.3} (whole photo {:.3})",
                r.photos, r.found, r.whole_photo
            )?;
        }
        Ok(())
    }
}

/// The crop's file name: the photo's, with `.jpg` unless it already names a JPEG.
fn crop_name(photo: &str) -> PathBuf {
    let path = Path::new(photo);
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg") => {
            path.to_path_buf()
        }
        _ => path.with_extension("jpg"),
    }
}

/// Where a photo's box comes from.
enum Source {
    File(std::collections::HashMap<String, Option<BoxPx>>),
    Auto,
    Detector(Box<Detector>),
}

/// What [`run`] did with one photo.
struct PhotoDone {
    /// `None` where the box file does not list the photo.
    outcome: Option<CropOutcome>,
    /// The box found by `--auto` or `--detector`.
    detection: Option<Detection>,
    /// With `--truth`: the IoU of the box used, and of the whole photo, with the true box.
    ious: Option<(f32, f32)>,
}

/// Crop every photo of `args.images` into `args.out`, in parallel, and say what was done.
pub fn run(args: &CropArgs) -> Result<CropSummary> {
    if !args.margin.is_finite() || args.margin < 0.0 {
        bail!(
            "--margin must be a number of at least 0, not {}",
            args.margin
        );
    }
    let d = &args.detector;
    let source = match (&args.boxes, args.auto, &d.detector) {
        (Some(path), false, None) => Source::File(read_boxes(path)?),
        (None, true, None) => Source::Auto,
        (None, false, Some(model)) => Source::Detector(Box::new(Detector::load(
            model,
            DetectorConfig {
                input_size: d.img_size,
                conf: d.conf,
                iou: d.iou,
                layout: d.layout,
                class_filter: None,
            },
        )?)),
        _ => bail!("give one of --boxes FILE, --auto or --detector MODEL"),
    };
    let truth = args.truth.as_deref().map(read_boxes).transpose()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    if std::fs::canonicalize(&args.out).ok() == std::fs::canonicalize(&args.images).ok() {
        bail!("--out must not be the --images folder (the photos would be overwritten)");
    }
    let photos = list_photos(&args.images)?;
    let progress = crate::args::bar(photos.len() as u64, "cropping");
    let results = photos
        .par_iter()
        .map(|name| -> Result<PhotoDone> {
            let img = load_rgb(&args.images.join(name))?;
            let (bbox, detection, listed) = match &source {
                Source::File(map) => match map.get(name) {
                    Some(b) => (*b, None, true),
                    None => (None, None, false),
                },
                Source::Auto => {
                    let d = auto_box(&img);
                    (d.map(|d| d.bbox), d, true)
                }
                Source::Detector(detector) => {
                    let found = detector
                        .detect(&img)
                        .with_context(|| format!("detecting in {name}"))?;
                    let d = found.first().map(|d| Detection {
                        bbox: d.bbox,
                        conf: d.conf,
                    });
                    (d.map(|d| d.bbox), d, true)
                }
            };
            let (out, outcome) = crop(&img, bbox.as_ref(), args.margin);
            // The box the crop used (the whole photo where it fell back) against the truth.
            let used = match outcome {
                CropOutcome::Fallback(_) => None,
                _ => bbox,
            };
            let whole = BoxPx {
                x0: 0.0,
                y0: 0.0,
                x1: img.width() as f32,
                y1: img.height() as f32,
            };
            let true_box = truth.as_ref().and_then(|t| t.get(name).copied().flatten());
            let ious = true_box.map(|t| (iou(&used.unwrap_or(whole), &t), iou(&whole, &t)));
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
                .encode_image(&out)
                .with_context(|| format!("cannot encode the crop of {name}"))?;
            fsio::write_bytes_atomic(&args.out.join(crop_name(name)), &bytes)?;
            progress.inc(1);
            Ok(PhotoDone {
                outcome: listed.then_some(outcome),
                detection,
                ious,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    progress.finish_and_clear();

    let mut summary = CropSummary {
        photos: photos.len(),
        ..CropSummary::default()
    };
    for done in &results {
        match done.outcome {
            None => summary.missing += 1,
            Some(CropOutcome::Inside) => summary.cropped += 1,
            Some(CropOutcome::Clipped) => {
                summary.cropped += 1;
                summary.clipped += 1;
            }
            Some(CropOutcome::Fallback(Fallback::NoBox)) => summary.no_box += 1,
            Some(CropOutcome::Fallback(Fallback::InvalidBox)) => summary.invalid_box += 1,
        }
    }
    if truth.is_some() {
        let ious: Vec<(f32, f32)> = results.iter().filter_map(|r| r.ious).collect();
        let mean = |f: fn(&(f32, f32)) -> f32| {
            ious.iter().map(|p| f64::from(f(p))).sum::<f64>() / ious.len().max(1) as f64
        };
        summary.iou = Some(IouReport {
            photos: ious.len(),
            found: mean(|p| p.0),
            whole_photo: mean(|p| p.1),
        });
    }
    if let Some(path) = &args.write_boxes {
        let rows: Vec<BoxRow> = photos
            .iter()
            .zip(&results)
            .map(|(name, done)| BoxRow::found(name, done.detection))
            .collect();
        write_boxes(path, BoxFormat::Bbox, &rows)?;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x0: f32, y0: f32, x1: f32, y1: f32) -> BoxPx {
        BoxPx { x0, y0, x1, y1 }
    }

    #[test]
    fn margin_grows_the_box_and_the_edge_clips_it() {
        let (r, o) = crop_rect(100, 80, Some(&b(20.0, 20.0, 40.0, 30.0)), 0.1);
        assert_eq!(
            (r, o),
            (
                Rect {
                    x: 18,
                    y: 19,
                    width: 24,
                    height: 12
                },
                CropOutcome::Inside
            )
        );
        let (r, o) = crop_rect(100, 80, Some(&b(-5.0, 60.0, 50.0, 90.0)), 0.0);
        assert_eq!(
            (r, o),
            (
                Rect {
                    x: 0,
                    y: 60,
                    width: 50,
                    height: 20
                },
                CropOutcome::Clipped
            )
        );
    }

    #[test]
    fn unusable_boxes_fall_back_to_the_whole_photo() {
        let whole = Rect {
            x: 0,
            y: 0,
            width: 100,
            height: 80,
        };
        let invalid = CropOutcome::Fallback(Fallback::InvalidBox);
        for bad in [
            b(10.0, 10.0, 10.0, 20.0),
            b(30.0, 10.0, 20.0, 20.0),
            b(f32::NAN, 0.0, 5.0, 5.0),
            b(100.0, 0.0, 120.0, 20.0),
            b(-30.0, -30.0, -1.0, -1.0),
        ] {
            assert_eq!(
                crop_rect(100, 80, Some(&bad), 0.1),
                (whole, invalid),
                "{bad:?}"
            );
        }
        let no_box = CropOutcome::Fallback(Fallback::NoBox);
        assert_eq!(crop_rect(100, 80, None, 0.1), (whole, no_box));
    }
}
