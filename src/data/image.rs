//! Loading photos as 8-bit RGB, whatever the camera wrote: JPEG (also CMYK) or PNG (also
//! 16-bit or with alpha), turned upright by its EXIF orientation. Every failure names the file.
//! Truncated and corrupt files are refused, not decoded with grey where the data is missing
//! (see [`super::jpeg`] for what is checked of a JPEG).

use super::DataError;
use anyhow::Context;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Photos larger than this on either side are refused rather than decoded.
pub const MAX_SIDE: u32 = 16_384;
/// Photos of more pixels than this are refused, from their header, before any pixel is
/// allocated (a decoded 40 MP photo takes 160 MB; see [`set_max_pixels`]).
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

static MAX_PIXELS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_PIXELS);

/// The largest photo, in pixels, that any decoding accepts from now on (service, commands and
/// training alike).
pub fn set_max_pixels(pixels: u64) {
    MAX_PIXELS.store(pixels.max(1), Ordering::Relaxed);
}

pub fn max_pixels() -> u64 {
    MAX_PIXELS.load(Ordering::Relaxed)
}

/// Load `path` as an upright 8-bit RGB image.
pub fn load_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_rgb(&bytes).map_err(|message| DataError::BadImage {
        path: path.to_path_buf(),
        message,
    })
}

/// Decode an image file held in memory as upright 8-bit RGB (at most [`max_pixels`]).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    decode_rgb_within(bytes, max_pixels())
}

/// [`decode_rgb`] refusing, from the header, photos of more than `limit` pixels.
pub fn decode_rgb_within(bytes: &[u8], limit: u64) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let Some(format) = reader.format() else {
        return Err("unknown image format (expected JPEG or PNG)".into());
    };
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| e.to_string())?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limit {
        return Err(format!(
            "{w}×{h} px ({:.1} MP) is over the limit of {:.1} MP",
            pixels as f64 / 1e6,
            limit as f64 / 1e6
        ));
    }
    if format == ImageFormat::Jpeg {
        super::jpeg::check_jpeg(bytes)?;
    }
    let orientation = decoder.orientation().map_err(|e| e.to_string())?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| match e {
        image::ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("truncated image ({e})")
        }
        e => e.to_string(),
    })?;
    image.apply_orientation(orientation);
    Ok(image.into_rgb8())
}

/// The photos (`.jpg`, `.jpeg`, `.png`) of a folder, sorted by name.
pub fn list_photos(dir: &Path) -> anyhow::Result<Vec<String>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
        if matches!(ext.as_str(), "jpg" | "jpeg" | "png") && e.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgb};

    fn png(color: image::ExtendedColorType, width: u32, height: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::png::PngEncoder::new(&mut out)
            .write_image(data, width, height, color)
            .unwrap();
        out
    }

    #[test]
    fn png_with_alpha_keeps_its_colour() {
        let bytes = png(image::ExtendedColorType::Rgba8, 1, 1, &[10, 20, 30, 0]);
        let img = decode_rgb(&bytes).unwrap();
        assert_eq!(*img.get_pixel(0, 0), Rgb([10, 20, 30]));
    }

    #[test]
    fn sixteen_bit_png_is_scaled_to_eight_bits() {
        let data: Vec<u8> = [65535u16, 32896, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let bytes = png(image::ExtendedColorType::Rgb16, 1, 1, &data);
        let img = decode_rgb(&bytes).unwrap();
        assert_eq!(*img.get_pixel(0, 0), Rgb([255, 128, 0]));
    }

    #[test]
    fn cmyk_jpeg_decodes_to_rgb() {
        // Pure cyan ink (C=255, M=Y=K=0) printed on white reads as RGB (0, 255, 255).
        let (w, h) = (16u16, 16u16);
        let cmyk: Vec<u8> = (0..w as usize * h as usize)
            .flat_map(|_| [255u8, 0, 0, 0])
            .collect();
        let mut bytes = Vec::new();
        jpeg_encoder::Encoder::new(&mut bytes, 95)
            .encode(&cmyk, w, h, jpeg_encoder::ColorType::Cmyk)
            .unwrap();
        let img = decode_rgb(&bytes).unwrap();
        let p = img.get_pixel(8, 8);
        assert!(p[0] < 20 && p[1] > 235 && p[2] > 235, "{p:?}");
    }

    fn small_jpeg() -> Vec<u8> {
        let rgb: Vec<u8> = (0..64 * 64 * 3).map(|i| (i % 251) as u8).collect();
        let mut bytes = Vec::new();
        jpeg_encoder::Encoder::new(&mut bytes, 90)
            .encode(&rgb, 64, 64, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        bytes
    }

    #[test]
    fn a_header_over_the_pixel_limit_is_refused_before_decoding() {
        // A 64×64 photo against a limit of 4000 pixels: refused from its header alone.
        let img = RgbImage::from_pixel(64, 64, image::Rgb([9, 9, 9]));
        let bytes = png(image::ExtendedColorType::Rgb8, 64, 64, img.as_raw());
        assert!(decode_rgb_within(&bytes, 4096).is_ok());
        let err = decode_rgb_within(&bytes, 4000).unwrap_err();
        assert!(err.contains("64×64") && err.contains("limit"), "{err}");
    }

    /// A 320×240 JPEG of smooth gradients and texture, as `jpeg_encoder` writes it with
    /// `setup`.
    fn photo_jpeg(setup: impl FnOnce(&mut jpeg_encoder::Encoder<&mut Vec<u8>>)) -> Vec<u8> {
        let (w, h) = (320u16, 240u16);
        let rgb: Vec<u8> = (0..u32::from(w) * u32::from(h))
            .flat_map(|i| {
                let (x, y) = (i % u32::from(w), i / u32::from(w));
                [(x / 2) as u8, (y + x * y % 7) as u8, ((x ^ y) % 200) as u8]
            })
            .collect();
        let mut bytes = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut bytes, 85);
        setup(&mut enc);
        enc.encode(&rgb, w, h, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        bytes
    }

    #[test]
    fn truncated_jpeg_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.jpg");
        let bytes = photo_jpeg(|_| {});
        let half = &bytes[..bytes.len() / 2];
        std::fs::write(&path, half).unwrap();
        let err = load_rgb(&path).unwrap_err().to_string();
        assert!(
            err.contains("cut.jpg") && err.contains("truncated"),
            "{err}"
        );
        // Half a file with an end-of-image marker after it: decoders fill the rest with grey.
        std::fs::write(&path, [half, &[0xFF, 0xD9]].concat()).unwrap();
        let err = load_rgb(&path).unwrap_err().to_string();
        assert!(
            err.contains("cut.jpg") && err.contains("truncated"),
            "{err}"
        );
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(load_rgb(&path).unwrap().dimensions(), (320, 240));
    }

    #[test]
    fn jpeg_corrupted_inside_its_image_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratched.jpg");
        let bytes = photo_jpeg(|_| {});
        let mid = bytes.len() / 2;
        for (at, fill) in [(mid, 0x55u8), (mid + 1000, 0x00), (bytes.len() - 900, 0xA7)] {
            let mut broken = bytes.clone();
            broken[at..at + 50].fill(fill);
            std::fs::write(&path, &broken).unwrap();
            let err = load_rgb(&path).unwrap_err().to_string();
            assert!(
                err.contains("scratched.jpg") && err.contains("corrupt"),
                "{err}"
            );
        }
    }

    #[test]
    fn every_kind_of_valid_jpeg_passes_the_check() {
        use jpeg_encoder::SamplingFactor as S;
        for sampling in [S::F_1_1, S::F_2_1, S::F_2_2, S::F_1_2] {
            for (progressive, restart) in [(false, 0), (false, 3), (true, 0), (true, 5)] {
                let bytes = photo_jpeg(|e| {
                    e.set_sampling_factor(sampling);
                    e.set_progressive(progressive);
                    if restart > 0 {
                        e.set_restart_interval(restart);
                    }
                });
                let img = decode_rgb(&bytes);
                assert!(img.is_ok(), "{sampling:?} {progressive} {restart}: {img:?}");
            }
        }
    }

    #[test]
    fn truncated_png_is_refused() {
        let img = RgbImage::from_fn(200, 150, |x, y| Rgb([x as u8, (x * y) as u8, y as u8]));
        let bytes = png(image::ExtendedColorType::Rgb8, 200, 150, img.as_raw());
        let half = &bytes[..bytes.len() / 2];
        let end = &bytes[bytes.len() - 12..];
        for cut in [half.to_vec(), [half, end].concat()] {
            let err = decode_rgb(&cut).unwrap_err();
            assert!(err.contains("truncated"), "{err}");
        }
    }

    #[test]
    fn corrupt_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noise.jpg");
        let mut bytes = small_jpeg();
        for b in &mut bytes[200..600] {
            *b = 0x55;
        }
        bytes[2..6].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        std::fs::write(&path, &bytes).unwrap();
        let err = load_rgb(&path).unwrap_err().to_string();
        assert!(err.contains("noise.jpg"), "{err}");

        let text = dir.path().join("notes.png");
        std::fs::write(&text, "not an image").unwrap();
        let err = load_rgb(&text).unwrap_err().to_string();
        assert!(
            err.contains("notes.png") && err.contains("unknown image format"),
            "{err}"
        );

        let err = load_rgb(&dir.path().join("absent.jpg"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absent.jpg"), "{err}");
    }

    #[test]
    fn exif_orientation_turns_the_photo_upright() {
        // A 2×1 JPEG tagged "rotate 90° clockwise" (orientation 6) must load as 1×2.
        let mut bytes = Vec::new();
        let mut enc = jpeg_encoder::Encoder::new(&mut bytes, 90);
        // Minimal big-endian EXIF block with one IFD0 entry: Orientation (0x0112) = 6.
        let exif: Vec<u8> = [
            b"Exif\0\0".as_slice(),
            b"MM\0\x2a\0\0\0\x08",
            &[
                0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0, 0, 0,
            ],
        ]
        .concat();
        enc.add_app_segment(1, &exif).unwrap();
        enc.encode(&[255, 0, 0, 0, 0, 255], 2, 1, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        assert_eq!(decode_rgb(&bytes).unwrap().dimensions(), (1, 2));
    }
}
