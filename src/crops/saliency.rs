//! The built-in crop that needs no detector: a fin at sea is what differs from the sea.
//!
//! The photo is reduced to a grid of at most [`GRID`] cells a side in an opponent colour
//! space (lightness, red–green, yellow–blue), slightly blurred. The background is sampled from
//! the border band of the grid; a cell's distance from the background is its distance to the
//! [`BACKGROUND_QUANTILE`]-th nearest border sample, so a background of several colours (sky
//! and sea) is recognised as long as each colour holds a few percent of the border, while an
//! animal touching the border once is not taken for background. Gradient energy is added, the
//! score is thresholded by Otsu's method and the connected region (8-neighbours) with the most
//! score is boxed.

use super::BoxPx;
use image::RgbImage;

/// Longest side of the working grid, in cells.
pub const GRID: u32 = 128;
/// Share of the border samples a colour must be near to count as background.
pub const BACKGROUND_QUANTILE: f32 = 0.05;
/// Weight of the gradient energy against the colour distance (both scaled to 0..1).
const GRADIENT_WEIGHT: f32 = 0.5;
/// Width of the border band sampled as background, as a share of each side.
const BORDER: f32 = 1.0 / 16.0;
/// Weight of lightness in colour distances: waves and shading change lightness most.
const LIGHTNESS_WEIGHT: f32 = 0.5;

/// A box found by [`auto_box`] with its confidence: the found region's share of all the
/// salient score in the photo (1 when it is the only salient region).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    pub bbox: BoxPx,
    pub conf: f32,
}

/// A grid of values, row-major.
struct Grid<T> {
    w: usize,
    h: usize,
    v: Vec<T>,
}

impl<T: Copy> Grid<T> {
    fn at(&self, x: isize, y: isize) -> T {
        let x = x.clamp(0, self.w as isize - 1) as usize;
        let y = y.clamp(0, self.h as isize - 1) as usize;
        self.v[y * self.w + x]
    }
}

/// The box of the most salient region of `img`, or `None` where nothing stands out.
pub fn auto_box(img: &RgbImage) -> Option<Detection> {
    let (width, height) = img.dimensions();
    if width == 0 || height == 0 {
        return None;
    }
    let k = width.max(height).div_ceil(GRID).max(1);
    let colour = blur(&opponent_grid(img, k));
    let dist = background_distance(&colour);
    let grad = gradient(&colour);
    let (dist_scale, grad_scale) = (percentile(&dist, 0.99), percentile(&grad, 0.99));
    let score: Vec<f32> = dist
        .iter()
        .zip(&grad)
        .map(|(&d, &g)| {
            (d / dist_scale.max(1e-3)).min(1.0)
                + GRADIENT_WEIGHT * (g / grad_scale.max(1e-3)).min(1.0)
        })
        .collect();
    let score = Grid {
        w: colour.w,
        h: colour.h,
        v: score,
    };
    let threshold = otsu(&score.v)?;
    let (cells, conf) = best_region(&score, threshold)?;
    let [x0, y0, x1, y1] = cells.map(|c| c as f32 * k as f32);
    Some(Detection {
        bbox: BoxPx {
            x0,
            y0,
            x1: x1.min(width as f32),
            y1: y1.min(height as f32),
        },
        conf,
    })
}

/// Mean opponent colour of each `k`×`k` block.
fn opponent_grid(img: &RgbImage, k: u32) -> Grid<[f32; 3]> {
    let (w, h) = (
        img.width().div_ceil(k) as usize,
        img.height().div_ceil(k) as usize,
    );
    let mut sum = vec![[0f32; 3]; w * h];
    let mut count = vec![0u32; w * h];
    for (x, y, p) in img.enumerate_pixels() {
        let i = (y / k) as usize * w + (x / k) as usize;
        let [r, g, b] = p.0.map(f32::from);
        let s = &mut sum[i];
        s[0] += (r + g + b) / 3.0;
        s[1] += r - g;
        s[2] += (r + g) / 2.0 - b;
        count[i] += 1;
    }
    let v = sum
        .iter()
        .zip(&count)
        .map(|(s, &n)| s.map(|c| c / n.max(1) as f32))
        .collect();
    Grid { w, h, v }
}

/// A 3×3 box blur, edges repeated.
fn blur(g: &Grid<[f32; 3]>) -> Grid<[f32; 3]> {
    let mut v = Vec::with_capacity(g.v.len());
    for y in 0..g.h as isize {
        for x in 0..g.w as isize {
            let mut s = [0f32; 3];
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let c = g.at(x + dx, y + dy);
                    (0..3).for_each(|i| s[i] += c[i] / 9.0);
                }
            }
            v.push(s);
        }
    }
    Grid { w: g.w, h: g.h, v }
}

fn colour_distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    let d = [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    (LIGHTNESS_WEIGHT * d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt()
}

/// Each cell's distance to the background sampled from the border band.
fn background_distance(g: &Grid<[f32; 3]>) -> Vec<f32> {
    let bx = ((g.w as f32 * BORDER) as usize).max(1);
    let by = ((g.h as f32 * BORDER) as usize).max(1);
    let border: Vec<[f32; 3]> = (0..g.h)
        .flat_map(|y| (0..g.w).map(move |x| (x, y)))
        .filter(|&(x, y)| x < bx || x + bx >= g.w || y < by || y + by >= g.h)
        .map(|(x, y)| g.v[y * g.w + x])
        .collect();
    let stride = border.len().div_ceil(512).max(1);
    let samples: Vec<[f32; 3]> = border.into_iter().step_by(stride).collect();
    let q = ((samples.len() as f32 * BACKGROUND_QUANTILE) as usize).min(samples.len() - 1);
    let mut d = vec![0f32; samples.len()];
    g.v.iter()
        .map(|&c| {
            d.iter_mut()
                .zip(&samples)
                .for_each(|(d, &s)| *d = colour_distance(c, s));
            *d.select_nth_unstable_by(q, f32::total_cmp).1
        })
        .collect()
}

/// Sobel gradient magnitude of lightness.
fn gradient(g: &Grid<[f32; 3]>) -> Vec<f32> {
    let l = |x: isize, y: isize| g.at(x, y)[0];
    (0..g.h as isize)
        .flat_map(|y| (0..g.w as isize).map(move |x| (x, y)))
        .map(|(x, y)| {
            let gx = l(x + 1, y - 1) + 2.0 * l(x + 1, y) + l(x + 1, y + 1)
                - l(x - 1, y - 1)
                - 2.0 * l(x - 1, y)
                - l(x - 1, y + 1);
            let gy = l(x - 1, y + 1) + 2.0 * l(x, y + 1) + l(x + 1, y + 1)
                - l(x - 1, y - 1)
                - 2.0 * l(x, y - 1)
                - l(x + 1, y - 1);
            (gx * gx + gy * gy).sqrt()
        })
        .collect()
}

fn percentile(v: &[f32], p: f32) -> f32 {
    let mut s = v.to_vec();
    let i = ((s.len() as f32 * p) as usize).min(s.len() - 1);
    *s.select_nth_unstable_by(i, f32::total_cmp).1
}

/// Otsu's threshold over 256 bins of `0..max`; `None` where all values are equal.
fn otsu(v: &[f32]) -> Option<f32> {
    let max = v.iter().copied().fold(0f32, f32::max);
    if max <= 0.0 {
        return None;
    }
    let mut hist = [0f64; 256];
    for &x in v {
        hist[((x / max * 255.0) as usize).min(255)] += 1.0;
    }
    let total = v.len() as f64;
    let sum_all: f64 = hist.iter().enumerate().map(|(i, &n)| i as f64 * n).sum();
    let (mut w0, mut sum0, mut best) = (0f64, 0f64, None);
    let mut best_var = 0f64;
    for (i, &n) in hist.iter().enumerate() {
        w0 += n;
        sum0 += i as f64 * n;
        let w1 = total - w0;
        if w0 == 0.0 || w1 == 0.0 {
            continue;
        }
        let between = w0 * w1 * (sum0 / w0 - (sum_all - sum0) / w1).powi(2);
        if between > best_var {
            best_var = between;
            best = Some(i);
        }
    }
    best.map(|i| (i as f32 + 1.0) / 255.0 * max)
}

/// The bounding cells `[x0, y0, x1, y1)` of the 8-connected region above `threshold` with the
/// most score, and its share of all the score above the threshold.
fn best_region(score: &Grid<f32>, threshold: f32) -> Option<([usize; 4], f32)> {
    let (w, h) = (score.w, score.h);
    let mut seen = vec![false; w * h];
    let mut total = 0f32;
    let mut best: Option<([usize; 4], f32)> = None;
    let mut stack = Vec::new();
    for start in 0..w * h {
        if seen[start] || score.v[start] < threshold {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let (mut mass, mut bounds) = (0f32, [w, h, 0, 0]);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            mass += score.v[i];
            bounds = [
                bounds[0].min(x),
                bounds[1].min(y),
                bounds[2].max(x + 1),
                bounds[3].max(y + 1),
            ];
            for ny in y.saturating_sub(1)..(y + 2).min(h) {
                for nx in x.saturating_sub(1)..(x + 2).min(w) {
                    let j = ny * w + nx;
                    if !seen[j] && score.v[j] >= threshold {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        total += mass;
        if best.is_none_or(|(_, m)| mass > m) {
            best = Some((bounds, mass));
        }
    }
    best.map(|(b, m)| (b, m / total.max(f32::MIN_POSITIVE)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn a_dark_fin_on_a_blue_sea_is_found() {
        let mut img = RgbImage::from_pixel(200, 150, Rgb([40, 90, 150]));
        for y in 40..100 {
            for x in 60..120 {
                img.put_pixel(x, y, Rgb([30, 30, 35]));
            }
        }
        let found = auto_box(&img).expect("a box");
        let truth = BoxPx {
            x0: 60.0,
            y0: 40.0,
            x1: 120.0,
            y1: 100.0,
        };
        assert!(super::super::iou(&found.bbox, &truth) > 0.8, "{found:?}");
        assert!(found.conf > 0.9);
    }

    #[test]
    fn a_uniform_photo_has_no_box() {
        assert_eq!(
            auto_box(&RgbImage::from_pixel(64, 48, Rgb([9, 9, 9]))),
            None
        );
        assert_eq!(auto_box(&RgbImage::new(0, 0)), None);
        assert!(auto_box(&RgbImage::from_pixel(1, 1, Rgb([9, 9, 9]))).is_none());
    }
}
