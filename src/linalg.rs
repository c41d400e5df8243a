//! Row-major f32 matrices: their product, rows scaled to unit length, a row's largest values.

/// `a · b` for `a` `[m, k]` and `b` `[k, n]`, or `a · bᵀ` for `b` `[n, k]` when `transposed`;
/// row-major `[m, n]`.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, transposed: bool) -> Vec<f32> {
    assert!(
        a.len() >= m * k && b.len() >= k * n,
        "matrices smaller than their shapes"
    );
    let mut out = vec![0.0f32; m * n];
    let (rsb, csb) = match transposed {
        true => (1, k as isize),
        false => (n as isize, 1),
    };
    // SAFETY: the assert above keeps every index that the strides reach inside `a` and `b`;
    // `out` is [m, n].
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
    out
}

/// `row` scaled to unit length (left as it is when all zero).
pub fn normalize_row(row: &mut [f32]) {
    let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    row.iter_mut().for_each(|v| *v /= norm);
}

/// Each row of `dim` values of `rows` scaled to unit length.
pub fn normalize_rows(rows: &mut [f32], dim: usize) {
    rows.chunks_mut(dim.max(1)).for_each(normalize_row);
}

/// The `n` largest values of `row` as `(index, value)`, largest first (ties: lower
/// index). Selection, not a sort: O(len · log n) comparisons, and an insertion only for a
/// value among the best so far.
pub fn top_k(row: &[f32], n: usize) -> Vec<(usize, f32)> {
    let mut best: Vec<(usize, f32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return best;
    }
    for (i, &v) in row.iter().enumerate() {
        if best.len() == n && v <= best[n - 1].1 {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i, v));
        best.truncate(n);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_and_unit_rows_match_a_hand_computation() {
        // [[1, 2], [3, 4]] · [[5, 6], [7, 8]] = [[19, 22], [43, 50]].
        let (a, b) = ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]);
        assert_eq!(matmul(&a, &b, 2, 2, 2, false), [19.0, 22.0, 43.0, 50.0]);
        // · bᵀ = [[1·5+2·6, 1·7+2·8], [3·5+4·6, 3·7+4·8]] = [[17, 23], [39, 53]].
        assert_eq!(matmul(&a, &b, 2, 2, 2, true), [17.0, 23.0, 39.0, 53.0]);
        let mut rows = [3.0, 4.0, 0.0, 0.0];
        normalize_rows(&mut rows, 2);
        assert_eq!(rows, [0.6, 0.8, 0.0, 0.0]);
    }

    #[test]
    fn top_k_keeps_the_largest_in_order() {
        assert_eq!(
            top_k(&[0.1, 0.9, 0.5, 0.9, 0.3], 3),
            [(1, 0.9), (3, 0.9), (2, 0.5)]
        );
        assert_eq!(top_k(&[0.1, 0.9], 5), [(1, 0.9), (0, 0.1)]);
        assert!(top_k(&[0.1, 0.9], 0).is_empty());
    }
}
