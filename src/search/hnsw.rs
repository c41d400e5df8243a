//! Approximate search on a hierarchical navigable small-world graph (Malkov & Yashunin, 2016).

use super::kernels::{dot4_fn, dot_fn, Dot4Fn, DotFn};
use super::topk::TopK;
use super::{check_capacity, reserve_huge, rows_of, Index, Neighbor, SearchError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The knobs of an [`HnswIndex`], named as in hnswlib and faiss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    /// Links kept per node on the upper layers; `2·m` on the bottom layer.
    pub m: usize,
    /// Candidates followed while inserting: higher builds slower and a better graph.
    pub ef_construction: usize,
    /// Candidates followed while searching (at least `k`): higher is slower and more exact.
    pub ef_search: usize,
    /// Seeds the draw of each node's top layer.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 100,
            ef_search: 64,
            seed: 0,
        }
    }
}

/// Approximate search, as faiss's `IndexHNSWFlat` with inner product.
///
/// Rows are stored as f32, contiguously. Layer-0 links, which nearly every step of a search
/// follows, live in one flat array with a fixed number of slots per node (no pointer to chase);
/// the few nodes that reach higher layers keep those links in small lists. [`Index::add`]
/// inserts rows in parallel (rayon), so the graph, and with it the approximate results, depends
/// on thread timing unless the rayon pool has one thread; searching a built graph is
/// deterministic.
pub struct HnswIndex {
    dim: usize,
    params: HnswParams,
    vectors: Vec<f32>,
    /// Layer 0: `1 + 2·m` slots per node, the number of its links and then the links. Writers
    /// hold the node's lock; readers load without one and may see a list being rewritten, whose
    /// entries are all valid ids (the approximate search tolerates that).
    base: Vec<AtomicU32>,
    /// `upper[node][layer - 1]`: the node's links on the layers above 0 it reaches.
    upper: Vec<Vec<Mutex<Vec<u32>>>>,
    /// The node reaching the top layer, and that layer.
    entry: Option<(u32, usize)>,
    rng: ChaCha8Rng,
    dot: DotFn,
    dot4: Dot4Fn,
    scratch: Mutex<Vec<Scratch>>,
}

/// Cache lines of a row fetched ahead of scoring it: the hardware prefetcher streams the rest
/// (512-d rows: 2 built faster than 1, 8 or all 32 over 51,000 rows, and than 4 over 1,000,000).
const PREFETCH_LINES: usize = 2;
/// Nodes inserted one by one before the rest go in parallel, so that early nodes find each other.
const SERIAL_HEAD: usize = 256;
/// Layers above the bottom one that a node may reach.
const MAX_LAYER: usize = 16;

impl HnswIndex {
    /// An empty index of `dim`-dimensional rows; `m` is raised to at least 2.
    pub fn new(dim: usize, params: HnswParams) -> Self {
        let params = HnswParams {
            m: params.m.max(2),
            ef_construction: params.ef_construction.max(1),
            ..params
        };
        Self {
            dim,
            params,
            vectors: Vec::new(),
            base: Vec::new(),
            upper: Vec::new(),
            entry: None,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            dot: dot_fn(),
            dot4: dot4_fn(),
            scratch: Mutex::new(Vec::new()),
        }
    }

    pub fn params(&self) -> HnswParams {
        self.params
    }

    /// Sets how many candidates a search follows: the speed/recall trade-off of a built index.
    pub fn set_ef_search(&mut self, ef_search: usize) {
        self.params.ef_search = ef_search;
    }

    fn vector(&self, id: u32) -> &[f32] {
        let start = id as usize * self.dim;
        &self.vectors[start..start + self.dim]
    }

    fn row_score(&self, query: &[f32], id: u32) -> f32 {
        (self.dot)(query, self.vector(id))
    }

    /// Asks the CPU to fetch the start of row `id` while other work goes on.
    #[inline]
    fn prefetch(&self, id: u32) {
        let row = self.vectors.as_ptr().wrapping_add(id as usize * self.dim);
        for line in (0..self.dim).step_by(16).take(PREFETCH_LINES) {
            prefetch_line(row.wrapping_add(line));
        }
    }

    /// The scores of one to four rows `ids` for `query`, in one pass over the rows (a shorter
    /// chunk is padded with its last row, whose extra scores are not used).
    fn scores4(&self, query: &[f32], ids: &[u32]) -> [f32; 4] {
        let last = ids[ids.len() - 1];
        let id = |i: usize| ids.get(i).copied().unwrap_or(last);
        (self.dot4)(
            query,
            [id(0), id(1), id(2), id(3)].map(|id| self.vector(id)),
        )
    }

    /// Scores the rows `ids` for `query` and hands each to `each`, in order. Rows are scored
    /// four at a time while the next four are fetched: the cost is memory, not arithmetic.
    fn score_each(&self, query: &[f32], ids: &[u32], mut each: impl FnMut(Neighbor)) {
        ids.iter().take(4).for_each(|&id| self.prefetch(id));
        for (i, chunk) in ids.chunks(4).enumerate() {
            let ahead = ids.iter().skip(4 * (i + 1)).take(4);
            ahead.for_each(|&id| self.prefetch(id));
            for (&id, score) in chunk.iter().zip(self.scores4(query, chunk)) {
                each(Neighbor { id, score });
            }
        }
    }

    fn max_links(&self, layer: usize) -> usize {
        if layer == 0 {
            2 * self.params.m
        } else {
            self.params.m
        }
    }

    /// The layer-0 slots of `node`: its number of links, then room for `2·m` links.
    fn base_slots(&self, node: u32) -> &[AtomicU32] {
        let width = 1 + 2 * self.params.m;
        let start = node as usize * width;
        &self.base[start..start + width]
    }

    /// The links of `node` on `layer`, into `out`.
    fn links_into(&self, node: u32, layer: usize, out: &mut Vec<u32>) {
        out.clear();
        if layer == 0 {
            let slots = self.base_slots(node);
            let count = (slots[0].load(Relaxed) as usize).min(slots.len() - 1);
            out.extend(slots[1..=count].iter().map(|s| s.load(Relaxed)));
        } else if let Some(list) = self.upper[node as usize].get(layer - 1) {
            out.extend_from_slice(&lock(list));
        }
    }

    /// Replaces the layer-0 links of `node`; the caller holds its lock.
    fn set_base_links(&self, node: u32, links: &[u32]) {
        let slots = self.base_slots(node);
        let count = links.len().min(slots.len() - 1);
        for (slot, &id) in slots[1..].iter().zip(&links[..count]) {
            slot.store(id, Relaxed);
        }
        slots[0].store(count as u32, Release);
    }

    fn draw_layer(&mut self) -> usize {
        let scale = 1.0 / (self.params.m as f64).ln();
        let u: f64 = self.rng.gen();
        ((-(1.0 - u).ln() * scale) as usize).min(MAX_LAYER)
    }

    fn take_scratch(&self) -> Scratch {
        lock(&self.scratch).pop().unwrap_or_default()
    }

    fn give_back_scratch(&self, scratch: Scratch) {
        lock(&self.scratch).push(scratch);
    }

    /// Follows ever better neighbours on `layer` from `from` until none is better.
    fn greedy(&self, query: &[f32], from: Neighbor, layer: usize, buf: &mut Vec<u32>) -> Neighbor {
        let mut best = from;
        loop {
            self.links_into(best.id, layer, buf);
            let mut moved = false;
            self.score_each(query, buf, |candidate| {
                if candidate.rank_cmp(&best) == Ordering::Less {
                    best = candidate;
                    moved = true;
                }
            });
            if !moved {
                return best;
            }
        }
    }

    /// The best `ef` nodes of `layer` reached from `entries`, best first.
    fn search_layer(
        &self,
        query: &[f32],
        entries: &[Neighbor],
        ef: usize,
        layer: usize,
        scratch: &mut Scratch,
    ) -> Vec<Neighbor> {
        let Scratch {
            visited,
            frontier,
            links,
            fresh,
        } = scratch;
        visited.reset(self.len());
        frontier.clear();
        let mut found = TopK::new(ef);
        for &e in entries {
            if visited.insert(e.id) {
                frontier.push(Better(e));
                found.push(e);
            }
        }
        while let Some(Better(current)) = frontier.pop() {
            if found.is_full() && current.score < found.floor() {
                break;
            }
            self.links_into(current.id, layer, links);
            links.iter().for_each(|&id| visited.prefetch(id));
            if let (0, Some(Better(next))) = (layer, frontier.peek()) {
                prefetch_line(self.base_slots(next.id).as_ptr());
            }
            fresh.clear();
            fresh.extend(links.iter().copied().filter(|&id| visited.insert(id)));
            self.score_each(query, fresh, |candidate| {
                if !found.is_full() || candidate.score >= found.floor() {
                    frontier.push(Better(candidate));
                    found.push(candidate);
                }
            });
        }
        found.into_sorted()
    }

    /// Up to `m` of `candidates` (best first) that are each closer to the query than to any
    /// chosen before: the diversity heuristic that keeps long-range links.
    fn select(&self, candidates: &[Neighbor], m: usize) -> Vec<u32> {
        let mut chosen: Vec<u32> = Vec::with_capacity(m);
        for c in candidates {
            if chosen.len() == m {
                break;
            }
            if self.all_below(self.vector(c.id), &chosen, c.score) {
                chosen.push(c.id);
            }
        }
        chosen
    }

    /// Whether every row of `ids` scores below `bound` for `query`; four rows at a time, stopping
    /// after the first four that hold one at or above it.
    fn all_below(&self, query: &[f32], ids: &[u32], bound: f32) -> bool {
        ids.chunks(4).all(|chunk| {
            let scores = self.scores4(query, chunk);
            scores[..chunk.len()].iter().all(|&s| s < bound)
        })
    }

    /// Links node `id`, whose slots already exist, into the graph.
    fn insert(&self, id: u32, locks: &[Mutex<()>], entry: &Mutex<Option<(u32, usize)>>) {
        let Some((entry_id, top)) = *lock(entry) else {
            return;
        };
        let level = self.upper[id as usize].len();
        let query = self.vector(id);
        let mut scratch = self.take_scratch();
        let mut ep = Neighbor {
            id: entry_id,
            score: self.row_score(query, entry_id),
        };
        for layer in (level + 1..=top).rev() {
            ep = self.greedy(query, ep, layer, &mut scratch.links);
        }
        let mut entries = vec![ep];
        for layer in (0..=level.min(top)).rev() {
            let mut found = self.search_layer(
                query,
                &entries,
                self.params.ef_construction,
                layer,
                &mut scratch,
            );
            // A node inserted in parallel may already link back to this one, which the search
            // then finds: it is no neighbour of itself.
            found.retain(|n| n.id != id);
            let chosen = self.select(&found, self.max_links(layer));
            if layer == 0 {
                let _guard = lock(&locks[id as usize]);
                self.set_base_links(id, &chosen);
            } else {
                *lock(&self.upper[id as usize][layer - 1]) = chosen.clone();
            }
            for &other in &chosen {
                self.connect(other, id, layer, locks, &mut scratch.links);
            }
            if !found.is_empty() {
                entries = found;
            }
        }
        self.give_back_scratch(scratch);
        if level > top {
            let mut entry = lock(entry);
            if entry.is_none_or(|(_, top)| level > top) {
                *entry = Some((id, level));
            }
        }
    }

    /// Adds a link from `from` to `to` on `layer`, pruning `from`'s links when over the limit.
    fn connect(&self, from: u32, to: u32, layer: usize, locks: &[Mutex<()>], buf: &mut Vec<u32>) {
        let max = self.max_links(layer);
        if layer == 0 {
            let _guard = lock(&locks[from as usize]);
            self.links_into(from, 0, buf);
            if buf.len() < max {
                buf.push(to);
                self.set_base_links(from, buf);
            } else {
                let pruned = self.prune(from, buf, to, max);
                self.set_base_links(from, &pruned);
            }
            return;
        }
        let Some(list) = self.upper[from as usize].get(layer - 1) else {
            return;
        };
        let mut list = lock(list);
        if list.len() < max {
            list.push(to);
        } else {
            *list = self.prune(from, &list, to, max);
        }
    }

    /// The at most `max` links that `from` keeps of `links` and `to`, by [`Self::select`].
    fn prune(&self, from: u32, links: &[u32], to: u32, max: usize) -> Vec<u32> {
        let base = self.vector(from);
        let mut candidates = Vec::with_capacity(links.len() + 1);
        self.score_each(base, links, |n| candidates.push(n));
        candidates.push(Neighbor {
            id: to,
            score: self.row_score(base, to),
        });
        candidates.sort_by(Neighbor::rank_cmp);
        self.select(&candidates, max)
    }
}

impl Index for HnswIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.vectors.len() / self.dim.max(1)
    }

    fn add(&mut self, vectors: &[f32]) -> Result<(), SearchError> {
        let n = rows_of(vectors.len(), self.dim)?;
        let old = self.len();
        check_capacity(old, n)?;
        reserve_huge(&mut self.vectors, vectors.len());
        self.vectors.extend_from_slice(vectors);
        let width = 1 + 2 * self.params.m;
        reserve_huge(&mut self.base, n * width);
        self.base
            .resize_with((old + n) * width, || AtomicU32::new(0));
        for _ in 0..n {
            let layers = self.draw_layer();
            self.upper
                .push((0..layers).map(|_| Mutex::new(Vec::new())).collect());
        }
        // The new rows from the highest layer down, as faiss inserts them: the sparse upper
        // layers are in place before the many nodes that only reach layer 0 descend through them.
        let mut order: Vec<u32> = (old as u32..(old + n) as u32).collect();
        order.sort_by_key(|&id| std::cmp::Reverse(self.upper[id as usize].len()));
        let mut order = &order[..];
        if let (None, Some((&top, rest))) = (self.entry, order.split_first()) {
            self.entry = Some((top, self.upper[top as usize].len()));
            order = rest;
        }
        let locks: Vec<Mutex<()>> = (0..old + n).map(|_| Mutex::new(())).collect();
        let entry = Mutex::new(self.entry);
        let (head, tail) = order.split_at(SERIAL_HEAD.min(order.len()));
        let this = &*self;
        for &id in head {
            this.insert(id, &locks, &entry);
        }
        tail.par_iter()
            .for_each(|&id| this.insert(id, &locks, &entry));
        self.entry = entry.into_inner().unwrap_or_else(PoisonError::into_inner);
        Ok(())
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Neighbor>>, SearchError> {
        rows_of(queries.len(), self.dim)?;
        let ef = self.params.ef_search.max(k);
        Ok(queries
            .par_chunks_exact(self.dim)
            .map(|query| {
                let Some((entry_id, top)) = self.entry.filter(|_| k > 0) else {
                    return Vec::new();
                };
                let mut scratch = self.take_scratch();
                let mut ep = Neighbor {
                    id: entry_id,
                    score: self.row_score(query, entry_id),
                };
                for layer in (1..=top).rev() {
                    ep = self.greedy(query, ep, layer, &mut scratch.links);
                }
                let mut found = self.search_layer(query, &[ep], ef, 0, &mut scratch);
                self.give_back_scratch(scratch);
                found.truncate(k);
                found
            })
            .collect())
    }

    fn storage_bytes(&self) -> usize {
        let header = std::mem::size_of::<Vec<Mutex<Vec<u32>>>>();
        let list = std::mem::size_of::<Mutex<Vec<u32>>>();
        let upper: usize = self
            .upper
            .iter()
            .map(|layers| {
                header
                    + layers
                        .iter()
                        .map(|l| list + 4 * lock(l).capacity())
                        .sum::<usize>()
            })
            .sum();
        std::mem::size_of_val(self.vectors.as_slice())
            + std::mem::size_of_val(self.base.as_slice())
            + upper
    }

    fn score(&self, query: &[f32], id: usize) -> Option<f32> {
        let row = self
            .vectors
            .get(id.checked_mul(self.dim)?..(id + 1).checked_mul(self.dim)?)?;
        (query.len() == self.dim).then(|| (self.dot)(query, row))
    }
}

/// Asks the CPU to fetch the cache line holding `p` while other work goes on.
#[inline]
fn prefetch_line<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint that never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A neighbour ordered so that the better of two compares greater.
struct Better(Neighbor);

impl Ord for Better {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.rank_cmp(&self.0)
    }
}

impl PartialOrd for Better {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Better {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Better {}

/// What one search reuses from the last: the visited set, the frontier and link buffers.
#[derive(Default)]
struct Scratch {
    visited: Visited,
    frontier: BinaryHeap<Better>,
    links: Vec<u32>,
    /// The links not visited yet.
    fresh: Vec<u32>,
}

/// Which nodes one search has seen: a stamp per node, so clearing is one increment.
#[derive(Default)]
struct Visited {
    stamps: Vec<u32>,
    stamp: u32,
}

impl Visited {
    fn reset(&mut self, n: usize) {
        if self.stamps.len() < n {
            self.stamps.resize(n, 0);
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            self.stamps.fill(0);
            self.stamp = 1;
        }
    }

    /// Asks the CPU to fetch `id`'s stamp while other work goes on.
    #[inline]
    fn prefetch(&self, id: u32) {
        if let Some(stamp) = self.stamps.get(id as usize) {
            prefetch_line(stamp);
        }
    }

    /// Marks `id` seen; whether it was unseen.
    fn insert(&mut self, id: u32) -> bool {
        match self.stamps.get_mut(id as usize) {
            Some(s) if *s != self.stamp => {
                *s = self.stamp;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::tests_support::random_unit_vectors;
    use crate::search::{FlatIndex, Storage};

    fn recall_at(k: usize, got: &[Vec<Neighbor>], exact: &[Vec<Neighbor>]) -> f64 {
        let hits: usize = got
            .iter()
            .zip(exact)
            .map(|(g, e)| g.iter().filter(|n| e.iter().any(|x| x.id == n.id)).count())
            .sum();
        hits as f64 / (k * exact.len()) as f64
    }

    #[test]
    fn recall_at_10_is_at_least_095_on_random_vectors() {
        let dim = 64;
        let rows = random_unit_vectors(10_000, dim, 11);
        let queries = random_unit_vectors(200, dim, 12);
        let mut flat = FlatIndex::new(dim, Storage::F32);
        flat.add(&rows).expect("whole rows");
        let exact = flat.search(&queries, 10).expect("search");

        let params = HnswParams {
            ef_search: 128,
            ..HnswParams::default()
        };
        let mut hnsw = HnswIndex::new(dim, params);
        // Two batches: the second is inserted into the graph of the first.
        hnsw.add(&rows[..4_000 * dim]).expect("whole rows");
        hnsw.add(&rows[4_000 * dim..]).expect("whole rows");
        assert_eq!(hnsw.len(), 10_000);
        let got = hnsw.search(&queries, 10).expect("search");
        assert!(got.iter().all(|g| g.len() == 10));
        for g in &got {
            assert!(g.windows(2).all(|w| w[0].rank_cmp(&w[1]) == Ordering::Less));
        }
        let recall = recall_at(10, &got, &exact);
        assert!(recall >= 0.95, "recall@10 = {recall}");
    }

    /// `per` photos of each of `individuals` random centres: centre + noise (cosine about 0.8),
    /// renormalised, in an order mixing the individuals; and one new photo of every 7th.
    fn clustered(individuals: usize, per: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let centres = random_unit_vectors(individuals, dim, seed);
        let photo = |i: usize, noise: &[f32]| -> Vec<f32> {
            let c = &centres[i * dim..(i + 1) * dim];
            let mut v: Vec<f32> = c.iter().zip(noise).map(|(c, e)| c + 0.75 * e).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        };
        let noise = random_unit_vectors(individuals * per, dim, seed + 1);
        let rows = (0..individuals * per)
            .flat_map(|r| photo(r % individuals, &noise[r * dim..(r + 1) * dim]))
            .collect();
        let fresh = random_unit_vectors(individuals, dim, seed + 2);
        let queries = (0..individuals)
            .step_by(7)
            .flat_map(|i| photo(i, &fresh[i * dim..(i + 1) * dim]))
            .collect();
        (rows, queries)
    }

    #[test]
    fn recall_at_10_is_at_least_095_on_clustered_vectors_at_ef_64() {
        let dim = 64;
        let (rows, queries) = clustered(2_000, 5, dim, 21);
        let mut flat = FlatIndex::new(dim, Storage::F32);
        flat.add(&rows).expect("whole rows");
        let exact = flat.search(&queries, 10).expect("search");
        let params = HnswParams {
            ef_construction: 40,
            ef_search: 64,
            ..HnswParams::default()
        };
        let mut hnsw = HnswIndex::new(dim, params);
        hnsw.add(&rows).expect("whole rows");
        let got = hnsw.search(&queries, 10).expect("search");
        let recall = recall_at(10, &got, &exact);
        assert!(recall >= 0.95, "recall@10 = {recall}");
        // Every query's own individual (rows i, i + 2000, ...) comes first.
        for (q, g) in got.iter().enumerate() {
            assert_eq!(g[0].id as usize % 2_000, q * 7, "query {q}");
        }
        // Layer-0 lists stay within their 2·m slots and name existing rows other than the node.
        for node in 0..hnsw.len() as u32 {
            let mut links = Vec::new();
            hnsw.links_into(node, 0, &mut links);
            assert!(!links.is_empty() && links.len() <= 2 * params.m);
            assert!(links
                .iter()
                .all(|&l| l != node && (l as usize) < hnsw.len()));
        }
    }

    #[test]
    fn small_and_empty_indexes_and_bad_shapes() {
        let dim = 8;
        let mut hnsw = HnswIndex::new(dim, HnswParams::default());
        assert!(hnsw.search(&[0.0; 8], 3).expect("search")[0].is_empty());
        let rows = random_unit_vectors(5, dim, 13);
        hnsw.add(&rows).expect("whole rows");
        let got = hnsw.search(&rows, 10).expect("search");
        for (i, g) in got.iter().enumerate() {
            assert_eq!(g.len(), 5);
            assert_eq!(g[0].id, i as u32);
        }
        assert!(hnsw.search(&rows, 0).expect("search")[0].is_empty());
        assert_eq!(
            hnsw.add(&[0.0; 3]),
            Err(SearchError::Shape { len: 3, dim: 8 })
        );
        assert_eq!(
            hnsw.search(&[0.0; 9], 1),
            Err(SearchError::Shape { len: 9, dim: 8 })
        );
        assert_eq!(hnsw.len(), 5);
    }
}
