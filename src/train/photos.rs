//! The photos of a run: the fold split of a Kaggle catalogue, each photo decoded once and its
//! crop sets resized to the model's input size.

use super::config::TrainConfig;
use crate::args::bar;
use crate::crops::sets::{self as crop_sets, load_sets};
use crate::data::folds::{assign_folds, split};
use crate::data::{image::load_rgb, NEW_INDIVIDUAL};
use crate::runs::{RunState, TrainSummary};
use crate::transforms::{fit_to, item_rng, ImgSize};
use anyhow::Result;
use image::RgbImage;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

/// The photos of one run, decoded once and resized to the model's input size.
pub(super) struct Photos {
    /// `views[set][photo]`: each crop set's crop of each photo, at the model's input size.
    pub views: Vec<Vec<RgbImage>>,
    /// Each crop set's share of the training draws.
    pub shares: Vec<f64>,
    /// Class of each training photo.
    pub train: Vec<(usize, i64)>,
    /// Photo index and true id (`new_individual` when its animal is not trained on).
    pub val: Vec<(usize, String)>,
    pub classes: Vec<String>,
    pub class_counts: Vec<usize>,
    /// Each training individual's species.
    pub species_of: HashMap<String, String>,
    /// The species of each validation photo (of `val`).
    pub val_species: Vec<String>,
}

impl Photos {
    pub fn len(&self) -> usize {
        self.views[0].len()
    }

    /// The photo as validated and predicted: its crop of the first set.
    pub fn eval_view(&self, photo: usize) -> RgbImage {
        self.views[0][photo].clone()
    }

    /// The photo for training draw `draw`: a crop set drawn by the shares.
    pub fn train_view(&self, photo: usize, draw: u64) -> RgbImage {
        let set = match self.views.len() {
            1 => 0,
            _ => crop_sets::draw(&self.shares, &mut item_rng(draw, photo as u64)),
        };
        self.views[set][photo].clone()
    }

    /// What trains and what validates, in words.
    pub fn describe(&self) -> String {
        let unseen = self.val.iter().filter(|(_, t)| t == NEW_INDIVIDUAL).count();
        format!(
            "{} photos of {} individuals, validating on {} queries ({} of known individuals, \
             across encounters where the photos have them; {unseen} of unseen ones)",
            self.train.len(),
            self.classes.len(),
            self.val.len(),
            self.val.len() - unseen,
        )
    }

    /// The run's outcome from its final `state`, the epoch it kept and that epoch's validation
    /// MAP@5, `started` when the run did.
    pub fn summary(
        &self,
        epochs: usize,
        state: &RunState,
        (kept_epoch, kept_map5): (usize, f64),
        started: Instant,
    ) -> TrainSummary {
        TrainSummary {
            epochs,
            best_epoch: state.best_epoch,
            best_map5: state.best_map5,
            kept_epoch,
            kept_map5,
            threshold: state.threshold,
            zero_shot_map5: state.zero_shot_map5,
            train_images: self.train.len(),
            val_images: self.val.len(),
            classes: self.classes.len(),
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// The photos of `cfg`'s fold split, each crop set's crop fitted to `size` as `cfg.fit` says
/// (padding of colour `fill`).
pub(super) fn load_photos(cfg: &TrainConfig, size: ImgSize, fill: [u8; 3]) -> Result<Photos> {
    let labelled = cfg.data.read()?;
    let set = labelled.set;
    anyhow::ensure!(cfg.folds >= 2, "--folds must be at least 2");
    anyhow::ensure!(
        cfg.fold < cfg.folds,
        "--fold {} is not below --folds {}",
        cfg.fold,
        cfg.folds
    );
    let assignments = assign_folds(&set.rows, cfg.folds, cfg.new_share, cfg.seed);
    let s = split(&assignments, cfg.fold);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &s.train {
        *counts.entry(&set.rows[i].individual_id).or_default() += 1;
    }
    let classes: Vec<String> = counts.keys().map(|s| s.to_string()).collect();
    let class_of: BTreeMap<&str, i64> = counts
        .keys()
        .enumerate()
        .map(|(c, &id)| (id, c as i64))
        .collect();

    let wanted: Vec<usize> = s.train.iter().chain(&s.val).copied().collect();
    let sets = load_sets(&cfg.crops)?;
    let bar = bar(wanted.len() as u64, "decoding photos");
    let decoded: Vec<Vec<RgbImage>> = wanted
        .par_iter()
        .map(|&i| {
            let name = &set.rows[i].image;
            let img = load_rgb(&labelled.image_dirs[i].join(name))?;
            bar.inc(1);
            Ok(sets
                .iter()
                .map(|c| fit_to(&c.apply(name, &img), size, cfg.fit, fill))
                .collect())
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    let mut views: Vec<Vec<RgbImage>> = vec![Vec::with_capacity(decoded.len()); sets.len()];
    for photo in decoded {
        for (view, img) in views.iter_mut().zip(photo) {
            view.push(img);
        }
    }
    let n_train = s.train.len();
    Ok(Photos {
        views,
        shares: sets.iter().map(|c| c.set.share).collect(),
        train: s
            .train
            .iter()
            .enumerate()
            .map(|(k, &i)| (k, class_of[set.rows[i].individual_id.as_str()]))
            .collect(),
        val: s
            .val
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let id = &set.rows[i].individual_id;
                let truth = if class_of.contains_key(id.as_str()) {
                    id.clone()
                } else {
                    NEW_INDIVIDUAL.to_string()
                };
                (n_train + k, truth)
            })
            .collect(),
        class_counts: counts.values().copied().collect(),
        val_species: s.val.iter().map(|&i| set.rows[i].species.clone()).collect(),
        species_of: s
            .train
            .iter()
            .map(|&i| {
                (
                    set.rows[i].individual_id.clone(),
                    set.rows[i].species.clone(),
                )
            })
            .collect(),
        classes,
    })
}
