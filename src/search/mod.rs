//! Nearest-neighbour search over L2-normalised embeddings, and per-individual ranking.
//!
//! Every index implements [`Index`]: rows are added as a row-major `n × dim` slice of `f32`, get
//! the ids `0, 1, 2, …` in the order added, and are scored against a query by inner product
//! (the cosine similarity when both are normalised). Two implementations are interchangeable:
//!
//! | index | search | storage per row |
//! |---|---|---|
//! | [`FlatIndex`] | exact: blocked matrix products and a partial top-k | `4·dim` (f32) or `2·dim` (f16) bytes |
//! | [`HnswIndex`] | approximate: a hierarchical navigable small-world graph | `4·dim` bytes plus about `8·M` bytes of links |
//!
//! [`IndexSpec`] chooses one by value (`--index flat|flat-f16|hnsw[:M[,EF]]`).
//!
//! Neighbours come best first: higher score first, and the lower id first among equal scores.
//! [`rank_labels`] then turns the neighbours of one query into a ranking of individuals.

mod flat;
mod hnsw;
mod kernels;
mod topk;

pub use flat::{FlatIndex, Storage};
pub use hnsw::{HnswIndex, HnswParams};

use std::cmp::Ordering;
use std::collections::HashMap;

/// One catalogue row found for a query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbor {
    /// The row's id: its position among all rows added to the index.
    pub id: u32,
    /// Inner product of the query and the row: their cosine similarity for normalised vectors.
    pub score: f32,
}

impl Neighbor {
    /// The ranking order of neighbours: higher score first, then lower id; total even with NaN.
    pub fn rank_cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.id.cmp(&other.id))
    }
}

/// A misuse of an index: the error leaves the index unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("an index needs a dimension of at least 1")]
    ZeroDimension,
    #[error("{len} values are not a whole number of {dim}-dimensional vectors")]
    Shape { len: usize, dim: usize },
    #[error("an index holds at most {max} rows; adding {adding} to {len} would exceed that")]
    TooManyRows {
        len: usize,
        adding: usize,
        max: usize,
    },
}

/// A searchable collection of vectors of one dimension.
pub trait Index: Send + Sync {
    /// Length of every vector.
    fn dim(&self) -> usize;
    /// Number of rows added.
    fn len(&self) -> usize;
    /// Whether no row has been added.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Appends the rows of `vectors` (row-major, `n × dim`); they get ids `len()..len() + n`.
    fn add(&mut self, vectors: &[f32]) -> Result<(), SearchError>;
    /// The `k` best rows for each query of `queries` (row-major, `nq × dim`), best first; fewer
    /// than `k` when the index holds fewer rows.
    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Neighbor>>, SearchError>;
    /// Bytes the index holds for its rows and any search structure.
    fn storage_bytes(&self) -> usize;
    /// The score of row `id` for `query` (`None` for a wrong length or an unknown row).
    fn score(&self, query: &[f32], id: usize) -> Option<f32>;
}

/// Which index to build, as a value (faiss's `index_factory`): `flat` (exact, f32), `flat-f16`
/// (exact, half the memory) or `hnsw[:M[,EF]]` (approximate; M links per node, EF candidates
/// followed per search).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexSpec {
    Flat(Storage),
    Hnsw { m: usize, ef_search: usize },
}

impl Default for IndexSpec {
    fn default() -> Self {
        IndexSpec::Flat(Storage::F32)
    }
}

impl IndexSpec {
    /// An empty index of `dim`-dimensional rows.
    pub fn build(&self, dim: usize) -> Box<dyn Index> {
        match *self {
            IndexSpec::Flat(storage) => Box::new(FlatIndex::new(dim, storage)),
            IndexSpec::Hnsw { m, ef_search } => Box::new(HnswIndex::new(
                dim,
                HnswParams {
                    m,
                    ef_search,
                    ..HnswParams::default()
                },
            )),
        }
    }

    /// An index of `dim`-dimensional rows holding `rows` (row-major).
    pub fn build_with(&self, dim: usize, rows: &[f32]) -> Result<Box<dyn Index>, SearchError> {
        let mut index = self.build(dim);
        index.add(rows)?;
        Ok(index)
    }

    /// Whether the index finds the exact neighbours.
    pub fn is_exact(&self) -> bool {
        matches!(self, IndexSpec::Flat(Storage::F32))
    }
}

impl std::str::FromStr for IndexSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, params) = s.split_once(':').unwrap_or((s, ""));
        let number = |v: &str, what: &str| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("index {s:?}: {what} {v:?} is not a positive whole number"))
        };
        match (kind.trim(), params.is_empty()) {
            ("flat", true) => Ok(IndexSpec::Flat(Storage::F32)),
            ("flat-f16", true) => Ok(IndexSpec::Flat(Storage::F16)),
            ("hnsw", _) => {
                let defaults = HnswParams::default();
                let mut parts = params.split(',').filter(|p| !p.trim().is_empty());
                let m = parts.next().map_or(Ok(defaults.m), |v| number(v, "M"))?;
                let ef_search = parts
                    .next()
                    .map_or(Ok(defaults.ef_search), |v| number(v, "EF"))?;
                if parts.next().is_some() {
                    return Err(format!("index {s:?}: hnsw takes at most M and EF"));
                }
                Ok(IndexSpec::Hnsw { m, ef_search })
            }
            _ => Err(format!(
                "unknown index {s:?}: flat, flat-f16 or hnsw[:M[,EF]]"
            )),
        }
    }
}

impl std::fmt::Display for IndexSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexSpec::Flat(Storage::F32) => write!(f, "flat"),
            IndexSpec::Flat(Storage::F16) => write!(f, "flat-f16"),
            IndexSpec::Hnsw { m, ef_search } => write!(f, "hnsw:{m},{ef_search}"),
        }
    }
}

/// The share of the exact `k` nearest neighbours of each query that `found` holds (recall@k),
/// `exact` and `found` listing each query's neighbours.
pub fn recall(exact: &[Vec<Neighbor>], found: &[Vec<Neighbor>]) -> f64 {
    let (mut hit, mut total) = (0usize, 0usize);
    for (e, f) in exact.iter().zip(found) {
        total += e.len();
        hit += e.iter().filter(|n| f.iter().any(|g| g.id == n.id)).count();
    }
    match total {
        0 => 1.0,
        _ => hit as f64 / total as f64,
    }
}

/// Checks that `len` values are whole `dim`-dimensional vectors and returns how many.
fn rows_of(len: usize, dim: usize) -> Result<usize, SearchError> {
    if dim == 0 {
        Err(SearchError::ZeroDimension)
    } else if len % dim != 0 {
        Err(SearchError::Shape { len, dim })
    } else {
        Ok(len / dim)
    }
}

/// Checks that `adding` more rows keep every id within `u32`.
fn check_capacity(len: usize, adding: usize) -> Result<(), SearchError> {
    let max = u32::MAX as usize;
    if len.checked_add(adding).is_some_and(|total| total <= max) {
        Ok(())
    } else {
        Err(SearchError::TooManyRows { len, adding, max })
    }
}

/// Grows `v` for `more` elements, backed by 2 MB pages where Linux gives them (transparent huge
/// pages in `madvise` mode): a graph search jumps between rows at random, and with 4 KB pages
/// nearly every jump into a large index also misses the TLB; and a gigabyte of rows faults in
/// 512 times fewer pages. Elsewhere it only reserves.
fn reserve_huge<T>(v: &mut Vec<T>, more: usize) {
    v.reserve(more);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_ptr() as usize;
        let end = start + v.capacity() * std::mem::size_of::<T>();
        let (lo, hi) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if hi > lo {
            // SAFETY: advice on whole pages inside the allocation `v` owns; it changes no
            // contents, and a refusal (an old kernel, THP off) leaves ordinary pages.
            unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
        }
    }
}

/// How the scores of one individual's photos among a query's neighbours combine into its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// The best score of any of its photos.
    Max,
    /// The mean of its best `k` scores; of all of them when fewer than `k` are among the
    /// neighbours (`MeanTopK(0)` counts as `MeanTopK(1)`, i.e. [`Aggregation::Max`]).
    MeanTopK(usize),
    /// For scores that are probabilities of the same individual: the chance that at least one
    /// of its photos is, `1 − Π(1 − p)`, so that several matching photos add up.
    NoisyOr,
}

impl Aggregation {
    /// The score of an individual whose photos among the neighbours scored `scores` (at least
    /// one).
    pub fn combine(self, scores: &[f32]) -> f32 {
        match self {
            Aggregation::Max => scores.iter().copied().fold(f32::MIN, f32::max),
            Aggregation::MeanTopK(k) => {
                let mut sorted = scores.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let best = &sorted[..k.clamp(1, sorted.len())];
                best.iter().sum::<f32>() / best.len() as f32
            }
            Aggregation::NoisyOr => {
                1.0 - scores
                    .iter()
                    .map(|p| 1.0 - p.clamp(0.0, 1.0))
                    .product::<f32>()
            }
        }
    }
}

/// Ranks individuals for one query: `labels[id]` is the individual of catalogue row `id`.
///
/// Returns the best `top` individuals as `(label, score)`, best first, the lower label first
/// among equal scores. Only individuals with a photo among `neighbors` are ranked, so search
/// with a `k` several times `top`. Neighbours whose id has no label are ignored.
pub fn rank_labels(
    neighbors: &[Neighbor],
    labels: &[u32],
    how: Aggregation,
    top: usize,
) -> Vec<(u32, f32)> {
    let mut by_label: HashMap<u32, Vec<f32>> = HashMap::new();
    for n in neighbors {
        if let Some(&label) = labels.get(n.id as usize) {
            by_label.entry(label).or_default().push(n.score);
        }
    }
    let mut ranked: Vec<(u32, f32)> = by_label
        .into_iter()
        .map(|(label, scores)| (label, how.combine(&scores)))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(top);
    ranked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u32, score: f32) -> Neighbor {
        Neighbor { id, score }
    }

    #[test]
    fn index_specs_parse_print_and_build_their_kind() {
        let parse = |s: &str| s.parse::<IndexSpec>();
        assert_eq!(parse("flat"), Ok(IndexSpec::Flat(Storage::F32)));
        assert_eq!(parse("flat-f16"), Ok(IndexSpec::Flat(Storage::F16)));
        let d = HnswParams::default();
        assert_eq!(
            parse("hnsw"),
            Ok(IndexSpec::Hnsw {
                m: d.m,
                ef_search: d.ef_search
            })
        );
        assert_eq!(
            parse("hnsw:8"),
            Ok(IndexSpec::Hnsw {
                m: 8,
                ef_search: d.ef_search
            })
        );
        let spec = parse("hnsw:12,200").unwrap();
        assert_eq!(
            spec,
            IndexSpec::Hnsw {
                m: 12,
                ef_search: 200
            }
        );
        for s in ["flat", "flat-f16", "hnsw:12,200"] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
        for bad in ["ivf", "flat:3", "hnsw:0", "hnsw:x", "hnsw:1,2,3"] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert!(IndexSpec::default().is_exact() && !spec.is_exact());

        // Every kind holds its rows and scores them as the exact index does.
        let rows: Vec<f32> = (0..40).map(|i| ((i * 7) % 11) as f32 / 11.0).collect();
        let query = &rows[..4];
        for spec in [IndexSpec::default(), parse("flat-f16").unwrap(), spec] {
            let index = spec.build_with(4, &rows).unwrap();
            assert_eq!(index.len(), 10, "{spec}");
            let exact: f32 = query.iter().zip(&rows[8..12]).map(|(a, b)| a * b).sum();
            let got = index.score(query, 2).unwrap();
            assert!((got - exact).abs() < 1e-2, "{spec}: {got} vs {exact}");
            assert_eq!(index.score(query, 10), None, "{spec}");
            assert_eq!(index.score(&query[..3], 0), None, "{spec}");
        }
    }

    #[test]
    fn recall_counts_the_exact_neighbours_found() {
        let exact = vec![vec![n(1, 0.9), n(2, 0.8)], vec![n(3, 0.7), n(4, 0.6)]];
        let found = vec![vec![n(1, 0.9), n(5, 0.7)], vec![n(4, 0.6), n(3, 0.7)]];
        assert_eq!(recall(&exact, &found), 0.75);
        assert_eq!(recall(&exact, &exact), 1.0);
        assert_eq!(recall(&[], &[]), 1.0);
    }

    #[test]
    fn rank_labels_max_and_mean_of_top_two() {
        // Rows 0..6 show individuals 7, 7, 3, 3, 5, 7.
        let labels = [7, 7, 3, 3, 5, 7];
        let neighbors = [
            n(0, 0.9),
            n(2, 0.85),
            n(1, 0.8),
            n(4, 0.7),
            n(5, 0.6),
            n(3, 0.5),
        ];
        let max = rank_labels(&neighbors, &labels, Aggregation::Max, 5);
        assert_eq!(max, vec![(7, 0.9), (3, 0.85), (5, 0.7)]);

        // 7: (0.9 + 0.8) / 2, 3: (0.85 + 0.5) / 2, 5: its only score 0.7.
        let mean = rank_labels(&neighbors, &labels, Aggregation::MeanTopK(2), 5);
        let expected = [(7, 0.85), (5, 0.7), (3, 0.675)];
        assert_eq!(mean.len(), 3);
        for ((label, score), (want_label, want_score)) in mean.iter().zip(expected) {
            assert_eq!(*label, want_label);
            assert!((score - want_score).abs() < 1e-6, "{label}: {score}");
        }

        let top1 = rank_labels(&neighbors, &labels, Aggregation::MeanTopK(2), 1);
        assert_eq!(top1.len(), 1);
        assert_eq!(top1[0].0, 7);
    }

    #[test]
    fn rank_labels_breaks_ties_by_lower_label_and_skips_unlabelled_rows() {
        let labels = [9, 4, 6];
        let neighbors = [n(0, 0.5), n(1, 0.5), n(2, 0.5), n(17, 0.99)];
        for how in [Aggregation::Max, Aggregation::MeanTopK(3)] {
            let ranked = rank_labels(&neighbors, &labels, how, 10);
            assert_eq!(ranked, vec![(4, 0.5), (6, 0.5), (9, 0.5)]);
        }
        assert!(rank_labels(&[], &labels, Aggregation::Max, 5).is_empty());
    }

    #[test]
    fn noisy_or_adds_up_photos_that_each_match_a_little() {
        // Individual 1: two photos at .6, 1 − .4·.4 = .84; individual 2: one photo at .8.
        let labels = [1, 1, 2];
        let neighbors = [n(0, 0.6), n(2, 0.8), n(1, 0.6)];
        let ranked = rank_labels(&neighbors, &labels, Aggregation::NoisyOr, 5);
        assert_eq!(ranked.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2]);
        assert!((ranked[0].1 - 0.84).abs() < 1e-6 && (ranked[1].1 - 0.8).abs() < 1e-6);
        let max = rank_labels(&neighbors, &labels, Aggregation::Max, 5);
        assert_eq!(max, vec![(2, 0.8), (1, 0.6)]);
        // Scores outside 0..1 count as certain or as nothing.
        assert_eq!(Aggregation::NoisyOr.combine(&[1.5, -2.0]), 1.0);
        assert_eq!(Aggregation::NoisyOr.combine(&[-1.0]), 0.0);
    }

    #[test]
    fn mean_of_top_zero_is_max() {
        let labels = [1, 1];
        let neighbors = [n(0, 0.25), n(1, 0.75)];
        let ranked = rank_labels(&neighbors, &labels, Aggregation::MeanTopK(0), 5);
        assert_eq!(ranked, vec![(1, 0.75)]);
    }

    #[test]
    fn rank_cmp_orders_by_score_then_id() {
        let mut v = [n(3, 0.5), n(1, 0.9), n(2, 0.5), n(0, 0.1)];
        v.sort_by(Neighbor::rank_cmp);
        let ids: Vec<u32> = v.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 0]);
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::Neighbor;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    /// `n` seeded random unit vectors, row-major.
    pub(crate) fn random_unit_vectors(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut v: Vec<f32> = (0..n * dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        for row in v.chunks_exact_mut(dim) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            row.iter_mut().for_each(|x| *x /= norm);
        }
        v
    }

    /// The reference: every score in f64, fully sorted, lower id first on ties.
    pub(crate) fn brute_force(
        rows: &[f32],
        queries: &[f32],
        dim: usize,
        k: usize,
    ) -> Vec<Vec<Neighbor>> {
        queries
            .chunks_exact(dim)
            .map(|q| {
                let mut all: Vec<Neighbor> = rows
                    .chunks_exact(dim)
                    .enumerate()
                    .map(|(id, r)| Neighbor {
                        id: id as u32,
                        score: q
                            .iter()
                            .zip(r)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>() as f32,
                    })
                    .collect();
                all.sort_by(Neighbor::rank_cmp);
                all.truncate(k);
                all
            })
            .collect()
    }
}
