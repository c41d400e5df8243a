//! Local features in a catalogue: each photo's keypoints and descriptors stored once, tagged
//! with how they were extracted (photos of other settings are extracted again); the
//! embedding's shortlist re-ranked by them; and the matches shown to the person who confirms.

use super::gallery::Near;
use super::{image_problem, invalid, not_found, Catalog, PhotoMatch};
use crate::decide::Candidate;
use crate::local::calibration::{rank_score, Calibration};
use crate::local::pairwise::Line;
use crate::local::{Features, IdentityScore, LocalArgs, Matcher};
use crate::model::whitening::Whitening;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use rayon::prelude::*;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;
use std::collections::HashMap;

/// How identify uses local features.
#[derive(Clone, Debug)]
pub struct LocalSearch {
    pub matcher: Matcher,
    /// How many of the embedding's nearest photos are re-scored.
    pub shortlist: usize,
    /// With a calibration, individuals rank by the fused probability and its threshold decides
    /// `new_individual`; without, by verified votes, the embedding's threshold deciding.
    pub calibration: Option<Calibration>,
    /// `--local-whitening`'s power, for a whitening fitted on the catalogue when no
    /// calibration brings one.
    pub whitening_power: f32,
    /// The whitening every matched photo's descriptors pass through: the calibration's (its
    /// scores were fitted through it), else one fitted on the catalogue's descriptors by
    /// [`Catalog::attach_local`].
    whitening: Option<Whitening>,
}

impl LocalSearch {
    /// Local matching as `args` say, with `calibration` (checked by the caller) and its
    /// whitening.
    pub fn new(args: &LocalArgs, calibration: Option<Calibration>) -> Result<LocalSearch> {
        Ok(LocalSearch {
            matcher: args.matcher()?,
            shortlist: args.shortlist,
            whitening: calibration.as_ref().and_then(|c| c.whitening.clone()),
            calibration,
            whitening_power: args.local_whitening,
        })
    }

    /// The whitening matched descriptors pass through, if any.
    pub fn whitening(&self) -> Option<&Whitening> {
        self.whitening.as_ref()
    }
}

/// Catalogue photos a whitening is fitted on, at most, spread evenly over their names (about
/// 1,000 keypoints each: [`crate::local::WHITENING_ROWS`] descriptors).
const WHITENING_PHOTOS: usize = 200;

/// What extracting a catalogue's missing local features did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Photos whose features were extracted.
    pub extracted: usize,
    /// Photos that could not be decoded, as `NAME: why`; tried again on the next start.
    pub unusable: Vec<String>,
    /// Photos a whitening was fitted on here (0: none fitted).
    pub whitened_on: usize,
}

/// How a candidate's best photo matched the query's marks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LocalMatch {
    /// The catalogue photo that matched best.
    pub image: String,
    /// Its correspondences that agree with one affine map.
    pub inliers: usize,
    /// Their LNBNN votes, the local score.
    pub verified: f32,
}

/// The verified matches between two photos, for a person to check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Matches {
    pub query: String,
    pub photo: String,
    /// How many lines there are.
    pub verified: usize,
    pub lines: Vec<Line>,
}

/// A candidate as re-ranked: its individual and score, its photos, how it matched locally.
pub(super) type Ranked = (Candidate, Vec<PhotoMatch>, Option<LocalMatch>);

/// The tag stored with features: the extraction settings as JSON.
fn tag(matcher: &Matcher) -> Result<String> {
    Ok(serde_json::to_string(&matcher.extraction())?)
}

pub(super) fn store_features(
    conn: &Connection,
    image: &str,
    tag: &str,
    f: &Features,
) -> Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO local_features (image, extraction, features) VALUES (?1, ?2, ?3)",
        params![image, tag, f.to_bytes()],
    )?;
    Ok(())
}

/// The features of `image` stored with `tag`, `None` when there are none; an error naming the
/// photo when they cannot be read.
pub(super) fn stored_features(
    conn: &Connection,
    image: &str,
    tag: &str,
) -> Result<Option<Features>> {
    let blob: Option<Vec<u8>> = conn
        .query_row(
            "SELECT features FROM local_features WHERE image = ?1 AND extraction = ?2",
            params![image, tag],
            |r| r.get(0),
        )
        .optional()?;
    blob.map(|b| {
        Features::from_bytes(&b).with_context(|| format!("the stored local features of {image}"))
    })
    .transpose()
}

impl Catalog {
    /// Re-rank identifications by local features: photos without features of `local`'s
    /// settings are extracted, one bounded batch at a time, and stored.
    pub fn attach_local(
        &mut self,
        local: LocalSearch,
        progress: &ProgressBar,
    ) -> Result<Extracted> {
        let tag = tag(&local.matcher)?;
        let missing = self.photos_without("local_features", "extraction", &tag)?;
        progress.set_length(missing.len() as u64);
        let mut count = 0;
        let unusable = self.in_batches(&missing, progress, |batch| {
            let features: Vec<Features> = batch
                .par_iter()
                .map(|(_, img)| local.matcher.extract(img))
                .collect();
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for ((name, _), f) in batch.iter().zip(&features) {
                store_features(&tx, name, &tag, f)?;
            }
            tx.commit()?;
            count += batch.len();
            Ok(())
        })?;
        let mut local = local;
        let mut whitened_on = 0;
        if local.calibration.is_none() && local.whitening_power > 0.0 {
            if let Some((w, photos)) = self.fit_whitening(&tag, local.whitening_power)? {
                (local.whitening, whitened_on) = (Some(w), photos);
            }
        }
        self.local = Some(local);
        Ok(Extracted {
            extracted: count,
            unusable,
            whitened_on,
        })
    }

    /// A whitening of `power` fitted on the stored features (`tag`) of at most
    /// [`WHITENING_PHOTOS`] catalogue photos spread evenly, and how many; `None` for a
    /// catalogue with too few keypoints ([`crate::local::fit_whitening`]; tried again at the
    /// next start).
    fn fit_whitening(&self, tag: &str, power: f32) -> Result<Option<(Whitening, usize)>> {
        let names: Vec<String> = {
            let conn = self.conn();
            let mut st = conn
                .prepare("SELECT image FROM local_features WHERE extraction = ?1 ORDER BY image")?;
            let rows = st.query_map([tag], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let step = names.len().div_ceil(WHITENING_PHOTOS).max(1);
        let mut photos = Vec::new();
        for name in names.iter().step_by(step) {
            // Unreadable features are named and left out (extracted again when matched).
            match stored_features(&self.conn(), name, tag) {
                Ok(Some(f)) => photos.push(f),
                Ok(None) => {}
                Err(e) => eprintln!("finprint: {e:#}; left out of the whitening"),
            }
        }
        let w = crate::local::fit_whitening(&photos.iter().collect::<Vec<_>>(), power)
            .context("the catalogue's local features")?;
        Ok(w.map(|w| (w, photos.len())))
    }

    pub fn local(&self) -> Option<&LocalSearch> {
        self.local.as_ref()
    }

    /// The local features of a catalogue photo by `matcher`: as stored, else (none stored with
    /// its settings, or unreadable) extracted and stored.
    pub fn features_of(&self, image: &str, matcher: &Matcher) -> Result<Features> {
        let tag = tag(matcher)?;
        match stored_features(&self.conn(), image, &tag) {
            Ok(Some(f)) => return Ok(f),
            Ok(None) => {}
            Err(e) => eprintln!("finprint: {e:#}; extracting them again"),
        }
        let rgb = crate::data::image::load_rgb(&self.images_dir().join(image))
            .map_err(|e| invalid(format!("{image}: {}", image_problem(&e))))?;
        let f = matcher.extract(&rgb);
        store_features(&self.conn(), image, &tag, &f)?;
        Ok(f)
    }

    /// The verified matches between two photos of the catalogue (`query` usually a pending
    /// upload, `photo` a candidate's), by the local matcher attached, else by the default
    /// settings (extracted on demand and kept).
    pub fn matches(&self, query: &str, photo: &str) -> Result<Matches> {
        for name in [query, photo] {
            let known = super::is_safe_name(name)
                && self
                    .conn()
                    .query_row("SELECT 1 FROM photos WHERE image = ?1", [name], |_| Ok(()))
                    .optional()?
                    .is_some();
            if !known {
                return Err(not_found(format!("no photo '{name}' in the catalogue")));
            }
        }
        let matcher = match &self.local {
            Some(l) => l.matcher.clone(),
            None => LocalArgs::default().matcher()?,
        };
        let lines = matcher.pairwise(
            &self.features_of(query, &matcher)?,
            &self.features_of(photo, &matcher)?,
        );
        Ok(Matches {
            query: query.to_string(),
            photo: photo.to_string(),
            verified: lines.len(),
            lines,
        })
    }

    /// The best `top` individuals for the query photo `image` (embedding `query`): the
    /// embedding's shortlist re-scored by `local`, each individual ranked by its best photo;
    /// individuals found only beyond the shortlist follow, by the embedding.
    pub(super) fn rerank(
        &self,
        local: &LocalSearch,
        image: &str,
        query: &[f32],
        top: usize,
        photos_each: usize,
    ) -> Result<Vec<Ranked>> {
        let gallery = || self.gallery.read().unwrap_or_else(|e| e.into_inner());
        let shortlist: Vec<Near> = match gallery().as_ref() {
            Some(g) => g.nearest(query, local.shortlist)?,
            None => anyhow::bail!("no search index"),
        };
        if shortlist.is_empty() {
            return Ok(Vec::new());
        }
        // A catalogue photo that cannot be read any more is logged and matches nothing.
        let features: Vec<Features> = shortlist
            .iter()
            .map(|p| {
                self.features_of(&p.image, &local.matcher)
                    .unwrap_or_else(|e| {
                        eprintln!("finprint: {e:#}; matched without local features");
                        Features::default()
                    })
            })
            .collect();
        let mut own = self.features_of(image, &local.matcher)?;
        // With a whitening, every matched photo's descriptors pass through it.
        let features = match local.whitening() {
            Some(w) => {
                own = own.whitened(w)?;
                features
                    .iter()
                    .map(|f| f.whitened(w))
                    .collect::<Result<Vec<_>>>()?
            }
            None => features,
        };
        let scores = local
            .matcher
            .rescore(&own, &features.iter().collect::<Vec<_>>());
        let fusion = local.calibration.as_ref().map(|c| &c.fusion);
        // Each individual's best photo (by the ranking score), its score and best cosine.
        let mut best: HashMap<&str, (usize, f32, f32)> = HashMap::new();
        // A calibration fitted for another identity score says how an individual's photos
        // combine; the best photo's needs nothing more.
        let combine = local
            .calibration
            .as_ref()
            .map(|c| c.identity_score)
            .filter(|&s| s != IdentityScore::Best);
        let mut photos: HashMap<&str, Vec<f32>> = HashMap::new();
        for (i, (p, s)) in shortlist.iter().zip(&scores).enumerate() {
            let key = rank_score(fusion, p.cosine, s.verified);
            if combine.is_some() {
                photos.entry(&p.id).or_default().push(key);
            }
            let e = best.entry(&p.id).or_insert((i, key, p.cosine));
            if key > e.1 {
                (e.0, e.1) = (i, key);
            }
            e.2 = e.2.max(p.cosine);
        }
        if let Some(how) = combine {
            for (id, e) in best.iter_mut() {
                e.1 = how.aggregation().combine(&photos[id]);
            }
        }
        let mut order: Vec<(&str, (usize, f32, f32))> = best.into_iter().collect();
        order.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1).then(a.0.cmp(b.0)));
        order.truncate(top);
        let guard = gallery();
        let g = guard.as_ref().context("no search index")?;
        let mut ranked: Vec<Ranked> = order
            .into_iter()
            .map(|(id, (i, key, cosine))| {
                let p = &shortlist[i];
                let mut photos = vec![PhotoMatch {
                    image: p.image.clone(),
                    score: p.cosine,
                }];
                photos.extend(
                    g.photos_of(query, id, photos_each)
                        .into_iter()
                        .filter(|m| m.image != p.image),
                );
                photos.truncate(photos_each);
                let candidate = Candidate {
                    id: id.to_string(),
                    // What the threshold is compared with.
                    score: if fusion.is_some() { key } else { cosine },
                };
                let matched = LocalMatch {
                    image: p.image.clone(),
                    inliers: scores[i].inliers,
                    verified: scores[i].verified,
                };
                (candidate, photos, Some(matched))
            })
            .collect();
        if ranked.len() < top {
            for (mut c, photos) in g.rank(query, 2 * top, photos_each)? {
                if ranked.len() < top && !ranked.iter().any(|r| r.0.id == c.id) {
                    if let Some(f) = fusion {
                        let last = ranked.last().map_or(f32::INFINITY, |r| r.0.score);
                        c.score = f.probability(c.score, 0.0).min(last);
                    }
                    ranked.push((c, photos, None));
                }
            }
        }
        Ok(ranked)
    }
}
