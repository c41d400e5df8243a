//! Approximate search on a hierarchical navigable small-world graph (Malkov & Yashunin, 2016).

use super::kernels::{dot_fn, DotFn};
use super::topk::TopK;
use super::{check_capacity, rows_of, Index, Neighbor, SearchError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
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
/// Rows are stored as f32 beside their links. [`Index::add`] inserts rows in parallel (rayon),
/// so the graph, and with it the approximate results, depends on thread timing unless the
/// rayon pool has one thread; searching a built graph is deterministic.
pub struct HnswIndex {
    dim: usize,
    params: HnswParams,
    vectors: Vec<f32>,
    /// `links[node][layer]`: the node's neighbours on each layer it reaches.
    links: Vec<Vec<Vec<u32>>>,
    /// The node reaching the top layer, and that layer.
    entry: Option<(u32, usize)>,
    rng: ChaCha8Rng,
    dot: DotFn,
    visited: Mutex<Vec<Visited>>,
}

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
            links: Vec::new(),
            entry: None,
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            dot: dot_fn(),
            visited: Mutex::new(Vec::new()),
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

    fn score(&self, query: &[f32], id: u32) -> f32 {
        (self.dot)(query, self.vector(id))
    }

    fn max_links(&self, layer: usize) -> usize {
        if layer == 0 {
            2 * self.params.m
        } else {
            self.params.m
        }
    }

    fn draw_layer(&mut self) -> usize {
        let scale = 1.0 / (self.params.m as f64).ln();
        let u: f64 = self.rng.gen();
        ((-(1.0 - u).ln() * scale) as usize).min(MAX_LAYER)
    }

    fn take_visited(&self) -> Visited {
        lock(&self.visited).pop().unwrap_or_default()
    }

    fn give_back_visited(&self, visited: Visited) {
        lock(&self.visited).push(visited);
    }

    /// Follows ever better neighbours on `layer` from `from` until none is better.
    fn greedy(&self, query: &[f32], from: Neighbor, layer: usize, graph: &impl Links) -> Neighbor {
        let mut best = from;
        let mut buf = Vec::new();
        loop {
            graph.copy_into(best.id, layer, &mut buf);
            let mut moved = false;
            for &id in &buf {
                let candidate = Neighbor {
                    id,
                    score: self.score(query, id),
                };
                if candidate.rank_cmp(&best) == Ordering::Less {
                    best = candidate;
                    moved = true;
                }
            }
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
        graph: &impl Links,
        visited: &mut Visited,
    ) -> Vec<Neighbor> {
        visited.reset(self.len());
        let mut frontier: BinaryHeap<Better> = BinaryHeap::new();
        let mut found = TopK::new(ef);
        for &e in entries {
            if visited.insert(e.id) {
                frontier.push(Better(e));
                found.push(e);
            }
        }
        let mut buf = Vec::new();
        while let Some(Better(current)) = frontier.pop() {
            if found.is_full() && current.score < found.floor() {
                break;
            }
            graph.copy_into(current.id, layer, &mut buf);
            for &id in &buf {
                if !visited.insert(id) {
                    continue;
                }
                let candidate = Neighbor {
                    id,
                    score: self.score(query, id),
                };
                if !found.is_full() || candidate.score >= found.floor() {
                    frontier.push(Better(candidate));
                    found.push(candidate);
                }
            }
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
            let v = self.vector(c.id);
            if chosen.iter().all(|&r| self.score(v, r) < c.score) {
                chosen.push(c.id);
            }
        }
        chosen
    }

    /// Links node `id`, whose layers already exist in `graph`, into the graph.
    fn insert(&self, id: u32, graph: &BuildGraph, entry: &Mutex<Option<(u32, usize)>>) {
        let Some((entry_id, top)) = *lock(entry) else {
            return;
        };
        let level = graph.nodes[id as usize].len().saturating_sub(1);
        let query = self.vector(id);
        let mut ep = Neighbor {
            id: entry_id,
            score: self.score(query, entry_id),
        };
        for layer in (level + 1..=top).rev() {
            ep = self.greedy(query, ep, layer, graph);
        }
        let mut visited = self.take_visited();
        let mut entries = vec![ep];
        for layer in (0..=level.min(top)).rev() {
            let found = self.search_layer(
                query,
                &entries,
                self.params.ef_construction,
                layer,
                graph,
                &mut visited,
            );
            let chosen = self.select(&found, self.max_links(layer));
            if let Some(mine) = graph.layer(id, layer) {
                *lock(mine) = chosen.clone();
            }
            for &other in &chosen {
                self.connect(other, id, layer, graph);
            }
            entries = found;
        }
        self.give_back_visited(visited);
        if level > top {
            let mut entry = lock(entry);
            if entry.is_none_or(|(_, top)| level > top) {
                *entry = Some((id, level));
            }
        }
    }

    /// Adds a link from `from` to `to` on `layer`, pruning `from`'s links when over the limit.
    fn connect(&self, from: u32, to: u32, layer: usize, graph: &BuildGraph) {
        let Some(list) = graph.layer(from, layer) else {
            return;
        };
        let mut list = lock(list);
        let max = self.max_links(layer);
        if list.len() < max {
            list.push(to);
            return;
        }
        let base = self.vector(from);
        let mut candidates: Vec<Neighbor> = list
            .iter()
            .chain(std::iter::once(&to))
            .map(|&id| Neighbor {
                id,
                score: self.score(base, id),
            })
            .collect();
        candidates.sort_by(Neighbor::rank_cmp);
        *list = self.select(&candidates, max);
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
        self.vectors.extend_from_slice(vectors);
        let mut links = std::mem::take(&mut self.links);
        for _ in 0..n {
            let layers = self.draw_layer() + 1;
            links.push(vec![Vec::new(); layers]);
        }
        let graph = BuildGraph {
            nodes: links
                .into_iter()
                .map(|layers| layers.into_iter().map(Mutex::new).collect())
                .collect(),
        };
        let mut first = old;
        if self.entry.is_none() && n > 0 {
            self.entry = Some((old as u32, graph.nodes[old].len() - 1));
            first += 1;
        }
        let entry = Mutex::new(self.entry);
        let head_end = (first + SERIAL_HEAD).min(old + n);
        let this = &*self;
        for id in first..head_end {
            this.insert(id as u32, &graph, &entry);
        }
        (head_end..old + n)
            .into_par_iter()
            .for_each(|id| this.insert(id as u32, &graph, &entry));
        self.entry = entry.into_inner().unwrap_or_else(PoisonError::into_inner);
        self.links = graph
            .nodes
            .into_iter()
            .map(|layers| {
                layers
                    .into_iter()
                    .map(|l| l.into_inner().unwrap_or_else(PoisonError::into_inner))
                    .collect()
            })
            .collect();
        Ok(())
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Neighbor>>, SearchError> {
        rows_of(queries.len(), self.dim)?;
        let graph = FrozenGraph(&self.links);
        let ef = self.params.ef_search.max(k);
        Ok(queries
            .par_chunks_exact(self.dim)
            .map(|query| {
                let Some((entry_id, top)) = self.entry.filter(|_| k > 0) else {
                    return Vec::new();
                };
                let mut ep = Neighbor {
                    id: entry_id,
                    score: self.score(query, entry_id),
                };
                for layer in (1..=top).rev() {
                    ep = self.greedy(query, ep, layer, &graph);
                }
                let mut visited = self.take_visited();
                let mut found = self.search_layer(query, &[ep], ef, 0, &graph, &mut visited);
                self.give_back_visited(visited);
                found.truncate(k);
                found
            })
            .collect())
    }

    fn storage_bytes(&self) -> usize {
        let header = std::mem::size_of::<Vec<u32>>();
        let links: usize = self
            .links
            .iter()
            .map(|layers| {
                header
                    + layers
                        .iter()
                        .map(|l| header + 4 * l.capacity())
                        .sum::<usize>()
            })
            .sum();
        std::mem::size_of_val(self.vectors.as_slice()) + links
    }
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

/// Read access to the neighbours of a node on a layer.
trait Links {
    fn copy_into(&self, node: u32, layer: usize, out: &mut Vec<u32>);
}

/// The graph while nodes are inserted in parallel: one lock per node and layer.
struct BuildGraph {
    nodes: Vec<Vec<Mutex<Vec<u32>>>>,
}

impl BuildGraph {
    fn layer(&self, node: u32, layer: usize) -> Option<&Mutex<Vec<u32>>> {
        self.nodes.get(node as usize)?.get(layer)
    }
}

impl Links for BuildGraph {
    fn copy_into(&self, node: u32, layer: usize, out: &mut Vec<u32>) {
        out.clear();
        if let Some(list) = self.layer(node, layer) {
            out.extend_from_slice(&lock(list));
        }
    }
}

/// The built graph, read without locks.
struct FrozenGraph<'a>(&'a [Vec<Vec<u32>>]);

impl Links for FrozenGraph<'_> {
    fn copy_into(&self, node: u32, layer: usize, out: &mut Vec<u32>) {
        out.clear();
        if let Some(list) = self.0.get(node as usize).and_then(|l| l.get(layer)) {
            out.extend_from_slice(list);
        }
    }
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
