//! Crop sets: one kind of crop for every photo (the whole body, the back fin, the whole photo),
//! from box files, so that training mixes kinds by share and prediction embeds each kind.
//!
//! A set is written `NAME=FILE[+FILE...][:SHARE]`, or `full[:SHARE]` for the whole photo:
//! `fullbody=train2.csv+test2.csv:0.6`. A photo a set's files have no usable box for is kept
//! whole, as `finprint crop` does.

use super::{auto_box, crop, read_boxes, write_boxes, BoxFormat, BoxPx, BoxRow};
use crate::data::image::{list_photos, load_rgb};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Margin added around every box of a crop set, as a share of the box's width and height.
pub const CROP_MARGIN: f32 = 0.1;

/// One kind of crop and its share of the training draws.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CropSet {
    pub name: String,
    /// Box files (either community format); none: the whole photo.
    pub boxes: Vec<PathBuf>,
    pub share: f64,
}

impl FromStr for CropSet {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Self> {
        let (body, share) = match spec.rsplit_once(':') {
            Some((body, share)) => {
                let share: f64 = share.trim().parse().with_context(|| {
                    format!("crop set {spec:?}: share {share:?} is not a number")
                })?;
                (body, share)
            }
            None => (spec, 1.0),
        };
        if !(share.is_finite() && share >= 0.0) {
            bail!("crop set {spec:?}: the share must be a number ≥ 0");
        }
        let (name, boxes) = match body.split_once('=') {
            Some((name, files)) => (
                name.trim(),
                files
                    .split('+')
                    .map(|f| PathBuf::from(f.trim()))
                    .collect::<Vec<_>>(),
            ),
            None => (body.trim(), Vec::new()),
        };
        if name.is_empty() {
            bail!("crop set {spec:?} has no name (NAME=FILE[:SHARE] or full[:SHARE])");
        }
        if boxes.is_empty() && name != "full" {
            bail!("crop set {spec:?} names no box file (NAME=FILE[:SHARE]; `full` for the whole photo)");
        }
        Ok(Self {
            name: name.to_string(),
            boxes,
            share,
        })
    }
}

/// A crop set with its boxes read.
pub struct LoadedCropSet {
    pub set: CropSet,
    boxes: HashMap<String, Option<BoxPx>>,
}

impl LoadedCropSet {
    /// Read the set's box files; an image listed in two of them is an error.
    pub fn load(set: &CropSet) -> Result<Self> {
        let mut boxes = HashMap::new();
        for path in &set.boxes {
            for (image, b) in read_boxes(path)? {
                if boxes.insert(image.clone(), b).is_some() {
                    bail!(
                        "crop set {}: image {image} is listed in more than one box file ({})",
                        set.name,
                        path.display()
                    );
                }
            }
        }
        Ok(Self {
            set: set.clone(),
            boxes,
        })
    }

    /// The crop of this set of the photo `image` (its file name); the whole photo where the
    /// set has no usable box for it.
    pub fn apply(&self, image: &str, img: &RgbImage) -> RgbImage {
        match self.boxes.get(image).copied().flatten() {
            Some(b) => crop(img, Some(&b), CROP_MARGIN).0,
            None => img.clone(),
        }
    }
}

/// Read every set; no set at all means the whole photo.
pub fn load_sets(sets: &[CropSet]) -> Result<Vec<LoadedCropSet>> {
    if sets.is_empty() {
        return Ok(vec![LoadedCropSet::load(&CropSet::from_str("full")?)?]);
    }
    if sets.iter().map(|s| s.share).sum::<f64>() <= 0.0 {
        bail!("the crop sets' shares add up to 0");
    }
    sets.iter().map(LoadedCropSet::load).collect()
}

/// Find every photo's box in the folders `dirs` with the built-in saliency crop and write them
/// to `out` in the community `bbox` format (a photo where nothing stands out gets an empty
/// box): a box file for a crop set that needs no detector. Returns the photos seen.
pub fn write_auto_boxes(dirs: &[PathBuf], out: &Path) -> Result<usize> {
    let mut rows = Vec::new();
    for dir in dirs {
        let names = list_photos(dir)?;
        let found: Vec<BoxRow> = names
            .par_iter()
            .map(|name| Ok(BoxRow::found(name, auto_box(&load_rgb(&dir.join(name))?))))
            .collect::<Result<_>>()?;
        rows.extend(found);
    }
    write_boxes(out, BoxFormat::Bbox, &rows)?;
    Ok(rows.len())
}

/// Draw a set index by `shares` (not all zero).
pub fn draw(shares: &[f64], rng: &mut impl Rng) -> usize {
    let total: f64 = shares.iter().sum();
    let mut x = rng.gen::<f64>() * total;
    for (i, &s) in shares.iter().enumerate() {
        if x < s {
            return i;
        }
        x -= s;
    }
    shares.iter().rposition(|&s| s > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn crop_sets_parse_from_their_written_form() {
        let s: CropSet = "fullbody=a.csv+b.csv:0.6".parse().unwrap();
        assert_eq!(s.name, "fullbody");
        assert_eq!(s.boxes, [PathBuf::from("a.csv"), PathBuf::from("b.csv")]);
        assert_eq!(s.share, 0.6);
        let s: CropSet = "full".parse().unwrap();
        assert!(s.boxes.is_empty());
        assert_eq!(s.share, 1.0);
        assert!("backfin".parse::<CropSet>().is_err());
        assert!("x=a.csv:lots".parse::<CropSet>().is_err());
        assert!("x=a.csv:-1".parse::<CropSet>().is_err());
        assert!("=a.csv".parse::<CropSet>().is_err());
    }

    #[test]
    fn draws_follow_the_shares() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let shares = [0.6, 0.0, 0.3, 0.1];
        let mut count = [0usize; 4];
        for _ in 0..20_000 {
            count[draw(&shares, &mut rng)] += 1;
        }
        assert_eq!(count[1], 0);
        for (c, s) in count.iter().zip(shares) {
            let got = *c as f64 / 20_000.0;
            assert!((got - s).abs() < 0.015, "{count:?}");
        }
    }

    #[test]
    fn a_set_crops_to_its_box_and_keeps_unboxed_photos_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boxes.csv");
        std::fs::write(&path, "image,box\na.jpg,10 20 30 60\nb.jpg,\n").unwrap();
        let set =
            LoadedCropSet::load(&format!("body={}", path.display()).parse().unwrap()).unwrap();
        let img = RgbImage::new(100, 80);
        // 20×40 box, 10% margin each side: 24×48 pixels.
        assert_eq!(set.apply("a.jpg", &img).dimensions(), (24, 48));
        assert_eq!(set.apply("b.jpg", &img).dimensions(), (100, 80));
        assert_eq!(set.apply("c.jpg", &img).dimensions(), (100, 80));
    }
}
