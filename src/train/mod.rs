//! Training: a Kaggle-format catalogue → a run folder ([`crate::runs`]) whose model tells its
//! individuals apart, validated by MAP@5 on a held-out fold that includes unseen individuals.
//!
//! | file | holds |
//! |---|---|
//! | [`config`] | [`TrainConfig`]: every setting, the `train` flags and `--config` JSON in one |
//! | [`augment`] | the reference's random augmentations, as transform steps |
//! | `photos` | the fold split, photos decoded and resized once |
//! | `validate` | validation: kNN (+ head) ranking, thresholds, the zero-shot baseline |
//! | `gradient` | the full and fast modes (AdamW, warm-up and cosine, checkpoints, resume) |
//! | `frozen` | the frozen mode: pretrained features and a learnt whitening |
//! | [`optim`] | AdamW and the learning-rate schedule |
//! | [`report`] | the run's curves and Markdown summary |

pub mod augment;
pub mod config;
mod frozen;
mod gradient;
pub mod optim;
mod photos;
pub mod report;
mod validate;

pub use config::{Mode, TrainConfig};
pub use validate::PRETRAINED_WEIGHTS;

use crate::embed::write_onnx;
use crate::network::{Engine, ONNX_DIR};
use crate::runs::{Ensemble, RunDir, TrainSummary};
use crate::runtime::configure_threads;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::Instant;

/// Train as `cfg` says into the run folder `out`; with `resume`, continue the run there from its
/// last checkpoint (its saved config wins over `cfg`). The checkpoints get their networks in
/// ONNX too. `log` gets a line for each step (the
/// photos, the zero-shot baseline, each epoch).
pub fn train(
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    log: &mut dyn FnMut(String),
) -> Result<TrainSummary> {
    let started = Instant::now();
    let run = RunDir::new(out);
    let cfg: TrainConfig = if resume {
        run.read_config()
            .context("--resume needs the run's train_config.json")?
    } else {
        if run.find_checkpoint("last").is_some() {
            bail!(
                "{} already holds a run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        cfg.clone().with_absolute_paths()?
    };
    cfg.data.check()?;
    let threads = configure_threads(cfg.threads);
    run.create()?;
    run.write_config(&cfg)?;
    let summary = match cfg.mode {
        Mode::Frozen => frozen::fit(&cfg, &run, started, log)?,
        Mode::Full | Mode::Fast => gradient::fit(&cfg, &run, resume, threads, started, log)?,
    };
    write_networks(&run)?;
    Ok(summary)
}

/// Each checkpoint's networks written to ONNX into its [`ONNX_DIR`], for the engine that runs
/// without libtorch.
fn write_networks(run: &RunDir) -> Result<()> {
    for name in ["best", "last"] {
        if let Some(dir) = run.find_checkpoint(name) {
            let ensemble = Ensemble::load(std::slice::from_ref(&dir), Engine::Libtorch)?;
            write_onnx(&ensemble, &dir.join(ONNX_DIR))
                .with_context(|| format!("writing the networks of {}", dir.display()))?;
        }
    }
    Ok(())
}
