//! Leave-one-out identification, as the field measures it: every labelled photo queries the
//! others, identities ranked by their best photo (or re-scored on a shortlist), with top-1,
//! top-5 and MAP@5; bootstrap intervals resample whole animals, and the paired bootstrap
//! compares two rankings on the same queries.

use crate::data::NEW_INDIVIDUAL;
use crate::decide::{answers, best_threshold, Candidate};
use crate::metrics::{average_precision_at_5, K};
use crate::search::{rank_labels, recall, Aggregation, IndexSpec, Neighbor};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

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
    /// Queries whose identity has other photos only where the query's gallery may not look
    /// (its own encounter, with `--exclude-same`): new individuals to that gallery.
    pub skipped: usize,
    /// With an approximate index: the share of each query's exact nearest photos it found.
    pub recall: Option<f64>,
    /// Each known query's row in `ids` and the rank of its true identity among its first
    /// five candidates (`None` when not among them): what `bootstrap` resamples.
    #[serde(skip)]
    pub known_ranks: Vec<(usize, Option<usize>)>,
}

/// How [`leave_one_out`] searches.
#[derive(Clone, Copy, Default)]
pub struct Protocol<'a> {
    /// Each photo's group: part of its identity, and its gallery holds only its group.
    pub groups: Option<&'a [String]>,
    /// Each photo's value of a column (its encounter) that its gallery never shares.
    pub exclude: Option<&'a [String]>,
    /// The `new_individual` threshold on the (re-scored) scores.
    pub threshold: f32,
    pub index: IndexSpec,
    /// Re-scoring of each query's shortlist (local features).
    pub rescore: Option<&'a Rescorer<'a>>,
}

/// Re-scores the first `shortlist` photos the embedding found for a query: `score(query,
/// shortlisted)` takes rows of the labelled set (with their cosine to the query) and gives one
/// score per shortlisted row. Identities of the shortlist are ranked by these scores combined
/// by `aggregation`, ahead of those found only beyond it.
pub struct Rescorer<'a> {
    pub shortlist: usize,
    pub aggregation: Aggregation,
    #[allow(clippy::type_complexity)]
    pub score: &'a (dyn Fn(usize, &[(usize, f32)]) -> Vec<f32> + Sync),
}

/// Query every photo against all the others (of the same group, when `protocol.groups` is
/// given), searched through an index of kind `protocol.index`: `emb` is row-major
/// `[ids.len(), dim]` unit vectors. With `protocol.exclude`, a query's gallery holds no photo
/// with its own value there (its encounter): a query whose identity has photos in its own
/// encounter only is then a new individual, counted in [`LooReport::skipped`].
pub fn leave_one_out(
    emb: &[f32],
    dim: usize,
    ids: &[String],
    protocol: &Protocol,
) -> anyhow::Result<LooReport> {
    let Protocol {
        groups,
        exclude,
        threshold,
        index,
        rescore,
    } = *protocol;
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
    let mut recall_sum = (0.0, 0usize);
    let mut skipped = 0;
    let excluded = |i: usize| exclude.map_or("", |e| e[i].as_str());
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
        let mut count: HashMap<&str, usize> = HashMap::new();
        let mut count_within: HashMap<(&str, &str), usize> = HashMap::new();
        let mut largest_excluded: HashMap<&str, usize> = HashMap::new();
        for &i in rows {
            *count.entry(ids[i].as_str()).or_default() += 1;
            *count_within
                .entry((ids[i].as_str(), excluded(i)))
                .or_default() += 1;
            *largest_excluded.entry(excluded(i)).or_default() += 1;
        }
        // Deep enough that the photos a query may not see leave the usual depth.
        let hidden = match exclude {
            Some(_) => largest_excluded.values().copied().max().unwrap_or(0),
            None => 0,
        };
        let k = ((K * 20 + 1).max(101) + hidden).min(rows.len());
        let found = index.build_with(dim, &vectors)?.search(&vectors, k)?;
        if !index.is_exact() {
            let exact = IndexSpec::default().build_with(dim, &vectors)?;
            let e = exact.search(&vectors, k)?;
            recall_sum.0 += recall(&e, &found) * rows.len() as f64;
            recall_sum.1 += rows.len();
        }
        let ranked: Vec<Vec<(u32, f32)>> = found
            .into_par_iter()
            .enumerate()
            .map(|(local, neighbors)| {
                let i = rows[local];
                let others: Vec<_> = neighbors
                    .into_iter()
                    .filter(|nb| {
                        let j = rows[nb.id as usize];
                        j != i && (exclude.is_none() || excluded(j) != excluded(i))
                    })
                    .collect();
                match rescore {
                    None => rank_labels(&others, &labels, Aggregation::Max, K),
                    Some(r) => rescored(i, &others, r, rows, &labels),
                }
            })
            .collect();
        for (local, ranked) in ranked.into_iter().enumerate() {
            let i = rows[local];
            let candidates = ranked
                .into_iter()
                .map(|(l, score)| Candidate {
                    id: names[l as usize].clone(),
                    score,
                })
                .collect();
            let id = ids[i].as_str();
            let visible = match exclude {
                Some(_) => count[id] - count_within[&(id, excluded(i))],
                None => count[id] - 1,
            };
            if visible == 0 && count[id] > 1 {
                skipped += 1;
            }
            let truth = match visible {
                0 => NEW_INDIVIDUAL.to_string(),
                _ => ids[i].clone(),
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
        skipped,
        recall: (!index.is_exact()).then(|| recall_sum.0 / recall_sum.1.max(1) as f64),
        known_ranks: queries
            .iter()
            .enumerate()
            .filter(|(_, (_, t))| t != NEW_INDIVIDUAL)
            .map(|(i, q)| (i, rank_of(q)))
            .collect(),
    })
}

/// The identities of a query's neighbours (`others`, embedding order, ids local to `rows`):
/// those of the first `r.shortlist` ranked by `r`'s scores, then those found only beyond.
fn rescored(
    query: usize,
    others: &[Neighbor],
    r: &Rescorer,
    rows: &[usize],
    labels: &[u32],
) -> Vec<(u32, f32)> {
    let (short, rest) = others.split_at(r.shortlist.min(others.len()));
    let global: Vec<(usize, f32)> = short
        .iter()
        .map(|nb| (rows[nb.id as usize], nb.score))
        .collect();
    let scores = (r.score)(query, &global);
    let short: Vec<Neighbor> = short
        .iter()
        .zip(scores)
        .map(|(nb, score)| Neighbor { id: nb.id, score })
        .collect();
    let mut ranked = rank_labels(&short, labels, r.aggregation, K);
    if ranked.len() < K {
        for (label, score) in rank_labels(rest, labels, Aggregation::Max, 2 * K) {
            if ranked.len() < K && !ranked.iter().any(|&(l, _)| l == label) {
                ranked.push((label, score.min(ranked.last().map_or(score, |l| l.1))));
            }
        }
    }
    ranked
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
    pub(crate) fn of(
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
                let unit = names.binary_search(&unit_of[i].as_str()).unwrap_or(0);
                (unit, outcome(r))
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
        Ok(Difference::of(
            &values,
            &base,
            &units,
            names.len(),
            resamples,
            seed,
        ))
    }
}

/// The means of per-query top-1, top-5 and MAP@5 values (0 for none).
pub fn means(values: &[[f64; 3]]) -> [f64; 3] {
    std::array::from_fn(|k| values.iter().map(|v| v[k]).sum::<f64>() / values.len().max(1) as f64)
}

/// A query's top-1, top-5 and average precision at 5, from the rank of its true identity
/// (0-based; `None` when not found).
pub fn outcome(rank: Option<usize>) -> [f64; 3] {
    let hit = |ok: bool| f64::from(u8::from(ok));
    let map = rank
        .filter(|&r| r < K)
        .map_or(0.0, |r| 1.0 / (r + 1) as f64);
    [hit(rank == Some(0)), hit(rank.is_some_and(|r| r < K)), map]
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

impl Difference {
    /// The mean differences of per-query `values` over `base` (the same queries, in the same
    /// order, `units[i]` the unit of query `i`) and their paired-bootstrap intervals.
    pub(crate) fn of(
        values: &[[f64; 3]],
        base: &[[f64; 3]],
        units: &[usize],
        unit_count: usize,
        resamples: usize,
        seed: u64,
    ) -> Self {
        let diffs: Vec<[f64; 3]> = values
            .iter()
            .zip(base)
            .map(|(a, b)| std::array::from_fn(|k| a[k] - b[k]))
            .collect();
        let [top1, top5, map5] = means(&diffs);
        Difference {
            top1,
            top5,
            map5,
            interval: Bootstrap::of(&diffs, units, unit_count, resamples, seed),
        }
    }
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
mod tests {
    use super::*;

    fn exact(exclude: Option<&[String]>) -> Protocol<'_> {
        Protocol {
            exclude,
            threshold: -1.0,
            ..Default::default()
        }
    }

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
        let r = leave_one_out(&emb, 2, &ids, &exact(None)).unwrap();
        assert_eq!(r.known_queries, 4);
        assert_eq!(
            r.known_ranks,
            [(0, Some(1)), (1, Some(0)), (2, Some(0)), (3, Some(1))]
        );
        assert!((r.top1 - 0.5).abs() < 1e-12 && (r.map5_known - 0.75).abs() < 1e-12);
        assert_eq!(r.recall, None, "the exact index reports no recall");
        // An approximate index over five photos finds every neighbour: the same report, with
        // its recall of the exact neighbours.
        let hnsw = IndexSpec::Hnsw {
            m: 4,
            ef_search: 16,
        };
        let a = leave_one_out(
            &emb,
            2,
            &ids,
            &Protocol {
                index: hnsw,
                ..exact(None)
            },
        )
        .unwrap();
        assert_eq!(a.recall, Some(1.0));
        assert_eq!(LooReport { recall: None, ..a }, r);
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

    #[test]
    fn excluding_the_same_encounter_hides_its_photos_and_counts_the_stranded() {
        // x has photos 0 and 1 in encounter e1 and photo 2 in e2; y has 3 (e3) and 4 (e4);
        // z has 5 and 6, both in e5. Photo 0 is nearest photo 1 (its own encounter), then 3.
        let emb = [
            1.0, 0.0, //
            0.99, 0.141, //
            0.6, 0.8, //
            0.95, -0.312, //
            0.9, -0.436, //
            -1.0, 0.0, //
            -0.99, 0.141,
        ];
        let ids: Vec<String> = ["x", "x", "x", "y", "y", "z", "z"]
            .map(String::from)
            .to_vec();
        let enc: Vec<String> = ["e1", "e1", "e2", "e3", "e4", "e5", "e5"]
            .map(String::from)
            .to_vec();
        let plain = leave_one_out(&emb, 2, &ids, &exact(None)).unwrap();
        assert_eq!(plain.known_queries, 7);
        assert_eq!(
            plain.known_ranks[0],
            (0, Some(0)),
            "photo 1 finds x for photo 0"
        );
        let r = leave_one_out(&emb, 2, &ids, &exact(Some(&enc))).unwrap();
        // z's photos see no other z: new individuals, counted as skipped; the rest are known.
        assert_eq!((r.known_queries, r.skipped), (5, 2));
        // Photo 0 may not see photo 1: y (photo 3, 0.95) comes before x (photo 2, 0.6).
        assert_eq!(r.known_ranks[0], (0, Some(1)));
        // Photo 2 (e2) still sees x's photos of e1.
        assert_eq!(r.known_ranks[2], (2, Some(0)));
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
