//! From ranked individuals to answers: `new_individual` inserted by a similarity threshold, and
//! the threshold chosen on validation queries to maximise MAP@5.

use crate::crops::sets::{load_sets, CropSet, LoadedCropSet};
use crate::data::image::{list_photos, load_rgb};
use crate::data::{read_train_csv, KaggleDir, Prediction, NEW_INDIVIDUAL};
use crate::embed::{fuse, Ensemble};
use crate::metrics::{average_precision_at_5, K};
use crate::model::happywhale::HappyWhaleModel;
use crate::search::{rank_labels, Aggregation, FlatIndex, Index, Storage};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::Tensor;

/// One candidate individual for a query, with its similarity (higher is more alike).
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub score: f32,
}

/// The best `top` individuals for each query (row-major `queries`), best first, from a catalogue
/// index whose row `i` shows individual `ids[labels[i]]`.
pub fn rank_candidates(
    index: &dyn Index,
    labels: &[u32],
    ids: &[String],
    queries: &[f32],
    how: Aggregation,
    top: usize,
) -> anyhow::Result<Vec<Vec<Candidate>>> {
    // Enough photos that `top` distinct individuals are almost always among them.
    let k = (top * 20).max(100).min(index.len());
    let found = index.search(queries, k)?;
    Ok(found
        .iter()
        .map(|neighbors| {
            rank_labels(neighbors, labels, how, top)
                .into_iter()
                .map(|(label, score)| Candidate {
                    id: ids[label as usize].clone(),
                    score,
                })
                .collect()
        })
        .collect())
}

/// The five answers for a query whose candidates are sorted best first: `new_individual` takes
/// the place where the similarity falls below `threshold` (first, when even the best is below).
pub fn answers(candidates: &[Candidate], threshold: f32) -> Vec<String> {
    let mut out = Vec::with_capacity(K);
    let mut new_placed = false;
    for c in candidates {
        if out.len() == K {
            break;
        }
        if !new_placed && c.score < threshold {
            out.push(NEW_INDIVIDUAL.to_string());
            new_placed = true;
            if out.len() == K {
                break;
            }
        }
        if c.id != NEW_INDIVIDUAL {
            out.push(c.id.clone());
        }
    }
    if !new_placed && out.len() < K {
        out.push(NEW_INDIVIDUAL.to_string());
    }
    out
}

/// The threshold that maximises MAP@5 over validation queries (candidates, true id), among the
/// candidates' own scores and the values just above them (the only places where the answers
/// change: the lowest score never puts new_individual before a candidate, just above the
/// highest always does); ties go to the lowest threshold. Always finite, so it saves to JSON.
/// Returns (threshold, MAP@5).
pub fn best_threshold(queries: &[(Vec<Candidate>, String)]) -> (f32, f64) {
    if queries.is_empty() {
        return (0.0, 0.0);
    }
    let mut grid: Vec<f32> = queries
        .iter()
        .flat_map(|(c, _)| c.iter().take(K).map(|c| c.score))
        .filter(|s| s.is_finite())
        .chain([0.0])
        .collect();
    // A threshold just above a score puts new_individual before that candidate.
    let above: Vec<f32> = grid.iter().map(|s| s.next_up()).collect();
    grid.extend(above);
    grid.sort_by(f32::total_cmp);
    grid.dedup();
    let map_at = |t: f32| {
        queries
            .iter()
            .map(|(c, truth)| average_precision_at_5(truth, &answers(c, t)))
            .sum::<f64>()
            / queries.len() as f64
    };
    grid.into_iter()
        .map(|t| (t, map_at(t)))
        .fold((f32::NEG_INFINITY, -1.0), |best, x| {
            if x.1 > best.1 {
                x
            } else {
                best
            }
        })
}

/// The threshold under which a `share` of the queries' best scores fall: the winners' fixed
/// share of `new_individual` first.
pub fn threshold_for_new_share(best_scores: &[f32], share: f64) -> f32 {
    if best_scores.is_empty() {
        return 0.0;
    }
    let mut s = best_scores.to_vec();
    s.sort_by(f32::total_cmp);
    let n = ((share.clamp(0.0, 1.0) * s.len() as f64).round() as usize).min(s.len());
    if n == 0 {
        f32::NEG_INFINITY
    } else if n == s.len() {
        f32::INFINITY
    } else {
        // Between the n-th and (n+1)-th lowest best score.
        (s[n - 1] + s[n]) / 2.0
    }
}

/// Queries of a species below which it keeps the global threshold (too few to choose one).
pub const MIN_SPECIES_QUERIES: usize = 20;

/// new_individual thresholds: one global, and per species where validation had enough queries.
/// A query's species is that of its best candidate, since test photos carry no species.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub global: f32,
    #[serde(default)]
    pub by_species: BTreeMap<String, f32>,
}

impl Thresholds {
    pub fn global(t: f32) -> Self {
        Self {
            global: t,
            by_species: BTreeMap::new(),
        }
    }

    /// The threshold for a query whose best candidate is of `species`.
    pub fn for_species(&self, species: Option<&str>) -> f32 {
        species
            .and_then(|s| self.by_species.get(s))
            .copied()
            .unwrap_or(self.global)
    }

    /// The answers of a query: `species_of` maps an individual to its species.
    pub fn answers(
        &self,
        candidates: &[Candidate],
        species_of: &HashMap<String, String>,
    ) -> Vec<String> {
        let species = candidates
            .first()
            .and_then(|c| species_of.get(&c.id))
            .map(String::as_str);
        answers(candidates, self.for_species(species))
    }
}

impl From<&Ensemble> for Thresholds {
    fn from(e: &Ensemble) -> Self {
        Self {
            global: e.threshold,
            by_species: e.species_thresholds.clone(),
        }
    }
}

/// The `top` best classes of the models' ArcFace heads for each row of `fused` (row-major
/// `[count, Σ dims]`, the ensemble's fused unit embeddings), the class cosines averaged with
/// the squared model weights `weights` (as the fused cosine averages the models' cosines); rows
/// may go on past the models' dimensions (other crop sets), which are ignored, as are members
/// without a head (pretrained features). `None` when no model has a head or those with one do
/// not share one class list.
pub fn head_candidates(
    models: &[&HappyWhaleModel],
    weights: &[f32],
    fused: &[f32],
    count: usize,
    top: usize,
) -> anyhow::Result<Option<Vec<Vec<Candidate>>>> {
    let Some(first) = models
        .iter()
        .find(|m| m.has_head())
        .map(|m| &m.config.classes)
    else {
        return Ok(None);
    };
    if count == 0
        || models
            .iter()
            .any(|m| m.has_head() && &m.config.classes != first)
    {
        return Ok(None);
    }
    let dim = fused.len() / count;
    let rows = Tensor::from_slice(fused).view([count as i64, dim as i64]);
    let mut total: Option<Tensor> = None;
    let mut offset = 0;
    let with_head = || models.iter().zip(weights).filter(|(m, _)| m.has_head());
    let norm: f32 = with_head().map(|(_, w)| w * w).sum();
    for (m, &w) in models.iter().zip(weights) {
        let d = m.config.embedding_size;
        let part = rows.narrow(1, offset, d).to_device(m.vs.device());
        offset += d;
        if !m.has_head() {
            continue;
        }
        let cos = tch::no_grad(|| m.head().cosine(&part)).to_device(tch::Device::Cpu)
            * f64::from(w * w / norm);
        total = Some(match total {
            Some(t) => t + cos,
            None => cos,
        });
    }
    let total = total.expect("an ensemble has a model");
    let k = (top as i64).min(first.len() as i64);
    let (values, indices) = total.topk(k, 1, true, true);
    let values = Vec::<f32>::try_from(values.contiguous().view([-1]))?;
    let indices = Vec::<i64>::try_from(indices.contiguous().view([-1]))?;
    let k = k as usize;
    Ok(Some(
        (0..count)
            .map(|q| {
                (0..k)
                    .map(|j| Candidate {
                        id: first[indices[q * k + j] as usize].clone(),
                        score: values[q * k + j],
                    })
                    .collect()
            })
            .collect(),
    ))
}

/// The global threshold that maximises MAP@5 over all validation queries, and for each species
/// with at least `min_queries` queries (by its best candidate's species) the one that maximises
/// it over that species' queries. Returns the thresholds and the MAP@5 they give together.
pub fn best_thresholds(
    queries: &[(Vec<Candidate>, String)],
    species_of: &HashMap<String, String>,
    min_queries: usize,
) -> (Thresholds, f64) {
    let (global, _) = best_threshold(queries);
    let mut by_group: BTreeMap<&str, Vec<(Vec<Candidate>, String)>> = BTreeMap::new();
    for q in queries {
        if let Some(s) = q.0.first().and_then(|c| species_of.get(&c.id)) {
            by_group.entry(s).or_default().push(q.clone());
        }
    }
    let by_species = by_group
        .into_iter()
        .filter(|(_, qs)| qs.len() >= min_queries)
        .map(|(s, qs)| (s.to_string(), best_threshold(&qs).0))
        .collect();
    let t = Thresholds { global, by_species };
    let map = queries
        .iter()
        .map(|(c, truth)| average_precision_at_5(truth, &t.answers(c, species_of)))
        .sum::<f64>()
        / queries.len().max(1) as f64;
    (t, map)
}

/// kNN and ArcFace-head scores blended per individual, `(1 − weight)·knn + weight·head`, best
/// first, the `top` best. `knn` and `head` are each a query's best candidates by that score;
/// an individual missing from one list takes that list's lowest score (an upper bound of its
/// own, which is below the list).
pub fn fuse_with_head(
    knn: &[Candidate],
    head: &[Candidate],
    weight: f32,
    top: usize,
) -> Vec<Candidate> {
    let floor = |list: &[Candidate]| list.iter().map(|c| c.score).fold(f32::INFINITY, f32::min);
    let (knn_floor, head_floor) = (floor(knn), floor(head));
    let knn_of: HashMap<&str, f32> = knn.iter().map(|c| (c.id.as_str(), c.score)).collect();
    let head_of: HashMap<&str, f32> = head.iter().map(|c| (c.id.as_str(), c.score)).collect();
    let mut ids: Vec<&str> = knn.iter().chain(head).map(|c| c.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut fused: Vec<Candidate> = ids
        .into_iter()
        .map(|id| {
            let k = knn_of.get(id).copied().unwrap_or(knn_floor);
            let h = head_of.get(id).copied().unwrap_or(head_floor);
            Candidate {
                id: id.to_string(),
                score: (1.0 - weight) * k + weight * h,
            }
        })
        .collect();
    fused.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.id.cmp(&b.id)));
    fused.truncate(top);
    fused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(list: &[(&str, f32)]) -> Vec<Candidate> {
        list.iter()
            .map(|&(id, score)| Candidate {
                id: id.into(),
                score,
            })
            .collect()
    }

    #[test]
    fn new_individual_takes_the_place_where_similarity_drops() {
        let c = cands(&[
            ("a", 0.9),
            ("b", 0.6),
            ("c", 0.5),
            ("d", 0.4),
            ("e", 0.3),
            ("f", 0.2),
        ]);
        assert_eq!(answers(&c, 0.55), ["a", "b", "new_individual", "c", "d"]);
        assert_eq!(answers(&c, 0.95), ["new_individual", "a", "b", "c", "d"]);
        assert_eq!(answers(&c, 0.1), ["a", "b", "c", "d", "e"]);
        // Fewer than five candidates: new_individual closes the list.
        assert_eq!(answers(&c[..2], 0.1), ["a", "b", "new_individual"]);
        assert_eq!(answers(&[], 0.5), ["new_individual"]);
    }

    #[test]
    fn the_best_threshold_is_found_on_a_hand_made_case() {
        // Query 1 is known (a, 0.8); query 2 is new (best 0.5); query 3 is known (b, 0.55).
        let q = vec![
            (cands(&[("a", 0.8), ("x", 0.3)]), "a".to_string()),
            (cands(&[("y", 0.5), ("z", 0.2)]), NEW_INDIVIDUAL.to_string()),
            (cands(&[("b", 0.55), ("w", 0.1)]), "b".to_string()),
        ];
        let (t, map) = best_threshold(&q);
        // Only a threshold in (0.5, 0.55] answers all three right.
        assert!((map - 1.0).abs() < 1e-12, "{map}");
        assert!(t > 0.5 && t <= 0.55, "{t}");
        let check: f64 = q
            .iter()
            .map(|(c, truth)| average_precision_at_5(truth, &answers(c, t)))
            .sum::<f64>()
            / 3.0;
        assert!((check - map).abs() < 1e-12);
    }

    #[test]
    fn the_best_threshold_is_finite_even_when_new_individual_belongs_first_everywhere() {
        let all_new = vec![
            (cands(&[("a", 0.9)]), NEW_INDIVIDUAL.to_string()),
            (cands(&[("b", 0.4)]), NEW_INDIVIDUAL.to_string()),
        ];
        let (t, map) = best_threshold(&all_new);
        assert!(t.is_finite() && t > 0.9, "{t}");
        assert!((map - 1.0).abs() < 1e-12);
        let all_known = vec![(cands(&[("a", -0.3)]), "a".to_string())];
        let (t, map) = best_threshold(&all_known);
        assert!(t.is_finite() && t <= -0.3, "{t}");
        assert!((map - 1.0).abs() < 1e-12);
    }

    #[test]
    fn per_species_thresholds_separate_what_one_threshold_cannot() {
        // Dolphins score high, belugas low: known dolphin 0.8, new dolphin 0.7, known beluga
        // 0.4, new beluga 0.3 (two queries each), species told by the best candidate.
        let species: HashMap<String, String> = [
            ("d1", "dolphin"),
            ("d2", "dolphin"),
            ("b1", "beluga"),
            ("b2", "beluga"),
        ]
        .iter()
        .map(|&(i, s)| (i.to_string(), s.to_string()))
        .collect();
        let mut q = Vec::new();
        for _ in 0..2 {
            q.push((cands(&[("d1", 0.8), ("d2", 0.1)]), "d1".to_string()));
            q.push((
                cands(&[("d2", 0.7), ("d1", 0.1)]),
                NEW_INDIVIDUAL.to_string(),
            ));
            q.push((cands(&[("b1", 0.4), ("b2", 0.1)]), "b1".to_string()));
            q.push((
                cands(&[("b2", 0.3), ("b1", 0.1)]),
                NEW_INDIVIDUAL.to_string(),
            ));
        }
        let (_, global_map) = best_threshold(&q);
        assert!(global_map < 0.95, "{global_map}");
        let (t, map) = best_thresholds(&q, &species, 2);
        assert!((map - 1.0).abs() < 1e-12, "{map}");
        let d = t.by_species["dolphin"];
        let b = t.by_species["beluga"];
        assert!(d > 0.7 && d <= 0.8, "{d}");
        assert!(b > 0.3 && b <= 0.4, "{b}");
        // Too few queries per species: the global threshold alone.
        let (t, m) = best_thresholds(&q, &species, 5);
        assert!(t.by_species.is_empty());
        assert!((m - global_map).abs() < 1e-12);
    }

    #[test]
    fn knn_and_head_scores_blend_per_individual() {
        let knn = cands(&[("a", 0.9), ("b", 0.8)]);
        let head = cands(&[("b", 0.9), ("c", 0.5)]);
        let fused = fuse_with_head(&knn, &head, 0.5, 5);
        let got: Vec<(&str, f32)> = fused.iter().map(|c| (c.id.as_str(), c.score)).collect();
        // a: (0.9 + 0.5 floor) / 2, b: (0.8 + 0.9) / 2, c: (0.8 floor + 0.5) / 2.
        let want = [("b", 0.85), ("a", 0.7), ("c", 0.65)];
        for ((id, s), (wid, ws)) in got.iter().zip(want) {
            assert_eq!(*id, wid);
            assert!((s - ws).abs() < 1e-6, "{id} {s}");
        }
        // Weight 0 is the kNN ranking; equal scores go to the lower id.
        let ids: Vec<String> = fuse_with_head(&knn, &head, 0.0, 2)
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["a", "b"]);
        let ids: Vec<String> = fuse_with_head(&knn, &head, 1.0, 1)
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(ids, ["b"]);
    }

    #[test]
    fn a_share_of_new_predictions_sets_the_threshold() {
        let best = [0.9, 0.2, 0.5, 0.7];
        let t = threshold_for_new_share(&best, 0.5);
        assert!((t - 0.6).abs() < 1e-6);
        assert_eq!(best.iter().filter(|&&s| s < t).count(), 2);
        assert_eq!(threshold_for_new_share(&best, 0.0), f32::NEG_INFINITY);
    }
}

/// Where `new_individual` goes in the answers.
#[derive(Clone, Debug, PartialEq)]
pub enum NewRule {
    /// Before the first candidate whose similarity is below the threshold (of its species).
    Threshold(Thresholds),
    /// First for this share of the queries, those whose best candidate is weakest (the
    /// winners' fixed share of new predictions).
    Share(f64),
}

/// A Kaggle submission for `test_images/` of `data`: every photo of `train.csv` is the
/// catalogue, ranked per individual by its best photo, `new_individual` by the threshold.
pub fn predict_submission(
    ensemble: &Ensemble,
    data: &KaggleDir,
    crops: &[CropSet],
    new_rule: &NewRule,
    batch: usize,
    flip_tta: bool,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Prediction>> {
    let train = read_train_csv(&data.train_csv())?;
    let tests = list_photos(&data.test_images())?;
    anyhow::ensure!(
        !train.rows.is_empty(),
        "{} lists no photo",
        data.train_csv().display()
    );
    let names: Vec<String> = train.rows.iter().map(|r| r.image.clone()).collect();
    let sets = load_sets(crops)?;
    progress.set_message("embedding the catalogue");
    let gallery = embed_crops(
        ensemble,
        &sets,
        &data.train_images(),
        &names,
        batch,
        flip_tta,
        progress,
    )?;
    progress.set_message("embedding the test photos");
    let queries = embed_crops(
        ensemble,
        &sets,
        &data.test_images(),
        &tests,
        batch,
        flip_tta,
        progress,
    )?;
    let mut ids: Vec<String> = train.rows.iter().map(|r| r.individual_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let labels: Vec<u32> = train
        .rows
        .iter()
        .map(|r| ids.binary_search(&r.individual_id).map_or(0, |i| i as u32))
        .collect();
    let mut index = FlatIndex::new(gallery.len() / names.len(), Storage::F32);
    index.add(&gallery)?;
    let knn = rank_candidates(
        &index,
        &labels,
        &ids,
        &queries,
        Aggregation::Max,
        FUSION_DEPTH,
    )?;
    let models: Vec<&HappyWhaleModel> = ensemble.models.iter().collect();
    let heads = if ensemble.fusion_weight > 0.0 {
        head_candidates(
            &models,
            &ensemble.weights,
            &queries,
            tests.len(),
            FUSION_DEPTH,
        )?
    } else {
        None
    };
    let ranked = fuse_all(knn, heads.as_deref(), ensemble.fusion_weight);
    let species_of: HashMap<String, String> = train
        .rows
        .iter()
        .map(|r| (r.individual_id.clone(), r.species.clone()))
        .collect();
    let thresholds = match new_rule {
        NewRule::Threshold(t) => t.clone(),
        NewRule::Share(share) => {
            let best: Vec<f32> = ranked
                .iter()
                .filter_map(|c| c.first().map(|c| c.score))
                .collect();
            Thresholds::global(threshold_for_new_share(&best, *share))
        }
    };
    Ok(tests
        .into_iter()
        .zip(ranked)
        .map(|(image, c)| Prediction {
            image,
            ids: thresholds.answers(&c, &species_of),
        })
        .collect())
}

/// Unit embeddings of the photos `names` in `dir`: the ensemble's embedding of each crop set's
/// crop, fused with the sets' shares as weights.
pub fn embed_crops(
    ensemble: &Ensemble,
    sets: &[LoadedCropSet],
    dir: &Path,
    names: &[String],
    batch: usize,
    flip_tta: bool,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<f32>> {
    let mut parts = Vec::with_capacity(sets.len());
    for set in sets {
        let load = |i: usize| Ok(set.apply(&names[i], &load_rgb(&dir.join(&names[i]))?));
        parts.push(ensemble.embed(names.len(), load, batch, flip_tta, progress)?);
    }
    let weights: Vec<f32> = sets.iter().map(|s| s.set.share as f32).collect();
    Ok(fuse(&parts, &weights, names.len()))
}

/// Candidates kept per query before blending kNN and head scores.
pub const FUSION_DEPTH: usize = 20;

/// The five candidates of each query: kNN scores blended with the heads' (`fuse_with_head`)
/// where `heads` are given and `weight` is positive, the kNN ranking alone otherwise.
pub fn fuse_all(
    knn: Vec<Vec<Candidate>>,
    heads: Option<&[Vec<Candidate>]>,
    weight: f32,
) -> Vec<Vec<Candidate>> {
    match heads {
        Some(heads) if weight > 0.0 => knn
            .iter()
            .zip(heads)
            .map(|(k, h)| fuse_with_head(k, h, weight, K))
            .collect(),
        _ => knn
            .into_iter()
            .map(|mut c| {
                c.truncate(K);
                c
            })
            .collect(),
    }
}

/// Head weights tried on validation.
pub const FUSION_WEIGHTS: [f32; 5] = [0.0, 0.25, 0.5, 0.75, 1.0];

/// The blend weight of kNN and head scores that maximises MAP@5 (with its best global
/// threshold) over validation queries; the lowest weight among equals. Returns the weight and
/// the MAP@5 of every weight tried.
pub fn choose_fusion_weight(
    knn: &[Vec<Candidate>],
    heads: &[Vec<Candidate>],
    truths: &[String],
) -> (f32, Vec<(f32, f64)>) {
    let tried: Vec<(f32, f64)> = FUSION_WEIGHTS
        .iter()
        .map(|&w| {
            let ranked = fuse_all(knn.to_vec(), Some(heads), w);
            let queries: Vec<_> = ranked.into_iter().zip(truths.iter().cloned()).collect();
            (w, best_threshold(&queries).1)
        })
        .collect();
    let best = tried.iter().fold(
        (0.0, f64::NEG_INFINITY),
        |b, &(w, m)| if m > b.1 { (w, m) } else { b },
    );
    (best.0, tried)
}

/// Leave-one-out identification over a labelled set.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LooReport {
    pub queries: usize,
    /// Queries whose identity has another photo to be found by.
    pub known_queries: usize,
    /// Over the known queries, ranking identities only: top-1, top-5 and MAP@5.
    pub top1: f64,
    pub top5: f64,
    pub map5_known: f64,
    /// Over all queries, `new_individual` inserted at `threshold` (truth for lone photos).
    pub map5: f64,
    pub threshold: f32,
    /// The threshold that would have been best here, and its MAP@5 (an optimistic bound).
    pub best_threshold: f32,
    pub best_map5: f64,
    /// Each known query's row in `ids` and the rank of its true identity among its first
    /// five candidates (`None` when not among them): what `bootstrap` resamples.
    #[serde(skip)]
    pub known_ranks: Vec<(usize, Option<usize>)>,
}

/// Query every photo against all the others (of the same group, when `groups` is given):
/// `emb` is row-major `[ids.len(), dim]` unit vectors.
pub fn leave_one_out(
    emb: &[f32],
    dim: usize,
    ids: &[String],
    groups: Option<&[String]>,
    threshold: f32,
) -> anyhow::Result<LooReport> {
    let n = ids.len();
    anyhow::ensure!(n > 1, "leave-one-out needs at least two photos, got {n}");
    let mut members: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        members
            .entry(groups.map_or("", |g| g[i].as_str()))
            .or_default()
            .push(i);
    }
    let mut queries: Vec<(Vec<Candidate>, String)> = vec![(Vec::new(), String::new()); n];
    for rows in members.values() {
        let mut names: Vec<String> = rows.iter().map(|&i| ids[i].clone()).collect();
        names.sort();
        names.dedup();
        let labels: Vec<u32> = rows
            .iter()
            .map(|&i| names.binary_search(&ids[i]).map_or(0, |x| x as u32))
            .collect();
        let vectors: Vec<f32> = rows
            .iter()
            .flat_map(|&i| emb[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let mut index = FlatIndex::new(dim, Storage::F32);
        index.add(&vectors)?;
        let k = (K * 20 + 1).max(101).min(rows.len());
        let found = index.search(&vectors, k)?;
        let mut count: HashMap<&str, usize> = HashMap::new();
        rows.iter()
            .for_each(|&i| *count.entry(ids[i].as_str()).or_default() += 1);
        for (local, neighbors) in found.into_iter().enumerate() {
            let others: Vec<_> = neighbors
                .into_iter()
                .filter(|nb| nb.id as usize != local)
                .collect();
            let candidates = rank_labels(&others, &labels, Aggregation::Max, K)
                .into_iter()
                .map(|(l, score)| Candidate {
                    id: names[l as usize].clone(),
                    score,
                })
                .collect();
            let i = rows[local];
            let truth = if count[ids[i].as_str()] > 1 {
                ids[i].clone()
            } else {
                NEW_INDIVIDUAL.to_string()
            };
            queries[i] = (candidates, truth);
        }
    }
    let known: Vec<&(Vec<Candidate>, String)> = queries
        .iter()
        .filter(|(_, t)| t != NEW_INDIVIDUAL)
        .collect();
    let rank_of = |(c, t): &(Vec<Candidate>, String)| c.iter().position(|x| &x.id == t);
    let share = |f: &dyn Fn(Option<usize>) -> f64| {
        known.iter().map(|q| f(rank_of(q))).sum::<f64>() / known.len().max(1) as f64
    };
    let map_at = |t: f32| {
        queries
            .iter()
            .map(|(c, truth)| average_precision_at_5(truth, &answers(c, t)))
            .sum::<f64>()
            / n.max(1) as f64
    };
    let (best_threshold, best_map5) = best_threshold(&queries);
    Ok(LooReport {
        queries: n,
        known_queries: known.len(),
        top1: share(&|r| f64::from(u8::from(r == Some(0)))),
        top5: share(&|r| f64::from(u8::from(r.is_some_and(|r| r < K)))),
        map5_known: share(&|r| r.filter(|&r| r < K).map_or(0.0, |r| 1.0 / (r + 1) as f64)),
        map5: map_at(threshold),
        threshold,
        best_threshold,
        best_map5,
        known_ranks: queries
            .iter()
            .enumerate()
            .filter(|(_, (_, t))| t != NEW_INDIVIDUAL)
            .map(|(i, q)| (i, rank_of(q)))
            .collect(),
    })
}

/// 95% percentile-bootstrap intervals of the known queries' top-1, top-5 and MAP@5 (each
/// `[low, high]`), resampling whole units (animals) with replacement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bootstrap {
    pub resamples: usize,
    pub seed: u64,
    /// Units resampled: the distinct units of the known queries.
    pub units: usize,
    pub top1: [f64; 2],
    pub top5: [f64; 2],
    pub map5: [f64; 2],
}

impl Bootstrap {
    /// Intervals of the means of per-query top-1, top-5 and MAP@5 `values` (see
    /// [`bootstrap_means`]), `unit_count` distinct units.
    fn of(
        values: &[[f64; 3]],
        units: &[usize],
        unit_count: usize,
        resamples: usize,
        seed: u64,
    ) -> Self {
        let [top1, top5, map5] = bootstrap_means(values, units, resamples, seed);
        Bootstrap {
            resamples,
            seed,
            units: unit_count,
            top1,
            top5,
            map5,
        }
    }
}

impl LooReport {
    /// Each known query's unit (an index into the sorted distinct units, also returned) and its
    /// top-1, top-5 and MAP@5 values.
    fn known_values<'a>(&self, unit_of: &'a [String]) -> (Vec<&'a str>, Vec<usize>, Vec<[f64; 3]>) {
        let mut names: Vec<&str> = self
            .known_ranks
            .iter()
            .map(|&(i, _)| unit_of[i].as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let (units, values) = self
            .known_ranks
            .iter()
            .map(|&(i, r)| {
                let hit = |ok: bool| f64::from(u8::from(ok));
                let unit = names.binary_search(&unit_of[i].as_str()).unwrap_or(0);
                let map = r.filter(|&r| r < K).map_or(0.0, |r| 1.0 / (r + 1) as f64);
                (
                    unit,
                    [hit(r == Some(0)), hit(r.is_some_and(|r| r < K)), map],
                )
            })
            .unzip();
        (names, units, values)
    }

    /// Bootstrap intervals over units, `unit_of[i]` naming the unit of row `i` of the `ids`
    /// given to `leave_one_out` (for nyala the animal, while the identity is animal + flank).
    pub fn bootstrap(&self, unit_of: &[String], resamples: usize, seed: u64) -> Bootstrap {
        let (names, units, values) = self.known_values(unit_of);
        Bootstrap::of(&values, &units, names.len(), resamples, seed)
    }

    /// How much better `self` does than `baseline` on the same photos: the differences of
    /// top-1, top-5 and MAP@5 over the known queries, with 95% intervals of a paired bootstrap
    /// (each resample draws units and compares both on the same queries), which is narrower
    /// than two separate intervals as an animal hard for one is usually hard for the other.
    pub fn paired_bootstrap(
        &self,
        baseline: &LooReport,
        unit_of: &[String],
        resamples: usize,
        seed: u64,
    ) -> anyhow::Result<Difference> {
        let same_queries = self.known_ranks.len() == baseline.known_ranks.len()
            && self
                .known_ranks
                .iter()
                .zip(&baseline.known_ranks)
                .all(|(a, b)| a.0 == b.0);
        anyhow::ensure!(same_queries, "the two evaluations have different queries");
        let (names, units, values) = self.known_values(unit_of);
        let (_, _, base) = baseline.known_values(unit_of);
        let diffs: Vec<[f64; 3]> = values
            .iter()
            .zip(&base)
            .map(|(a, b)| std::array::from_fn(|k| a[k] - b[k]))
            .collect();
        let mean = |k: usize| diffs.iter().map(|d| d[k]).sum::<f64>() / diffs.len().max(1) as f64;
        Ok(Difference {
            top1: mean(0),
            top5: mean(1),
            map5: mean(2),
            interval: Bootstrap::of(&diffs, &units, names.len(), resamples, seed),
        })
    }
}

/// Differences of top-1, top-5 and MAP@5 (known queries) between two evaluations of the same
/// photos, with their paired-bootstrap intervals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Difference {
    pub top1: f64,
    pub top5: f64,
    pub map5: f64,
    pub interval: Bootstrap,
}

/// The 2.5% and 97.5% percentiles of the mean of `values` (one row per query, `unit[i]` the
/// unit of query `i`) when the units are drawn with replacement `resamples` times: each draw
/// takes as many units as there are, and its mean is over all the queries of the drawn units.
pub fn bootstrap_means<const M: usize>(
    values: &[[f64; M]],
    unit: &[usize],
    resamples: usize,
    seed: u64,
) -> [[f64; 2]; M] {
    use rand::{Rng, SeedableRng};
    let units = unit.iter().max().map_or(0, |&u| u + 1);
    let mut sums = vec![([0.0; M], 0usize); units];
    for (v, &u) in values.iter().zip(unit) {
        sums[u].1 += 1;
        for (s, x) in sums[u].0.iter_mut().zip(v) {
            *s += x;
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut draws: [Vec<f64>; M] = std::array::from_fn(|_| Vec::with_capacity(resamples));
    for _ in 0..resamples.max(1) {
        let mut total = [0.0; M];
        let mut count = 0;
        for _ in 0..units {
            let (s, n) = &sums[rng.gen_range(0..units)];
            total.iter_mut().zip(s).for_each(|(t, x)| *t += x);
            count += n;
        }
        for (d, t) in draws.iter_mut().zip(total) {
            d.push(t / count.max(1) as f64);
        }
    }
    draws.map(|mut d| {
        d.sort_by(f64::total_cmp);
        let at = |p: f64| d[((d.len() - 1) as f64 * p).round() as usize];
        [at(0.025), at(0.975)]
    })
}

#[cfg(test)]
mod bootstrap_tests {
    use super::*;

    #[test]
    fn equal_animals_give_a_zero_width_interval() {
        // Four animals with the same outcomes: every resample has the same mean.
        let values = vec![[1.0, 0.5]; 8];
        let unit = [0, 0, 1, 1, 2, 2, 3, 3];
        let ci = bootstrap_means(&values, &unit, 500, 1);
        assert_eq!(ci, [[1.0, 1.0], [0.5, 0.5]]);
    }

    #[test]
    fn two_animals_span_both_extremes() {
        // Draws of two animals: {a,a} mean 1 and {b,b} mean 0, each a quarter of the time.
        let ci = bootstrap_means(&[[1.0], [0.0]], &[0, 1], 1000, 3);
        assert_eq!(ci, [[0.0, 1.0]]);
    }

    #[test]
    fn the_interval_matches_the_normal_approximation() {
        // 100 animals, half always right: mean 0.5, standard error sqrt(0.25 / 100) = 0.05,
        // so the 95% interval is about 0.5 ± 0.098. The same seed gives the same interval.
        let values: Vec<[f64; 1]> = (0..100)
            .map(|i| [f64::from(u8::from(i % 2 == 0))])
            .collect();
        let unit: Vec<usize> = (0..100).collect();
        let [[lo, hi]] = bootstrap_means(&values, &unit, 4000, 7);
        assert!(
            (lo - 0.402).abs() < 0.02 && (hi - 0.598).abs() < 0.02,
            "{lo} {hi}"
        );
        assert_eq!(bootstrap_means(&values, &unit, 4000, 7), [[lo, hi]]);
    }

    #[test]
    fn leave_one_out_ranks_feed_the_bootstrap_by_animal() {
        // Animal a (identity x): photo 0 is nearer photo 3 of y than its own photo 1, so it
        // ranks x second; photo 1 ranks x first. Animal b (identity y): photo 2 ranks y first,
        // photo 3 second (behind x). Photo 4 is alone: a new individual, not a known query.
        let emb = [
            1.0, 0.0, //
            0.6, -0.8, //
            0.0, 1.0, //
            0.8, 0.6, //
            -1.0, 0.0,
        ];
        let ids: Vec<String> = ["x", "x", "y", "y", "z"].map(String::from).to_vec();
        let r = leave_one_out(&emb, 2, &ids, None, -1.0).unwrap();
        assert_eq!(r.known_queries, 4);
        assert_eq!(
            r.known_ranks,
            [(0, Some(1)), (1, Some(0)), (2, Some(0)), (3, Some(1))]
        );
        assert!((r.top1 - 0.5).abs() < 1e-12 && (r.map5_known - 0.75).abs() < 1e-12);
        let animals: Vec<String> = ["a", "a", "b", "b", "c"].map(String::from).to_vec();
        paired_differences_resample_animals(&r, &animals);
        let b = r.bootstrap(&animals, 1000, 5);
        assert_eq!(b.units, 2);
        // Each animal has one query right and one second: every resample gives the same.
        assert_eq!(
            (b.top1, b.top5, b.map5),
            ([0.5, 0.5], [1.0, 1.0], [0.75, 0.75])
        );
    }

    /// Against a baseline that ranks photo 0's identity first (one better) and photo 2's
    /// third (two steps worse): differences over the 4 known queries, top-1 (−1 + 1) / 4 = 0,
    /// top-5 0, MAP@5 (1/2 − 1 + 1 − 1/3) / 4 = 1/24. Animal a's queries differ by −1/2 in
    /// MAP@5, b's by +2/3: resamples {a,a}, {a,b}, {b,b} span −1/4 … +1/3.
    fn paired_differences_resample_animals(r: &LooReport, animals: &[String]) {
        let mut baseline = r.clone();
        baseline.known_ranks = vec![(0, Some(0)), (1, Some(0)), (2, Some(2)), (3, Some(1))];
        let d = r.paired_bootstrap(&baseline, animals, 2000, 1).unwrap();
        assert!(d.top1.abs() < 1e-12 && d.top5.abs() < 1e-12, "{d:?}");
        assert!((d.map5 - 1.0 / 24.0).abs() < 1e-12, "{}", d.map5);
        let [lo, hi] = d.interval.map5;
        assert!(
            (lo + 0.25).abs() < 1e-12 && (hi - 1.0 / 3.0).abs() < 1e-12,
            "{lo} {hi}"
        );
        assert_eq!(d.interval.units, 2);
        let mut other = baseline;
        other.known_ranks.pop();
        assert!(r.paired_bootstrap(&other, animals, 10, 1).is_err());
    }
}
