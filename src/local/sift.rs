//! SIFT keypoints (Lowe 2004) with RootSIFT descriptors (Arandjelović & Zisserman 2012), as
//! OpenCV computes them: the image doubled, a Gaussian scale space of 3 layers per octave,
//! extrema of its differences refined to sub-pixel and sub-scale, low-contrast and edge-like
//! points dropped, and a 4×4×8 histogram of gradients around each point. Upright by default,
//! as HotSpotter matches animals: the orientation is taken as 0 rather than from the gradients.

use super::gray::{Gray, Pool};
use std::cell::RefCell;

/// SIFT's settings; the defaults are OpenCV's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SiftConfig {
    /// Keep at most this many keypoints, the strongest (largest |DoG| response).
    pub max_keypoints: usize,
    pub octave_layers: usize,
    /// Minimum |DoG| at a keypoint, for a 0..1 image, times `octave_layers`.
    pub contrast_threshold: f32,
    /// Maximum ratio of the principal curvatures (edges have one large, one small).
    pub edge_threshold: f32,
    /// The blur of each octave's first layer.
    pub sigma: f32,
    /// Start from the image doubled (OpenCV's first octave -1): more small keypoints.
    pub upsample: bool,
}

impl Default for SiftConfig {
    fn default() -> Self {
        SiftConfig {
            max_keypoints: 1000,
            octave_layers: 3,
            contrast_threshold: 0.04,
            edge_threshold: 10.0,
            sigma: 1.6,
            upsample: true,
        }
    }
}

/// A keypoint in the input image's pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Keypoint {
    pub x: f32,
    pub y: f32,
    /// Diameter of the described neighbourhood's scale, as OpenCV's `KeyPoint::size`.
    pub size: f32,
    pub response: f32,
    octave: usize,
    layer: usize,
    /// The sub-layer offset of the refined extremum, in -0.5..0.5.
    sub_layer: f32,
    /// Position and scale (σ) in its octave's pixels.
    ox: f32,
    oy: f32,
    scale: f32,
}

impl Keypoint {
    /// OpenCV's packed `KeyPoint::octave` (octave, layer and sub-layer offset), so that OpenCV
    /// can describe the same keypoints for comparison (`sift.compute`).
    pub fn opencv_octave(&self, cfg: &SiftConfig) -> i32 {
        let octave = self.octave as i32 - i32::from(cfg.upsample);
        let sub = ((self.sub_layer + 0.5) * 255.0).round() as i32;
        (octave & 255) | ((self.layer as i32) << 8) | ((sub & 255) << 16)
    }
}

const BORDER: usize = 5;
const DESC_WIDTH: usize = 4;
const DESC_BINS: usize = 8;
/// The length of a SIFT descriptor.
pub const DESC_LEN: usize = DESC_WIDTH * DESC_WIDTH * DESC_BINS;

thread_local! {
    /// Each thread's scale-space buffers, kept from photo to photo.
    static POOL: RefCell<Pool> = RefCell::default();
}

/// Detect upright keypoints and compute their RootSIFT descriptors (unit L2 norm), strongest
/// first: `(keypoints, descriptors)` with descriptors row-major `[n, DESC_LEN]`. The scale
/// space lives in buffers the calling thread keeps for its next photo: about 14 images the size
/// of the input doubled (a 512×180 photo: 21 MB).
pub fn detect_and_describe(image: &Gray, cfg: &SiftConfig) -> (Vec<Keypoint>, Vec<f32>) {
    if image.width < 2 * BORDER + 3 || image.height < 2 * BORDER + 3 {
        return (Vec::new(), Vec::new());
    }
    POOL.with_borrow_mut(|pool| {
        let pyramid = gaussian_pyramid(image, cfg, pool);
        let mut keypoints = find_extrema(&pyramid, cfg, pool);
        keypoints.sort_by(|a, b| b.response.total_cmp(&a.response));
        keypoints.dedup_by(|a, b| a.x == b.x && a.y == b.y && a.size == b.size);
        keypoints.truncate(cfg.max_keypoints);
        let mut descriptors = vec![0f32; keypoints.len() * DESC_LEN];
        for (kp, out) in keypoints.iter().zip(descriptors.chunks_mut(DESC_LEN)) {
            describe(&pyramid[kp.octave][kp.layer], kp, out);
            root_sift(out);
        }
        pyramid.into_iter().flatten().for_each(|g| pool.give(g));
        (keypoints, descriptors)
    })
}

fn gaussian_pyramid(image: &Gray, cfg: &SiftConfig, pool: &mut Pool) -> Vec<Vec<Gray>> {
    let s = cfg.octave_layers;
    let initial_blur: f32 = if cfg.upsample { 1.0 } else { 0.5 };
    let sigma = (cfg.sigma.powi(2) - initial_blur * initial_blur)
        .max(0.01)
        .sqrt();
    let base = match cfg.upsample {
        true => {
            let doubled = image.upsample2(pool);
            let base = doubled.blur(sigma, pool);
            pool.give(doubled);
            base
        }
        false => image.blur(sigma, pool),
    };
    let octaves = (((image.width.min(image.height) as f32).log2() - 2.0).round() as isize
        + isize::from(cfg.upsample))
    .max(1) as usize;
    // The extra blur taking each layer to the next: σ_i = σ·k^i, k = 2^(1/s).
    let k = 2f32.powf(1.0 / s as f32);
    let steps: Vec<f32> = (1..s + 3)
        .map(|i| {
            let previous = cfg.sigma * k.powi(i as i32 - 1);
            ((previous * k).powi(2) - previous.powi(2)).sqrt()
        })
        .collect();
    let mut pyramid: Vec<Vec<Gray>> = Vec::with_capacity(octaves);
    let mut base = Some(base);
    for o in 0..octaves {
        let first = match base.take() {
            Some(base) => base,
            None => pyramid[o - 1][s].halve(pool),
        };
        if first.width < 2 * BORDER + 3 || first.height < 2 * BORDER + 3 {
            pool.give(first);
            break;
        }
        let mut layers = vec![first];
        for &step in &steps {
            let next = layers.last().expect("non-empty").blur(step, pool);
            layers.push(next);
        }
        pyramid.push(layers);
    }
    pyramid
}

/// The refined extrema of each octave's differences of Gaussians (built one octave at a time).
fn find_extrema(pyramid: &[Vec<Gray>], cfg: &SiftConfig, pool: &mut Pool) -> Vec<Keypoint> {
    let s = cfg.octave_layers;
    let threshold = 0.5 * cfg.contrast_threshold / s as f32;
    let mut found = Vec::new();
    for (o, octave) in pyramid.iter().enumerate() {
        let dog: Vec<Gray> = octave.windows(2).map(|w| w[1].minus(&w[0], pool)).collect();
        let (w, h) = (dog[0].width, dog[0].height);
        for layer in 1..=s {
            let (below, here, above) = (&dog[layer - 1], &dog[layer], &dog[layer + 1]);
            for y in BORDER..h - BORDER {
                for x in BORDER..w - BORDER {
                    let v = here.at(x, y);
                    if v.abs() <= threshold || !is_extremum(v, x, y, [below, here, above]) {
                        continue;
                    }
                    if let Some(kp) = refine(&dog, o, layer, x, y, cfg) {
                        found.push(kp);
                    }
                }
            }
        }
        dog.into_iter().for_each(|g| pool.give(g));
    }
    found
}

fn is_extremum(v: f32, x: usize, y: usize, layers: [&Gray; 3]) -> bool {
    let mut is_max = true;
    let mut is_min = true;
    for (l, img) in layers.iter().enumerate() {
        for yy in y - 1..=y + 1 {
            for xx in x - 1..=x + 1 {
                if l == 1 && xx == x && yy == y {
                    continue;
                }
                let u = img.at(xx, yy);
                is_max &= v >= u;
                is_min &= v <= u;
            }
        }
        if !is_max && !is_min {
            return false;
        }
    }
    (is_max && v > 0.0) || (is_min && v < 0.0)
}

/// Fit a quadratic to the DoG around a sample and move to its extremum (up to 5 steps), as
/// OpenCV's `adjustLocalExtrema`; `None` when it leaves the image, does not settle, has too
/// little contrast or lies on an edge.
fn refine(
    dog: &[Gray],
    octave: usize,
    mut layer: usize,
    mut x: usize,
    mut y: usize,
    cfg: &SiftConfig,
) -> Option<Keypoint> {
    let s = cfg.octave_layers;
    let (w, h) = (dog[0].width, dog[0].height);
    let mut settled = None;
    for _ in 0..5 {
        let (prev, img, next) = (&dog[layer - 1], &dog[layer], &dog[layer + 1]);
        let d = |g: &Gray, dx: isize, dy: isize| {
            g.at((x as isize + dx) as usize, (y as isize + dy) as usize)
        };
        let grad = [
            (d(img, 1, 0) - d(img, -1, 0)) * 0.5,
            (d(img, 0, 1) - d(img, 0, -1)) * 0.5,
            (d(next, 0, 0) - d(prev, 0, 0)) * 0.5,
        ];
        let v2 = d(img, 0, 0) * 2.0;
        let dxx = d(img, 1, 0) + d(img, -1, 0) - v2;
        let dyy = d(img, 0, 1) + d(img, 0, -1) - v2;
        let dss = d(next, 0, 0) + d(prev, 0, 0) - v2;
        let dxy = (d(img, 1, 1) - d(img, -1, 1) - d(img, 1, -1) + d(img, -1, -1)) * 0.25;
        let dxs = (d(next, 1, 0) - d(next, -1, 0) - d(prev, 1, 0) + d(prev, -1, 0)) * 0.25;
        let dys = (d(next, 0, 1) - d(next, 0, -1) - d(prev, 0, 1) + d(prev, 0, -1)) * 0.25;
        let hessian = [[dxx, dxy, dxs], [dxy, dyy, dys], [dxs, dys, dss]];
        let offset = solve3(hessian, grad)?.map(|v| -v);
        if offset.iter().all(|v| v.abs() < 0.5) {
            settled = Some((offset, grad, [dxx, dyy, dxy]));
            break;
        }
        if offset.iter().any(|v| v.abs() > (i32::MAX / 3) as f32) {
            return None;
        }
        x = (x as isize + offset[0].round() as isize).try_into().ok()?;
        y = (y as isize + offset[1].round() as isize).try_into().ok()?;
        layer = (layer as isize + offset[2].round() as isize)
            .try_into()
            .ok()?;
        if layer < 1 || layer > s || x < BORDER || x >= w - BORDER || y < BORDER || y >= h - BORDER
        {
            return None;
        }
    }
    let (offset, grad, [dxx, dyy, dxy]) = settled?;
    let contrast = dog[layer].at(x, y) + 0.5 * dot3(grad, offset);
    if contrast.abs() * (s as f32) < cfg.contrast_threshold {
        return None;
    }
    let (trace, det) = (dxx + dyy, dxx * dyy - dxy * dxy);
    let e = cfg.edge_threshold;
    if det <= 0.0 || trace * trace * e >= (e + 1.0).powi(2) * det {
        return None;
    }
    let scale = cfg.sigma * 2f32.powf((layer as f32 + offset[2]) / s as f32);
    let (ox, oy) = (x as f32 + offset[0], y as f32 + offset[1]);
    let to_input = 2f32.powi(octave as i32) * if cfg.upsample { 0.5 } else { 1.0 };
    Some(Keypoint {
        x: ox * to_input,
        y: oy * to_input,
        size: scale * 2.0 * to_input,
        response: contrast.abs(),
        octave,
        layer,
        sub_layer: offset[2],
        ox,
        oy,
        scale,
    })
}

fn dot3(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Solve `m·x = b` for a symmetric 3×3 `m` by Cramer's rule; `None` when singular.
fn solve3(m: [[f32; 3]; 3], b: [f32; 3]) -> Option<[f32; 3]> {
    let det = |m: [[f32; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(m);
    if d.abs() < 1e-12 {
        return None;
    }
    let mut x = [0f32; 3];
    for (c, xc) in x.iter_mut().enumerate() {
        let mut mc = m;
        for r in 0..3 {
            mc[r][c] = b[r];
        }
        *xc = det(mc) / d;
    }
    Some(x)
}

/// OpenCV's `calcSIFTDescriptor` at orientation 0: gradients in a square of 4×4 cells of
/// 3σ each, Gaussian-weighted, trilinearly binned into 8 orientations, L2-normalised, clipped
/// at 0.2 and normalised again.
fn describe(img: &Gray, kp: &Keypoint, out: &mut [f32]) {
    let (d, n) = (DESC_WIDTH as f32, DESC_BINS);
    let hist_width = 3.0 * kp.scale;
    let diagonal = ((img.width.pow(2) + img.height.pow(2)) as f32).sqrt();
    let radius =
        ((hist_width * std::f32::consts::SQRT_2 * (d + 1.0) * 0.5).round()).min(diagonal) as isize;
    let (px, py) = (kp.ox.round() as isize, kp.oy.round() as isize);
    let exp_scale = -1.0 / (d * d * 0.5);
    let bins_per_degree = n as f32 / 360.0;
    let stride = (DESC_WIDTH + 2) * (n + 2);
    let mut hist = vec![0f32; (DESC_WIDTH + 2) * stride];
    // Where a row or column offset falls among the cells: its coordinate in the window, the
    // cell before it and its share of the next; `None` outside the 4×4 cells or the image.
    let place = |offset: isize, centre: isize, extent: usize| {
        let rotated = offset as f32 / hist_width;
        let bin = rotated + d / 2.0 - 0.5;
        let pixel = centre + offset;
        (bin > -1.0 && bin < d && pixel > 0 && pixel < extent as isize - 1).then(|| {
            let first = bin.floor();
            (
                rotated,
                pixel as usize,
                (first as isize + 1) as usize,
                bin - first,
            )
        })
    };
    let columns: Vec<_> = (-radius..=radius)
        .filter_map(|j| place(j, px, img.width))
        .collect();
    for i in -radius..=radius {
        let Some((r_rot, r, r0, fr)) = place(i, py, img.height) else {
            continue;
        };
        for &(c_rot, c, c0, fc) in &columns {
            let dx = img.at(c + 1, r) - img.at(c - 1, r);
            let dy = img.at(c, r - 1) - img.at(c, r + 1);
            let weight = ((c_rot * c_rot + r_rot * r_rot) * exp_scale).exp();
            let magnitude = (dx * dx + dy * dy).sqrt() * weight;
            let mut angle = dy.atan2(dx).to_degrees();
            if angle < 0.0 {
                angle += 360.0;
            }
            // Not negative, so truncation is the floor (and cheaper than `floor`'s libm call).
            let obin = angle * bins_per_degree;
            let o0 = obin as usize;
            let fo = obin - o0 as f32;
            let o0 = o0 % n;
            let base = r0 * stride + c0 * (n + 2);
            for (dr, wr) in [(0, 1.0 - fr), (1, fr)] {
                for (dc, wc) in [(0, 1.0 - fc), (1, fc)] {
                    for (dobin, wo) in [(0, 1.0 - fo), (1, fo)] {
                        hist[base + dr * stride + dc * (n + 2) + o0 + dobin] +=
                            magnitude * wr * wc * wo;
                    }
                }
            }
        }
    }
    for r in 0..DESC_WIDTH {
        for c in 0..DESC_WIDTH {
            let cell = &mut hist[(r + 1) * stride + (c + 1) * (n + 2)..][..n + 2];
            // Orientation bins wrap around: the bin past the last belongs to the first.
            cell[0] += cell[n];
            cell[1] += cell[n + 1];
            out[(r * DESC_WIDTH + c) * n..][..n].copy_from_slice(&cell[..n]);
        }
    }
    let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt();
    let clip = norm * 0.2;
    out.iter_mut().for_each(|v| *v = v.min(clip));
    let norm = out
        .iter()
        .map(|v| v * v)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    out.iter_mut().for_each(|v| *v /= norm);
}

/// RootSIFT: L1-normalise, then take square roots; Euclidean distance between the results is
/// the Hellinger kernel between the histograms, and each has unit L2 norm.
fn root_sift(desc: &mut [f32]) {
    let l1 = desc.iter().sum::<f32>().max(f32::EPSILON);
    desc.iter_mut().for_each(|v| *v = (*v / l1).sqrt());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::lnbnn;
    use crate::local::ransac::{self, Correspondence};
    use crate::local::Features;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A dark Gaussian spot of standard deviation `s` on a light background, plus more spots.
    fn spots(width: usize, height: usize, spots: &[(f32, f32, f32)]) -> Gray {
        let mut data = vec![0.8f32; width * height];
        for y in 0..height {
            for x in 0..width {
                for &(cx, cy, s) in spots {
                    let r2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                    data[y * width + x] -= 0.6 * (-r2 / (2.0 * s * s)).exp();
                }
            }
        }
        Gray::new(width, height, data)
    }

    #[test]
    fn a_blob_is_found_at_its_centre_and_its_scale() {
        let (kps, desc) =
            detect_and_describe(&spots(80, 80, &[(40.3, 37.6, 4.0)]), &SiftConfig::default());
        let kp = kps[0];
        assert!(
            (kp.x - 40.3).abs() < 0.5 && (kp.y - 37.6).abs() < 0.5,
            "{kp:?}"
        );
        // The scale-normalised Laplacian of a Gaussian spot of σ peaks at scale σ; OpenCV's
        // size is the diameter 2σ.
        assert!((kp.size / 8.0 - 1.0).abs() < 0.2, "{kp:?}");
        let d = &desc[..DESC_LEN];
        let norm: f32 = d.iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-4 && d.iter().all(|&v| v >= 0.0));
    }

    #[test]
    fn keypoints_of_a_shifted_and_scaled_photo_match_through_the_same_affine_map() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let marks: Vec<(f32, f32, f32)> = (0..60)
            .map(|_| {
                (
                    rng.gen_range(10.0..190.0),
                    rng.gen_range(10.0..140.0),
                    rng.gen_range(1.5..4.0),
                )
            })
            .collect();
        // The second photo: the same marks scaled by 0.8 and moved by (12, -5).
        let (scale, tx, ty) = (0.8, 12.0, -5.0);
        let moved: Vec<_> = marks
            .iter()
            .map(|&(x, y, s)| (x * scale + tx, y * scale + ty, s * scale))
            .collect();
        let cfg = SiftConfig::default();
        let extract = |g: &Gray| {
            let (kps, descriptors) = detect_and_describe(g, &cfg);
            Features {
                size: [g.width as u32, g.height as u32],
                points: kps.iter().map(|k| [k.x, k.y]).collect(),
                dim: DESC_LEN,
                descriptors,
            }
        };
        let a = extract(&spots(200, 150, &marks));
        let b = extract(&spots(200, 150, &moved));
        assert!(a.len() > 40 && b.len() > 30, "{} and {}", a.len(), b.len());
        let votes = lnbnn::vote(&a, &[&b], 1, 0.0);
        let pairs: Vec<Correspondence> = votes[0]
            .matches
            .iter()
            .map(|m| Correspondence {
                from: a.points[m.query],
                to: b.points[m.gallery],
                weight: 1.0,
            })
            .collect();
        let fit = ransac::fit(&pairs, &Default::default(), 200.0);
        assert!(fit.inliers >= 20, "{fit:?} of {} pairs", pairs.len());
        let want = [scale, 0.0, tx, 0.0, scale, ty];
        for (i, (g, w)) in fit.map.iter().zip(want).enumerate() {
            let tolerance = if i % 3 == 2 { 2.0 } else { 0.03 };
            assert!((g - w).abs() < tolerance, "{:?}", fit.map);
        }
    }
}
