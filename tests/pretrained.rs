//! Checks of the pretrained EfficientNet-Lite weights that `tools/fetch_weights.sh` puts in
//! `weights/`: the converted files load into finprint's backbones (plus the `_fc` classifier),
//! classify scikit-image's sample photos into the right ImageNet classes, and give the reference
//! package's logits. Each test skips, saying so, when `weights/` is absent.

mod common;

use finprint::data::image::load_rgb;
use finprint::model::{self, Backbone, Variant};
use image::imageops::{self, FilterType};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use common::serial;

const PHOTOS: [&str; 4] = [
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
];

fn weights_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights");
    let complete = ["efficientnet_lite0.safetensors"]
        .iter()
        .all(|f| dir.join(f).is_file())
        && PHOTOS.iter().all(|f| dir.join("samples").join(f).is_file());
    if complete {
        Some(dir)
    } else {
        eprintln!(
            "skipped: {} is incomplete (run `bash tools/fetch_weights.sh`)",
            dir.display()
        );
        None
    }
}

/// A backbone with the ImageNet classifier of its checkpoint.
struct Classifier {
    _vs: nn::VarStore,
    variant: &'static Variant,
    backbone: Box<dyn Backbone>,
    fc: nn::Linear,
}

impl Classifier {
    fn load(name: &str, dir: &Path) -> Classifier {
        let variant = model::variant(name).expect("a registry variant");
        let mut vs = nn::VarStore::new(Device::Cpu);
        let backbone = variant.build(&vs.root());
        let fc = nn::linear(
            vs.root() / "_fc",
            backbone.num_features(),
            1000,
            Default::default(),
        );
        let path = dir.join(variant.weights_file().expect("pretrained weights"));
        vs.load(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Classifier {
            _vs: vs,
            variant,
            backbone,
            fc,
        }
    }

    /// ImageNet logits of `[N, 3, H, W]` pixels in 0..255.
    fn logits(&self, pixels: &Tensor) -> Tensor {
        tch::no_grad(|| {
            let features = self
                .backbone
                .forward_features(&self.variant.normalize(pixels), false);
            self.fc
                .forward(&features.mean_dim([2i64, 3].as_slice(), false, Kind::Float))
        })
    }
}

/// The sample photos resized (squashed) to `size`×`size`, as `[N, 3, size, size]` bytes.
fn photos(dir: &Path, size: u32) -> Tensor {
    let images: Vec<Tensor> = PHOTOS
        .iter()
        .map(|f| {
            let path = dir.join("samples").join(f);
            let rgb = load_rgb(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let small = imageops::resize(&rgb, size, size, FilterType::Triangle);
            Tensor::from_slice(small.as_raw())
                .view([size as i64, size as i64, 3])
                .permute([2, 0, 1])
        })
        .collect();
    Tensor::stack(&images, 0)
}

#[test]
fn lite_classifies_sample_photos() {
    let Some(dir) = weights_dir() else { return };
    let _serial = serial();
    // ImageNet classes: tabby 281, tiger cat 282, Egyptian cat 285; espresso 967, cup 968;
    // drilling platform 540, missile 657, projectile 744, space shuttle 812; moped 665, motor
    // scooter 670.
    let cats = [281, 282, 285];
    let coffee = [967, 968];
    let rocket = [657, 744, 812];
    let moped = [665, 670];
    for name in [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ] {
        let Some(file) = model::variant(name).and_then(|v| v.weights_file()) else {
            continue;
        };
        if !dir.join(&file).is_file() {
            eprintln!("skipped {name}: no {file}");
            continue;
        }
        let net = Classifier::load(name, &dir);
        let probs = net
            .logits(&photos(&dir, net.variant.input_size as u32))
            .softmax(-1, Kind::Float);
        let (p, top) = probs.topk(5, -1, true, true);
        let top: Vec<Vec<i64>> = top.try_into().expect("classes");
        let p: Vec<Vec<f32>> = p.try_into().expect("probabilities");
        for (i, photo) in PHOTOS.iter().enumerate() {
            eprintln!("{name} {photo}: top-5 {:?} p {:.3?}", top[i], p[i]);
        }
        assert!(
            cats.contains(&top[0][0]) && p[0][0] > 0.5,
            "{name}: cat {:?}",
            top[0]
        );
        assert!(
            coffee.contains(&top[1][0]) && p[1][0] > 0.5,
            "{name}: coffee {:?}",
            top[1]
        );
        assert!(
            top[2].iter().any(|c| rocket.contains(c)),
            "{name}: rocket {:?}",
            top[2]
        );
        assert!(
            top[3][..2].iter().all(|c| moped.contains(c)),
            "{name}: motorcycle {:?}",
            top[3]
        );
    }
}

/// The deterministic pixel pattern of `tools/make_fixtures.py`: `(i · 7919) mod 251`.
fn pattern() -> Tensor {
    let n = 2 * 3 * 224 * 224;
    (Tensor::arange(n, (Kind::Int64, Device::Cpu)) * 7919)
        .remainder(251)
        .view([2, 3, 224, 224])
}

#[test]
fn lite0_gives_the_reference_logits() {
    let Some(dir) = weights_dir() else { return };
    let _serial = serial();
    let fixture = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lite0_pretrained.safetensors");
    let want = Tensor::read_safetensors(&fixture)
        .unwrap_or_else(|e| panic!("{}: {e}", fixture.display()))
        .into_iter()
        .find(|(k, _)| k == "__logits__")
        .expect("__logits__")
        .1;
    let got = Classifier::load("efficientnet_lite0", &dir).logits(&pattern());
    let diff = (&got - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    eprintln!("lite0 logits: max |diff| {diff:.2e}, max |reference| {scale:.3}");
    // The reference divides by 128 after subtracting 127; finprint's mean/std in 0..1 units
    // round differently, hence 1e-4 rather than bit equality.
    assert!(diff < 1e-4 * scale, "max |diff| {diff} (scale {scale})");
    assert_eq!(got.argmax(-1, false), want.argmax(-1, false));
}

/// `finprint export-onnx --zero-shot efficientnet_lite0` writes the pretrained network, and
/// tract and onnxruntime running that file give libtorch's features of the sample photos
/// (after L2 normalisation, within 1e-4).
#[cfg(any(feature = "onnx", feature = "onnxruntime"))]
#[test]
fn lite0_exported_to_onnx_gives_libtorch_features() {
    let Some(dir) = weights_dir() else { return };
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_finprint"))
        .args(["export-onnx", "--zero-shot", "efficientnet_lite0", "--out"])
        .arg(out.path())
        .env("FINPRINT_WEIGHTS", &dir)
        .status()
        .unwrap();
    assert!(status.success());
    let file = out.path().join("0-efficientnet_lite0-224.onnx");
    let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let model = finprint::model::happywhale::HappyWhaleModel::zero_shot(
        "efficientnet_lite0",
        None,
        finprint::transforms::Fit::Squash,
        Device::Cpu,
    )
    .unwrap();
    let xs = model::variant("efficientnet_lite0")
        .unwrap()
        .normalize(&photos(&dir, 224));
    let want = model.extract(&xs);
    let input = Vec::<f32>::try_from(xs.contiguous().view(-1)).unwrap();
    let runs = common::onnx_engines(&bytes, &input, PHOTOS.len());
    assert!(!runs.is_empty());
    for run in runs {
        let got = Tensor::from_slice(&run.rows).view([PHOTOS.len() as i64, 1280]);
        let got = finprint::model::heads::normalize(&got);
        let diff = (&got - &want).abs().max().double_value(&[]);
        let engine = run.engine;
        eprintln!("lite0 through ONNX and {engine}: max |diff| {diff:.2e} of unit features");
        assert!(diff <= 1e-4, "{engine}: max |diff| {diff}");
    }
}

/// Eval throughput of Lite0 at 224×224, batch 16, in NCHW and in channels-last memory layout
/// (tch has no `to_memory_format`; a permuted contiguous copy has channels-last strides, which
/// libtorch's convolutions then keep). Run with `cargo test --release --test pretrained --
/// --ignored --nocapture`.
#[test]
#[ignore]
fn lite0_inference_speed() {
    let _serial = serial();
    let vs = nn::VarStore::new(Device::Cpu);
    let variant = model::variant("efficientnet_lite0").expect("lite0");
    let net = variant.build(&vs.root());
    let xs = Tensor::randn([16, 3, 224, 224], (Kind::Float, Device::Cpu));
    let channels_last = xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
    for (layout, input) in [("NCHW", &xs), ("channels-last", &channels_last)] {
        let _ = tch::no_grad(|| net.forward_features(input, false));
        let runs = 5;
        let start = Instant::now();
        for _ in 0..runs {
            let _ = tch::no_grad(|| net.forward_features(input, false));
        }
        let per_s = (runs * 16) as f64 / start.elapsed().as_secs_f64();
        eprintln!(
            "lite0 224×224 batch 16 {layout}: {per_s:.1} images/s ({} threads)",
            tch::get_num_threads()
        );
    }
}

/// `finprint embed --zero-shot` by its default engine (onnxruntime, the network written in
/// memory) writes libtorch's embeddings of the sample photos within 1e-4, and an
/// `ORT_DYLIB_PATH` that names no onnxruntime library is an error naming it.
#[cfg(feature = "onnxruntime")]
#[test]
fn embed_by_the_default_engine_gives_libtorchs_embeddings() {
    use common::{fails_with, finprint, succeeds};
    use finprint::embed::Embeddings;
    let Some(dir) = weights_dir() else { return };
    let _serial = serial();
    let out = tempfile::tempdir().unwrap();
    let embed = |engine: Option<&str>, file: &str| {
        let mut cmd = finprint();
        cmd.args(["embed", "--zero-shot", "efficientnet_lite0", "--images"])
            .arg(dir.join("samples"))
            .arg("--out")
            .arg(out.path().join(file))
            .env("FINPRINT_WEIGHTS", &dir)
            .env_remove(finprint::onnx::LIBRARY_VAR);
        if let Some(engine) = engine {
            cmd.args(["--engine", engine]);
        }
        cmd
    };
    succeeds(&mut embed(None, "default.safetensors"));
    succeeds(&mut embed(Some("libtorch"), "libtorch.safetensors"));
    let read = |f: &str| Embeddings::load(&out.path().join(f)).unwrap();
    let (got, want) = (read("default.safetensors"), read("libtorch.safetensors"));
    assert_eq!(got.names, want.names);
    assert_eq!(got.names.len(), PHOTOS.len());
    let diff = got
        .vectors
        .iter()
        .zip(&want.vectors)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    eprintln!("embed by onnxruntime against libtorch: max |diff| {diff:.2e}");
    assert!(diff <= 1e-4, "max |diff| {diff}");

    let fake = out.path().join("libonnxruntime.so");
    std::fs::write(&fake, "not a library").unwrap();
    let mut cmd = embed(None, "fake.safetensors");
    let named = format!("onnxruntime library {}", fake.display());
    fails_with(cmd.env(finprint::onnx::LIBRARY_VAR, &fake), &named);
    assert!(!out.path().join("fake.safetensors").exists());
}
