//! The community box files: `bbox` files (`[[x0 y0 x1 y1]]` with a `conf` such as `[0.8570]`,
//! both `[]` or empty when nothing was found) and `box` files (`x0 y0 x1 y1`, empty when nothing
//! was found). The format is told by the column present.

use super::Detection;
use crate::data::{CsvFile, DataError};
use crate::fsio;
use anyhow::Result;
use std::collections::HashMap;
use std::path::Path;

/// A box in pixel coordinates, x0 < x1, y0 < y1, inside the image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxPx {
    pub x0: f32,
    pub y0: f32,
    pub x1: f32,
    pub y1: f32,
}

/// Which community format a box file is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoxFormat {
    /// `image,bbox,conf` with `bbox` = `[[x0 y0 x1 y1]]` and `conf` = `[0.8570]`.
    Bbox,
    /// `image,box` with `box` = `x0 y0 x1 y1`.
    Box,
}

/// One row to write to a box file.
#[derive(Clone, Debug, PartialEq)]
pub struct BoxRow {
    pub image: String,
    pub bbox: Option<BoxPx>,
    /// Written in the `bbox` format only.
    pub conf: f32,
}

impl BoxRow {
    /// The row for what a finder (`--auto`, `--detector`) found in `image`: an empty box
    /// with confidence 0 where it found nothing.
    pub fn found(image: &str, detection: Option<Detection>) -> Self {
        Self {
            image: image.to_string(),
            bbox: detection.map(|d| d.bbox),
            conf: detection.map_or(0.0, |d| d.conf),
        }
    }
}

/// Read a box file in either community format: each image's box, `None` where the file says
/// nothing was found. Where a row lists several boxes, the most confident (else the first) is
/// taken. A malformed box, or an image listed twice, is an error naming the file and line.
pub fn read_boxes(path: &Path) -> Result<HashMap<String, Option<BoxPx>>, DataError> {
    let file = CsvFile::read(path)?;
    let image = file.column("image")?;
    let (format, col) = match file.find_column("bbox") {
        Some(col) => (BoxFormat::Bbox, col),
        None => (BoxFormat::Box, file.column("box")?),
    };
    let conf = file.find_column("conf");
    let mut out = HashMap::with_capacity(file.len());
    for row in file.rows() {
        let name = row.field(image)?;
        let text = row.optional(col);
        let parsed = match format {
            BoxFormat::Bbox => parse_bbox(text, conf.map_or("", |c| row.optional(c))),
            BoxFormat::Box => parse_box(text),
        }
        .map_err(|message| row.error(message))?;
        if out.insert(name.to_string(), parsed).is_some() {
            return Err(row.error(format!("image {name} is listed twice")));
        }
    }
    Ok(out)
}

/// Write `rows` as a box file in `format`, atomically.
pub fn write_boxes(path: &Path, format: BoxFormat, rows: &[BoxRow]) -> Result<()> {
    fsio::write_atomic(path, |w| {
        let mut csv = csv::Writer::from_writer(w);
        match format {
            BoxFormat::Bbox => csv.write_record(["image", "bbox", "conf"])?,
            BoxFormat::Box => csv.write_record(["image", "box"])?,
        }
        for row in rows {
            let coords = row
                .bbox
                .map(|b| format!("{} {} {} {}", b.x0, b.y0, b.x1, b.y1));
            match (format, coords) {
                (BoxFormat::Bbox, Some(c)) => csv.write_record([
                    row.image.as_str(),
                    &format!("[[{c}]]"),
                    &format!("[{:.4}]", row.conf),
                ])?,
                (BoxFormat::Bbox, None) => csv.write_record([row.image.as_str(), "[]", "[]"])?,
                (BoxFormat::Box, c) => {
                    csv.write_record([row.image.as_str(), c.as_deref().unwrap_or("")])?
                }
            }
        }
        csv.flush()?;
        Ok(())
    })
}

/// Four finite numbers separated by spaces (or commas).
fn parse_four(text: &str) -> Result<BoxPx, String> {
    let numbers = parse_numbers(text, |t| format!("'{t}' is not a number in box '{text}'"))?;
    match numbers[..] {
        [x0, y0, x1, y1] => Ok(BoxPx { x0, y0, x1, y1 }),
        _ => Err(format!(
            "box '{text}' has {} numbers, not 4 (x0 y0 x1 y1)",
            numbers.len()
        )),
    }
}

/// A `box` cell: `x0 y0 x1 y1`, or empty for no box.
fn parse_box(text: &str) -> Result<Option<BoxPx>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    parse_four(text).map(Some)
}

/// A `bbox` cell `[[x0 y0 x1 y1] [..]]` (or `[]`/empty for none) with its `conf` cell.
fn parse_bbox(text: &str, conf: &str) -> Result<Option<BoxPx>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let malformed = || format!("bbox '{text}' is not of the form [[x0 y0 x1 y1]]");
    let mut rest = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(malformed)?
        .trim();
    let mut boxes = Vec::new();
    while !rest.is_empty() {
        let (group, after) = rest
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .ok_or_else(malformed)?;
        boxes.push(parse_four(group)?);
        rest = after.trim_start_matches(|c: char| c.is_whitespace() || c == ',');
    }
    let confs = parse_conf(conf)?;
    if !confs.is_empty() && confs.len() != boxes.len() {
        return Err(format!(
            "{} boxes but {} confidences ('{conf}')",
            boxes.len(),
            confs.len()
        ));
    }
    // The first of the most confident boxes (the first box where there are no confidences).
    let best = confs
        .iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &c)| match best {
            Some((_, b)) if b >= c => best,
            _ => Some((i, c)),
        })
        .map_or(0, |(i, _)| i);
    Ok(boxes.get(best).copied())
}

/// A `conf` cell: `[0.85]`, `[0.85 0.2]`, `[]` or empty.
fn parse_conf(text: &str) -> Result<Vec<f32>, String> {
    let inner = text.trim_start_matches('[').trim_end_matches(']');
    parse_numbers(inner, |t| format!("confidence '{t}' is not a number"))
}

/// Finite numbers separated by spaces or commas; `bad(token)` words the error.
fn parse_numbers(text: &str, bad: impl Fn(&str) -> String) -> Result<Vec<f32>, String> {
    text.split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<f32>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| bad(t))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(x0: f32, y0: f32, x1: f32, y1: f32) -> BoxPx {
        BoxPx { x0, y0, x1, y1 }
    }

    #[test]
    fn bbox_cells_parse_with_the_most_confident_box() {
        assert_eq!(parse_bbox("", ""), Ok(None));
        assert_eq!(parse_bbox("[]", "[]"), Ok(None));
        assert_eq!(
            parse_bbox("[[0 95 804 647]]", "[0.8570]"),
            Ok(Some(b(0.0, 95.0, 804.0, 647.0)))
        );
        assert_eq!(
            parse_bbox("[[1 2 3 4] [5 6 7 8] [9 10 11 12]]", "[0.2 0.9 0.9]"),
            Ok(Some(b(5.0, 6.0, 7.0, 8.0)))
        );
        assert_eq!(
            parse_bbox("[[1 2 3 4] [5 6 7 8]]", ""),
            Ok(Some(b(1.0, 2.0, 3.0, 4.0)))
        );
        assert_eq!(
            parse_bbox("[[1.5, 2, 3, 4]]", "[1]"),
            Ok(Some(b(1.5, 2.0, 3.0, 4.0)))
        );
    }

    #[test]
    fn malformed_cells_are_errors() {
        for (bbox, conf) in [
            ("[[1 2 3]]", "[0.5]"),
            ("[[1 2 3 x]]", "[0.5]"),
            ("[[1 2 3 4]", "[0.5]"),
            ("1 2 3 4", ""),
            ("[[1 2 3 4] [5 6 7 8]]", "[0.5]"),
            ("[[1 2 3 4]]", "[high]"),
        ] {
            assert!(parse_bbox(bbox, conf).is_err(), "{bbox} {conf}");
        }
        assert!(parse_box("1 2 3").is_err());
        assert!(parse_box("1 2 3 inf").is_err());
        assert_eq!(parse_box("1 2 3 4"), Ok(Some(b(1.0, 2.0, 3.0, 4.0))));
    }
}
