//! The model behind a catalogue: which one it is (so that embeddings made by another model are
//! made again), and a worker thread that owns it, since libtorch models are not `Sync`.

use crate::embed::Ensemble;
use anyhow::{Context, Result};
use image::RgbImage;
use indicatif::ProgressBar;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Mutex};

/// The models that embed a catalogue's photos.
#[derive(Clone, Debug)]
pub enum ModelSpec {
    /// Trained run (or checkpoint) folders, fused.
    Runs(Vec<PathBuf>),
    /// A pretrained backbone's pooled features, at `img_size` (the backbone's own when `None`).
    ZeroShot {
        backbone: String,
        img_size: Option<i64>,
    },
}

/// FNV-1a, 64 bits: a stable fingerprint of bytes (std's hasher may change between releases).
pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The fingerprint of every file of a folder (names and bytes, in name order).
fn folder_fingerprint(dir: &Path) -> Result<u64> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let mut h = 0;
    for path in names {
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        h = fnv1a(path.file_name().unwrap_or_default().as_encoded_bytes(), h);
        h = fnv1a(&bytes, h);
    }
    Ok(h)
}

impl ModelSpec {
    /// A name that changes whenever the model's weights or input size change.
    pub fn identity(&self) -> Result<String> {
        match self {
            ModelSpec::Runs(runs) => {
                let parts = runs
                    .iter()
                    .map(|run| {
                        let dir = crate::train::run::checkpoint_dir(run)?;
                        Ok(format!("{:016x}", folder_fingerprint(&dir)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(format!("runs:{}", parts.join("+")))
            }
            ModelSpec::ZeroShot { backbone, img_size } => {
                let weights = crate::model::happywhale::pretrained_weights(backbone)?;
                let bytes = std::fs::read(&weights)
                    .with_context(|| format!("cannot read {}", weights.display()))?;
                Ok(format!(
                    "zero-shot:{backbone}:{}:{:016x}",
                    img_size.map_or("default".into(), |s| s.to_string()),
                    fnv1a(&bytes, 0)
                ))
            }
        }
    }

    /// Load the models; `threshold` replaces the saved new_individual threshold when given
    /// (zero-shot features have none: 0 then).
    pub fn load(&self, threshold: Option<f32>, device: tch::Device) -> Result<Ensemble> {
        let mut ensemble = match self {
            ModelSpec::Runs(runs) => Ensemble::load(runs, device)?,
            ModelSpec::ZeroShot { backbone, img_size } => {
                Ensemble::zero_shot(backbone, *img_size, 0.0, device)?
            }
        };
        if let Some(t) = threshold {
            ensemble.threshold = t;
        }
        Ok(ensemble)
    }
}

type Job = (Vec<RgbImage>, mpsc::Sender<Result<Vec<f32>>>);

/// A thread that owns the models and embeds the photos sent to it, one batch at a time.
pub struct Embedder {
    jobs: Mutex<mpsc::Sender<Job>>,
    /// Length of an embedding.
    pub dim: usize,
    /// The new_individual threshold.
    pub threshold: f32,
    /// [`ModelSpec::identity`] of the models.
    pub model_id: String,
}

/// Photos per batch sent through the model.
const BATCH: usize = 16;

impl Embedder {
    /// Start the worker: the models are loaded on its own thread.
    pub fn start(spec: &ModelSpec, threshold: Option<f32>) -> Result<Self> {
        let model_id = spec.identity()?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(usize, f32)>>();
        let spec = spec.clone();
        std::thread::Builder::new()
            .name("finprint-embedder".into())
            .spawn(move || {
                let ensemble = match spec.load(threshold, crate::runtime::device()) {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((ensemble.dim(), ensemble.threshold)));
                for (images, reply) in rx {
                    let n = images.len();
                    let load = |i: usize| Ok(images[i].clone());
                    let out = ensemble.embed(n, load, BATCH, false, &ProgressBar::hidden());
                    let _ = reply.send(out);
                }
            })
            .context("cannot start the embedding thread")?;
        let (dim, threshold) = ready_rx
            .recv()
            .context("the embedding thread stopped while loading the models")??;
        Ok(Self {
            jobs: Mutex::new(jobs),
            dim,
            threshold,
            model_id,
        })
    }

    /// Unit embeddings of `images`, row-major `[images.len(), dim]`; blocks until done.
    pub fn embed(&self, images: Vec<RgbImage>) -> Result<Vec<f32>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = mpsc::channel();
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((images, tx))
            .map_err(|_| anyhow::anyhow!("the embedding thread has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("the embedding thread has stopped"))?
    }
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn fnv1a_matches_its_published_values() {
        // FNV-1a 64 test vectors: "" and "a".
        assert_eq!(fnv1a(b"", 0), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a", 0), 0xaf63_dc4c_8601_ec8c);
    }
}
