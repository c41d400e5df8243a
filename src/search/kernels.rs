//! Inner products, chosen once for the CPU at hand.

/// An inner product of two equally long slices.
pub(crate) type DotFn = fn(&[f32], &[f32]) -> f32;

/// The inner products of one query with four rows, each equal bit for bit to [`DotFn`]'s: one
/// pass loads the query once for the four rows and keeps four rows' loads in flight.
pub(crate) type Dot4Fn = fn(&[f32], [&[f32]; 4]) -> [f32; 4];

/// Independent accumulators: enough to keep a few vector registers busy.
const LANES: usize = 32;

fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (xs, ys) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in xs.zip(ys) {
        // Fixed-size arrays let the compiler unroll and vectorise the lanes.
        let (Ok(x), Ok(y)) = (<&[f32; LANES]>::try_from(x), <&[f32; LANES]>::try_from(y)) else {
            continue;
        };
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        let (low, high) = acc.split_at_mut(width);
        for (l, h) in low.iter_mut().zip(high.iter()) {
            *l += *h;
        }
        width /= 2;
    }
    acc[0] + tail
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (j, s) in acc.iter_mut().enumerate() {
            let x = _mm256_loadu_ps(pa.add(i + 8 * j));
            let y = _mm256_loadu_ps(pb.add(i + 8 * j));
            *s = _mm256_fmadd_ps(x, y, *s);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
    sum_lanes(acc) + tail
}

/// The sum of four accumulators' lanes, in the one order both AVX2 kernels share.
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_lanes(acc: [std::arch::x86_64::__m256; 4]) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
    _mm_cvtss_f32(q)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2_fma(a: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = rows.iter().fold(a.len(), |n, r| n.min(r.len()));
    let pa = a.as_ptr();
    let pb = rows.map(<[f32]>::as_ptr);
    // The same accumulators, in the same order, as `dot_avx2_fma` keeps for each row.
    let mut acc = [[_mm256_setzero_ps(); 4]; 4];
    let mut i = 0;
    while i + 32 <= n {
        for j in 0..4 {
            let x = _mm256_loadu_ps(pa.add(i + 8 * j));
            for (s, p) in acc.iter_mut().zip(pb) {
                s[j] = _mm256_fmadd_ps(x, _mm256_loadu_ps(p.add(i + 8 * j)), s[j]);
            }
        }
        i += 32;
    }
    while i + 8 <= n {
        let x = _mm256_loadu_ps(pa.add(i));
        for (s, p) in acc.iter_mut().zip(pb) {
            s[0] = _mm256_fmadd_ps(x, _mm256_loadu_ps(p.add(i)), s[0]);
        }
        i += 8;
    }
    let mut out = [0.0; 4];
    for ((o, s), row) in out.iter_mut().zip(acc).zip(rows) {
        let tail: f32 = a[i..n].iter().zip(&row[i..n]).map(|(x, y)| x * y).sum();
        *o = sum_lanes(s) + tail;
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn dot4_avx2_fma_checked(a: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    // SAFETY: `dot4_fn` hands this function out only after detecting AVX2 and FMA.
    unsafe { dot4_avx2_fma(a, rows) }
}

fn dot4_portable(a: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    rows.map(|row| dot_portable(a, row))
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_fma_checked(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: `dot_fn` hands this function out only after detecting AVX2 and FMA.
    unsafe { dot_avx2_fma(a, b) }
}

/// The fastest inner product this CPU runs.
pub(crate) fn dot_fn() -> DotFn {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return dot_avx2_fma_checked;
    }
    dot_portable
}

/// The four-row inner product matching [`dot_fn`]'s choice.
pub(crate) fn dot4_fn() -> Dot4Fn {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        return dot4_avx2_fma_checked;
    }
    dot4_portable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_with_a_plain_sum() {
        for len in [0, 1, 7, 32, 33, 64, 100, 512] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            for dot in [dot_portable as DotFn, dot_fn()] {
                assert!((dot(&a, &b) - want).abs() < 1e-4, "len {len}");
            }
        }
    }

    #[test]
    fn four_rows_at_once_equal_one_at_a_time_bit_for_bit() {
        for len in [0, 1, 7, 8, 32, 33, 64, 100, 512, 515] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let rows: Vec<Vec<f32>> = (0..4)
                .map(|r| {
                    (0..len)
                        .map(|i| (i as f32 * 0.11 + r as f32).cos())
                        .collect()
                })
                .collect();
            let rows = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let (dot, dot4) = (dot_fn(), dot4_fn());
            let want = rows.map(|row| dot(&a, row).to_bits());
            assert_eq!(dot4(&a, rows).map(f32::to_bits), want, "len {len}");
            let portable = rows.map(|row| dot_portable(&a, row).to_bits());
            assert_eq!(dot4_portable(&a, rows).map(f32::to_bits), portable);
        }
    }
}
