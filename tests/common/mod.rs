//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test crate uses some of them

use finprint::data::KaggleDir;
use finprint::synth::{generate, SynthConfig};
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
