//! The YOLO detector against onnxruntime on the fixtures of `tools/make_yolo_fixtures.py`:
//! two tiny YOLO-like graphs (v5 and v8 output layouts) fed the same letterboxed image; the raw
//! outputs, the boxes after decoding and NMS, and the `crop --detector` command.
#![cfg(feature = "detector")]

mod common;

use finprint::crops::detector::{decode, letterbox, nms, to_nchw, Letterbox, YoloBox};
use finprint::crops::{iou, read_boxes, BoxPx, Detector, DetectorConfig, Layout};
use finprint::data::image::load_rgb;
use image::RgbImage;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct Reference {
    size: u32,
    iou: f32,
    photos: HashMap<String, Photo>,
    models: HashMap<String, Model>,
}

#[derive(Deserialize)]
struct Photo {
    width: u32,
    height: u32,
    scale: f64,
    left: u32,
    top: u32,
}

#[derive(Deserialize)]
struct Model {
    file: String,
    conf: f32,
    output_shape: Vec<usize>,
    output: Vec<f32>,
    /// Per photo size (and `letterbox`): rows of x0 y0 x1 y1 score class.
    detections: HashMap<String, Vec<[f32; 6]>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/yolo")
}

fn reference() -> Reference {
    let text = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(r: &Reference, m: &Model) -> Detector {
    let config = DetectorConfig {
        conf: m.conf,
        iou: r.iou,
        ..DetectorConfig::default()
    };
    Detector::load(&fixtures().join(&m.file), config).unwrap()
}

fn assert_same(found: &[YoloBox], expected: &[[f32; 6]], what: &str) {
    assert_eq!(found.len(), expected.len(), "{what}: {found:?}");
    for (i, (d, e)) in found.iter().zip(expected).enumerate() {
        let coords = [d.bbox.x0, d.bbox.y0, d.bbox.x1, d.bbox.y1];
        let worst = coords
            .iter()
            .zip(e)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{what} #{i}: {d:?} vs {e:?}");
        assert!((d.conf - e[4]).abs() < 1e-5, "{what} #{i}: {d:?} vs {e:?}");
        assert_eq!(d.class, e[5] as usize, "{what} #{i}");
    }
}

#[test]
fn raw_outputs_match_onnxruntime() {
    let r = reference();
    let input = to_nchw(&load_rgb(&fixtures().join("letterboxed.png")).unwrap());
    for (name, m) in &r.models {
        let detector = load(&r, m);
        assert_eq!(
            detector.input_size(),
            r.size,
            "{name}: the model's own size"
        );
        let expected_layout = if name == "v5" { Layout::V5 } else { Layout::V8 };
        assert_eq!(detector.layout(), expected_layout, "{name}");
        let (shape, out) = detector.forward(&input).unwrap();
        assert_eq!(shape, m.output_shape, "{name}");
        let worst = out
            .iter()
            .zip(&m.output)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{name}: largest difference from onnxruntime {worst:e}");
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}

#[test]
fn detections_match_the_reference_decode_and_nms() {
    let r = reference();
    let img = load_rgb(&fixtures().join("letterboxed.png")).unwrap();
    for (name, m) in &r.models {
        let detector = load(&r, m);
        // On onnxruntime's own output: candidates overlap, so NMS drops some, and keeps those
        // of the reference.
        let candidates = decode(&m.output_shape, &m.output, Layout::Auto, m.conf, None).unwrap();
        let kept = nms(candidates.clone(), r.iou);
        assert!(
            kept.len() >= 3 && candidates.len() >= kept.len() + 3,
            "{name}: {} candidates, {} kept",
            candidates.len(),
            kept.len()
        );
        assert_same(&kept, &m.detections["letterbox"], &format!("{name} decode"));
        for (size, p) in &r.photos {
            let geometry = Letterbox::new(p.width, p.height, r.size);
            assert_eq!(
                (geometry.scale, geometry.left, geometry.top),
                (p.scale, p.left, p.top),
                "{size}"
            );
            let found = detector.detect_letterboxed(&img, &geometry).unwrap();
            assert_same(&found, &m.detections[size], &format!("{name} {size}"));
        }
        // End to end: the 64×48 photo inside the letterbox is letterboxed back to it exactly.
        let photo = image::imageops::crop_imm(&img, 0, 8, 64, 48).to_image();
        assert_eq!(letterbox(&photo, r.size).0, img);
        let found = detector.detect(&photo).unwrap();
        assert_same(&found, &m.detections["64x48"], &format!("{name} detect"));
    }
}

#[test]
fn bad_models_and_sizes_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not an onnx model").unwrap();
    let err = format!(
        "{:#}",
        Detector::load(&junk, DetectorConfig::default())
            .err()
            .unwrap()
    );
    assert!(err.contains("junk.onnx"), "{err}");

    let v8 = fixtures().join("v8.onnx");
    let config = DetectorConfig {
        input_size: Some(128),
        ..DetectorConfig::default()
    };
    let err = format!("{:#}", Detector::load(&v8, config).err().unwrap());
    assert!(err.contains("v8.onnx") && err.contains("64×64"), "{err}");
    let config = DetectorConfig {
        conf: 1.5,
        ..DetectorConfig::default()
    };
    assert!(Detector::load(&v8, config).is_err());
}

#[test]
fn the_crop_command_crops_to_the_best_detection() {
    let r = reference();
    let m = &r.models["v8"];
    let expected = m.detections["64x48"][0];
    let best = BoxPx {
        x0: expected[0],
        y0: expected[1],
        x1: expected[2],
        y1: expected[3],
    };
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let img = load_rgb(&fixtures().join("letterboxed.png")).unwrap();
    let photo: RgbImage = image::imageops::crop_imm(&img, 0, 8, 64, 48).to_image();
    photo.save(images.join("fin.png")).unwrap();
    // The true box: the best detection shifted by 4 px, for a known IoU.
    let truth_box = BoxPx {
        x0: best.x0 + 4.0,
        x1: best.x1 + 4.0,
        ..best
    };
    let truth = dir.path().join("truth.csv");
    std::fs::write(
        &truth,
        format!(
            "image,box\nfin.png,{} {} {} {}\n",
            truth_box.x0, truth_box.y0, truth_box.x1, truth_box.y1
        ),
    )
    .unwrap();

    let crop = |conf: f32, out: &str| {
        let found = dir.path().join(format!("{out}.csv"));
        let run = common::finprint()
            .args(["crop", "--margin", "0", "--conf", &conf.to_string()])
            .arg("--detector")
            .arg(fixtures().join(&m.file))
            .arg("--images")
            .arg(&images)
            .arg("--out")
            .arg(dir.path().join(out))
            .arg("--write-boxes")
            .arg(&found)
            .arg("--truth")
            .arg(&truth)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let boxes = read_boxes(&found).unwrap();
        (String::from_utf8_lossy(&run.stdout).to_string(), boxes)
    };

    let (stdout, boxes) = crop(m.conf, "crops");
    let found = boxes["fin.png"].unwrap();
    for (a, b) in [
        (found.x0, best.x0),
        (found.y0, best.y0),
        (found.x1, best.x1),
        (found.y1, best.y1),
    ] {
        assert!((a - b).abs() < 1e-3, "{found:?} vs {best:?}");
    }
    let written = std::fs::read_to_string(dir.path().join("crops.csv")).unwrap();
    assert!(
        written.contains(&format!("[{:.4}]", expected[4])),
        "{written}"
    );
    let whole = BoxPx {
        x0: 0.0,
        y0: 0.0,
        x1: 64.0,
        y1: 48.0,
    };
    assert_eq!(
        stdout.trim(),
        format!(
            "1 photos: 1 cropped (0 clipped), 0 fell back to the whole photo (0 no box, 0 \
             invalid box), 0 missing from the box file\nmean IoU against the true boxes of 1 \
             photos: {:.3} (whole photo {:.3})",
            iou(&found, &truth_box),
            iou(&whole, &truth_box)
        )
    );
    let crop_img = load_rgb(&dir.path().join("crops/fin.jpg")).unwrap();
    let (x0, y0) = (found.x0.floor() as u32, found.y0.floor() as u32);
    let (x1, y1) = (found.x1.ceil() as u32, found.y1.ceil() as u32);
    assert_eq!(crop_img.dimensions(), (x1 - x0, y1 - y0));

    // Nothing is that confident: the photo is kept whole and the box file says so.
    let (stdout, boxes) = crop(0.999, "none");
    assert_eq!(boxes["fin.png"], None);
    assert!(
        stdout.starts_with(
            "1 photos: 0 cropped (0 clipped), 1 fell back to the whole photo (1 no box"
        ),
        "{stdout}"
    );
    assert_eq!(
        load_rgb(&dir.path().join("none/fin.jpg"))
            .unwrap()
            .dimensions(),
        (64, 48)
    );
}
