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
        false => image::imageops::resize(image, nw, nh, image::imageops::FilterType::Triangle),
    }
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

    #[inline]
    pub fn at(&self, x: usize, y: usize) -> f32 {
        self.data[y * self.width + x]
    }

    pub fn minus(&self, other: &Gray) -> Gray {
        let data = self
            .data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| a - b)
            .collect();
        Gray::new(self.width, self.height, data)
    }

    /// Gaussian blur of standard deviation `sigma`, separable, kernel radius 4σ, borders
    /// reflected without repeating the edge (OpenCV's default).
    pub fn blur(&self, sigma: f32) -> Gray {
        let radius = ((sigma * 4.0).round() as usize).max(1);
        let mut kernel: Vec<f32> = (0..=2 * radius)
            .map(|i| {
                let x = i as f32 - radius as f32;
                (-x * x / (2.0 * sigma * sigma)).exp()
            })
            .collect();
        let sum: f32 = kernel.iter().sum();
        kernel.iter_mut().for_each(|k| *k /= sum);
        let rows = convolve(&self.data, self.width, self.height, &kernel, true);
        Gray::new(
            self.width,
            self.height,
            convolve(&rows, self.width, self.height, &kernel, false),
        )
    }

    /// Twice the size, bilinear, pixel centres aligned.
    pub fn upsample2(&self) -> Gray {
        let (w, h) = (self.width * 2, self.height * 2);
        let mut data = Vec::with_capacity(w * h);
        let source = |d: usize, n: usize| {
            let s = ((d as f32 + 0.5) / 2.0 - 0.5).max(0.0);
            let i = (s as usize).min(n - 1);
            (i, (i + 1).min(n - 1), s - i as f32)
        };
        for y in 0..h {
            let (y0, y1, fy) = source(y, self.height);
            for x in 0..w {
                let (x0, x1, fx) = source(x, self.width);
                let top = self.at(x0, y0) * (1.0 - fx) + self.at(x1, y0) * fx;
                let bottom = self.at(x0, y1) * (1.0 - fx) + self.at(x1, y1) * fx;
                data.push(top * (1.0 - fy) + bottom * fy);
            }
        }
        Gray::new(w, h, data)
    }

    /// Every other pixel of every other row (the next octave of an already blurred image).
    pub fn halve(&self) -> Gray {
        let (w, h) = (self.width / 2, self.height / 2);
        let data = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| self.at(2 * x, 2 * y))
            .collect();
        Gray::new(w, h, data)
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
fn convolve(data: &[f32], w: usize, h: usize, kernel: &[f32], along_rows: bool) -> Vec<f32> {
    let radius = (kernel.len() / 2) as isize;
    let mut out = vec![0f32; data.len()];
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blur_keeps_a_constant_image_and_spreads_an_impulse_as_a_gaussian() {
        let flat = Gray::new(9, 7, vec![0.25; 63]);
        assert!(flat.blur(1.3).data.iter().all(|v| (v - 0.25).abs() < 1e-6));
        let mut data = vec![0.0; 31 * 31];
        data[15 * 31 + 15] = 1.0;
        let spread = Gray::new(31, 31, data).blur(2.0);
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
    fn reflect_101_borders() {
        assert_eq!(
            (-2..7).map(|i| reflect(i, 5)).collect::<Vec<_>>(),
            [2, 1, 0, 1, 2, 3, 4, 3, 2]
        );
    }

    #[test]
    fn upsample_then_halve_returns_a_ramp() {
        let ramp = Gray::new(4, 2, vec![0.0, 1.0, 2.0, 3.0, 0.0, 1.0, 2.0, 3.0]);
        let up = ramp.upsample2();
        assert_eq!((up.width, up.height), (8, 4));
        // Centres align: output x=1 samples input 0.25, x=2 samples 0.75.
        assert!((up.at(1, 0) - 0.25).abs() < 1e-6 && (up.at(2, 0) - 0.75).abs() < 1e-6);
        assert_eq!(up.halve().width, 4);
    }
}
