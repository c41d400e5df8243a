//! The model behind a catalogue: which one it is (so that embeddings made by another model are
//! made again), and a worker thread that owns it, since libtorch models are not `Sync`.

use crate::runs::ModelSpec;
use anyhow::{Context, Result};
use image::RgbImage;
use indicatif::ProgressBar;
use std::sync::{mpsc, Mutex};

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
                let ensemble = match spec.load(threshold) {
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
