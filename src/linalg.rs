//! Row-major f32 matrices: their product, rows scaled to unit length, a row's largest values;
//! the eigen-decomposition of a small symmetric matrix.

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

/// Eigenvalues (descending) and unit eigenvectors of the symmetric `[n, n]` matrix `m`
/// (row-major, f64), by cyclic Jacobi rotations: `vectors` is row-major `[n, n]`, eigenvector
/// `j` in column `j`. For the small matrices of finprint (a descriptor's covariance, n ≤ a few
/// hundred): each sweep costs O(n³), and a few sweeps reach f64 precision.
pub fn symmetric_eigen(m: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(m.len(), n * n, "a square matrix");
    let mut a = m.to_vec();
    let mut v = vec![0.0f64; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                // The rotation that zeroes a[p][q]: tan θ = t, the smaller root.
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let vectors = (0..n)
        .flat_map(|r| order.iter().map(move |&c| (r, c)))
        .map(|(r, c)| v[r * n + c])
        .collect();
    (values, vectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_eigen_finds_hand_computed_pairs_and_rebuilds_the_matrix() {
        // [[2, 1], [1, 2]]: 3 along (1, 1)/√2, 1 along (1, −1)/√2.
        let (values, vectors) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
        assert!((values[0] - 3.0).abs() < 1e-12 && (values[1] - 1.0).abs() < 1e-12);
        let h = 0.5f64.sqrt();
        assert!((vectors[0].abs() - h).abs() < 1e-12 && (vectors[0] - vectors[2]).abs() < 1e-12);
        assert!((vectors[1] + vectors[3]).abs() < 1e-12);
        // A 6×6 symmetric matrix: V·diag(λ)·Vᵀ gives it back, V orthonormal, λ descending.
        let n = 6;
        let m: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                ((i * j) as f64).sin() + ((i + j) as f64).cos() + if i == j { 3.0 } else { 0.0 }
            })
            .collect();
        let (values, vectors) = symmetric_eigen(&m, n);
        assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
        for i in 0..n {
            for j in 0..n {
                let back: f64 = (0..n)
                    .map(|k| vectors[i * n + k] * values[k] * vectors[j * n + k])
                    .sum();
                let dot: f64 = (0..n)
                    .map(|k| vectors[k * n + i] * vectors[k * n + j])
                    .sum();
                assert!((back - m[i * n + j]).abs() < 1e-9, "({i}, {j}): {back}");
                assert!(
                    (dot - f64::from(u8::from(i == j))).abs() < 1e-9,
                    "({i}, {j}): {dot}"
                );
            }
        }
    }

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
