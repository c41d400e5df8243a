//! From ranked individuals to answers: `new_individual` inserted by a similarity threshold, and
//! the threshold chosen on validation queries to maximise MAP@5.

use crate::crops::LoadedCropSet;
use crate::data::image::list_photos;
use crate::data::{read_train_csv, write_submission, KaggleDir, Prediction, NEW_INDIVIDUAL};
use crate::embed::EmbedOptions;
use crate::metrics::{average_precision_at_5, K};
use crate::model::happywhale::HappyWhaleModel;
use crate::runs::{Ensemble, ModelArgs};
use crate::search::{rank_labels, Aggregation, Index, IndexSpec};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
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

/// Where `new_individual` goes in the answers.
#[derive(Clone, Debug, PartialEq)]
pub enum NewRule {
    /// Before the first candidate whose similarity is below the threshold (of its species).
    Threshold(Thresholds),
    /// First for this share of the queries, those whose best candidate is weakest (the
    /// winners' fixed share of new predictions).
    Share(f64),
}

/// `finprint predict`.
#[derive(Clone, Debug, clap::Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A folder in Kaggle's layout: train.csv and train_images/ are the catalogue,
    /// test_images/ the photos to identify.
    #[arg(long)]
    pub data: PathBuf,
    /// The submission to write (image,predictions).
    #[arg(long)]
    pub out: PathBuf,
    /// The new_individual threshold [default: the one chosen on the models' validation; 0 for
    /// --zero-shot].
    #[arg(long)]
    pub threshold: Option<f32>,
    /// Instead of a threshold: put new_individual first for this share of the test photos
    /// (those whose best candidate is weakest).
    #[arg(long, conflicts_with = "threshold")]
    pub new_share: Option<f64>,
    /// Weight of the ArcFace heads' scores against the kNN scores [default: the one chosen on
    /// the models' validation]; 0: kNN alone.
    #[arg(long)]
    pub fusion_weight: Option<f32>,
    /// The catalogue's search index: flat (exact), flat-f16 or hnsw[:M[,EF]].
    #[arg(long, default_value_t = IndexSpec::default())]
    pub index: IndexSpec,
    #[command(flatten)]
    pub options: EmbedOptions,
}

/// Predict `test_images/` of `args.data` and write the submission; returns the rule that
/// placed new_individual and the number of predictions.
pub fn run(args: &PredictArgs, progress: &ProgressBar) -> anyhow::Result<(NewRule, usize)> {
    let spec = args.model.spec();
    let mut ensemble = spec.load(None, crate::runtime::device())?;
    if let Some(w) = args.fusion_weight {
        ensemble.fusion_weight = w;
    }
    let rule = match (args.new_share, args.threshold) {
        (Some(share), _) => NewRule::Share(share),
        (None, Some(t)) => NewRule::Threshold(Thresholds::global(t)),
        (None, None) => NewRule::Threshold((&ensemble).into()),
    };
    let sets = args.options.crop_sets(&spec)?;
    let predictions = predict_submission(
        &ensemble,
        &KaggleDir::new(&args.data),
        &sets,
        &rule,
        &args.options,
        args.index,
        progress,
    )?;
    write_submission(&args.out, &predictions)?;
    Ok((rule, predictions.len()))
}

/// A Kaggle submission for `test_images/` of `data`: every photo of `train.csv` is the
/// catalogue (searched through an index of kind `index`), ranked per individual by its best
/// photo, `new_individual` by the rule.
pub fn predict_submission(
    ensemble: &Ensemble,
    data: &KaggleDir,
    sets: &[LoadedCropSet],
    new_rule: &NewRule,
    options: &EmbedOptions,
    index: IndexSpec,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<Prediction>> {
    let train = read_train_csv(&data.train_csv())?;
    let tests = list_photos(&data.test_images())?;
    anyhow::ensure!(
        !train.rows.is_empty(),
        "{} lists no photo",
        data.train_csv().display()
    );
    anyhow::ensure!(
        !tests.is_empty(),
        "{} holds no photo to predict (.jpg, .jpeg or .png)",
        data.test_images().display()
    );
    let names: Vec<String> = train.rows.iter().map(|r| r.image.clone()).collect();
    progress.set_message("embedding the catalogue");
    let gallery = options.embed(ensemble, sets, &data.train_images(), &names, progress)?;
    progress.set_message("embedding the test photos");
    let queries = options.embed(ensemble, sets, &data.test_images(), &tests, progress)?;
    let mut ids: Vec<String> = train.rows.iter().map(|r| r.individual_id.clone()).collect();
    ids.sort();
    ids.dedup();
    let labels: Vec<u32> = train
        .rows
        .iter()
        .map(|r| ids.binary_search(&r.individual_id).map_or(0, |i| i as u32))
        .collect();
    let index = index.build_with(gallery.len() / names.len(), &gallery)?;
    let knn = rank_candidates(
        index.as_ref(),
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
