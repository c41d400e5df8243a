//! A single-channel f32 image in 0..1, with the few operations a scale space needs.

use image::RgbImage;

#[derive(Clone, Debug, PartialEq)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    /// Row-major.
    pub data: Vec<f32>,
}

/// `image` resized with a triangle filter so its longer side is `longest` pixels.
pub fn resize_longest(image: &RgbImage, longest: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let scale = longest as f32 / w.max(h).max(1) as f32;
    let (nw, nh) = (
        ((w as f32 * scale).round() as u32).max(1),
        ((h as f32 * scale).round() as u32).max(1),
    );
    match (nw, nh) == (w, h) {
        true => image.clone(),
        false => resize_triangle(image, nw, nh),
    }
}

/// `image::imageops::resize(image, width, height, FilterType::Triangle)`, pixel for pixel, in
/// a fraction of its time: the same weights and the same sums in the same order (rows first,
/// in f32, then columns, rounded), with each axis' weights computed once instead of per pixel
/// and no alpha channel carried.
pub fn resize_triangle(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == 0 || h == 0 || width == 0 || height == 0 {
        return RgbImage::new(width, height);
    }
    let (src_row, dst_row) = (w as usize * 3, width as usize * 3);
    let src = image.as_raw();
    let mut rows = vec![0f32; height as usize * src_row];
    for ((first, weights), out) in triangle_taps(h, height)
        .into_iter()
        .zip(rows.chunks_exact_mut(src_row))
    {
        for (i, &weight) in weights.iter().enumerate() {
            let row = &src[(first + i) * src_row..][..src_row];
            for (o, &v) in out.iter_mut().zip(row) {
                *o += f32::from(v) * weight;
            }
        }
    }
    let columns = triangle_taps(w, width);
    let mut out = vec![0u8; height as usize * dst_row];
    for (row, dst) in rows
        .chunks_exact(src_row)
        .zip(out.chunks_exact_mut(dst_row))
    {
        for ((first, weights), pixel) in columns.iter().zip(dst.chunks_exact_mut(3)) {
            let mut t = [0f32; 3];
            for (i, &weight) in weights.iter().enumerate() {
                let p = &row[(first + i) * 3..][..3];
                for c in 0..3 {
                    t[c] += p[c] * weight;
                }
            }
            for c in 0..3 {
                pixel[c] = t[c].clamp(0.0, 255.0).round() as u8;
            }
        }
    }
    RgbImage::from_raw(width, height, out).expect("a buffer of width × height pixels")
}

/// The image crate's triangle filter along one axis of `src` pixels resized to `dst`: each
/// output pixel's first source pixel and normalised weights, computed as it does.
fn triangle_taps(src: u32, dst: u32) -> Vec<(usize, Vec<f32>)> {
    let ratio = src as f32 / dst as f32;
    let stretch = ratio.max(1.0);
    (0..dst)
        .map(|o| {
            let centre = (o as f32 + 0.5) * ratio;
            let first = ((centre - stretch).floor() as i64).clamp(0, i64::from(src) - 1);
            let end = ((centre + stretch).ceil() as i64).clamp(first + 1, i64::from(src));
            let centre = centre - 0.5;
            let mut weights: Vec<f32> = (first..end)
                .map(|i| (1.0 - ((i as f32 - centre) / stretch).abs()).max(0.0))
                .collect();
            let mut sum = 0.0;
            for w in &weights {
                sum += w;
            }
            for w in &mut weights {
                *w /= sum;
            }
            (first as usize, weights)
        })
        .collect()
}

impl Gray {
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            width * height,
            "pixel count of a {width}×{height} image"
        );
        Gray {
            width,
            height,
            data,
        }
    }

    /// The luma (BT.601, as OpenCV's RGB→gray) of `image`, resized with a triangle filter so
    /// its longer side is `longest` pixels.
    pub fn from_rgb_longest(image: &RgbImage, longest: u32) -> Self {
        let resized = resize_longest(image, longest);
        let (nw, nh) = resized.dimensions();
        let data = resized
            .pixels()
            .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) / 255.0)
            .collect();
        Gray::new(nw as usize, nh as usize, data)
    }

    /// Contrast-limited adaptive histogram equalisation (CLAHE) as OpenCV's `createCLAHE(clip,
    /// (8, 8))` computes it on the image's 8-bit levels: each of 8×8 tiles gets the lookup table
    /// of its own equalised histogram, clipped at `clip` times the mean bin count with the
    /// excess spread over all bins, and each pixel blends the tables of its four nearest tiles.
    /// Faint marks on a dark or shaded part of the animal then reach the same contrast as on
    /// a bright one.
    pub fn clahe(&self, clip: f32) -> Gray {
        const TILES: usize = 8;
        const BINS: usize = 256;
        let (w, h) = (self.width, self.height);
        let level = |v: f32| (v * 255.0).round_ties_even().clamp(0.0, 255.0) as usize;
        // OpenCV takes the tiles' histograms of the image padded (reflect-101) by
        // TILES − size % TILES along both sides whenever one of them is not a whole number of
        // tiles (a side that is gains a whole tile's padding).
        let (tw, th) = match w % TILES == 0 && h % TILES == 0 {
            true => (w / TILES, h / TILES),
            false => (
                (w + TILES - w % TILES) / TILES,
                (h + TILES - h % TILES) / TILES,
            ),
        };
        let area = tw * th;
        let limit = ((clip * area as f32 / BINS as f32) as usize).max(1);
        let mut luts = vec![[0u8; BINS]; TILES * TILES];
        for (t, lut) in luts.iter_mut().enumerate() {
            let (x0, y0) = ((t % TILES) * tw, (t / TILES) * th);
            let mut hist = [0usize; BINS];
            for y in y0..y0 + th {
                let row = reflect(y as isize, h) * w;
                for x in x0..x0 + tw {
                    hist[level(self.data[row + reflect(x as isize, w)])] += 1;
                }
            }
            let mut excess = 0;
            for c in hist.iter_mut().filter(|c| **c > limit) {
                excess += *c - limit;
                *c = limit;
            }
            let (batch, mut residual) = (excess / BINS, excess % BINS);
            let step = BINS.checked_div(residual).map_or(BINS, |s| s.max(1));
            for (i, c) in hist.iter_mut().enumerate() {
                *c += batch;
                if residual > 0 && i % step == 0 {
                    *c += 1;
                    residual -= 1;
                }
            }
            let scale = (BINS - 1) as f32 / area as f32;
            let mut sum = 0;
            for (l, c) in lut.iter_mut().zip(hist) {
                sum += c;
                *l = (sum as f32 * scale).round_ties_even().min(255.0) as u8;
            }
        }
        // A pixel's two nearest tile centres along one axis and the weight of the second.
        let nearest = |p: usize, size: usize| {
            let f = p as f32 * (1.0 / size as f32) - 0.5;
            let lo = f.floor();
            let a = f - lo;
            let lo = lo as isize;
            (lo.max(0) as usize, ((lo + 1) as usize).min(TILES - 1), a)
        };
        let xs: Vec<_> = (0..w).map(|x| nearest(x, tw)).collect();
        let mut data = Vec::with_capacity(w * h);
        for y in 0..h {
            let (ty1, ty2, ya) = nearest(y, th);
            for (x, &(tx1, tx2, xa)) in xs.iter().enumerate() {
                let v = level(self.data[y * w + x]);
                let at = |ty: usize, tx: usize| luts[ty * TILES + tx][v] as f32;
                let top = at(ty1, tx1) * (1.0 - xa) + at(ty1, tx2) * xa;
                let bottom = at(ty2, tx1) * (1.0 - xa) + at(ty2, tx2) * xa;
                let out = (top * (1.0 - ya) + bottom * ya)
                    .round_ties_even()
                    .clamp(0.0, 255.0);
                data.push(out / 255.0);
            }
        }
        Gray::new(w, h, data)
    }

    #[inline]
    pub fn at(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.width + x]
    }

    /// `self − other`, pixel by pixel, in a buffer from `pool`.
    pub fn minus(&self, other: &Gray, pool: &mut Pool) -> Gray {
        let mut out = pool.take(self.width, self.height);
        for ((o, a), b) in out.data.iter_mut().zip(&self.data).zip(&other.data) {
            *o = a - b;
        }
        out
    }

    /// Gaussian blur of standard deviation `sigma`, separable, kernel radius 4σ, borders
    /// reflected without repeating the edge (OpenCV's default), in a buffer from `pool`.
    pub fn blur(&self, sigma: f32, pool: &mut Pool) -> Gray {
        let radius = ((sigma * 4.0).round() as usize).max(1);
        let mut kernel: Vec<f32> = (0..=2 * radius)
            .map(|i| {
                let x = i as f32 - radius as f32;
                (-x * x / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let sum: f32 = kernel.iter().sum();
        kernel.iter_mut().for_each(|k| *k /= sum);
        let mut rows = pool.take(self.width, self.height);
        convolve(
            &self.data,
            self.width,
            self.height,
            &kernel,
            true,
            &mut rows.data,
        );
        let mut out = pool.take(self.width, self.height);
        convolve(
            &rows.data,
            self.width,
            self.height,
            &kernel,
            false,
            &mut out.data,
        );
        pool.give(rows);
        out
    }

    /// Twice the size, bilinear, pixel centres aligned, in a buffer from `pool`.
    pub fn upsample2(&self, pool: &mut Pool) -> Gray {
        let (w, h) = (self.width * 2, self.height * 2);
        let mut out = pool.take(w, h);
        let source = |d: usize, n: usize| {
            let s = ((d as f32 + 0.5) / 2.0 - 0.5).max(0.0);
            let i = (s as usize).min(n - 1);
            (i, (i + 1).min(n - 1), s - i as f32)
        };
        let columns: Vec<_> = (0..w).map(|x| source(x, self.width)).collect();
        for (y, row) in out.data.chunks_exact_mut(w).enumerate() {
            let (y0, y1, fy) = source(y, self.height);
            for (o, &(x0, x1, fx)) in row.iter_mut().zip(&columns) {
                let top = self.at(x0, y0) * (1.0 - fx) + self.at(x1, y0) * fx;
                let bottom = self.at(x0, y1) * (1.0 - fx) + self.at(x1, y1) * fx;
                *o = top * (1.0 - fy) + bottom * fy;
            }
        }
        out
    }

    /// Every other pixel of every other row (the next octave of an already blurred image), in
    /// a buffer from `pool`.
    pub fn halve(&self, pool: &mut Pool) -> Gray {
        let (w, h) = (self.width / 2, self.height / 2);
        let mut out = pool.take(w, h);
        for y in 0..h {
            for x in 0..w {
                out.data[y * w + x] = self.at(2 * x, 2 * y);
            }
        }
        out
    }
}

/// Pixel buffers kept from one image to the next. A scale space allocated afresh for every
/// photo is fresh pages from the kernel, each faulted in and zeroed on first touch: a few
/// percent of SIFT's time on a quiet machine, and a third of it (perf, 25 photos) while another
/// process was churning memory. Images taken from a pool and given back reuse the same memory;
/// the pool keeps what it is given until it is dropped.
#[derive(Debug, Default)]
pub struct Pool(Vec<Vec<f32>>);

impl Pool {
    /// A `width`×`height` image of zeros, in the smallest kept buffer that holds it (or the
    /// largest, grown, or a new one).
    pub fn take(&mut self, width: usize, height: usize) -> Gray {
        let len = width * height;
        let capacity = |&i: &usize| self.0[i].capacity();
        let fits = (0..self.0.len())
            .filter(|i| capacity(i) >= len)
            .min_by_key(capacity);
        let mut data = match fits.or_else(|| (0..self.0.len()).max_by_key(capacity)) {
            Some(i) => self.0.swap_remove(i),
            None => Vec::new(),
        };
        data.clear();
        data.resize(len, 0.0);
        Gray::new(width, height, data)
    }

    /// Keep `image`'s buffer for a later [`Pool::take`].
    pub fn give(&mut self, image: Gray) {
        self.0.push(image.data);
    }
}

/// Reflect-101 index: -1 → 1, n → n-2.
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let mut i = i;
    loop {
        if i < 0 {
            i = -i;
        } else if i >= n {
            i = 2 * n - 2 - i;
        } else {
            return i as usize;
        }
    }
}

/// One pass of a separable filter, each output line a sum of shifted input lines times the
/// kernel's taps (contiguous, so the inner loops vectorise).
/// `out` must hold zeros.
fn convolve(data: &[f32], w: usize, h: usize, kernel: &[f32], along_rows: bool, out: &mut [f32]) {
    let radius = (kernel.len() / 2) as isize;
    if along_rows {
        let mut padded = vec![0f32; w + 2 * radius as usize];
        for (row, out_row) in data.chunks_exact(w).zip(out.chunks_exact_mut(w)) {
            for (i, v) in padded.iter_mut().enumerate() {
                *v = row[reflect(i as isize - radius, w)];
            }
            for (k, &tap) in kernel.iter().enumerate() {
                for (o, &v) in out_row.iter_mut().zip(&padded[k..k + w]) {
                    *o += tap * v;
                }
            }
        }
    } else {
        for (y, out_row) in out.chunks_exact_mut(w).enumerate() {
            for (k, &tap) in kernel.iter().enumerate() {
                let source = reflect(y as isize + k as isize - radius, h);
                for (o, &v) in out_row.iter_mut().zip(&data[source * w..(source + 1) * w]) {
                    *o += tap * v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_triangle_resize_is_the_image_crates_pixel_for_pixel() {
        let mut state = 12345u32;
        let mut noise = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        };
        for (w, h, nw, nh) in [
            (512, 341, 256, 171),
            (144, 409, 180, 512),
            (97, 61, 30, 19),
            (40, 30, 41, 90),
            (1, 7, 3, 2),
        ] {
            let image = RgbImage::from_fn(w, h, |_, _| image::Rgb([noise(), noise(), noise()]));
            let want =
                image::imageops::resize(&image, nw, nh, image::imageops::FilterType::Triangle);
            assert!(
                resize_triangle(&image, nw, nh) == want,
                "{w}×{h} → {nw}×{nh}"
            );
        }
    }

    #[test]
    fn blur_keeps_a_constant_image_and_spreads_an_impulse_as_a_gaussian() {
        let flat = Gray::new(9, 7, vec![0.25; 63]);
        let pool = &mut Pool::default();
        assert!(flat
            .blur(1.3, pool)
            .data
            .iter()
            .all(|v| (v - 0.25).abs() < 1e-6));
        let mut data = vec![0.0; 31 * 31];
        data[15 * 31 + 15] = 1.0;
        let spread = Gray::new(31, 31, data).blur(2.0, pool);
        let total: f32 = spread.data.iter().sum();
        assert!((total - 1.0).abs() < 1e-4, "mass {total}");
        // Variance along x of the blurred impulse is σ² = 4.
        let var: f32 = (0..31)
            .flat_map(|y| (0..31).map(move |x| (x, y)))
            .map(|(x, y)| spread.at(x, y) * (x as f32 - 15.0).powi(2))
            .sum();
        assert!((var - 4.0).abs() < 0.05, "variance {var}");
    }

    #[test]
    fn a_pool_gives_zeros_in_the_smallest_buffer_that_holds_them() {
        let mut pool = Pool::default();
        let (small, large) = (pool.take(4, 4), pool.take(10, 10));
        let (small_at, large_at) = (small.data.as_ptr(), large.data.as_ptr());
        let mut dirty = large;
        dirty.data.fill(7.0);
        pool.give(dirty);
        pool.give(small);
        let again = pool.take(3, 5);
        assert_eq!(again.data.as_ptr(), small_at);
        assert_eq!((again.width, again.height), (3, 5));
        let reused = pool.take(9, 9);
        assert_eq!(reused.data.as_ptr(), large_at);
        assert!(reused.data.iter().all(|&v| v == 0.0));
        // Nothing left that holds it: the largest kept buffer grows, or a new one is made.
        assert_eq!(pool.take(20, 20).data.len(), 400);
    }

    /// OpenCV's `createCLAHE(clip, (8, 8)).apply` on the patterns of
    /// tools/make_clahe_fixture.py, with and without whole tiles.
    #[test]
    fn clahe_matches_opencv() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/clahe_opencv.bin"
        );
        let expected = std::fs::read(path).unwrap();
        let mut at = 0;
        for (w, h, clip) in [(61, 45, 2.0), (64, 48, 2.0), (64, 45, 4.0), (40, 90, 1.0)] {
            let pattern = (0..h * w)
                .map(|i| {
                    let (x, y) = (i % w, i / w);
                    let v =
                        (40 + 150 * x / w + (x * 31 + y * 17) % 23 * ((x / 5 + y / 7) % 3)) % 256;
                    v as f32 / 255.0
                })
                .collect();
            let out = Gray::new(w, h, pattern).clahe(clip);
            let ours: Vec<u8> = out.data.iter().map(|v| (v * 255.0).round() as u8).collect();
            let theirs = &expected[at..at + w * h];
            at += w * h;
            let differ = ours.iter().zip(theirs).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{w}×{h}, clip {clip}: {differ} pixels differ");
        }
        assert_eq!(at, expected.len());
    }

    #[test]
    fn reflect_101_borders() {
        assert_eq!(
            (-2..7).map(|i| reflect(i, 5)).collect::<Vec<_>>(),
            [2, 1, 0, 1, 2, 3, 4, 3, 2]
        );
    }

    #[test]
    fn upsample_then_halve_returns_a_ramp() {
        let ramp = Gray::new(4, 2, vec![0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]);
        let pool = &mut Pool::default();
        let up = ramp.upsample2(pool);
        assert_eq!((up.width, up.height), (8, 4));
        // Centres align: output x=1 samples input 0.25, x=2 samples 0.75.
        assert!((up.at(1, 0) - 0.25).abs() < 1e-6 && (up.at(2, 0) - 0.75).abs() < 1e-6);
        assert_eq!(up.halve(pool).width, 4);
    }
}
