//! The gradient modes of a training run: a Kaggle-format catalogue → a model that tells its individuals apart,
//! validated every epoch by MAP@5 on a held-out fold that includes unseen individuals.
//!
//! Two modes, both real training. `Full` fine-tunes every layer on freshly augmented photos.
//! `Fast` freezes the backbone's early stages: their outputs are computed once per augmentation
//! pass (and for the validation views) and cached, and only the last stages, GeM, the neck and
//! ArcFace train on them — a fraction of the cost on a CPU.
//!
//! Checkpoints hold the model and the optimiser state (see [`crate::runs`]). Every random draw
//! is seeded from the run's seed and the epoch, so `--resume` after a kill gives the same
//! weights as an uninterrupted run.

use super::augment::train_pipeline;
use super::config::{Keep, Mode, TrainConfig};
use super::optim::{lr_at, AdamW, Group};
use super::photos::{load_photos, Photos};
use super::validate::{
    knn_ranking, map5_of, pretrained_views, validation, Validation, Views, PRETRAINED_WEIGHTS,
};
use crate::args::bar;
use crate::decide::Candidate;
use crate::embed::embed_images;
use crate::model::config::ModelConfig;
use crate::model::happywhale::{pretrained_weights, HappyWhaleModel};
use crate::network::{input_tensor, to_vec, unit_with_flips};
use crate::runs::{saved_state, EpochMetrics, RunDir, RunState, TrainSummary};
use crate::runtime::{configure_threads, prefetched, CpuReading};
use crate::transforms::{batch_with, item_rng, mean_colour, Pipeline};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use std::time::Instant;
use tch::Tensor;

/// A trained checkpoint's optimiser state.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Train the gradient modes (full, fast) as `cfg` says into `run`, whose config is written;
/// with `resume`, from its last checkpoint.
pub(super) fn fit(
    cfg: &TrainConfig,
    run: &RunDir,
    resume: bool,
    mut threads: usize,
    started: Instant,
    log: &mut dyn FnMut(String),
) -> Result<TrainSummary> {
    let out = &run.root;
    anyhow::ensure!(
        !cfg.model.contains(','),
        "--model {:?}: only --mode frozen fuses several backbones",
        cfg.model
    );

    let variant = crate::model::variant(&cfg.model)
        .with_context(|| format!("unknown backbone {:?}", cfg.model))?;
    let size = cfg.input_size(variant);
    let fill = mean_colour(variant.mean.map(|v| v as f32));
    let photos = load_photos(cfg, size, fill)?;
    anyhow::ensure!(
        !photos.train.is_empty() && !photos.val.is_empty(),
        "fold {} leaves no training or no validation photos",
        cfg.fold
    );
    log(format!(
        "training {} ({} mode) on {}; {threads} thread{}",
        cfg.model,
        format!("{:?}", cfg.mode).to_lowercase(),
        photos.describe(),
        if threads == 1 { "" } else { "s" }
    ));

    let mut mcfg = ModelConfig::for_backbone(
        &cfg.model,
        photos.classes.clone(),
        photos.class_counts.clone(),
    )?;
    mcfg.img_size = size;
    mcfg.fit = cfg.fit;
    mcfg.flips = cfg.flips;
    mcfg.embedding_size = cfg.embedding_size;
    mcfg.arcface = cfg.arcface.clone();
    if cfg.species_weight > 0.0 {
        let mut species: Vec<String> = photos.species_of.values().cloned().collect();
        species.sort();
        species.dedup();
        mcfg.species = species;
    }
    tch::manual_seed(cfg.seed as i64);
    let mut model = HappyWhaleModel::new(mcfg, crate::runtime::device())?;
    if cfg.pretrained {
        model.load_backbone_weights(&pretrained_weights(&cfg.model)?)?;
    }
    let mut opt = AdamW::new(param_groups(&model, cfg));

    let mut state = RunState::default();
    let mut metrics = Vec::new();
    if resume {
        let dir = run
            .find_checkpoint("last")
            .with_context(|| format!("{} has no checkpoint to resume", out.display()))?;
        model
            .vs
            .load(dir.join(crate::model::config::WEIGHTS_FILE))
            .with_context(|| format!("cannot load {}", dir.display()))?;
        opt.load(&dir.join(OPTIMIZER_FILE))?;
        state = saved_state(&dir)?;
        metrics = run
            .read_metrics()?
            .into_iter()
            .filter(|m| m.epoch <= state.epoch)
            .collect();
        log(format!(
            "resuming after epoch {} of {}",
            state.epoch, cfg.epochs
        ));
    }

    let t = Instant::now();
    let mut trainer = Trainer::new(cfg, &model, &photos)?;
    let pretrained = match cfg.pretrained && (cfg.fuse_pretrained || !resume) {
        true => Some(pretrained_views(
            &cfg.model,
            size,
            cfg.fit,
            cfg.tta_flips(),
            &photos,
        )?),
        false => None,
    };
    if let (false, Some(views)) = (resume, &pretrained) {
        let zs = map5_of(&photos, &knn_ranking(&photos, views)?);
        state.zero_shot_map5 = Some(zs);
        metrics.push(EpochMetrics {
            epoch: 0,
            train_loss: None,
            lr: None,
            val_map5: Some(zs),
            threshold: None,
            val_map5_knn: Some(zs),
            val_map5_species: None,
            val_species_accuracy: None,
            fusion_weight: None,
            pretrained_weight: None,
            images_per_s: None,
            seconds: t.elapsed().as_secs_f64(),
        });
        run.write_metrics(&metrics)?;
        log(format!(
            "zero-shot (pretrained GeM features) validation MAP@5 {zs:.4}"
        ));
    }
    trainer.pretrained = pretrained.filter(|_| cfg.fuse_pretrained);

    let steps_per_epoch = photos.train.len().div_ceil(cfg.batch_size);
    let total_steps = steps_per_epoch * cfg.epochs;
    let warmup = (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize;
    let first = state.epoch + 1;
    let mut load = CpuReading::now();
    for epoch in first..=cfg.epochs {
        // Without --threads, follow the cores other jobs left free over the last epoch: they
        // start and stop during a long run.
        if cfg.threads.is_none() && epoch > first {
            if let Some(free) = load.as_ref().and_then(CpuReading::free_cores_since) {
                if free != threads {
                    configure_threads(Some(free));
                    log(format!(
                        "epoch {epoch}: libtorch threads {threads} → {free}, the cores other jobs left free over the last epoch"
                    ));
                    threads = free;
                }
            }
            load = CpuReading::now();
        }
        let t = Instant::now();
        tch::manual_seed(
            (cfg.seed as i64)
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as i64),
        );
        let progress = ProgressBar::new(steps_per_epoch as u64);
        progress.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:25}] {pos}/{len} {msg} eta {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        progress.set_prefix(format!("{epoch}/{}", cfg.epochs));
        let schedule = |step: usize| lr_at(step, total_steps, warmup, cfg.lr, cfg.min_lr_ratio);
        let (loss, lr) = trainer.epoch(&model, &mut opt, &photos, epoch, schedule, &progress)?;
        progress.finish_and_clear();
        let seconds = t.elapsed().as_secs_f64();
        let images_per_s = photos.train.len() as f64 / seconds;

        let validate = epoch % cfg.val_every.max(1) == 0 || epoch == cfg.epochs;
        let v = if validate {
            Some(trainer.validate(&model, &photos)?)
        } else {
            None
        };
        let map = v.as_ref().map(|v| v.map5);
        let line = EpochMetrics {
            epoch,
            train_loss: Some(loss),
            lr: Some(lr),
            val_map5: map,
            threshold: v.as_ref().map(|v| v.thresholds.global),
            val_map5_knn: v.as_ref().map(|v| v.map5_knn),
            val_map5_species: v.as_ref().map(|v| v.map5_species),
            val_species_accuracy: v.as_ref().and_then(|v| v.species_accuracy),
            fusion_weight: v.as_ref().map(|v| v.fusion_weight),
            pretrained_weight: v.as_ref().map(|v| v.pretrained_weight),
            images_per_s: Some(images_per_s),
            seconds: t.elapsed().as_secs_f64(),
        };
        let species = v.as_ref().and_then(|v| v.species_accuracy);
        log(format!(
            "epoch {epoch}/{}: loss {loss:.4}, lr {lr:.2e}, {images_per_s:.1} img/s{}{}",
            cfg.epochs,
            map.map_or(String::new(), |m| format!(", val MAP@5 {m:.4}")),
            species.map_or(String::new(), |a| format!(", species accuracy {a:.3}"))
        ));
        metrics.push(line);
        state.epoch = epoch;
        let improved = map.is_some_and(|m| m > state.best_map5 || state.best_epoch == 0);
        if let (true, Some(m)) = (improved, map) {
            state.best_map5 = m;
            state.best_epoch = epoch;
        }
        // The decisions saved with the checkpoints are those of the model kept.
        let keep_this = match cfg.keep {
            Keep::Last => true,
            Keep::Best => improved,
        };
        if let (true, Some(v)) = (keep_this, v) {
            state.threshold = v.thresholds.global;
            state.species_thresholds = v.thresholds.by_species;
            state.fusion_weight = v.fusion_weight;
            state.pretrained_weight = v.pretrained_weight;
        }
        run.write_metrics(&metrics)?;
        if improved && cfg.keep == Keep::Best {
            save(run, "best", &model, &opt, &state)?;
        }
        save(run, "last", &model, &opt, &state)?;
    }
    if cfg.keep == Keep::Last {
        save(run, "best", &model, &opt, &state)?;
    }

    let kept_epoch = match cfg.keep {
        Keep::Last => state.epoch,
        Keep::Best => state.best_epoch,
    };
    let kept_map5 = metrics
        .iter()
        .find(|m| m.epoch == kept_epoch)
        .and_then(|m| m.val_map5)
        .unwrap_or(state.best_map5);
    let summary = photos.summary(cfg.epochs, &state, (kept_epoch, kept_map5), started);
    run.write_summary(&summary)?;
    Ok(summary)
}

/// Write checkpoint `name` of a trained model: its weights, optimiser state and run state.
fn save(
    run: &RunDir,
    name: &str,
    model: &HappyWhaleModel,
    opt: &AdamW,
    state: &RunState,
) -> Result<()> {
    run.save_checkpoint(name, state, |tmp| {
        model.save(tmp)?;
        opt.save(&tmp.join(OPTIMIZER_FILE))
    })
}

/// Backbone parameters at the base rate, heads at `head_lr_mult`; weight decay on weight
/// matrices and kernels only (not on biases, norms or GeM's p).
fn param_groups(model: &HappyWhaleModel, cfg: &TrainConfig) -> Vec<Group> {
    let mut vars: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut groups: Vec<Group> = [
        (1.0, cfg.weight_decay),
        (1.0, 0.0),
        (cfg.head_lr_mult, cfg.weight_decay),
        (cfg.head_lr_mult, 0.0),
    ]
    .into_iter()
    .map(|(lr_mult, weight_decay)| Group {
        params: Vec::new(),
        lr_mult,
        weight_decay,
    })
    .collect();
    for (name, t) in vars {
        let head = !name.starts_with("model.");
        let decays = t.dim() >= 2;
        groups[usize::from(head) * 2 + usize::from(!decays)]
            .params
            .push((name, t));
    }
    groups
}

/// The per-mode machinery of one run.
struct Trainer {
    cfg: TrainConfig,
    pipeline: Pipeline,
    /// Fast mode: the frozen stages, and their cached outputs per augmentation pass.
    frozen: usize,
    train_cache: Vec<Tensor>,
    /// Fast mode: frozen-stage outputs of every photo's validation view.
    eval_cache: Option<Tensor>,
    /// The pretrained backbone's features, fused with the trained ones at validation.
    pretrained: Option<Views>,
    /// With a species head: each class's species, an index into the model's species.
    class_species: Option<Tensor>,
}

impl Trainer {
    fn new(cfg: &TrainConfig, model: &HappyWhaleModel, photos: &Photos) -> Result<Self> {
        let size = model.config.img_size;
        let mean = model.config.mean.map(|v| v as f32);
        let std = model.config.std.map(|v| v as f32);
        let pipeline = train_pipeline(
            &cfg.augment,
            cfg.flips,
            (size.width, size.height),
            mean,
            std,
        )?;
        let stages = model.backbone().num_stages();
        let frozen = match cfg.mode {
            Mode::Full => 0,
            Mode::Fast => cfg.freeze_stages.unwrap_or(stages - 1).min(stages),
            Mode::Frozen => bail!("the frozen mode has no gradient steps (see train::frozen)"),
        };
        let species = &model.config.species;
        let class_species = model.species_head().map(|_| {
            let of: Vec<i64> = photos
                .classes
                .iter()
                .map(|c| {
                    let s = &photos.species_of[c];
                    species.binary_search(s).map_or(0, |i| i as i64)
                })
                .collect();
            Tensor::from_slice(&of).to_device(model.vs.device())
        });
        let mut t = Self {
            cfg: cfg.clone(),
            pipeline,
            frozen,
            train_cache: Vec::new(),
            eval_cache: None,
            pretrained: None,
            class_species,
        };
        if frozen > 0 {
            let eval = Pipeline::eval(size, model.config.fit, mean, std)?;
            let all: Vec<usize> = (0..photos.len()).collect();
            t.eval_cache = Some(t.frozen_features(
                model,
                photos,
                &all,
                &eval,
                u64::MAX,
                "caching validation features",
            )?);
            for pass in 0..cfg.aug_passes.max(1) {
                let idx: Vec<usize> = photos.train.iter().map(|&(i, _)| i).collect();
                let what = format!(
                    "caching augmented features {}/{}",
                    pass + 1,
                    cfg.aug_passes.max(1)
                );
                let seed = cfg.seed.wrapping_mul(7919).wrapping_add(pass as u64);
                let cache = t.frozen_features(model, photos, &idx, &t.pipeline, seed, &what)?;
                t.train_cache.push(cache);
            }
        }
        Ok(t)
    }

    /// Outputs of the frozen stages for photos `idx` under `pipeline` (their training views
    /// drawn with `seed`, their eval views when `seed` is `u64::MAX`).
    fn frozen_features(
        &self,
        model: &HappyWhaleModel,
        photos: &Photos,
        idx: &[usize],
        pipeline: &Pipeline,
        seed: u64,
        what: &str,
    ) -> Result<Tensor> {
        let batch = 32;
        let progress = bar(idx.len() as u64, what);
        let mut parts = Vec::new();
        prefetched(
            idx.len().div_ceil(batch),
            2,
            |b| {
                let chunk = &idx[b * batch..((b + 1) * batch).min(idx.len())];
                batch_with(
                    pipeline,
                    chunk.len(),
                    seed.wrapping_add(b as u64 * 1_000_003),
                    |i| {
                        Ok(match seed {
                            u64::MAX => photos.eval_view(chunk[i]),
                            _ => photos.train_view(chunk[i], seed),
                        })
                    },
                )
                .map(|chw| (chw, chunk.len()))
            },
            |_, (chw, n)| {
                let xs = input_tensor(model, &chw, n);
                parts.push(tch::no_grad(|| {
                    model.backbone().forward_stages(&xs, false, 0, self.frozen)
                }));
                progress.inc(n as u64);
                Ok(())
            },
        )?;
        progress.finish_and_clear();
        Ok(Tensor::cat(&parts, 0))
    }

    /// Embeddings `[n, E]` from the trainable stages on (cached) inputs.
    fn head_forward(&self, model: &HappyWhaleModel, xs: &Tensor, train: bool) -> Tensor {
        let stages = model.backbone().num_stages();
        let map = model
            .backbone()
            .forward_stages(xs, train, self.frozen, stages);
        model.neck(&model.pool(&map), train)
    }

    /// One epoch; returns the mean loss and the last learning rate.
    fn epoch(
        &mut self,
        model: &HappyWhaleModel,
        opt: &mut AdamW,
        photos: &Photos,
        epoch: usize,
        schedule: impl Fn(usize) -> f64,
        progress: &ProgressBar,
    ) -> Result<(f64, f64)> {
        let bs = self.cfg.batch_size.max(2);
        let mut order: Vec<usize> = (0..photos.train.len()).collect();
        order.shuffle(&mut item_rng(self.cfg.seed ^ 0x5AFF1E, epoch as u64));
        // A batch of one breaks BatchNorm: fold a last single photo into the previous batch.
        let mut batches: Vec<&[usize]> = order.chunks(bs).collect();
        if batches.len() > 1 && batches.last().is_some_and(|b| b.len() < 2) {
            batches.pop();
        }
        let steps_before = (epoch - 1) * photos.train.len().div_ceil(bs);
        let (mut loss_sum, mut seen, mut lr) = (0.0, 0usize, 0.0);
        let started = Instant::now();
        let device = model.vs.device();
        let mut step_on = |b: usize, xs: Tensor, labels: Tensor, from_cache: bool| -> Result<()> {
            lr = schedule(steps_before + b);
            opt.zero_grad();
            let emb = if from_cache {
                self.head_forward(model, &xs, true)
            } else {
                model.embed(&xs, true)
            };
            let mut loss = model
                .head()
                .forward(&emb, &labels)
                .cross_entropy_for_logits(&labels);
            if let (Some(head), Some(of)) = (model.species_head(), &self.class_species) {
                let species = of.index_select(0, &labels);
                let aux = head
                    .forward(&emb, &species)
                    .cross_entropy_for_logits(&species);
                loss += aux * self.cfg.species_weight;
            }
            loss.backward();
            if self.cfg.grad_clip > 0.0 {
                opt.clip_grad_norm(self.cfg.grad_clip);
            }
            opt.step(lr);
            let n = labels.size()[0] as usize;
            let l = loss.double_value(&[]);
            anyhow::ensure!(
                l.is_finite(),
                "the loss diverged at epoch {epoch}, step {b}: lower --lr"
            );
            loss_sum += l * n as f64;
            seen += n;
            progress.inc(1);
            progress.set_message(format!(
                "loss {:.4} lr {lr:.2e} {:.1} img/s",
                loss_sum / seen as f64,
                seen as f64 / started.elapsed().as_secs_f64()
            ));
            Ok(())
        };
        let labels_of = |batch: &[usize]| {
            let l: Vec<i64> = batch.iter().map(|&k| photos.train[k].1).collect();
            Tensor::from_slice(&l).to_device(device)
        };
        if self.frozen > 0 {
            let cache = &self.train_cache[(epoch - 1) % self.train_cache.len()];
            for (b, batch) in batches.iter().enumerate() {
                let idx: Vec<i64> = batch.iter().map(|&k| k as i64).collect();
                let xs = cache.index_select(0, &Tensor::from_slice(&idx).to_device(cache.device()));
                step_on(b, xs, labels_of(batch), true)?;
            }
        } else {
            let seed = self
                .cfg
                .seed
                .wrapping_mul(1_000_003)
                .wrapping_add(epoch as u64);
            let pipeline = &self.pipeline;
            prefetched(
                batches.len(),
                2,
                |b| {
                    let batch = batches[b];
                    batch_with(
                        pipeline,
                        batch.len(),
                        seed.wrapping_add(b as u64 * 7919),
                        |i| Ok(photos.train_view(photos.train[batch[i]].0, seed)),
                    )
                },
                |b, chw| {
                    step_on(
                        b,
                        input_tensor(model, &chw, batches[b].len()),
                        labels_of(batches[b]),
                        false,
                    )
                },
            )?;
        }
        Ok((loss_sum / seen.max(1) as f64, lr))
    }

    /// Unit embeddings of photos `idx` in eval mode (flip TTA as configured).
    fn embeddings(
        &self,
        model: &HappyWhaleModel,
        photos: &Photos,
        idx: &[usize],
    ) -> Result<Vec<f32>> {
        if let Some(cache) = &self.eval_cache {
            let mut out = Vec::new();
            for chunk in idx.chunks(64) {
                let ids: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
                let xs = cache.index_select(0, &Tensor::from_slice(&ids).to_device(cache.device()));
                let e = unit_with_flips(&xs, self.cfg.tta_flips(), |x| {
                    self.head_forward(model, x, false)
                });
                out.extend(to_vec(&e)?);
            }
            Ok(out)
        } else {
            let progress = bar(idx.len() as u64, "embedding for validation");
            let e = embed_images(
                model,
                idx.len(),
                |i| Ok(photos.eval_view(idx[i])),
                32,
                self.cfg.flip_tta,
                &progress,
            );
            progress.finish_and_clear();
            e
        }
    }

    /// Validation of the trained embeddings, fused with the pretrained features at the weight
    /// that serves kNN best when there are some.
    fn validate(&self, model: &HappyWhaleModel, photos: &Photos) -> Result<Validation> {
        let train: Vec<usize> = photos.train.iter().map(|&(i, _)| i).collect();
        let val: Vec<usize> = photos.val.iter().map(|(i, _)| *i).collect();
        let trained = Views {
            gallery: self.embeddings(model, photos, &train)?,
            queries: self.embeddings(model, photos, &val)?,
            dim: model.config.embedding_size as usize,
        };
        let head = Some((model, trained.queries.as_slice()));
        let Some(pretrained) = &self.pretrained else {
            return validation(photos, head, knn_ranking(photos, &trained)?);
        };
        // (weight, MAP@5, ranking) of the best weight so far; weight 0 is the trained alone.
        let mut best: Option<(f32, f64, Vec<Vec<Candidate>>)> = None;
        for w in PRETRAINED_WEIGHTS {
            let ranked = match w > 0.0 {
                true => knn_ranking(photos, &trained.fused(pretrained, w))?,
                false => knn_ranking(photos, &trained)?,
            };
            let map5 = map5_of(photos, &ranked);
            if best.as_ref().is_none_or(|b| map5 > b.1) {
                best = Some((w, map5, ranked));
            }
        }
        let (weight, _, knn) = best.context("no pretrained weight to try")?;
        Ok(Validation {
            pretrained_weight: weight,
            ..validation(photos, head, knn)?
        })
    }
}
