//! Validation of a run: the held-out fold's queries against the training photos, ranked by kNN
//! (optionally blended with the ArcFace head), `new_individual` thresholds chosen to maximise
//! MAP@5, and the pretrained backbone's features as the zero-shot baseline.

use super::photos::Photos;
use crate::args::bar;
use crate::decide::{best_threshold, Candidate};
use crate::embed::{embed_images, fuse};
use crate::model::happywhale::HappyWhaleModel;
use crate::network::Heads;
use crate::predict::{
    best_thresholds, choose_fusion_weight, fuse_all, head_candidates, prefer_species,
    rank_candidates, species_predictions, Thresholds, FUSION_DEPTH, MIN_SPECIES_QUERIES,
};
use crate::runs::ZeroShot;
use crate::search::{Aggregation, IndexSpec};
use crate::transforms::{Fit, Flips, ImgSize};
use anyhow::Result;

/// What validation measured and chose: see [`EpochMetrics`].
pub(super) struct Validation {
    pub map5: f64,
    pub map5_knn: f64,
    pub map5_species: f64,
    /// The species head's accuracy on the queries (runs with one).
    pub species_accuracy: Option<f64>,
    pub fusion_weight: f32,
    pub pretrained_weight: f32,
    pub thresholds: Thresholds,
}

/// Weights of the pretrained features tried by validation (see [`super::TrainConfig::fuse_pretrained`]).
pub const PRETRAINED_WEIGHTS: [f32; 5] = [0.0, 0.5, 0.75, 1.0, 1.5];

/// Unit embeddings of the training photos (gallery) and the validation photos (queries).
pub(super) struct Views {
    pub gallery: Vec<f32>,
    pub queries: Vec<f32>,
    pub dim: usize,
}

impl Views {
    /// The rows of `parts` concatenated at `weights` (see [`fuse`]).
    pub(super) fn concat(parts: &[&Views], weights: &[f32]) -> Views {
        let join = |rows: Vec<Vec<f32>>| {
            let n = rows[0].len() / parts[0].dim;
            fuse(&rows, weights, n)
        };
        Views {
            gallery: join(parts.iter().map(|v| v.gallery.clone()).collect()),
            queries: join(parts.iter().map(|v| v.queries.clone()).collect()),
            dim: parts.iter().map(|v| v.dim).sum(),
        }
    }

    /// Each row of `self` concatenated with `other`'s at `weight`.
    pub(super) fn fused(&self, other: &Views, weight: f32) -> Views {
        Views::concat(&[self, other], &[1.0, weight])
    }
}

/// Validation queries against the training photos as gallery: the kNN ranking `knn` (see
/// [`knn_ranking`]), blended with the ArcFace head's scores at the weight that serves best (when
/// `head` gives a model with its queries' embeddings), candidates of other species than its
/// species head predicts moved behind the rest (when it has one), and the best new_individual
/// thresholds, global and per species.
pub(super) fn validation(
    photos: &Photos,
    head: Option<(&HappyWhaleModel, &[f32])>,
    knn: Vec<Vec<Candidate>>,
) -> Result<Validation> {
    let truths: Vec<String> = photos.val.iter().map(|(_, t)| t.clone()).collect();
    let classifier = match head {
        Some((m, queries)) => Some((&m.config, Heads::of(m)?, queries)),
        None => None,
    };
    let heads = match &classifier {
        Some((c, h, queries)) => {
            head_candidates(&[(c, h)], &[1.0], queries, truths.len(), FUSION_DEPTH)
        }
        None => None,
    };
    let (fusion_weight, tried) = match &heads {
        Some(h) => choose_fusion_weight(&knn, h, &truths),
        None => (0.0, Vec::new()),
    };
    let mut ranked = fuse_all(knn, heads.as_deref(), fusion_weight);
    let species = match &classifier {
        Some((c, h, queries)) => species_predictions(&[(c, h)], &[1.0], queries, truths.len()),
        None => None,
    };
    let mut species_accuracy = None;
    if let Some(predicted) = species {
        let right = predicted.iter().zip(&photos.val_species);
        let right = right.filter(|(p, t)| p == t).count();
        species_accuracy = Some(right as f64 / predicted.len().max(1) as f64);
        ranked = prefer_species(ranked, &predicted, &photos.species_of);
    }
    let fused: Vec<_> = ranked.into_iter().zip(truths.iter().cloned()).collect();
    let map5 = best_threshold(&fused).1;
    // The first weight tried is 0, kNN alone; without a head, `fused` is kNN alone.
    let map5_knn = tried.first().map_or(map5, |&(_, m)| m);
    let (thresholds, map5_species) =
        best_thresholds(&fused, &photos.species_of, MIN_SPECIES_QUERIES);
    Ok(Validation {
        map5,
        map5_knn,
        map5_species,
        species_accuracy,
        fusion_weight,
        pretrained_weight: 0.0,
        thresholds,
    })
}

/// Each validation query's candidates by exact kNN over the training photos.
pub(super) fn knn_ranking(photos: &Photos, views: &Views) -> Result<Vec<Vec<Candidate>>> {
    let index = IndexSpec::default().build_with(views.dim, &views.gallery)?;
    let labels: Vec<u32> = photos.train.iter().map(|&(_, c)| c as u32).collect();
    rank_candidates(
        index.as_ref(),
        &labels,
        &photos.classes,
        &views.queries,
        Aggregation::Max,
        FUSION_DEPTH,
    )
}

/// MAP@5 (at the best threshold) of a ranking of the validation queries.
pub(super) fn map5_of(photos: &Photos, ranked: &[Vec<Candidate>]) -> f64 {
    let truths = photos.val.iter().map(|(_, t)| t.clone());
    let queries: Vec<_> = ranked.iter().cloned().zip(truths).collect();
    best_threshold(&queries).1
}

/// GeM-pooled features (p = 3) of a pretrained backbone, for the training and validation
/// photos: the zero-shot baseline, and what [`super::TrainConfig::fuse_pretrained`] fuses.
pub(super) fn pretrained_views(
    backbone: &str,
    size: ImgSize,
    fit: Fit,
    tta: Flips,
    photos: &Photos,
) -> Result<Views> {
    let features = ZeroShot {
        backbone: backbone.to_string(),
        img_size: Some(size),
        fit,
        flips: tta,
    };
    let model = features.load(crate::runtime::device())?;
    let flip_tta = tta != Flips::None;
    let idx: Vec<usize> = photos
        .train
        .iter()
        .map(|&(i, _)| i)
        .chain(photos.val.iter().map(|(i, _)| *i))
        .collect();
    let progress = bar(idx.len() as u64, "pretrained features");
    let all = embed_images(
        &model,
        idx.len(),
        |i| Ok(photos.eval_view(idx[i])),
        32,
        flip_tta,
        &progress,
    )?;
    progress.finish_and_clear();
    let dim = model.config.embedding_size as usize;
    let mut gallery = all;
    let queries = gallery.split_off(photos.train.len() * dim);
    Ok(Views {
        gallery,
        queries,
        dim,
    })
}
