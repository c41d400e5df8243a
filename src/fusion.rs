//! The embedding fused with local matching: every photo's local features (read from a features
//! file where they were stored), the re-scoring of a query's shortlist with what it costs, and
//! the calibration that makes cosines and verified votes comparable probabilities, fitted by
//! leave-one-out over labelled photos of animals that are not the ones identified.

use crate::crossval::{leave_one_out, Protocol, Rescorer};
use crate::local::calibration::{rank_score, Calibration, Fusion};
use crate::local::{self, store, Features, LocalArgs, Matcher};
use crate::model::whitening::Whitening;
use crate::search::Aggregation;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The local features of a set of photos, and the matcher that compares them.
pub struct LocalScores {
    matcher: Matcher,
    features: Vec<Features>,
    /// Photos extracted (not read from the features file) and the nanoseconds (on one core)
    /// that took; re-scoring's nanoseconds with the count of queries.
    extracted: usize,
    extract_ns: u64,
    rescore_ns: AtomicU64,
    rescored: AtomicU64,
}

impl LocalScores {
    /// The features of `names` in `images`: read from `file` where it holds them (extracted
    /// with the same settings), extracted otherwise and then stored there.
    pub fn extract(
        args: &LocalArgs,
        file: Option<&Path>,
        images: &Path,
        names: &[String],
        progress: &ProgressBar,
    ) -> Result<Self> {
        let matcher = args.matcher()?;
        progress.reset();
        progress.set_length(names.len() as u64);
        progress.set_message("local features");
        let spent = AtomicU64::new(0);
        let (features, extracted) = store::cached(file, &matcher.extraction(), names, |i| {
            let start = Instant::now();
            let image = crate::data::image::load_rgb(&images.join(&names[i]))?;
            let features = matcher.extract(&image);
            progress.inc(1);
            spent.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            Ok(features)
        })?;
        Ok(LocalScores {
            matcher,
            features,
            extracted,
            extract_ns: spent.into_inner(),
            rescore_ns: AtomicU64::new(0),
            rescored: AtomicU64::new(0),
        })
    }

    /// `self`'s photos followed by `other`'s (a catalogue and the photos that query it).
    pub fn append(&mut self, other: LocalScores) {
        self.features.extend(other.features);
        self.extracted += other.extracted;
        self.extract_ns += other.extract_ns;
    }

    /// The photos `rows` of this set, in that order.
    pub fn select(&self, rows: &[usize]) -> LocalScores {
        LocalScores {
            matcher: self.matcher.clone(),
            features: rows.iter().map(|&i| self.features[i].clone()).collect(),
            extracted: 0,
            extract_ns: 0,
            rescore_ns: AtomicU64::new(0),
            rescored: AtomicU64::new(0),
        }
    }

    /// These photos with their descriptors whitened ([`Features::whitened`]).
    pub fn whitened(mut self, whitening: &Whitening) -> Result<LocalScores> {
        self.features
            .par_iter_mut()
            .try_for_each(|f| -> Result<()> {
                *f = f.whitened(whitening)?;
                Ok(())
            })?;
        Ok(self)
    }

    /// The PCA whitening of these photos' descriptors with `power` ([`local::fit_whitening`]).
    pub fn fit_whitening(&self, power: f32) -> Result<Option<Whitening>> {
        local::fit_whitening(&self.features.iter().collect::<Vec<_>>(), power)
    }

    pub fn len(&self) -> usize {
        self.features.len()
    }

    pub fn is_empty(&self) -> bool {
        self.features.is_empty()
    }

    /// The shortlisted photos' verified LNBNN votes against the query (rows of this set).
    pub fn rescore(&self, query: usize, shortlist: &[(usize, f32)]) -> Vec<f32> {
        let start = Instant::now();
        let gallery: Vec<&Features> = shortlist.iter().map(|&(j, _)| &self.features[j]).collect();
        let scores = self
            .matcher
            .rescore(&self.features[query], &gallery)
            .into_iter()
            .map(|m| m.verified)
            .collect();
        let elapsed = start.elapsed().as_nanos() as u64;
        self.rescore_ns.fetch_add(elapsed, Ordering::Relaxed);
        self.rescored.fetch_add(1, Ordering::Relaxed);
        scores
    }

    /// The scores a shortlist is ranked by: the fused probability with a calibration, else the
    /// verified votes (ties, no verified match, keep the embedding's order).
    pub fn scores(
        &self,
        fusion: Option<&Fusion>,
        query: usize,
        shortlist: &[(usize, f32)],
    ) -> Vec<f32> {
        let verified = self.rescore(query, shortlist);
        shortlist
            .iter()
            .zip(verified)
            .map(|(&(_, cos), v)| rank_score(fusion, cos, v))
            .collect()
    }

    pub fn cost(&self, shortlist: usize) -> LocalCost {
        let photos = self.features.len().max(1) as f64;
        let keypoints = self.features.iter().map(Features::len).sum::<usize>() as f64 / photos;
        LocalCost {
            shortlist,
            keypoints,
            bytes_per_photo: keypoints * store::keypoint_bytes(self.matcher.dim()) as f64,
            extracted: self.extracted,
            extract_ms: self.extract_ns as f64 / 1e6 / self.extracted.max(1) as f64,
            rescore_ms: self.rescore_ns.load(Ordering::Relaxed) as f64
                / 1e6
                / self.rescored.load(Ordering::Relaxed).max(1) as f64,
        }
    }
}

/// What local features cost, on one core.
#[derive(Clone, Debug, Serialize)]
pub struct LocalCost {
    pub shortlist: usize,
    /// Mean keypoints kept per photo, and the bytes they take stored (positions in f32,
    /// descriptors in f16).
    pub keypoints: f64,
    pub bytes_per_photo: f64,
    /// Photos whose features were extracted (the others were read from the features file),
    /// and the mean milliseconds each took to decode and extract.
    pub extracted: usize,
    pub extract_ms: f64,
    /// Mean milliseconds to re-score one query's shortlist (LNBNN and RANSAC).
    pub rescore_ms: f64,
}

/// Fit the fusion of the embedding with local matching on labelled photos of calibration
/// animals: every photo queries the others as `protocol` says (its `rescore` is replaced),
/// each shortlisted photo gives a pair (cosine, verified votes, same individual); then the
/// `new_individual` threshold on the fused probability that is best on the same queries, for
/// identities scored as `args.identity_score` says. With `--local-whitening`, the descriptors
/// are whitened first (in place: `local` is taken) by a whitening fitted on these photos,
/// which the calibration keeps.
/// `emb` and `local` hold the same photos, identities `ids`; `args` gives the shortlist's
/// length.
pub fn calibrate(
    local: LocalScores,
    emb: &[f32],
    dim: usize,
    ids: &[String],
    protocol: &Protocol,
    args: &LocalArgs,
    model: String,
) -> Result<Calibration> {
    let (shortlist, identity) = (args.shortlist, args.identity_score);
    let whitening = local.fit_whitening(args.local_whitening)?;
    let local = match &whitening {
        Some(w) => local.whitened(w)?,
        None => local,
    };
    let local = &local;
    let pairs = Mutex::new(Vec::new());
    let verified_of = Mutex::new(HashMap::new());
    let record = |query: usize, short: &[(usize, f32)]| {
        let verified = local.rescore(query, short);
        let mut found: Vec<(f32, f32, bool)> = short
            .iter()
            .zip(&verified)
            .map(|(&(j, cos), &v)| (cos, v, ids[j] == ids[query]))
            .collect();
        pairs
            .lock()
            .expect("no panic while held")
            .append(&mut found);
        verified_of
            .lock()
            .expect("no panic while held")
            .insert(query, verified.clone());
        verified
    };
    let recording = Rescorer {
        shortlist,
        aggregation: Aggregation::Max,
        score: &record,
    };
    leave_one_out(
        emb,
        dim,
        ids,
        &Protocol {
            rescore: Some(&recording),
            ..*protocol
        },
    )?;
    let pairs = pairs.into_inner().expect("no panic while held");
    let fusion = Fusion::fit(&pairs)
        .context("the calibration needs shortlisted pairs of the same and of different animals")?;
    let verified_of = verified_of.into_inner().expect("no panic while held");
    let fused = |query: usize, short: &[(usize, f32)]| {
        short
            .iter()
            .zip(&verified_of[&query])
            .map(|(&(_, cos), &v)| fusion.probability(cos, v))
            .collect()
    };
    let report = leave_one_out(
        emb,
        dim,
        ids,
        &Protocol {
            rescore: Some(&Rescorer {
                shortlist,
                aggregation: identity.aggregation(),
                score: &fused,
            }),
            ..*protocol
        },
    )?;
    Ok(Calibration {
        model,
        extraction: local.matcher.extraction(),
        shortlist,
        lnbnn_k: local.matcher.k,
        score: local.matcher.score,
        identity_score: identity,
        geometry: local.matcher.ransac.geometry,
        max_rotation: local.matcher.ransac.max_rotation,
        position_weight: local.matcher.position_weight,
        whitening_power: args.local_whitening,
        whitening,
        fusion,
        threshold: report.best_threshold,
        photos: ids.len(),
        map5: report.best_map5,
    })
}
