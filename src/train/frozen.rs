//! The frozen mode: whole pretrained backbones, no gradient step. Each backbone's GeM features
//! (p = 3) of every photo are computed once; the unit features of all backbones are
//! concatenated, and a whitening learnt in closed form on the training identities
//! ([`crate::model::whitening`]) maps them to the embedding. Validation picks the whitening's
//! shrinkage and size among [`SHRINKS`] × {embedding size / 2, embedding size}; metrics line 0
//! is the plain concatenation (the zero-shot baseline), line 1 the chosen whitening.
//!
//! The checkpoint folder (`best/`, and `last/` alike) holds the run state, the members and the
//! whitening ([`crate::runs::save_frozen`]); [`crate::runs::Ensemble::load`] rebuilds them.

use super::config::TrainConfig;
use super::photos::load_photos;
use super::validate::{knn_ranking, map5_of, pretrained_views, validation, Validation, Views};
use crate::args::bar;
use crate::model::whitening::{self, Whitening};
use crate::runs::{save_frozen, EpochMetrics, Frozen, Member, RunDir, RunState, TrainSummary};
use crate::transforms::mean_colour;
use anyhow::{Context, Result};
use std::time::Instant;
/// Shrinkages of the within-identity covariance tried by validation.
pub const SHRINKS: [f64; 4] = [0.2, 0.4, 0.6, 0.8];

/// The backbones of `--model`, comma-separated.
fn backbones(model: &str) -> Vec<&str> {
    model
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Fit the frozen mode's whitening as `cfg` says into `run`, whose config is written.
pub(super) fn fit(
    cfg: &TrainConfig,
    run: &RunDir,
    started: Instant,
    log: &mut dyn FnMut(String),
) -> Result<TrainSummary> {
    anyhow::ensure!(
        cfg.pretrained,
        "--mode frozen needs the pretrained weights (it trains no backbone)"
    );
    anyhow::ensure!(
        cfg.species_weight == 0.0,
        "--species-weight trains a species head: the gradient modes only (--mode full or fast)"
    );
    let names = backbones(&cfg.model);
    anyhow::ensure!(!names.is_empty(), "--model names no backbone");
    let mut members = Vec::new();
    let mut parts = Vec::new();
    let mut photos = None;
    for name in names {
        let variant =
            crate::model::variant(name).with_context(|| format!("unknown backbone {name:?}"))?;
        let size = cfg.input_size(variant);
        let fill = mean_colour(variant.mean.map(|v| v as f32));
        let p = match photos.take() {
            Some((s, f, p)) if (s, f) == (size, fill) => p,
            _ => load_photos(cfg, size, fill)?,
        };
        anyhow::ensure!(
            !p.train.is_empty() && !p.val.is_empty(),
            "fold {} leaves no training or no validation photos",
            cfg.fold
        );
        if members.is_empty() {
            log(format!("frozen {} on {}", cfg.model, p.describe()));
        }
        parts.push(pretrained_views(name, size, cfg.fit, cfg.tta_flips(), &p)?);
        members.push(Member {
            backbone: name.to_string(),
            img_size: size,
            fit: cfg.fit,
            flips: cfg.flips,
        });
        photos = Some((size, fill, p));
    }
    let (_, _, photos) = photos.context("no photos")?;
    let t = Instant::now();
    let refs: Vec<&Views> = parts.iter().collect();
    let raw = Views::concat(&refs, &vec![1.0; refs.len()]);
    let zero_shot = map5_of(&photos, &knn_ranking(&photos, &raw)?);
    let zero_shot_seconds = t.elapsed().as_secs_f64();
    log(format!(
        "zero-shot (pretrained GeM features) validation MAP@5 {zero_shot:.4}"
    ));

    let labels: Vec<usize> = photos.train.iter().map(|&(_, c)| c as usize).collect();
    let dims = [cfg.embedding_size as usize / 2, cfg.embedding_size as usize];
    let progress = bar((SHRINKS.len() * dims.len()) as u64, "fitting whitenings");
    let mut best: Option<(f64, Frozen, Whitening, Vec<_>)> = None;
    for shrink in SHRINKS {
        for dim in dims {
            let w = whitening::fit(&raw.gallery, raw.dim, &labels, shrink, dim.max(1))?;
            let views = Views {
                gallery: w.apply(&raw.gallery)?,
                queries: w.apply(&raw.queries)?,
                dim: w.dim_out,
            };
            let ranked = knn_ranking(&photos, &views)?;
            let map5 = map5_of(&photos, &ranked);
            if best.as_ref().is_none_or(|b| map5 > b.0) {
                let frozen = Frozen {
                    members: members.clone(),
                    shrink,
                    dim: w.dim_out,
                };
                best = Some((map5, frozen, w, ranked));
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let (_, frozen, w, ranked) = best.context("no whitening fitted")?;
    let v = validation(&photos, None, ranked)?;
    log(format!(
        "whitened (shrinkage {}, {} dimensions) validation MAP@5 {:.4}, new_individual threshold {:.3}",
        frozen.shrink, frozen.dim, v.map5, v.thresholds.global
    ));

    let line = |epoch, map5: f64, knn: f64, v: Option<&Validation>, seconds| EpochMetrics {
        epoch,
        train_loss: None,
        lr: None,
        val_map5: Some(map5),
        threshold: v.map(|v| v.thresholds.global),
        val_map5_knn: Some(knn),
        val_map5_species: v.map(|v| v.map5_species),
        val_species_accuracy: None,
        fusion_weight: None,
        pretrained_weight: None,
        images_per_s: None,
        seconds,
    };
    let metrics = [
        line(0, zero_shot, zero_shot, None, zero_shot_seconds),
        line(1, v.map5, v.map5_knn, Some(&v), t.elapsed().as_secs_f64()),
    ];
    run.write_metrics(&metrics)?;
    let state = RunState {
        epoch: 1,
        best_map5: v.map5,
        best_epoch: 1,
        threshold: v.thresholds.global,
        zero_shot_map5: Some(zero_shot),
        species_thresholds: v.thresholds.by_species.clone(),
        ..RunState::default()
    };
    for name in ["best", "last"] {
        run.save_checkpoint(name, &state, |dir| save_frozen(dir, &frozen, &w))?;
    }
    let summary = photos.summary(1, &state, (1, v.map5), started);
    run.write_summary(&summary)?;
    Ok(summary)
}
