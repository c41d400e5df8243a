//! Exact search: every query against every row.

use super::kernels::{dot_fn, DotFn};
use super::topk::TopK;
use super::{check_capacity, reserve_huge, rows_of, Index, Neighbor, SearchError};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// How a [`FlatIndex`] stores its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// 4 bytes a value, exact.
    F32,
    /// 2 bytes a value: half the memory, scores off by about 1e-3 for normalised rows.
    F16,
}

#[derive(Clone)]
enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

/// Exact search by brute force, as faiss's `IndexFlatIP`.
///
/// Rows are scanned in chunks of [`ROW_CHUNK`] in parallel (rayon); against each chunk, blocks of
/// queries are scored with one matrix product, or with plain inner products when there are only
/// a few queries, and every query keeps its best `k` in a bounded heap. f16 rows are widened to
/// f32 a chunk at a time. Scores of the same pair may differ in the last bits between a batched
/// and a single-query search, as the two sum in different orders.
#[derive(Clone)]
pub struct FlatIndex {
    dim: usize,
    rows: Rows,
    dot: DotFn,
}

/// Rows scored together: a chunk of 512 rows × 512 f32 fits in a core's L2 cache.
const ROW_CHUNK: usize = 512;
/// Queries scored by one matrix product.
const QUERY_BLOCK: usize = 256;
/// Queries whose heaps are kept at once, bounding memory for very large batches.
const QUERY_PASS: usize = 4096;
/// Below this many queries, plain inner products beat a matrix product (which packs its inputs).
const MIN_GEMM_QUERIES: usize = 8;

impl FlatIndex {
    /// An empty index of `dim`-dimensional rows.
    pub fn new(dim: usize, storage: Storage) -> Self {
        let rows = match storage {
            Storage::F32 => Rows::F32(Vec::new()),
            Storage::F16 => Rows::F16(Vec::new()),
        };
        Self {
            dim,
            rows,
            dot: dot_fn(),
        }
    }

    pub fn storage(&self) -> Storage {
        match self.rows {
            Rows::F32(_) => Storage::F32,
            Rows::F16(_) => Storage::F16,
        }
    }

    /// Scores the queries of `queries` against rows `chunk·ROW_CHUNK..` into `part`.
    fn scan_chunk(&self, chunk: usize, queries: &[f32], part: &mut Partial) {
        let dim = self.dim;
        let start = chunk * ROW_CHUNK;
        let end = (start + ROW_CHUNK).min(self.len());
        let Partial { tops, wide, scores } = part;
        let rows: &[f32] = match &self.rows {
            Rows::F32(v) => &v[start * dim..end * dim],
            Rows::F16(v) => {
                wide.resize((end - start) * dim, 0.0);
                v[start * dim..end * dim].convert_to_f32_slice(wide);
                wide
            }
        };
        let nrows = end - start;
        let nq = queries.len() / dim;
        let id = |j: usize| (start + j) as u32;
        if nq < MIN_GEMM_QUERIES {
            for (q, top) in queries.chunks_exact(dim).zip(tops.iter_mut()) {
                for (j, row) in rows.chunks_exact(dim).enumerate() {
                    let score = (self.dot)(q, row);
                    top.push(Neighbor { id: id(j), score });
                }
            }
            return;
        }
        for (block, block_tops) in queries
            .chunks(QUERY_BLOCK * dim)
            .zip(tops.chunks_mut(QUERY_BLOCK))
        {
            let m = block.len() / dim;
            scores.resize(m * nrows, 0.0);
            // SAFETY: `block` is m × dim and `rows` nrows × dim, both row-major, read as A (m × dim)
            // and Bᵀ (dim × nrows); `scores` is a separate m × nrows buffer written as C.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    dim,
                    nrows,
                    1.0,
                    block.as_ptr(),
                    dim as isize,
                    1,
                    rows.as_ptr(),
                    1,
                    dim as isize,
                    0.0,
                    scores.as_mut_ptr(),
                    nrows as isize,
                    1,
                );
            }
            for (row_scores, top) in scores.chunks_exact(nrows).zip(block_tops.iter_mut()) {
                for (j, &score) in row_scores.iter().enumerate() {
                    top.push(Neighbor { id: id(j), score });
                }
            }
        }
    }
}

/// One worker's best rows so far for a pass of queries, and its scratch buffers.
struct Partial {
    tops: Vec<TopK>,
    wide: Vec<f32>,
    scores: Vec<f32>,
}

impl Partial {
    fn new(queries: usize, k: usize) -> Self {
        Self {
            tops: vec![TopK::new(k); queries],
            wide: Vec::new(),
            scores: Vec::new(),
        }
    }

    fn merge(mut self, other: Partial) -> Self {
        for (mine, theirs) in self.tops.iter_mut().zip(other.tops) {
            mine.merge(theirs);
        }
        self
    }
}

impl Index for FlatIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        match &self.rows {
            Rows::F32(v) => v.len() / self.dim.max(1),
            Rows::F16(v) => v.len() / self.dim.max(1),
        }
    }

    fn add(&mut self, vectors: &[f32]) -> Result<(), SearchError> {
        let n = rows_of(vectors.len(), self.dim)?;
        check_capacity(self.len(), n)?;
        match &mut self.rows {
            Rows::F32(v) => {
                reserve_huge(v, vectors.len());
                v.extend_from_slice(vectors);
            }
            Rows::F16(v) => {
                let start = v.len();
                reserve_huge(v, vectors.len());
                v.resize(start + vectors.len(), f16::ZERO);
                v[start..].convert_from_f32_slice(vectors);
            }
        }
        Ok(())
    }

    fn search(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<Neighbor>>, SearchError> {
        let nq = rows_of(queries.len(), self.dim)?;
        let chunks = self.len().div_ceil(ROW_CHUNK);
        let mut out = Vec::with_capacity(nq);
        for pass in queries.chunks(QUERY_PASS * self.dim) {
            let pass_nq = pass.len() / self.dim;
            let best = (0..chunks)
                .into_par_iter()
                .fold(
                    || Partial::new(pass_nq, k),
                    |mut part, chunk| {
                        self.scan_chunk(chunk, pass, &mut part);
                        part
                    },
                )
                .reduce(|| Partial::new(pass_nq, k), Partial::merge);
            out.extend(best.tops.into_iter().map(TopK::into_sorted));
        }
        Ok(out)
    }

    fn storage_bytes(&self) -> usize {
        match &self.rows {
            Rows::F32(v) => std::mem::size_of_val(v.as_slice()),
            Rows::F16(v) => std::mem::size_of_val(v.as_slice()),
        }
    }

    fn score(&self, query: &[f32], id: usize) -> Option<f32> {
        if query.len() != self.dim {
            return None;
        }
        let range = id.checked_mul(self.dim)?..(id + 1).checked_mul(self.dim)?;
        match &self.rows {
            Rows::F32(v) => Some((self.dot)(query, v.get(range)?)),
            Rows::F16(v) => {
                let row: Vec<f32> = v.get(range)?.iter().map(|x| x.to_f32()).collect();
                Some((self.dot)(query, &row))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::tests_support::{brute_force, random_unit_vectors};

    fn index_of(dim: usize, storage: Storage, rows: &[f32]) -> FlatIndex {
        let mut index = FlatIndex::new(dim, storage);
        index.add(rows).expect("whole rows");
        index
    }

    fn assert_same(got: &[Vec<Neighbor>], want: &[Vec<Neighbor>], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (q, (g, w)) in got.iter().zip(want).enumerate() {
            let g_ids: Vec<u32> = g.iter().map(|n| n.id).collect();
            let w_ids: Vec<u32> = w.iter().map(|n| n.id).collect();
            assert_eq!(g_ids, w_ids, "query {q}");
            for (a, b) in g.iter().zip(w) {
                assert!(
                    (a.score - b.score).abs() <= tol,
                    "query {q}: {a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn f32_matches_brute_force_single_and_batched() {
        let dim = 64;
        let rows = random_unit_vectors(2_000, dim, 1);
        let queries = random_unit_vectors(50, dim, 2);
        let index = index_of(dim, Storage::F32, &rows);
        assert_eq!(index.len(), 2_000);
        let want = brute_force(&rows, &queries, dim, 10);
        assert_same(&index.search(&queries, 10).expect("search"), &want, 1e-5);
        // Few queries take the inner-product path instead of the matrix product.
        let few = &queries[..3 * dim];
        assert_same(&index.search(few, 10).expect("search"), &want[..3], 1e-5);
    }

    #[test]
    fn score_of_one_row_matches_the_search() {
        let dim = 16;
        let rows = random_unit_vectors(20, dim, 8);
        let query = &random_unit_vectors(1, dim, 9)[..];
        for storage in [Storage::F32, Storage::F16] {
            let index = index_of(dim, storage, &rows);
            for n in &index.search(query, 20).expect("search")[0] {
                let score = index.score(query, n.id as usize).expect("a row");
                assert!((score - n.score).abs() < 1e-5, "{storage:?} row {}", n.id);
            }
            assert_eq!(index.score(query, 20), None);
            assert_eq!(index.score(&query[..dim - 1], 0), None);
        }
    }

    #[test]
    fn f32_handles_k_beyond_len_zero_k_and_an_empty_index() {
        let dim = 8;
        let rows = random_unit_vectors(5, dim, 3);
        let queries = random_unit_vectors(10, dim, 4);
        let index = index_of(dim, Storage::F32, &rows);
        let got = index.search(&queries, 50).expect("search");
        assert_same(&got, &brute_force(&rows, &queries, dim, 50), 1e-5);
        assert!(got.iter().all(|n| n.len() == 5));
        let none = index.search(&queries, 0).expect("search");
        assert!(none.iter().all(Vec::is_empty));

        let empty = FlatIndex::new(dim, Storage::F32);
        assert!(empty.is_empty());
        let got = empty.search(&queries, 3).expect("search");
        assert_eq!(got.len(), 10);
        assert!(got.iter().all(Vec::is_empty));
        assert!(empty.search(&[], 3).expect("search").is_empty());
    }

    #[test]
    fn ties_put_the_lower_id_first() {
        let dim = 16;
        let base = random_unit_vectors(3, dim, 5);
        // Rows 0..30 repeat three vectors, so every score appears ten times.
        let rows: Vec<f32> = (0..30)
            .flat_map(|i| base[(i % 3) * dim..(i % 3 + 1) * dim].to_vec())
            .collect();
        let index = index_of(dim, Storage::F32, &rows);
        for nq in [1, 20] {
            let queries: Vec<f32> = base[..dim].repeat(nq);
            for result in index.search(&queries, 4).expect("search") {
                let ids: Vec<u32> = result.iter().map(|n| n.id).collect();
                assert_eq!(ids, vec![0, 3, 6, 9]);
            }
        }
    }

    #[test]
    fn f16_keeps_top1_on_separated_data_within_1e3() {
        let dim = 64;
        let rows = random_unit_vectors(1_000, dim, 6);
        // Each query is a catalogue row plus a little noise: its row stands out clearly.
        let noise = random_unit_vectors(40, dim, 7);
        let queries: Vec<f32> = (0..40)
            .flat_map(|q| {
                let row = &rows[q * 25 * dim..(q * 25 + 1) * dim];
                let v: Vec<f32> = row
                    .iter()
                    .zip(&noise[q * dim..(q + 1) * dim])
                    .map(|(r, n)| r + 0.1 * n)
                    .collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(move |x| x / norm)
            })
            .collect();
        let exact = brute_force(&rows, &queries, dim, 5);
        let index = index_of(dim, Storage::F16, &rows);
        assert_eq!(index.storage(), Storage::F16);
        assert_eq!(index.storage_bytes(), 1_000 * dim * 2);
        for few in [&queries[..dim], &queries[..]] {
            let got = index.search(few, 5).expect("search");
            for (q, (g, w)) in got.iter().zip(&exact).enumerate() {
                assert_eq!(g[0].id, (q * 25) as u32);
                assert_eq!(g[0].id, w[0].id);
                for b in w {
                    if let Some(a) = g.iter().find(|n| n.id == b.id) {
                        assert!((a.score - b.score).abs() <= 1e-3, "{a:?} vs {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_that_change_nothing() {
        let mut index = FlatIndex::new(4, Storage::F32);
        assert_eq!(
            index.add(&[1.0; 6]),
            Err(SearchError::Shape { len: 6, dim: 4 })
        );
        assert!(index.is_empty());
        index.add(&[1.0; 8]).expect("two rows");
        assert_eq!(
            index.search(&[1.0; 3], 1),
            Err(SearchError::Shape { len: 3, dim: 4 })
        );
        let mut zero = FlatIndex::new(0, Storage::F16);
        assert_eq!(zero.add(&[]), Err(SearchError::ZeroDimension));
        assert_eq!(zero.search(&[], 1), Err(SearchError::ZeroDimension));
        assert_eq!(zero.len(), 0);
    }
}
