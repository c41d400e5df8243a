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
