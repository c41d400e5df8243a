//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test crate uses some of them

use finprint::data::KaggleDir;
use finprint::synth::{generate, SynthConfig};
use image::{Rgb, RgbImage};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard};

/// Model tests run one at a time: libtorch parallelises each of them already, and its threads
/// collapse when two models run at once.
static LOCK: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(2);
    guard
}

/// The `finprint` binary built for the tests.
pub fn finprint() -> Command {
    Command::new(env!("CARGO_BIN_EXE_finprint"))
}

/// `finprint ARGS`, run to its end.
pub fn run(args: &[&str]) -> Output {
    finprint().args(args).output().expect("finprint runs")
}

/// Runs `cmd` to its end and asserts that it succeeded (showing its stderr if not).
pub fn succeeds(cmd: &mut Command) -> Output {
    let o = cmd.output().expect("finprint runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// Runs `cmd` to its end and asserts that it failed with a message holding `needle`. The
/// assertion names how it ended (an exit code, or the signal that killed it with nothing said).
pub fn fails_with(cmd: &mut Command, needle: &str) {
    let o = cmd.output().expect("finprint runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(needle),
        "expected a failure naming {needle:?}, got {} with stderr: {err}",
        o.status
    );
}

/// A synthetic catalogue of `individuals` animals in `dir`.
pub fn synth(dir: &Path, individuals: usize, width: u32, height: u32, seed: u64) -> KaggleDir {
    let kaggle = KaggleDir::new(dir);
    let cfg = SynthConfig {
        individuals,
        seed,
        width,
        height,
        ..SynthConfig::default()
    };
    generate(&kaggle, &cfg, &indicatif::ProgressBar::hidden()).unwrap();
    kaggle
}

/// A JPEG of a few hundred bytes whose header declares `side`×`side` pixels: an 8×8 photo
/// with its frame header's size rewritten.
pub fn header_bomb(side: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    jpeg_encoder::Encoder::new(&mut bytes, 80)
        .encode(&[90; 8 * 8 * 3], 8, 8, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    let sof = bytes
        .windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
        .expect("a frame header");
    bytes[sof + 5..sof + 7].copy_from_slice(&side.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&side.to_be_bytes());
    bytes
}

/// A generated animal whose identity is only a pattern of spots: `(x, y, radius)` on a pale
/// body, in body coordinates centred on 0.
pub fn spot_animal(rng: &mut ChaCha8Rng) -> Vec<(f32, f32, f32)> {
    (0..30)
        .map(|_| {
            (
                rng.gen_range(-90.0..90.0),
                rng.gen_range(-45.0..45.0),
                rng.gen_range(2.0..5.0),
            )
        })
        .collect()
}

/// A photo of `spots`: the body moved, scaled and turned a little, on a background of its own.
pub fn spot_photo(spots: &[(f32, f32, f32)], rng: &mut ChaCha8Rng) -> RgbImage {
    let (w, h) = (320u32, 240u32);
    let scale = rng.gen_range(0.85..1.15f32);
    let angle = rng.gen_range(-0.08..0.08f32);
    let (cx, cy) = (
        160.0 + rng.gen_range(-20.0..20.0f32),
        120.0 + rng.gen_range(-15.0..15.0f32),
    );
    let (c, s) = (angle.cos() * scale, angle.sin() * scale);
    let placed: Vec<(f32, f32, f32)> = spots
        .iter()
        .map(|&(x, y, r)| (cx + c * x - s * y, cy + s * x + c * y, r * scale))
        .collect();
    // Background clutter of its own: big soft blobs, different in every photo.
    let clutter: Vec<(f32, f32, f32)> = (0..12)
        .map(|_| {
            (
                rng.gen_range(0.0..w as f32),
                rng.gen_range(0.0..h as f32),
                rng.gen_range(3.0..8.0),
            )
        })
        .collect();
    let tone = rng.gen_range(60.0..100.0f32);
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let (bx, by) = ((fx - cx) / scale, (fy - cy) / scale);
        let on_body = (bx / 110.0).powi(2) + (by / 60.0).powi(2) < 1.0;
        let mut v = if on_body { 200.0 } else { tone };
        for &(px, py, r) in &clutter {
            let d2 = (fx - px).powi(2) + (fy - py).powi(2);
            v += 60.0 * (-d2 / (2.0 * r * r)).exp();
        }
        for &(px, py, r) in &placed {
            let d2 = (fx - px).powi(2) + (fy - py).powi(2);
            v -= 150.0 * (-d2 / (2.0 * r * r)).exp();
        }
        let v = (v + rng.gen_range(-4.0..4.0)).clamp(0.0, 255.0) as u8;
        Rgb([v, v, v])
    })
}

/// A reference fixture of tests/fixtures (safetensors), by tensor name.
pub fn reference(name: &str) -> std::collections::HashMap<String, tch::Tensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    tch::Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// weights/`file`, or `None` (saying the test is skipped) when `tools/setup.sh` has not
/// fetched it.
pub fn weights(file: &str) -> Option<std::path::PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("weights")
        .join(file);
    if !path.is_file() {
        eprintln!("skipped: weights/{file} absent (run bash tools/setup.sh)");
        return None;
    }
    Some(path)
}

/// A fixture's photo, stored as a u8 tensor `[H, W, 3]`.
pub fn photo(t: &tch::Tensor) -> RgbImage {
    let (h, w) = (t.size()[0] as u32, t.size()[1] as u32);
    let bytes = Vec::<u8>::try_from(t.flatten(0, -1)).unwrap();
    RgbImage::from_raw(w, h, bytes).expect("an RGB image")
}

/// A tensor's values as f32, flattened.
pub fn floats(t: &tch::Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap()
}

/// One ONNX engine's run of a network: its name, the input `[C, H, W]` it takes, the width of
/// its output rows, and the rows.
pub struct OnnxRun {
    pub engine: &'static str,
    pub chw: [usize; 3],
    pub rows: Vec<f32>,
    pub dim: usize,
}

/// The `n` inputs `[n, C, H, W]` through the ONNX model `bytes` by each ONNX engine of this
/// build: tract (planned for batches of 2, so a last batch of 1 is padded) and onnxruntime.
pub fn onnx_engines(bytes: &[u8], input: &[f32], n: usize) -> Vec<OnnxRun> {
    let mut runs = Vec::new();
    #[cfg(feature = "onnx")]
    {
        let net = finprint::onnx::OnnxNet::new(bytes, "test model", 2).unwrap();
        runs.push(OnnxRun {
            engine: "tract",
            chw: net.shape().chw,
            rows: net.run(input, n).unwrap(),
            dim: net.shape().dim,
        });
    }
    #[cfg(feature = "onnxruntime")]
    {
        let net = finprint::onnx::OrtNet::new(bytes, "test model").unwrap();
        runs.push(OnnxRun {
            engine: "onnxruntime",
            chw: net.shape().chw,
            rows: net.run(input, n).unwrap(),
            dim: net.shape().dim,
        });
    }
    runs
}
