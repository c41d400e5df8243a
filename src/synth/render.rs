//! Procedural renderer of synthetic dorsal-fin photos.
//!
//! An [`Individual`] holds everything that identifies one animal: its fin silhouette
//! (shape parameters drawn inside its species family, trailing-edge notches, a clipped
//! tip or a bitten leading edge), its scars and pigment blotches and, for killer whales,
//! its saddle patch. [`render`] draws one photo of it: sky, coastline, waves, pose,
//! occluding splash, clutter, lighting and camera effects are drawn afresh for every
//! photo, so that only the marks carry identity.
//!
//! Fin-local coordinates: `x` runs along the body from the fin's leading root (0)
//! toward the tail, `y` runs up from the waterline (0) to the tip (1); one unit is the
//! fin height. The fin is the set `lead(y) <= x <= trail(y)` below a top line, stored
//! as tables in an `Outline`; every pixel of the fin's bounding box is mapped back
//! into these coordinates, so pose, scale and mirroring move the marks with the fin.
//! The visible back is a low hump, `y <= top(x)`, in the same coordinates.
//!
//! Everything is a pure function of the `Individual` and the random draws, and the
//! per-pixel noise is hashed from positions, so equal seeds give equal bytes. The
//! work is a fixed number of passes over the image plus one over the animal's box.

use crate::crops::BoxPx;
use image::RgbImage;
use rand::Rng;
use std::f32::consts::PI;

/// Species the generator draws, as Kaggle Happywhale labels, each with a fin shape family and colouring.
pub const SPECIES: &[&str] = &[
    "bottlenose_dolphin",
    "killer_whale",
    "short_finned_pilot_whale",
    "fin_whale",
    "spinner_dolphin",
];
/// Relative frequencies of SPECIES in a generated catalogue.
pub const SPECIES_WEIGHTS: &[f64] = &[0.40, 0.20, 0.12, 0.12, 0.16];

const BOTTLENOSE: usize = 0;
const KILLER_WHALE: usize = 1;
const PILOT_WHALE: usize = 2;
const FIN_WHALE: usize = 3;
const SPINNER: usize = 4;

/// One rendered photo with its true boxes.
pub struct Photo {
    pub image: RgbImage,
    /// Tight box of the visible fin (above the water and any splash).
    pub fin_box: BoxPx,
    /// Box of the visible fin and back.
    pub body_box: BoxPx,
}

// ---------------------------------------------------------------------------
// Small maths helpers
// ---------------------------------------------------------------------------

/// An RGB colour, nominally in [0, 1] per channel (display referred).
type Rgbf = [f32; 3];

const WHITE: Rgbf = [1.0, 1.0, 1.0];

fn mix(a: Rgbf, b: Rgbf, t: f32) -> Rgbf {
    [
        a[0] + (b[0] - a[0]) * t,
        a[1] + (b[1] - a[1]) * t,
        a[2] + (b[2] - a[2]) * t,
    ]
}

fn scale(a: Rgbf, s: f32) -> Rgbf {
    [a[0] * s, a[1] * s, a[2] * s]
}

fn add(a: Rgbf, b: Rgbf) -> Rgbf {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn mul(a: Rgbf, b: Rgbf) -> Rgbf {
    [a[0] * b[0], a[1] * b[1], a[2] * b[2]]
}

fn luma(a: Rgbf) -> f32 {
    0.299 * a[0] + 0.587 * a[1] + 0.114 * a[2]
}

fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

fn dot3(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Uniform draw from `[lo, hi)`, or `lo` when the range is empty.
fn uni<R: Rng + ?Sized>(rng: &mut R, (lo, hi): (f32, f32)) -> f32 {
    if hi > lo {
        rng.gen_range(lo..hi)
    } else {
        lo
    }
}

/// Index drawn with probability proportional to `weights`.
fn pick<R: Rng + ?Sized>(rng: &mut R, weights: &[f32]) -> usize {
    let total: f32 = weights.iter().sum();
    let mut r = rng.gen::<f32>() * total;
    for (i, &w) in weights.iter().enumerate() {
        if r < w {
            return i;
        }
        r -= w;
    }
    weights.len() - 1
}

/// Multiplies each channel by its own factor in `[1 - amount, 1 + amount)`.
fn jitter_colour<R: Rng + ?Sized>(rng: &mut R, c: Rgbf, amount: f32) -> Rgbf {
    let mut out = c;
    for v in &mut out {
        *v *= uni(rng, (1.0 - amount, 1.0 + amount));
    }
    out
}

// ---------------------------------------------------------------------------
// Hash-based noise: pure functions of position and seed, hence deterministic
// ---------------------------------------------------------------------------

fn hash(x: i32, y: i32, seed: u32) -> u32 {
    let mut h = seed ^ (x as u32).wrapping_mul(0x9E37_79B1) ^ (y as u32).wrapping_mul(0x85EB_CA77);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7FEB_352D);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846C_A68B);
    h ^= h >> 16;
    h
}

fn hash_unit(x: i32, y: i32, seed: u32) -> f32 {
    (hash(x, y, seed) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// `floor` as an integer, without a libm call on baseline x86-64.
fn floor_i(x: f32) -> i32 {
    let i = x as i32;
    if (i as f32) > x {
        i - 1
    } else {
        i
    }
}

/// Smooth value noise in [0, 1] with unit lattice spacing.
fn value_noise(x: f32, y: f32, seed: u32) -> f32 {
    let (ix, iy) = (floor_i(x), floor_i(y));
    let (fx, fy) = (x - ix as f32, y - iy as f32);
    let sx = fx * fx * (3.0 - 2.0 * fx);
    let sy = fy * fy * (3.0 - 2.0 * fy);
    let (ix1, iy1) = (ix.wrapping_add(1), iy.wrapping_add(1));
    let a = hash_unit(ix, iy, seed);
    let b = hash_unit(ix1, iy, seed);
    let c = hash_unit(ix, iy1, seed);
    let d = hash_unit(ix1, iy1, seed);
    let top = a + (b - a) * sx;
    let bottom = c + (d - c) * sx;
    top + (bottom - top) * sy
}

/// Fractal sum of `octaves` value noises, normalised to [0, 1].
fn fbm(x: f32, y: f32, seed: u32, octaves: u32) -> f32 {
    let (mut sum, mut amp, mut freq, mut norm) = (0.0, 1.0, 1.0, 0.0);
    for o in 0..octaves {
        sum += amp
            * value_noise(
                x * freq,
                y * freq,
                seed.wrapping_add(o.wrapping_mul(0x9E37)),
            );
        norm += amp;
        amp *= 0.5;
        freq *= 2.03;
    }
    sum / norm
}

/// Approximately standard-normal value per (x, y, seed): a scaled sum of four uniform bytes.
fn hash_gauss(x: i32, y: i32, seed: u32) -> f32 {
    let h = hash(x, y, seed);
    let sum = (h & 0xFF) + ((h >> 8) & 0xFF) + ((h >> 16) & 0xFF) + (h >> 24);
    (sum as f32 / 255.0 - 2.0) * 1.732
}

// ---------------------------------------------------------------------------
// The individual: fin shape and marks
// ---------------------------------------------------------------------------

/// Shape parameters of one fin, in fin-local units (fin height = 1).
#[derive(Clone, Debug)]
struct FinShape {
    /// Length of the fin's root along the back.
    base: f32,
    /// Horizontal position of the tip (behind the leading root when positive).
    tip_x: f32,
    /// Exponent of the leading edge `tip_x * y^lead_pow`: above 1 it bulges forward.
    lead_pow: f32,
    /// Exponent of the trailing edge sweep: above 1 the edge stays back until near the tip.
    trail_pow: f32,
    /// Extra hollowing of the trailing edge at mid height (falcate fins).
    concavity: f32,
    /// Height of the rounded tip cap.
    tip_round: f32,
    /// Forward flare of the leading edge into the back.
    lead_flare: f32,
    /// Backward flare of the trailing edge into the back.
    trail_flare: f32,
}

impl FinShape {
    /// Leading and trailing edge at height `y` before tip rounding.
    fn raw_edges(&self, y: f32) -> (f32, f32) {
        let y = y.clamp(0.0, 1.0);
        let lead = self.tip_x * y.powf(self.lead_pow) - self.lead_flare * (-y / 0.12).exp();
        let trail = self.base + (self.tip_x - self.base) * y.powf(self.trail_pow)
            - self.concavity * 4.0 * y * (1.0 - y)
            + self.trail_flare * (-y / 0.06).exp();
        (lead, trail.max(lead + 0.05 * (1.0 - y)))
    }

    /// Leading and trailing edge at height `y` (below 0 the edges continue straight down).
    fn edges(&self, y: f32) -> (f32, f32) {
        let (lead, trail) = self.raw_edges(y);
        let start = 1.0 - self.tip_round;
        if y <= start {
            return (lead, trail);
        }
        // Round the tip: the half width shrinks like a quarter ellipse over the cap.
        let (l0, t0) = self.raw_edges(start);
        let t = ((y - start) / self.tip_round).min(1.0);
        let cap = 0.5 * (t0 - l0) * (1.0 - t * t).max(0.0).sqrt();
        let centre = 0.5 * (lead + trail);
        let half = (0.5 * (trail - lead)).min(cap);
        (centre - half, centre + half)
    }
}

/// A bite out of a fin edge, centred at height `y`.
#[derive(Clone, Debug)]
struct Notch {
    y: f32,
    half_height: f32,
    /// Depth in fin-local units.
    depth: f32,
    /// U-shaped (steep sides) rather than V-shaped.
    rounded: bool,
}

impl Notch {
    fn bite(&self, y: f32) -> f32 {
        let t = (y - self.y) / self.half_height;
        if t.abs() >= 1.0 {
            0.0
        } else if self.rounded {
            self.depth * (1.0 - t * t).sqrt()
        } else {
            self.depth * (1.0 - t.abs())
        }
    }
}

/// A missing tip: the fin ends at the line `y = top + slope * (x - x_at)`.
#[derive(Clone, Debug)]
struct TipCut {
    top: f32,
    slope: f32,
    x_at: f32,
}

/// A scar, or a rake of parallel scars, along a parabola in fin-local coordinates.
#[derive(Clone, Debug)]
struct Scar {
    cx: f32,
    cy: f32,
    cos: f32,
    sin: f32,
    half_len: f32,
    /// Curvature: the line is `t = bend * s^2 + offset` in the scar's own frame.
    bend: f32,
    width: f32,
    /// Offsets of the parallel lines (one entry for a single scar).
    offsets: Vec<f32>,
    colour: Rgbf,
    alpha: f32,
    seed: u32,
}

impl Scar {
    /// Coverage in [0, 1] at local point (x, y); `px` is the size of a pixel in local units.
    fn coverage(&self, x: f32, y: f32, px: f32) -> f32 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let s = dx * self.cos + dy * self.sin;
        if s.abs() > self.half_len + self.width + px {
            return 0.0;
        }
        let t = -dx * self.sin + dy * self.cos;
        let sc = s.clamp(-self.half_len, self.half_len);
        let curve = self.bend * sc * sc;
        let taper = 1.0 - 0.7 * (sc / self.half_len).powi(2);
        let true_width = self.width * taper;
        let width = true_width.max(px);
        // A line thinner than a pixel is drawn one pixel wide but fainter.
        let fade = (true_width / px).min(1.0);
        let slope = 2.0 * self.bend * sc;
        let norm = 1.0 / (1.0 + slope * slope);
        let ds = s - sc;
        let mut best: f32 = 0.0;
        for &off in &self.offsets {
            let dt = t - off - curve;
            if dt.abs() > width + px {
                continue;
            }
            let d = (ds * ds + dt * dt * norm).sqrt();
            best = best.max(((0.5 * width - d) / px + 0.5).clamp(0.0, 1.0));
        }
        if best <= 0.0 {
            return 0.0;
        }
        // Healed scars are uneven along their length.
        let uneven = 0.7 + 0.3 * value_noise(s * 30.0, 0.5, self.seed);
        best * fade * self.alpha * uneven
    }
}

/// An irregular elliptical patch of different tone, in the coordinates of the fin or back.
#[derive(Clone, Debug)]
struct Blotch {
    cx: f32,
    cy: f32,
    cos: f32,
    sin: f32,
    rx: f32,
    ry: f32,
    /// Relative amplitude of the boundary's irregularity.
    wobble: f32,
    colour: Rgbf,
    alpha: f32,
    seed: u32,
}

impl Blotch {
    fn coverage(&self, x: f32, y: f32, px: f32) -> f32 {
        let soft = (px / self.rx.min(self.ry)).max(0.12);
        // The wobble can push the boundary out to `1 / (1 - wobble)` radii.
        let limit = (1.0 + soft) / (1.0 - self.wobble);
        let (dx, dy) = (x - self.cx, y - self.cy);
        let reach = limit * self.rx.max(self.ry);
        if dx.abs() > reach || dy.abs() > reach {
            return 0.0;
        }
        let s = (dx * self.cos + dy * self.sin) / self.rx;
        let t = (-dx * self.sin + dy * self.cos) / self.ry;
        let q = (s * s + t * t).sqrt();
        if q > limit {
            return 0.0;
        }
        let wobble = 1.0 + self.wobble * (fbm(s * 2.2, t * 2.2, self.seed, 2) - 0.5) * 2.0;
        (1.0 - smoothstep(1.0 - soft, 1.0 + soft, q * wobble)) * self.alpha
    }
}

/// The visible part of the back around the fin.
#[derive(Clone, Debug)]
struct Back {
    /// Height of the back's highest point above the waterline.
    cap: f32,
    /// Visible length in front of the fin's leading root.
    front: f32,
    /// Visible length behind the fin's trailing root.
    rear: f32,
    /// Tone of the back relative to the fin.
    tone: f32,
    /// Saddle patch behind the fin (killer whales, faint on some pilot whales).
    saddle: Option<Blotch>,
}

/// Everything that identifies one animal: fixed for all its photos.
#[derive(Clone, Debug)]
pub struct Individual {
    /// Index into [`SPECIES`].
    pub species: usize,
    shape: FinShape,
    notches: Vec<Notch>,
    lead_bite: Option<Notch>,
    tip_cut: Option<TipCut>,
    /// Amplitude of the small irregularities of the trailing edge.
    edge_roughness: f32,
    edge_seed: u32,
    skin: Rgbf,
    skin_texture: f32,
    skin_seed: u32,
    scars: Vec<Scar>,
    blotches: Vec<Blotch>,
    back: Back,
}

/// Ranges of a species family's parameters (fin height = 1).
struct Family {
    base: (f32, f32),
    tip_x: (f32, f32),
    lead_pow: (f32, f32),
    trail_pow: (f32, f32),
    concavity: (f32, f32),
    tip_round: (f32, f32),
    lead_flare: (f32, f32),
    trail_flare: (f32, f32),
    back_cap: (f32, f32),
    back_front: (f32, f32),
    back_rear: (f32, f32),
    skin: Rgbf,
    /// Black species: marks are always lighter than the skin.
    dark: bool,
}

impl Family {
    fn of(species: usize, male: bool) -> Family {
        match species {
            KILLER_WHALE if male => Family {
                base: (0.55, 0.78),
                tip_x: (0.12, 0.45),
                lead_pow: (1.0, 1.15),
                trail_pow: (1.0, 1.4),
                concavity: (-0.04, 0.05),
                tip_round: (0.02, 0.06),
                lead_flare: (0.05, 0.12),
                trail_flare: (0.03, 0.08),
                back_cap: (0.1, 0.18),
                back_front: (0.4, 0.8),
                back_rear: (0.6, 1.1),
                skin: [0.055, 0.055, 0.065],
                dark: true,
            },
            KILLER_WHALE => Family {
                base: (0.85, 1.1),
                tip_x: (0.75, 1.15),
                lead_pow: (1.4, 2.0),
                trail_pow: (1.6, 2.4),
                concavity: (0.08, 0.2),
                tip_round: (0.05, 0.1),
                lead_flare: (0.08, 0.15),
                trail_flare: (0.03, 0.08),
                back_cap: (0.15, 0.25),
                back_front: (0.6, 1.0),
                back_rear: (0.8, 1.4),
                skin: [0.055, 0.055, 0.065],
                dark: true,
            },
            PILOT_WHALE => Family {
                base: (1.7, 2.2),
                tip_x: (1.5, 2.1),
                lead_pow: (2.2, 3.2),
                trail_pow: (1.8, 2.8),
                concavity: (0.12, 0.28),
                tip_round: (0.15, 0.28),
                lead_flare: (0.1, 0.25),
                trail_flare: (0.04, 0.1),
                back_cap: (0.3, 0.45),
                back_front: (0.8, 1.4),
                back_rear: (1.0, 1.8),
                skin: [0.07, 0.07, 0.08],
                dark: true,
            },
            FIN_WHALE => Family {
                base: (1.2, 1.6),
                tip_x: (1.3, 1.8),
                lead_pow: (2.0, 3.0),
                trail_pow: (2.0, 3.0),
                concavity: (0.12, 0.25),
                tip_round: (0.05, 0.12),
                lead_flare: (0.2, 0.35),
                trail_flare: (0.05, 0.12),
                back_cap: (0.25, 0.4),
                back_front: (2.0, 4.0),
                back_rear: (2.0, 3.5),
                skin: [0.3, 0.32, 0.35],
                dark: false,
            },
            SPINNER => Family {
                base: (0.95, 1.25),
                tip_x: (0.5, 0.9),
                lead_pow: (1.05, 1.35),
                trail_pow: (1.1, 1.6),
                concavity: (0.0, 0.08),
                tip_round: (0.02, 0.06),
                lead_flare: (0.06, 0.12),
                trail_flare: (0.03, 0.08),
                back_cap: (0.15, 0.25),
                back_front: (0.5, 0.9),
                back_rear: (0.7, 1.2),
                skin: [0.22, 0.24, 0.27],
                dark: false,
            },
            BOTTLENOSE => Family {
                base: (1.05, 1.45),
                tip_x: (0.95, 1.45),
                lead_pow: (1.5, 2.3),
                trail_pow: (1.6, 2.6),
                concavity: (0.08, 0.22),
                tip_round: (0.04, 0.12),
                lead_flare: (0.08, 0.2),
                trail_flare: (0.03, 0.08),
                back_cap: (0.15, 0.28),
                back_front: (0.5, 1.0),
                back_rear: (0.8, 1.4),
                skin: [0.4, 0.43, 0.46],
                dark: false,
            },
            _ => unreachable!("species {species} out of range"),
        }
    }
}

/// Probabilities of 0, 1, ... trailing-edge notches.
const NOTCH_COUNT_WEIGHTS: &[f32] = &[0.07, 0.13, 0.22, 0.25, 0.18, 0.09, 0.06];
/// Probabilities of 0, 1, ... scars.
const SCAR_COUNT_WEIGHTS: &[f32] = &[0.2, 0.25, 0.2, 0.15, 0.12, 0.08];
/// Probabilities of 0, 1, ... pigment blotches.
const BLOTCH_COUNT_WEIGHTS: &[f32] = &[0.25, 0.3, 0.22, 0.13, 0.1];
/// Probabilities of 0, 1, ... pigment blotches on black species.
const DARK_BLOTCH_COUNT_WEIGHTS: &[f32] = &[0.5, 0.3, 0.15, 0.05];

impl Individual {
    /// Draw a new animal of `species` (index into SPECIES).
    ///
    /// Panics if `species >= SPECIES.len()`.
    pub fn sample(species: usize, rng: &mut impl Rng) -> Self {
        Self::sample_from(species, rng)
    }

    fn sample_from<R: Rng + ?Sized>(species: usize, rng: &mut R) -> Self {
        assert!(
            species < SPECIES.len(),
            "species index {species} out of range"
        );
        let male = species == KILLER_WHALE && rng.gen_bool(0.4);
        let fam = Family::of(species, male);
        let shape = FinShape {
            base: uni(rng, fam.base),
            tip_x: uni(rng, fam.tip_x),
            lead_pow: uni(rng, fam.lead_pow),
            trail_pow: uni(rng, fam.trail_pow),
            concavity: uni(rng, fam.concavity),
            tip_round: uni(rng, fam.tip_round),
            lead_flare: uni(rng, fam.lead_flare),
            trail_flare: uni(rng, fam.trail_flare),
        };
        let width_at = |y: f32| {
            let (l, t) = shape.edges(y);
            t - l
        };

        // Slope dx/dy of the leading (0) or trailing (1) edge at height y.
        let slope_at = |y: f32, edge: usize| {
            let (a, b) = (shape.edges(y - 0.01), shape.edges(y + 0.01));
            let dx = if edge == 0 { b.0 - a.0 } else { b.1 - a.1 };
            dx / 0.02
        };
        // A height on an edge where the edge is steep enough for a sideways bite: where
        // it runs nearly horizontally a bite would look like a slot. The least slanted
        // of a dozen draws if none is steep.
        let bite_site = |rng: &mut R, range: (f32, f32), edge: usize| -> (f32, f32) {
            let mut best = (range.0, f32::MAX);
            for _ in 0..12 {
                let y = uni(rng, range);
                let slope = slope_at(y, edge).abs();
                if slope < best.1 {
                    best = (y, slope);
                }
                if slope < 1.0 {
                    break;
                }
            }
            (best.0, (1.0 + best.1 * best.1).sqrt())
        };
        let bite = |rng: &mut R, range, edge, size: (f32, f32), depth: (f32, f32), limit| {
            let (y, stretch) = bite_site(rng, range, edge);
            Notch {
                y,
                half_height: uni(rng, size) / stretch,
                depth: (uni(rng, depth) * stretch).min(limit * width_at(y)),
                rounded: edge == 0 || rng.gen_bool(0.5),
            }
        };
        let notches = (0..pick(rng, NOTCH_COUNT_WEIGHTS))
            .map(|_| bite(rng, (0.08, 0.92), 1, (0.012, 0.05), (0.025, 0.1), 0.35))
            .collect();
        let lead_bite = rng
            .gen_bool(0.08)
            .then(|| bite(rng, (0.25, 0.8), 0, (0.03, 0.07), (0.04, 0.09), 0.3));
        let tip_cut = rng.gen_bool(0.12).then(|| {
            let top = 1.0 - uni(rng, (0.06, 0.2));
            let (l, t) = shape.edges(top);
            TipCut {
                top,
                slope: uni(rng, (-0.5, 0.5)),
                x_at: 0.5 * (l + t),
            }
        });

        let tone = uni(rng, (0.85, 1.15));
        let skin = scale(jitter_colour(rng, fam.skin, 0.04), tone);
        let light_mark =
            |rng: &mut R| -> Rgbf { mix(skin, [0.9, 0.9, 0.9], uni(rng, (0.35, 0.75))) };
        let dark_mark = |rng: &mut R| -> Rgbf { scale(skin, uni(rng, (0.3, 0.55))) };

        // A random point well inside the fin.
        let interior = |rng: &mut R| -> (f32, f32) {
            let y = uni(rng, (0.08, 0.82));
            let (l, t) = shape.edges(y);
            (l + (t - l) * uni(rng, (0.15, 0.85)), y)
        };

        let scars = (0..pick(rng, SCAR_COUNT_WEIGHTS))
            .map(|_| {
                let (cx, cy) = interior(rng);
                let angle = uni(rng, (-PI, PI));
                // Rake marks (teeth of another animal) are long, thin, nearly straight
                // parallel lines; other scars are single curved lines.
                let rake = rng.gen_bool(0.35);
                let lines = if rake { rng.gen_range(2..=4) } else { 1 };
                let spacing = uni(rng, (0.025, 0.05));
                let offsets = (0..lines)
                    .map(|i| (i as f32 - 0.5 * (lines - 1) as f32) * spacing)
                    .collect();
                let (length, bend, width) = if rake {
                    ((0.15, 0.35), (-0.8, 0.8), (0.008, 0.016))
                } else {
                    ((0.1, 0.35), (-2.5, 2.5), (0.01, 0.025))
                };
                let light = fam.dark || rng.gen_bool(0.75);
                Scar {
                    cx,
                    cy,
                    cos: angle.cos(),
                    sin: angle.sin(),
                    half_len: 0.5 * uni(rng, length),
                    bend: uni(rng, bend),
                    width: uni(rng, width),
                    offsets,
                    colour: if light {
                        light_mark(rng)
                    } else {
                        dark_mark(rng)
                    },
                    alpha: uni(rng, (0.65, 0.95)),
                    seed: rng.gen(),
                }
            })
            .collect();

        // Black skin rarely shows pigment patches; grey skin often does.
        let blotch_weights = if fam.dark {
            DARK_BLOTCH_COUNT_WEIGHTS
        } else {
            BLOTCH_COUNT_WEIGHTS
        };
        let max_radius = if fam.dark { 0.08 } else { 0.11 };
        let blotches = (0..pick(rng, blotch_weights))
            .map(|_| {
                let (cx, cy) = interior(rng);
                let r = uni(rng, (0.035, max_radius)).min(0.4 * width_at(cy));
                let angle = uni(rng, (-PI, PI));
                let light = fam.dark || rng.gen_bool(0.6);
                Blotch {
                    cx,
                    cy,
                    cos: angle.cos(),
                    sin: angle.sin(),
                    rx: r,
                    ry: r * uni(rng, (0.45, 1.0)),
                    wobble: uni(rng, (0.1, 0.45)),
                    colour: if fam.dark {
                        mix(skin, [0.85, 0.85, 0.85], uni(rng, (0.12, 0.3)))
                    } else if light {
                        mix(skin, [0.85, 0.85, 0.85], uni(rng, (0.25, 0.5)))
                    } else {
                        scale(skin, uni(rng, (0.45, 0.7)))
                    },
                    alpha: uni(rng, (0.6, 0.9)),
                    seed: rng.gen(),
                }
            })
            .collect();

        let mut back = Back {
            cap: uni(rng, fam.back_cap),
            front: uni(rng, fam.back_front),
            rear: uni(rng, fam.back_rear),
            tone: uni(rng, (0.9, 1.05)),
            saddle: None,
        };
        let saddle = match species {
            KILLER_WHALE => Some((jitter_colour(rng, [0.52, 0.54, 0.57], 0.1), 0.95)),
            PILOT_WHALE if rng.gen_bool(0.5) => Some((mix(skin, WHITE, 0.18), 0.6)),
            _ => None,
        };
        if let Some((colour, alpha)) = saddle {
            let len = uni(rng, (0.45, 1.0)) * if male { 0.7 } else { 1.0 };
            let cx = shape.base * uni(rng, (0.55, 0.85)) + 0.5 * len;
            let profile = BackProfile::new(&back, shape.base);
            let ry = uni(rng, (0.05, 0.1));
            let angle = uni(rng, (-0.12, 0.02));
            back.saddle = Some(Blotch {
                cx,
                cy: profile.top_at(cx) - 0.6 * ry,
                cos: angle.cos(),
                sin: angle.sin(),
                rx: 0.5 * len,
                ry,
                wobble: uni(rng, (0.15, 0.5)),
                colour,
                alpha,
                seed: rng.gen(),
            });
        }

        Individual {
            species,
            shape,
            notches,
            lead_bite,
            tip_cut,
            edge_roughness: uni(rng, (0.002, 0.012)),
            edge_seed: rng.gen(),
            skin,
            skin_texture: uni(rng, (0.03, 0.08)),
            skin_seed: rng.gen(),
            scars,
            blotches,
            back,
        }
    }
}

// ---------------------------------------------------------------------------
// Geometry: the fin outline table, the back profile and poses
// ---------------------------------------------------------------------------

/// Number of rows of the outline tables.
const OUTLINE_SAMPLES: usize = 512;
/// Lowest local height of the fin (it continues below the waterline into the body).
const FIN_BOTTOM: f32 = -0.7;

/// The fin silhouette with all its marks cut out, tabulated over height.
struct Outline {
    step: f32,
    lead: Vec<f32>,
    trail: Vec<f32>,
    /// `1 / sqrt(1 + slope^2)` of each edge: turns horizontal gaps into distances.
    lead_k: Vec<f32>,
    trail_k: Vec<f32>,
    top: TipCut,
    /// Horizontal extent of the fin above the waterline.
    x_min: f32,
    x_max: f32,
}

impl Outline {
    fn new(ind: &Individual) -> Self {
        let n = OUTLINE_SAMPLES;
        let step = (1.0 - FIN_BOTTOM) / (n - 1) as f32;
        let mut lead = Vec::with_capacity(n);
        let mut trail = Vec::with_capacity(n);
        for i in 0..n {
            let y = FIN_BOTTOM + i as f32 * step;
            let (mut l, mut t) = ind.shape.edges(y);
            let along = smoothstep(0.0, 0.08, y) * (1.0 - smoothstep(0.9, 1.0, y));
            let rough = (value_noise(y * 25.0, 0.5, ind.edge_seed) - 0.5) * 2.0
                + (value_noise(y * 90.0, 3.5, ind.edge_seed) - 0.5);
            t -= along * ind.edge_roughness * rough;
            t -= ind.notches.iter().map(|n| n.bite(y)).sum::<f32>();
            if let Some(bite) = &ind.lead_bite {
                l += bite.bite(y);
            }
            lead.push(l);
            trail.push(t);
        }
        let inv_norm = |v: &[f32]| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    let (a, b) = (i.saturating_sub(1), (i + 1).min(n - 1));
                    let slope = (v[b] - v[a]) / ((b - a) as f32 * step);
                    1.0 / (1.0 + slope * slope).sqrt()
                })
                .collect()
        };
        let lead_k = inv_norm(&lead);
        let trail_k = inv_norm(&trail);
        let first_visible = (-FIN_BOTTOM / step) as usize;
        let (x_min, x_max) = lead[first_visible..]
            .iter()
            .zip(&trail[first_visible..])
            .filter(|(l, t)| t > l)
            .fold((f32::MAX, f32::MIN), |(lo, hi), (&l, &t)| {
                (lo.min(l), hi.max(t))
            });
        let top = ind.tip_cut.clone().unwrap_or(TipCut {
            top: 1.0,
            slope: 0.0,
            x_at: 0.0,
        });
        Outline {
            step,
            lead,
            trail,
            lead_k,
            trail_k,
            top,
            x_min,
            x_max,
        }
    }

    /// Signed distance to the outline in local units (positive inside) and the
    /// fraction of the chord from the leading edge at (x, y).
    fn sample(&self, x: f32, y: f32) -> (f32, f32) {
        let f = ((y - FIN_BOTTOM) / self.step).clamp(0.0, (OUTLINE_SAMPLES - 1) as f32 - 1e-3);
        let i = f as usize;
        let fr = f - i as f32;
        let lerp = |v: &[f32]| v[i] + (v[i + 1] - v[i]) * fr;
        let (l, t) = (lerp(&self.lead), lerp(&self.trail));
        let d_lead = (x - l) * lerp(&self.lead_k);
        let d_trail = (t - x) * lerp(&self.trail_k);
        let top = &self.top;
        let d_top =
            (top.top + top.slope * (x - top.x_at) - y) / (1.0 + top.slope * top.slope).sqrt();
        let d_bottom = y - FIN_BOTTOM;
        let across = ((x - l) / (t - l).max(1e-4)).clamp(0.0, 1.0);
        (d_lead.min(d_trail).min(d_top).min(d_bottom), across)
    }
}

/// Profile of the back: `y <= top(x)`, a parabola on each side of its peak that
/// dives below the waterline `front` before and `rear` behind the fin's root.
#[derive(Clone, Copy, Debug)]
struct BackProfile {
    peak_x: f32,
    cap: f32,
    front_len: f32,
    rear_len: f32,
}

impl BackProfile {
    fn new(back: &Back, base: f32) -> Self {
        let peak_x = 0.45 * base;
        BackProfile {
            peak_x,
            cap: back.cap,
            front_len: back.front + peak_x,
            rear_len: back.rear + base - peak_x,
        }
    }

    /// Local x range where the back is above the waterline.
    fn x_range(&self) -> (f32, f32) {
        (self.peak_x - self.front_len, self.peak_x + self.rear_len)
    }

    /// Height of the back at `x` and its slope.
    fn top(&self, x: f32) -> (f32, f32) {
        let len = if x < self.peak_x {
            self.front_len
        } else {
            self.rear_len
        };
        let t = (x - self.peak_x) / len;
        (self.cap * (1.0 - t * t), -2.0 * self.cap * t / len)
    }

    fn top_at(&self, x: f32) -> f32 {
        self.top(x).0
    }

    /// Signed distance to the back's upper edge, positive inside.
    fn signed_distance(&self, x: f32, y: f32) -> f32 {
        let (top, slope) = self.top(x);
        (top - y) / (1.0 + slope * slope).sqrt()
    }
}

/// Placement of local coordinates in the image: local (0, 0) lands on (ox, oy).
#[derive(Clone, Copy, Debug)]
struct Pose {
    ox: f32,
    oy: f32,
    /// Pixels per local unit (the fin height in pixels).
    scale: f32,
    cos: f32,
    sin: f32,
    /// 1 for an animal swimming left (head at negative x), -1 for one swimming right.
    mirror: f32,
}

impl Pose {
    fn to_local(self, px: f32, py: f32) -> (f32, f32) {
        let (dx, dy) = (px - self.ox, py - self.oy);
        let rx = dx * self.cos + dy * self.sin;
        let ry = -dx * self.sin + dy * self.cos;
        (rx * self.mirror / self.scale, -ry / self.scale)
    }

    fn to_image(self, x: f32, y: f32) -> (f32, f32) {
        let rx = x * self.scale * self.mirror;
        let ry = -y * self.scale;
        (
            self.ox + rx * self.cos - ry * self.sin,
            self.oy + rx * self.sin + ry * self.cos,
        )
    }

    /// Image bounding box (x0, y0, x1, y1) of a local rectangle.
    fn image_bounds(self, x0: f32, y0: f32, x1: f32, y1: f32) -> (f32, f32, f32, f32) {
        [(x0, y0), (x1, y0), (x0, y1), (x1, y1)].iter().fold(
            (f32::MAX, f32::MAX, f32::MIN, f32::MIN),
            |(a, b, c, d), &(x, y)| {
                let (px, py) = self.to_image(x, y);
                (a.min(px), b.min(py), c.max(px), d.max(py))
            },
        )
    }
}

// ---------------------------------------------------------------------------
// The scene: sky, coast, clouds and sea, a pure function of the pixel position
// ---------------------------------------------------------------------------

struct Wave {
    kx: f32,
    kz: f32,
    amp: f32,
    phase: f32,
}

struct Water {
    deep: Rgbf,
    waves: Vec<Wave>,
    cam_h: f32,
    focal: f32,
    chop: f32,
    chop_freq: f32,
    glint: f32,
    shininess: i32,
    haze_dist: f32,
    seed: u32,
}

struct Clouds {
    cover: f32,
    scale: f32,
    colour: Rgbf,
    seed: u32,
}

struct Coast {
    x0: f32,
    x1: f32,
    height: f32,
    ridge: f32,
    colour: Rgbf,
    seed: u32,
}

struct Scene {
    width: f32,
    height: f32,
    horizon: f32,
    zenith: Rgbf,
    horizon_colour: Rgbf,
    sun_dir: [f32; 3],
    sun: Rgbf,
    clouds: Option<Clouds>,
    coast: Option<Coast>,
    water: Water,
}

impl Scene {
    /// Draws a scene; the horizon stays above `waterline - 0.1 * height`.
    fn sample<R: Rng + ?Sized>(width: f32, height: f32, waterline: f32, rng: &mut R) -> Self {
        let horizon = if rng.gen_bool(0.75) {
            uni(rng, (0.04, 0.5)) * height
        } else {
            -uni(rng, (0.05, 0.8)) * height
        };
        let horizon = horizon.min(waterline - 0.1 * height);
        let overcast = rng.gen::<f32>().powf(1.5);
        let brightness = uni(rng, (0.8, 1.1));
        let zenith = scale(
            mix([0.22, 0.42, 0.75], [0.55, 0.58, 0.62], overcast),
            brightness,
        );
        let horizon_colour = scale(
            mix([0.72, 0.8, 0.88], [0.75, 0.77, 0.79], overcast),
            brightness,
        );
        let elevation = uni(rng, (0.15, 1.1));
        let azimuth = uni(rng, (-PI, PI));
        let sun_dir = [
            elevation.cos() * azimuth.sin(),
            elevation.sin(),
            elevation.cos() * azimuth.cos(),
        ];
        let sun = scale([1.0, 0.96, 0.88], brightness * (1.0 - 0.6 * overcast));

        let clouds = (horizon > 0.0 && rng.gen_bool(0.6)).then(|| Clouds {
            cover: uni(rng, (0.35, 0.7)),
            scale: uni(rng, (0.6, 2.0)),
            colour: scale(mix(WHITE, [0.8, 0.82, 0.85], overcast), brightness),
            seed: rng.gen(),
        });
        let coast = (horizon > 4.0 && rng.gen_bool(0.45)).then(|| {
            let land =
                [[0.17, 0.22, 0.18], [0.3, 0.28, 0.25], [0.34, 0.4, 0.48]][rng.gen_range(0..3)];
            let full = rng.gen_bool(0.5);
            let (x0, x1) = if full {
                (-width, 2.0 * width)
            } else {
                let a = uni(rng, (-0.5, 0.7)) * width;
                (a, a + uni(rng, (0.3, 0.9)) * width)
            };
            Coast {
                x0,
                x1,
                height: uni(rng, (0.015, 0.09)) * height,
                ridge: uni(rng, (0.05, 0.3)) * width,
                colour: mix(land, horizon_colour, uni(rng, (0.2, 0.65))),
                seed: rng.gen(),
            }
        });

        let deep = [
            [0.08, 0.24, 0.38],
            [0.1, 0.3, 0.3],
            [0.24, 0.3, 0.33],
            [0.06, 0.2, 0.3],
        ][pick(rng, &[0.4, 0.25, 0.2, 0.15])];
        let deep = scale(
            jitter_colour(rng, deep, 0.1),
            brightness * uni(rng, (0.85, 1.3)),
        );
        let roughness = uni(rng, (0.3, 1.0));
        let main_dir = uni(rng, (-0.6, 0.6));
        let waves = (0..rng.gen_range(4..=MAX_WAVES))
            .map(|_| {
                let wavelength = uni(rng, (0.5, 5.0));
                let k = 2.0 * PI / wavelength;
                let dir = main_dir + uni(rng, (-0.7, 0.7));
                let steepness = uni(rng, (0.03, 0.11)) * roughness;
                Wave {
                    kx: k * dir.sin(),
                    kz: k * dir.cos(),
                    amp: steepness / k,
                    phase: uni(rng, (0.0, 2.0 * PI)),
                }
            })
            .collect();
        let water = Water {
            deep,
            waves,
            cam_h: uni(rng, (2.0, 8.0)),
            focal: width * uni(rng, (0.9, 1.6)),
            chop: uni(rng, (0.05, 0.4)) * roughness,
            chop_freq: uni(rng, (1.5, 5.0)),
            glint: (1.0 - overcast) * uni(rng, (0.4, 2.5)),
            shininess: rng.gen_range(40..400),
            haze_dist: uni(rng, (60.0, 400.0)),
            seed: rng.gen(),
        };
        Scene {
            width,
            height,
            horizon,
            zenith,
            horizon_colour,
            sun_dir,
            sun,
            clouds,
            coast,
            water,
        }
    }

    /// Sky colour at an elevation given as the sine of the angle above the horizon.
    fn sky_colour(&self, elevation: f32) -> Rgbf {
        mix(
            self.horizon_colour,
            self.zenith,
            smoothstep(0.0, 0.6, elevation).sqrt(),
        )
    }

    /// Top of the coastline at a column, if there is land there.
    fn coast_top(&self, px: f32) -> Option<f32> {
        let coast = self.coast.as_ref()?;
        let ramp = 0.15 * (coast.x1 - coast.x0);
        let taper = smoothstep(coast.x0, coast.x0 + ramp, px)
            * (1.0 - smoothstep(coast.x1 - ramp, coast.x1, px));
        if taper <= 0.0 {
            return None;
        }
        let ridge = fbm(px / coast.ridge, 0.5, coast.seed, 4);
        Some(self.horizon - coast.height * (0.3 + 0.7 * ridge) * taper.sqrt())
    }

    fn sky(&self, px: f32, py: f32) -> Rgbf {
        let rise = self.horizon - py;
        let focal = self.water.focal;
        let elevation = rise / (rise * rise + focal * focal).sqrt();
        let mut c = self.sky_colour(elevation);
        if let Some(clouds) = &self.clouds {
            // Project onto a cloud layer: far clouds crowd toward the horizon.
            let d = rise.max(0.5);
            let u = (px - 0.5 * self.width) / d * clouds.scale;
            let v = focal / d * clouds.scale * 0.25;
            let fade = smoothstep(0.5, 0.05 * self.height, rise);
            let n = fbm(u, v, clouds.seed, 3);
            let alpha = smoothstep(clouds.cover, clouds.cover + 0.2, n) * fade;
            if alpha > 0.0 {
                let shade = 0.8 + 0.25 * value_noise(u * 3.0, v * 3.0, clouds.seed ^ 0xABCD);
                c = mix(c, scale(clouds.colour, shade), alpha * 0.9);
            }
        }
        c
    }

    /// Sky or land above the horizon; `coast_top` is the land's top in this column.
    fn above_horizon(&self, px: f32, py: f32, coast_top: Option<f32>) -> Rgbf {
        match (coast_top, &self.coast) {
            (Some(top), Some(coast)) if py > top - 0.5 => {
                let tex = 0.9 + 0.2 * value_noise(px * 0.2, py * 0.4, coast.seed);
                let land = scale(coast.colour, tex);
                let cover = (py - top + 0.5).clamp(0.0, 1.0);
                if cover >= 1.0 {
                    land
                } else {
                    mix(self.sky(px, py), land, cover)
                }
            }
            _ => self.sky(px, py),
        }
    }

    /// Constants of the sea along the pixel row at height `py` (below the horizon).
    fn sea_row(&self, py: f32) -> SeaRow {
        let wt = &self.water;
        let dy = (py - self.horizon).max(0.25);
        // Ground-plane coordinates seen by a camera `cam_h` above the sea.
        let z = wt.cam_h * wt.focal / dy;
        let dx = z / wt.focal;
        let foot_z = z * z / (wt.cam_h * wt.focal);
        let mut fades = [0.0; MAX_WAVES];
        for (fade, wave) in fades.iter_mut().zip(&wt.waves) {
            // Phase change per pixel; waves finer than about four pixels fade out.
            let change = wave.kx.abs() * dx + wave.kz.abs() * foot_z;
            *fade = (1.0 - change / 1.5).max(0.0);
        }
        SeaRow {
            z,
            dx,
            x0: -0.5 * self.width * dx,
            fades,
            chop: wt.chop * (1.0 - wt.chop_freq * (dx + foot_z) / 0.8).max(0.0),
            haze: 0.7 * (1.0 - (-z / wt.haze_dist).exp()),
        }
    }

    /// Colour of the sea at ground point (x, row.z) with wave slopes (gx, gz).
    fn sea_colour(&self, row: &SeaRow, x: f32, mut gx: f32, mut gz: f32) -> Rgbf {
        let wt = &self.water;
        let z = row.z;
        if row.chop > 0.0 {
            let (cx, cz) = (x * wt.chop_freq, z * wt.chop_freq);
            gx += row.chop * (value_noise(cx, cz, wt.seed) - 0.5);
            gz += row.chop * (value_noise(cx + 17.3, cz + 5.1, wt.seed) - 0.5);
        }
        let nl = (gx * gx + 1.0 + gz * gz).sqrt();
        let normal = [-gx / nl, 1.0 / nl, -gz / nl];
        let vl = (x * x + wt.cam_h * wt.cam_h + z * z).sqrt();
        let view = [x / vl, -wt.cam_h / vl, z / vl];
        let cos_i = (-dot3(view, normal)).clamp(0.0, 1.0);
        let refl = [
            view[0] + 2.0 * cos_i * normal[0],
            view[1] + 2.0 * cos_i * normal[1],
            view[2] + 2.0 * cos_i * normal[2],
        ];
        let fresnel = 0.02 + 0.98 * (1.0 - cos_i).powi(5);
        let patches = 0.85 + 0.3 * value_noise(x * 0.06, z * 0.06, wt.seed ^ 0x5555);
        let deep = scale(wt.deep, patches);
        let mut c = mix(deep, self.sky_colour(refl[1].max(0.0)), fresnel);
        let s = dot3(refl, self.sun_dir);
        if s > 0.8 {
            c = add(c, scale(self.sun, wt.glint * s.powi(wt.shininess)));
        }
        mix(c, self.horizon_colour, row.haze)
    }

    /// Colour of the sea at one pixel.
    fn water(&self, px: f32, py: f32) -> Rgbf {
        let row = self.sea_row(py);
        let x = row.x0 + px * row.dx;
        let (mut gx, mut gz) = (0.0, 0.0);
        for (wave, &fade) in self.water.waves.iter().zip(&row.fades) {
            if fade > 0.0 {
                let c = wave.amp * fade * (wave.kx * x + wave.kz * row.z + wave.phase).cos();
                gx += c * wave.kx;
                gz += c * wave.kz;
            }
        }
        self.sea_colour(&row, x, gx, gz)
    }

    /// Colours of the sea along a whole row, advancing each wave's phase by rotation.
    fn water_row(&self, py: f32, out: &mut [Rgbf]) {
        let row = self.sea_row(py);
        let mut slopes = vec![(0.0f32, 0.0f32); out.len()];
        for (wave, &fade) in self.water.waves.iter().zip(&row.fades) {
            if fade <= 0.0 {
                continue;
            }
            let start = wave.kx * (row.x0 + 0.5 * row.dx) + wave.kz * row.z + wave.phase;
            let step = wave.kx * row.dx;
            let (mut s, mut c) = start.sin_cos();
            let (sd, cd) = step.sin_cos();
            let a = wave.amp * fade;
            for (i, g) in slopes.iter_mut().enumerate() {
                // Re-anchor now and then so rounding errors cannot accumulate.
                if i % 64 == 63 {
                    (s, c) = (start + step * i as f32).sin_cos();
                }
                g.0 += a * c * wave.kx;
                g.1 += a * c * wave.kz;
                (s, c) = (s * cd + c * sd, c * cd - s * sd);
            }
        }
        for (i, (o, &(gx, gz))) in out.iter_mut().zip(&slopes).enumerate() {
            let x = row.x0 + (i as f32 + 0.5) * row.dx;
            *o = self.sea_colour(&row, x, gx, gz);
        }
    }

    /// Paints the whole background into a canvas.
    fn paint(&self, width: u32, height: u32) -> Canvas {
        let (w, h) = (width as usize, height as usize);
        let mut pixels = vec![[0.0f32; 3]; w * h];
        let coast_tops: Vec<Option<f32>> =
            (0..w).map(|px| self.coast_top(px as f32 + 0.5)).collect();
        let mut sea = vec![[0.0f32; 3]; w];
        for (py, row) in pixels.chunks_exact_mut(w).enumerate() {
            let fy = py as f32 + 0.5;
            let rise = self.horizon - fy;
            if rise < 0.5 {
                self.water_row(fy, &mut sea);
            }
            for (px, p) in row.iter_mut().enumerate() {
                let fx = px as f32 + 0.5;
                *p = if rise >= 0.5 {
                    self.above_horizon(fx, fy, coast_tops[px])
                } else if rise <= -0.5 {
                    sea[px]
                } else {
                    mix(
                        sea[px],
                        self.above_horizon(fx, fy, coast_tops[px]),
                        rise + 0.5,
                    )
                };
            }
        }
        Canvas {
            width: w,
            height: h,
            pixels,
        }
    }
}

/// Maximum number of wave trains of a sea.
const MAX_WAVES: usize = 6;

/// Per-row constants of the sea.
struct SeaRow {
    /// Distance of the row's ground points.
    z: f32,
    /// Ground distance across one pixel, and ground x of the image's left edge.
    dx: f32,
    x0: f32,
    /// Amplitude factor of each wave (0 where it would alias).
    fades: [f32; MAX_WAVES],
    chop: f32,
    haze: f32,
}

// ---------------------------------------------------------------------------
// Canvas and drawing of small things
// ---------------------------------------------------------------------------

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgbf>,
}

impl Canvas {
    fn blend(&mut self, px: usize, py: usize, colour: Rgbf, alpha: f32) {
        let p = &mut self.pixels[py * self.width + px];
        *p = mix(*p, colour, alpha.clamp(0.0, 1.0));
    }

    /// Integer pixel range covering [a, b) clipped to `0..limit`.
    fn span(a: f32, b: f32, limit: usize) -> std::ops::Range<usize> {
        let lo = a.floor().max(0.0) as usize;
        let hi = (b.ceil().max(0.0) as usize).min(limit);
        lo.min(hi)..hi
    }

    /// An anti-aliased line segment.
    fn segment(&mut self, a: (f32, f32), b: (f32, f32), width: f32, colour: Rgbf, alpha: f32) {
        let r = 0.5 * width + 1.0;
        let xs = Self::span(a.0.min(b.0) - r, a.0.max(b.0) + r, self.width);
        let ys = Self::span(a.1.min(b.1) - r, a.1.max(b.1) + r, self.height);
        let (ex, ey) = (b.0 - a.0, b.1 - a.1);
        let len2 = (ex * ex + ey * ey).max(1e-6);
        for py in ys {
            for px in xs.clone() {
                let (qx, qy) = (px as f32 + 0.5 - a.0, py as f32 + 0.5 - a.1);
                let t = ((qx * ex + qy * ey) / len2).clamp(0.0, 1.0);
                let d = ((qx - t * ex).powi(2) + (qy - t * ey).powi(2)).sqrt();
                let cov = (0.5 * width - d + 0.5).clamp(0.0, 1.0);
                if cov > 0.0 {
                    self.blend(px, py, colour, cov * alpha);
                }
            }
        }
    }

    /// An anti-aliased trapezoid with horizontal top and bottom: `(x0, x1)` at `top`
    /// and `(b0, b1)` at `bottom`.
    fn trapezoid(
        &mut self,
        top: f32,
        bottom: f32,
        (x0, x1): (f32, f32),
        (b0, b1): (f32, f32),
        colour: Rgbf,
    ) {
        let ys = Self::span(top, bottom, self.height);
        let xs = Self::span(x0.min(b0), x1.max(b1), self.width);
        for py in ys {
            let y = py as f32 + 0.5;
            let row = ((y + 0.5).min(bottom) - (y - 0.5).max(top)).clamp(0.0, 1.0);
            let t = ((y - top) / (bottom - top)).clamp(0.0, 1.0);
            let (l, r) = (x0 + (b0 - x0) * t, x1 + (b1 - x1) * t);
            for px in xs.clone() {
                let x = px as f32 + 0.5;
                let col = ((x + 0.5).min(r) - (x - 0.5).max(l)).clamp(0.0, 1.0);
                if col * row > 0.0 {
                    self.blend(px, py, colour, col * row);
                }
            }
        }
    }
}

/// A distant boat sitting on the horizon.
fn draw_boat<R: Rng + ?Sized>(canvas: &mut Canvas, scene: &Scene, rng: &mut R) {
    let (w, h) = (scene.width, scene.height);
    let length = uni(rng, (0.03, 0.09)) * w;
    let hull = length * uni(rng, (0.12, 0.2));
    let x = uni(rng, (0.05, 0.95)) * w;
    let base = scene.horizon + uni(rng, (0.002, 0.02)) * h;
    let colour = [[0.85, 0.86, 0.88], [0.12, 0.13, 0.15], [0.5, 0.15, 0.12]][rng.gen_range(0..3)];
    let colour = mix(colour, scene.horizon_colour, uni(rng, (0.15, 0.5)));
    let (l, r) = (x - 0.5 * length, x + 0.5 * length);
    let bow = if rng.gen_bool(0.5) { 0.15 } else { -0.15 } * length;
    canvas.trapezoid(
        base - hull,
        base,
        (l - bow.min(0.0), r - bow.max(0.0)),
        (l + 0.08 * length, r - 0.08 * length),
        colour,
    );
    let cabin_w = length * uni(rng, (0.2, 0.45));
    let cabin_h = hull * uni(rng, (0.8, 1.8));
    let cx = x + uni(rng, (-0.2, 0.2)) * length;
    let cabin = mix([0.9, 0.9, 0.92], scene.horizon_colour, uni(rng, (0.2, 0.5)));
    canvas.trapezoid(
        base - hull - cabin_h,
        base - hull,
        (cx - 0.4 * cabin_w, cx + 0.5 * cabin_w),
        (cx - 0.5 * cabin_w, cx + 0.5 * cabin_w),
        cabin,
    );
}

/// A few birds: small dark "m" shapes.
fn draw_birds<R: Rng + ?Sized>(canvas: &mut Canvas, scene: &Scene, rng: &mut R) {
    let (w, h) = (scene.width, scene.height);
    let lowest = if scene.horizon > 0.2 * h {
        scene.horizon
    } else {
        0.5 * h
    };
    let unit = h / 256.0;
    let (cx, cy) = (uni(rng, (0.1, 0.9)) * w, uni(rng, (0.05, 0.8)) * lowest);
    for _ in 0..rng.gen_range(1..=5) {
        let x = cx + uni(rng, (-0.15, 0.15)) * w;
        let y = cy + uni(rng, (-0.08, 0.08)) * h;
        let span = uni(rng, (2.5, 7.0)) * unit;
        let lift = uni(rng, (0.1, 0.5)) * span;
        let elbow = uni(rng, (-0.1, 0.25)) * span;
        let colour = mix([0.1, 0.1, 0.12], scene.horizon_colour, uni(rng, (0.0, 0.4)));
        let width = 0.9 * unit.max(1.0);
        for side in [-1.0, 1.0] {
            let mid = (x + side * 0.45 * span, y - elbow);
            canvas.segment((x, y), mid, width, colour, 1.0);
            canvas.segment(mid, (x + side * span, y - lift), width, colour, 1.0);
        }
    }
}

// ---------------------------------------------------------------------------
// The animal in the water
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum OccluderKind {
    /// A smooth wave crest, translucent at its top.
    Crest,
    /// An irregular white splash.
    Splash,
    /// A low band of foam.
    Foam,
}

/// Something in front of the lower part of the fin.
struct Occluder {
    kind: OccluderKind,
    cx: f32,
    half_width: f32,
    height: f32,
    seed: u32,
}

/// The water surface in front of an animal.
struct Front {
    base_y: f32,
    ripple_amp: f32,
    ripple_freq: f32,
    ripple_phase: f32,
    occluder: Option<Occluder>,
    /// Foam along the waterline where the body breaks the surface.
    foam: f32,
    foam_x: (f32, f32),
    foam_size: f32,
    seed: u32,
}

impl Front {
    /// The undisturbed waterline.
    fn base_line(&self, px: f32) -> f32 {
        self.base_y + self.ripple_amp * (px * self.ripple_freq + self.ripple_phase).sin()
    }

    /// The waterline including the occluder.
    fn line(&self, px: f32) -> f32 {
        let base = self.base_line(px);
        let Some(occ) = &self.occluder else {
            return base;
        };
        let t = (px - occ.cx) / occ.half_width;
        if t.abs() >= 1.0 {
            return base;
        }
        let bump = (1.0 - t * t).powi(2);
        let raise = match occ.kind {
            OccluderKind::Crest => bump * (1.0 + 0.06 * (px * 0.4).sin()),
            OccluderKind::Splash => {
                let n = fbm(px / (0.2 * occ.height + 2.0), 0.5, occ.seed, 3);
                bump.sqrt() * (0.3 + 0.9 * n)
            }
            OccluderKind::Foam => {
                let plateau = (1.0 - t.powi(6)).max(0.0);
                plateau * (0.7 + 0.3 * value_noise(px / 3.0, 1.5, occ.seed))
            }
        };
        base - occ.height * raise
    }

    /// Colour of the occluder at a pixel between `line` and `base`.
    fn occluder_colour(&self, scene: &Scene, px: f32, py: f32, line: f32, base: f32) -> Rgbf {
        let near = scene.water(px, base + (base - py) + 2.0);
        let Some(occ) = &self.occluder else {
            return near;
        };
        let from_top = py - line;
        let rel = from_top / (base - line).max(1.0);
        let n = fbm(px * 0.15, py * 0.3, occ.seed ^ 0x77, 3);
        let foam = mix([0.78, 0.82, 0.85], [0.97, 0.98, 1.0], n);
        match occ.kind {
            OccluderKind::Crest => {
                let face = mix(near, scale(scene.water.deep, 1.25), 0.35);
                let lit = mix(face, [0.45, 0.65, 0.62], 0.3 * (1.0 - rel));
                let cap = (-from_top / 1.5).exp() * smoothstep(0.3, 0.6, n);
                mix(lit, foam, cap * 0.9)
            }
            OccluderKind::Splash => mix(near, scale(foam, 0.9 + 0.1 * n), 0.55 + 0.45 * n),
            OccluderKind::Foam => mix(near, foam, 0.5 + 0.5 * smoothstep(0.3, 0.7, n)),
        }
    }

    /// Alpha of the waterline foam at a pixel.
    fn foam_alpha(&self, px: f32, py: f32, line: f32) -> f32 {
        let d = py - line;
        if self.foam <= 0.0 || d < -3.0 || d > 8.0 * self.foam_size {
            return 0.0;
        }
        let (x0, x1) = self.foam_x;
        let ramp = 0.1 * (x1 - x0) + 2.0;
        let taper =
            smoothstep(x0 - ramp, x0 + ramp, px) * (1.0 - smoothstep(x1 - ramp, x1 + ramp, px));
        if taper <= 0.0 {
            return 0.0;
        }
        let band = if d >= 0.0 {
            (-d / (2.0 * self.foam_size)).exp()
        } else {
            (d / 0.6).exp()
        };
        // Streaks: the noise is stretched along the waterline.
        let fs = self.foam_size;
        let n = fbm(px / (3.0 * fs), py / (0.7 * fs), self.seed, 2);
        self.foam * taper * band * smoothstep(0.35, 0.75, n)
    }
}

/// Per-photo lighting of the animal.
#[derive(Clone, Copy, Debug)]
struct Look {
    /// Unit vector in image coordinates pointing toward the light.
    light_dir: (f32, f32),
    /// Brightness change across one fin height along `light_dir`.
    gradient: f32,
    /// Brightening (or darkening) of the rounded leading edge.
    rim: f32,
    /// Darkening of the fin toward its trailing edge, where it turns away from the camera.
    relief: f32,
    /// Strength and position (fraction of the chord from the leading edge) of a wet sheen.
    sheen: f32,
    sheen_at: f32,
    /// Exposure of the animal.
    light: f32,
    sun: Rgbf,
    /// Sky colour reflected by the wet skin, and how much of it.
    sky: Rgbf,
    reflect: f32,
    seed: u32,
}

impl Look {
    fn sample<R: Rng + ?Sized>(scene: &Scene, rng: &mut R) -> Self {
        let angle = if rng.gen_bool(0.75) {
            uni(rng, (-PI, 0.0))
        } else {
            uni(rng, (-PI, PI))
        };
        Look {
            light_dir: (angle.cos(), angle.sin()),
            gradient: uni(rng, (0.15, 0.45)),
            rim: uni(rng, (-0.2, 0.3)),
            relief: uni(rng, (0.05, 0.3)),
            sheen: if rng.gen_bool(0.5) {
                uni(rng, (0.03, 0.18))
            } else {
                0.0
            },
            sheen_at: uni(rng, (0.1, 0.5)),
            light: uni(rng, (0.8, 1.2)),
            sun: scene.sun,
            sky: scene.sky_colour(0.4),
            reflect: uni(rng, (0.03, 0.12)),
            seed: rng.gen(),
        }
    }
}

/// One animal as drawn in one photo.
struct Animal<'a> {
    ind: &'a Individual,
    outline: Outline,
    back_shape: BackProfile,
    fin: Pose,
    back: Pose,
    /// Draw the individual's scars, blotches and saddle.
    marks: bool,
    /// Width of the soft edge in pixels (1 = crisp anti-aliasing).
    edge_px: f32,
    look: Look,
    haze: f32,
    haze_colour: Rgbf,
}

impl Animal<'_> {
    /// Image point of the fin's centre, the pivot of the lighting gradient.
    fn centre(&self) -> (f32, f32) {
        self.fin
            .to_image(0.5 * (self.outline.x_min + self.outline.x_max), 0.5)
    }

    fn shade(&self, px: f32, py: f32, centre: (f32, f32)) -> f32 {
        let (lx, ly) = self.look.light_dir;
        let along = ((px - centre.0) * lx + (py - centre.1) * ly) / self.fin.scale;
        (1.0 + self.look.gradient * along).max(0.3)
    }

    fn fin_colour(&self, x: f32, y: f32, across: f32, shade: f32) -> Rgbf {
        let ind = self.ind;
        let px = 1.0 / self.fin.scale;
        let tex = fbm(x * 9.0, y * 9.0, ind.skin_seed, 2) - 0.5;
        let mut c = scale(ind.skin, 1.0 + 2.0 * ind.skin_texture * tex);
        if self.marks {
            for blotch in &ind.blotches {
                let a = blotch.coverage(x, y, px);
                if a > 0.0 {
                    c = mix(c, blotch.colour, a);
                }
            }
            for scar in &ind.scars {
                let a = scar.coverage(x, y, px);
                if a > 0.0 {
                    c = mix(c, scar.colour, a);
                }
            }
        }
        // The fin is thickest a third of the way back from its rounded leading edge:
        // its surface turns away from the camera toward both edges.
        let rounded = (1.0 - across).powi(3) * smoothstep(0.0, 0.2, y);
        let curve = ((across - 0.3) / 0.7).powi(2);
        let lit = shade * (1.0 + self.look.rim * rounded) * (1.0 - self.look.relief * curve);
        let mut out = scale(c, self.look.light * lit);
        // Wet skin reflects some sky, most on the rounded front of the fin.
        out = mix(out, self.look.sky, self.look.reflect * (1.0 - 0.6 * across));
        if self.look.sheen > 0.0 {
            let t = (across - self.look.sheen_at) / 0.15;
            let streaks = 0.5 + value_noise(x * 5.0, y * 16.0, self.look.seed);
            let k = self.look.sheen * (-t * t).exp() * smoothstep(0.0, 0.3, y) * streaks;
            out = add(out, scale(self.look.sun, k));
        }
        out
    }

    fn back_colour(&self, x: f32, y: f32, shade: f32) -> Rgbf {
        let ind = self.ind;
        let tex = fbm(x * 9.0 + 50.0, y * 9.0, ind.skin_seed, 2) - 0.5;
        let mut c = scale(
            ind.skin,
            ind.back.tone * (1.0 + 2.0 * ind.skin_texture * tex),
        );
        if self.marks {
            if let Some(saddle) = &ind.back.saddle {
                let a = saddle.coverage(x, y, 1.0 / self.fin.scale);
                if a > 0.0 {
                    c = mix(c, saddle.colour, a);
                }
            }
        }
        // Wet skin near the waterline is darker.
        let wet = 0.8 + 0.2 * smoothstep(0.0, ind.back.cap, y);
        let mut out = scale(c, self.look.light * shade * wet);
        out = mix(out, self.look.sky, self.look.reflect);
        let below_top = (self.back_shape.top_at(x) - y) / 0.03;
        let highlight = self.look.sheen.max(0.04) * (-below_top * below_top).exp();
        out = add(out, scale(self.look.sun, highlight));
        out
    }
}

/// Accumulates the pixel bounds of a set of pixels.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

impl Bounds {
    fn empty() -> Self {
        Bounds {
            x0: usize::MAX,
            y0: usize::MAX,
            x1: 0,
            y1: 0,
        }
    }

    fn include(&mut self, px: usize, py: usize) {
        self.x0 = self.x0.min(px);
        self.y0 = self.y0.min(py);
        self.x1 = self.x1.max(px + 1);
        self.y1 = self.y1.max(py + 1);
    }

    fn is_empty(&self) -> bool {
        self.x0 >= self.x1 || self.y0 >= self.y1
    }

    fn to_box(self) -> BoxPx {
        BoxPx {
            x0: self.x0 as f32,
            y0: self.y0 as f32,
            x1: self.x1 as f32,
            y1: self.y1 as f32,
        }
    }
}

/// Draws an animal with the water in front of it; returns the bounds of its visible
/// fin and of its visible fin and back.
fn draw_animal(canvas: &mut Canvas, scene: &Scene, a: &Animal, front: &Front) -> (Bounds, Bounds) {
    let out = &a.outline;
    let back_shape = a.back_shape;
    let (back_x0, back_x1) = back_shape.x_range();
    let fin_b = a
        .fin
        .image_bounds(out.x_min - 0.05, 0.0, out.x_max + 0.05, 1.05);
    let back_b = a
        .back
        .image_bounds(back_x0, -0.5, back_x1, back_shape.cap + 0.02);
    let mut x0 = fin_b.0.min(back_b.0);
    let mut x1 = fin_b.2.max(back_b.2);
    if let Some(occ) = &front.occluder {
        x0 = x0.min(occ.cx - occ.half_width);
        x1 = x1.max(occ.cx + occ.half_width);
    }
    let under = 0.15 * a.fin.scale + 3.0;
    let y0 = fin_b.1.min(back_b.1) - 2.0;
    let y1 = front.base_y + front.ripple_amp + under;
    let xs = Canvas::span(x0 - 2.0, x1 + 2.0, canvas.width);
    let ys = Canvas::span(y0, y1, canvas.height);
    let columns: Vec<(f32, f32)> = xs
        .clone()
        .map(|px| {
            let fx = px as f32 + 0.5;
            (front.line(fx), front.base_line(fx))
        })
        .collect();

    let centre = a.centre();
    let inv_edge = a.fin.scale / a.edge_px;
    let (fin_x0, fin_x1) = (out.x_min - 0.1, out.x_max + 0.1);
    let back_top = back_shape.cap + 2.0 * a.edge_px / a.fin.scale;
    let mut fin_bounds = Bounds::empty();
    let mut body_bounds = Bounds::empty();
    for py in ys {
        let fy = py as f32 + 0.5;
        for (px, &(line, base)) in xs.clone().zip(&columns) {
            let fx = px as f32 + 0.5;
            let above = (line - fy + 0.5).clamp(0.0, 1.0);
            let (xl, yl) = a.fin.to_local(fx, fy);
            let (mut fin_cov, mut across) = (0.0, 0.0);
            if xl > fin_x0 && xl < fin_x1 && yl > FIN_BOTTOM && yl < 1.1 {
                let (d, ac) = out.sample(xl, yl);
                fin_cov = (d * inv_edge + 0.5).clamp(0.0, 1.0);
                across = ac;
            }
            let (xb, yb) = a.back.to_local(fx, fy);
            let back_cov = if yb > back_top || xb < back_x0 || xb > back_x1 {
                0.0
            } else {
                (back_shape.signed_distance(xb, yb) * inv_edge + 0.5).clamp(0.0, 1.0)
            };
            let cov = fin_cov + back_cov * (1.0 - fin_cov);
            let mut c = canvas.pixels[py * canvas.width + px];
            // Below the surface the animal shows faintly through the water.
            let depth = (fy - line).max(0.0) / a.fin.scale;
            let seen = 0.4 * (-depth / 0.05).exp();
            if cov * (above + (1.0 - above) * seen) > 1e-3 {
                let shade = a.shade(fx, fy, centre);
                let fin_c = if fin_cov > 0.0 {
                    a.fin_colour(xl, yl, across, shade)
                } else {
                    [0.0; 3]
                };
                let animal = if fin_cov >= 1.0 {
                    fin_c
                } else {
                    let back_c = a.back_colour(xb, yb, shade);
                    mix(back_c, fin_c, fin_cov / cov)
                };
                let animal = mix(animal, a.haze_colour, a.haze);
                if above > 0.0 {
                    c = mix(c, animal, cov * above);
                }
                if above < 1.0 {
                    let tinted = mul(animal, scale(scene.water.deep, 2.0));
                    c = mix(c, tinted, cov * (1.0 - above) * seen);
                }
            }
            if fy + 0.5 > line && fy - 0.5 < base && front.occluder.is_some() {
                let occ = front.occluder_colour(scene, fx, fy, line, base);
                let alpha = (1.0 - above) * (base - fy + 0.5).clamp(0.0, 1.0);
                c = mix(c, occ, alpha);
            }
            let foam = front.foam_alpha(fx, fy, line);
            if foam > 0.0 {
                c = mix(c, scale([0.92, 0.95, 0.97], 0.9 + 0.1 * a.look.light), foam);
            }
            canvas.pixels[py * canvas.width + px] = c;
            if fin_cov * above > 0.5 {
                fin_bounds.include(px, py);
            }
            if cov * above > 0.5 {
                body_bounds.include(px, py);
            }
        }
    }
    (fin_bounds, body_bounds)
}

/// Fin and back poses for the main animal, keeping the whole fin in frame.
/// `size` is the range of the fin height as a fraction of the image height.
fn sample_pose<R: Rng + ?Sized>(
    outline: &Outline,
    size: (f32, f32),
    w: f32,
    h: f32,
    rng: &mut R,
) -> (Pose, Pose) {
    let angle = uni(rng, (-10.0, 10.0)).to_radians();
    let mirror = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
    let unit = Pose {
        ox: 0.0,
        oy: 0.0,
        scale: 1.0,
        cos: angle.cos(),
        sin: angle.sin(),
        mirror,
    };
    let (ux0, uy0, ux1, uy1) = unit.image_bounds(outline.x_min, 0.0, outline.x_max, 1.0);
    let margin = 2.0 + 0.02 * w.min(h);
    let scale = (uni(rng, size) * h)
        .min((w - 2.0 * margin) / (ux1 - ux0))
        .min((0.93 * h - 2.0 * margin) / (uy1 - uy0));
    let (bx0, by0, bx1, by1) = (ux0 * scale, uy0 * scale, ux1 * scale, uy1 * scale);
    let ox = uni(rng, (margin - bx0, w - margin - bx1));
    let oy = uni(rng, (margin - by0, (h - margin - by1).min(0.95 * h)));
    let fin = Pose {
        ox,
        oy,
        scale,
        ..unit
    };
    let back_angle = 0.3 * angle;
    let back = Pose {
        cos: back_angle.cos(),
        sin: back_angle.sin(),
        ..fin
    };
    (fin, back)
}

/// The water in front of an animal whose waterline is at `base_y`.
fn sample_front<R: Rng + ?Sized>(
    base_y: f32,
    fin: &Pose,
    outline: &Outline,
    body_x: (f32, f32),
    occlude: bool,
    rng: &mut R,
) -> Front {
    let s = fin.scale;
    let occluder = (occlude && rng.gen_bool(0.45)).then(|| {
        let (a, _) = fin.to_image(outline.x_min, 0.0);
        let (b, _) = fin.to_image(outline.x_max, 0.0);
        let kind = [
            OccluderKind::Crest,
            OccluderKind::Splash,
            OccluderKind::Foam,
        ][pick(rng, &[0.4, 0.3, 0.3])];
        Occluder {
            kind,
            cx: a + (b - a) * uni(rng, (0.0, 1.0)),
            half_width: (b - a).abs() * uni(rng, (0.4, 1.2)) + 0.1 * s,
            height: s * uni(rng, (0.05, 0.25)),
            seed: rng.gen(),
        }
    });
    Front {
        base_y,
        ripple_amp: uni(rng, (0.0, 0.012)) * s,
        ripple_freq: uni(rng, (2.0, 8.0)) / s,
        ripple_phase: uni(rng, (0.0, 2.0 * PI)),
        occluder,
        foam: if rng.gen_bool(0.55) {
            uni(rng, (0.2, 0.7))
        } else {
            0.0
        },
        foam_x: body_x,
        foam_size: (uni(rng, (0.01, 0.03)) * s).max(1.0),
        seed: rng.gen(),
    }
}

/// A second, unmarked animal far away behind the main one.
fn draw_distant_fin<R: Rng + ?Sized>(
    canvas: &mut Canvas,
    scene: &Scene,
    main: (f32, f32, f32),
    rng: &mut R,
) {
    let (w, h) = (scene.width, scene.height);
    let (main_x0, main_x1, main_base) = main;
    let species = pick(
        rng,
        &SPECIES_WEIGHTS
            .iter()
            .map(|&w| w as f32)
            .collect::<Vec<_>>(),
    );
    let other = Individual::sample_from(species, rng);
    let outline = Outline::new(&other);
    let scale = uni(rng, (0.05, 0.14)) * h;
    let top_water = scene.horizon.max(0.0) + 0.02 * h;
    let base_y = uni(rng, (top_water + 0.3 * scale, main_base - 0.05 * h));
    if base_y > main_base - 0.05 * h || base_y - scale < 0.0 {
        return;
    }
    let fin_w = (outline.x_max - outline.x_min) * scale;
    let left_room = main_x0 - 4.0 - fin_w;
    let right_room = w - main_x1 - 4.0 - fin_w;
    let x = if left_room > 0.0 && (right_room <= 0.0 || rng.gen_bool(0.5)) {
        uni(rng, (0.0, left_room))
    } else if right_room > 0.0 {
        main_x1 + 4.0 + uni(rng, (0.0, right_room))
    } else {
        return;
    };
    let mirror = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
    let ox = if mirror > 0.0 {
        x - outline.x_min * scale
    } else {
        x + outline.x_max * scale
    };
    let fin = Pose {
        ox,
        oy: base_y,
        scale,
        cos: 1.0,
        sin: 0.0,
        mirror,
    };
    let look = Look::sample(scene, rng);
    let animal = Animal {
        ind: &other,
        back_shape: BackProfile::new(&other.back, other.shape.base),
        outline,
        fin,
        back: fin,
        marks: false,
        edge_px: uni(rng, (1.0, 3.0)),
        look,
        haze: uni(rng, (0.15, 0.45)),
        haze_colour: scene.horizon_colour,
    };
    let front = sample_front(base_y, &fin, &animal.outline, (x, x + fin_w), false, rng);
    draw_animal(canvas, scene, &animal, &front);
}

// ---------------------------------------------------------------------------
// Camera: exposure, colour cast, blur, noise, tone curve
// ---------------------------------------------------------------------------

struct Camera {
    exposure: f32,
    cast: Rgbf,
    contrast: f32,
    gamma: f32,
    vignette: f32,
    blur: f32,
    noise: f32,
    noise_seed: u32,
}

impl Camera {
    fn sample<R: Rng + ?Sized>(rng: &mut R) -> Self {
        Camera {
            exposure: uni(rng, (0.8, 1.2)),
            cast: jitter_colour(rng, WHITE, 0.07),
            contrast: uni(rng, (0.85, 1.25)),
            gamma: uni(rng, (0.8, 1.25)),
            vignette: if rng.gen_bool(0.4) {
                uni(rng, (0.1, 0.35))
            } else {
                0.0
            },
            blur: if rng.gen_bool(0.4) {
                uni(rng, (0.3, 2.0))
            } else {
                0.0
            },
            noise: if rng.gen_bool(0.45) {
                uni(rng, (0.005, 0.04))
            } else {
                0.0
            },
            noise_seed: rng.gen(),
        }
    }

    fn develop(&self, mut canvas: Canvas) -> RgbImage {
        let (w, h) = (canvas.width, canvas.height);
        let gain = scale(self.cast, self.exposure);
        let (cx, cy) = (0.5 * w as f32, 0.5 * h as f32);
        let r2 = 1.0 / (cx * cx + cy * cy);
        for (y, row) in canvas.pixels.chunks_exact_mut(w).enumerate() {
            let dy = y as f32 + 0.5 - cy;
            for (x, p) in row.iter_mut().enumerate() {
                let dx = x as f32 + 0.5 - cx;
                let v = 1.0 - self.vignette * (dx * dx + dy * dy) * r2;
                *p = scale(mul(*p, gain), v);
            }
        }
        if self.blur > 0.0 {
            gaussian_blur(&mut canvas.pixels, w, h, self.blur);
        }
        // Tone curve as a lookup table over [0, 1].
        const LEVELS: usize = 1024;
        let top = (LEVELS - 1) as f32;
        let lut: Vec<u8> = (0..LEVELS)
            .map(|i| {
                let v = ((i as f32 / top - 0.5) * self.contrast + 0.5).clamp(0.0, 1.0);
                (v.powf(self.gamma) * 255.0 + 0.5) as u8
            })
            .collect();
        let mut raw = Vec::with_capacity(w * h * 3);
        for (y, row) in canvas.pixels.chunks_exact(w).enumerate() {
            for (x, p) in row.iter().enumerate() {
                for (ch, &v) in p.iter().enumerate() {
                    let n = if self.noise > 0.0 {
                        let seed = self.noise_seed.wrapping_add(ch as u32 * 7919);
                        self.noise * hash_gauss(x as i32, y as i32, seed)
                    } else {
                        0.0
                    };
                    raw.push(lut[((v + n).clamp(0.0, 1.0) * top + 0.5) as usize]);
                }
            }
        }
        RgbImage::from_raw(w as u32, h as u32, raw).expect("buffer size matches the image")
    }
}

/// Separable gaussian blur with clamped edges.
fn gaussian_blur(pixels: &mut [Rgbf], w: usize, h: usize, sigma: f32) {
    let r = (3.0 * sigma).ceil() as usize;
    let mut kernel: Vec<f32> = (0..=2 * r)
        .map(|i| {
            let d = i as f32 - r as f32;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    // Blurs the rows of a `w`-wide image and writes them as the columns of `dst`.
    let pass = |src: &[Rgbf], dst: &mut [Rgbf], w: usize, h: usize| {
        let mut padded = vec![[0.0f32; 3]; w + 2 * r];
        for (y, row) in src.chunks_exact(w).enumerate() {
            for (i, p) in padded.iter_mut().enumerate() {
                *p = row[i.saturating_sub(r).min(w - 1)];
            }
            for x in 0..w {
                let mut acc = [0.0f32; 3];
                for (&k, p) in kernel.iter().zip(&padded[x..x + 2 * r + 1]) {
                    acc[0] += k * p[0];
                    acc[1] += k * p[1];
                    acc[2] += k * p[2];
                }
                dst[x * h + y] = acc;
            }
        }
    };
    let mut transposed = vec![[0.0f32; 3]; w * h];
    pass(pixels, &mut transposed, w, h);
    pass(&transposed, pixels, h, w);
}

// ---------------------------------------------------------------------------
// Rendering a photo
// ---------------------------------------------------------------------------

/// Mean luma of the canvas over a coarse grid inside an image rectangle.
fn mean_luma(canvas: &Canvas, (x0, y0, x1, y1): (f32, f32, f32, f32)) -> f32 {
    let mut sum = 0.0;
    let mut count = 0;
    for j in 0..8 {
        for i in 0..8 {
            let x = (x0 + (x1 - x0) * (i as f32 + 0.5) / 8.0) as usize;
            let y = (y0 + (y1 - y0) * (j as f32 + 0.5) / 8.0) as usize;
            if x < canvas.width && y < canvas.height {
                sum += luma(canvas.pixels[y * canvas.width + x]);
                count += 1;
            }
        }
    }
    if count == 0 {
        0.5
    } else {
        sum / count as f32
    }
}

/// Render one photo of `ind` under random conditions drawn from `rng`, `width`×`height` pixels.
///
/// Panics if either dimension is below 16 pixels.
pub fn render(ind: &Individual, width: u32, height: u32, rng: &mut impl Rng) -> Photo {
    assert!(
        width >= 16 && height >= 16,
        "photo too small: {width}x{height}"
    );
    let (w, h) = (width as f32, height as f32);
    let outline = Outline::new(ind);
    // Fin whales show a small fin on a long back.
    let size = if ind.species == FIN_WHALE {
        (0.22, 0.5)
    } else {
        (0.25, 0.7)
    };
    let (fin, back) = sample_pose(&outline, size, w, h, rng);
    let scene = Scene::sample(w, h, fin.oy, rng);
    let mut canvas = scene.paint(width, height);

    let fin_rect = fin.image_bounds(outline.x_min, 0.0, outline.x_max, 1.0);
    if scene.horizon > 0.05 * h && rng.gen_bool(0.2) {
        draw_boat(&mut canvas, &scene, rng);
    }
    if rng.gen_bool(0.25) {
        draw_birds(&mut canvas, &scene, rng);
    }
    if rng.gen_bool(0.2) {
        draw_distant_fin(&mut canvas, &scene, (fin_rect.0, fin_rect.2, fin.oy), rng);
    }

    let mut look = Look::sample(&scene, rng);
    // Keep the fin apart from what lies behind it: a fin as bright as the sea behind
    // it is drawn backlit (darker), as in real photos against bright water.
    let behind = mean_luma(&canvas, fin_rect);
    let skin = luma(ind.skin).max(0.01);
    let current = skin * look.light;
    if (current - behind).abs() < 0.2 {
        let (darker, lighter) = (behind - 0.22, behind + 0.22);
        let target = if darker > 0.03 && (current - darker < lighter - current || lighter > 0.75) {
            darker
        } else {
            lighter
        };
        look.light = (target / skin).clamp(0.4, 1.8);
    }
    let back_shape = BackProfile::new(&ind.back, ind.shape.base);
    let body_x = {
        let (x0, x1) = back_shape.x_range();
        let (a, _) = back.to_image(x0, 0.0);
        let (b, _) = back.to_image(x1, 0.0);
        (a.min(b), a.max(b))
    };
    let front = sample_front(fin.oy, &fin, &outline, body_x, true, rng);
    let haze = uni(rng, (0.0, 0.1));
    let animal = Animal {
        ind,
        outline,
        back_shape,
        fin,
        back,
        marks: true,
        edge_px: 1.0,
        look,
        haze,
        haze_colour: scene.horizon_colour,
    };
    let (mut fin_bounds, mut body_bounds) = draw_animal(&mut canvas, &scene, &animal, &front);
    if fin_bounds.is_empty() {
        // Unreachable with the pose limits above; keep the boxes valid regardless.
        fin_bounds.include(
            (fin.ox.max(0.0) as usize).min(canvas.width - 1),
            (fin.oy.max(0.0) as usize).min(canvas.height - 1),
        );
    }
    if body_bounds.is_empty() {
        body_bounds = fin_bounds;
    }
    let camera = Camera::sample(rng);
    Photo {
        image: camera.develop(canvas),
        fin_box: fin_bounds.to_box(),
        body_box: body_bounds.to_box(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn photo(seed: u64, species: usize, w: u32, h: u32) -> Photo {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ind = Individual::sample(species, &mut rng);
        render(&ind, w, h, &mut rng)
    }

    /// The fin silhouette rasterised at `n`×`n` over a fixed window of local coordinates.
    fn silhouette_mask(ind: &Individual, n: usize) -> Vec<bool> {
        let outline = Outline::new(ind);
        let (x0, x1, y0, y1) = (-0.5, 3.0, 0.0, 1.05);
        (0..n * n)
            .map(|i| {
                let x = x0 + (x1 - x0) * ((i % n) as f32 + 0.5) / n as f32;
                let y = y0 + (y1 - y0) * ((i / n) as f32 + 0.5) / n as f32;
                outline.sample(x, y).0 > 0.0
            })
            .collect()
    }

    #[test]
    fn species_tables_agree() {
        assert_eq!(SPECIES.len(), SPECIES_WEIGHTS.len());
        assert!(SPECIES_WEIGHTS.iter().all(|&w| w > 0.0));
    }

    #[test]
    fn same_seed_gives_same_photo() {
        for species in 0..SPECIES.len() {
            let a = photo(7 + species as u64, species, 192, 128);
            let b = photo(7 + species as u64, species, 192, 128);
            assert_eq!(a.image.as_raw(), b.image.as_raw());
            assert_eq!(a.fin_box, b.fin_box);
            assert_eq!(a.body_box, b.body_box);
        }
    }

    #[test]
    fn different_seeds_give_different_photos() {
        let a = photo(1, BOTTLENOSE, 192, 128);
        let b = photo(2, BOTTLENOSE, 192, 128);
        assert_ne!(a.image.as_raw(), b.image.as_raw());
        // Same individual, two photos: the conditions differ too.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let ind = Individual::sample(KILLER_WHALE, &mut rng);
        let c = render(&ind, 192, 128, &mut rng);
        let d = render(&ind, 192, 128, &mut rng);
        assert_ne!(c.image.as_raw(), d.image.as_raw());
    }

    #[test]
    fn boxes_are_inside_and_nested() {
        for seed in 0..60 {
            let (w, h) = (160, 112);
            let p = photo(seed, seed as usize % SPECIES.len(), w, h);
            for b in [p.fin_box, p.body_box] {
                assert!(b.x0 >= 0.0 && b.y0 >= 0.0, "seed {seed}: {b:?}");
                assert!(b.x1 <= w as f32 && b.y1 <= h as f32, "seed {seed}: {b:?}");
                assert!(
                    b.x1 - b.x0 >= 2.0 && b.y1 - b.y0 >= 2.0,
                    "seed {seed}: {b:?}"
                );
            }
            let (f, b) = (p.fin_box, p.body_box);
            assert!(
                f.x0 >= b.x0 - 1.0
                    && f.y0 >= b.y0 - 1.0
                    && f.x1 <= b.x1 + 1.0
                    && f.y1 <= b.y1 + 1.0,
                "seed {seed}: fin {f:?} outside body {b:?}"
            );
            // The fin is 25-70% of the image height unless a wide fin had to shrink.
            assert!(f.y1 - f.y0 >= 0.1 * h as f32, "seed {seed}: {f:?}");
        }
    }

    #[test]
    fn fin_box_covers_the_fin() {
        for seed in 0..40 {
            let p = photo(100 + seed, seed as usize % SPECIES.len(), 256, 192);
            let (f, b) = (p.fin_box, p.body_box);
            let inside = |r: BoxPx, x: u32, y: u32| {
                let (x, y) = (x as f32 + 0.5, y as f32 + 0.5);
                x > r.x0 && x < r.x1 && y > r.y0 && y < r.y1
            };
            // Mean colour of the sea beside and below the animal.
            let mut sea = [0.0f64; 3];
            let mut n_sea = 0.0;
            for (x, y, px) in p.image.enumerate_pixels() {
                if !inside(b, x, y) && y as f32 > b.y0 {
                    n_sea += 1.0;
                    for (t, &v) in sea.iter_mut().zip(&px.0) {
                        *t += v as f64;
                    }
                }
            }
            assert!(n_sea > 0.0, "seed {seed}");
            let sea = sea.map(|v| v / n_sea);
            // A good part of the fin box must look clearly unlike that sea.
            let (mut n_box, mut n_unlike) = (0, 0);
            for (x, y, px) in p.image.enumerate_pixels() {
                if inside(f, x, y) {
                    n_box += 1;
                    let dist =
                        px.0.iter()
                            .zip(&sea)
                            .map(|(&v, m)| (v as f64 - m).powi(2))
                            .sum::<f64>()
                            .sqrt();
                    if dist > 20.0 {
                        n_unlike += 1;
                    }
                }
            }
            let frac = n_unlike as f64 / n_box as f64;
            assert!(
                frac > 0.3,
                "seed {seed}: only {frac:.2} of the fin box is unlike the sea"
            );
        }
    }

    #[test]
    fn same_individual_same_silhouette() {
        for species in 0..SPECIES.len() {
            let a = Individual::sample(species, &mut ChaCha8Rng::seed_from_u64(42));
            let b = Individual::sample(species, &mut ChaCha8Rng::seed_from_u64(42));
            assert_eq!(silhouette_mask(&a, 96), silhouette_mask(&b, 96));
            assert_eq!(silhouette_mask(&a, 96), silhouette_mask(&a.clone(), 96));
        }
    }

    #[test]
    fn individuals_of_a_species_differ() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for species in 0..SPECIES.len() {
            for _ in 0..10 {
                let a = silhouette_mask(&Individual::sample(species, &mut rng), 96);
                let b = silhouette_mask(&Individual::sample(species, &mut rng), 96);
                let union = a.iter().zip(&b).filter(|(p, q)| **p || **q).count();
                let differ = a.iter().zip(&b).filter(|(p, q)| p != q).count();
                assert!(union > 500, "species {species}: empty silhouette");
                assert!(
                    differ as f64 >= 0.04 * union as f64,
                    "species {species}: silhouettes differ in only {differ} of {union} pixels"
                );
            }
        }
    }

    #[test]
    fn renders_every_species_at_small_and_large_sizes() {
        for species in 0..SPECIES.len() {
            for (w, h) in [(128, 96), (512, 384)] {
                let p = photo(900 + species as u64, species, w, h);
                assert_eq!(p.image.dimensions(), (w, h));
                assert!(p.fin_box.x1 <= w as f32 && p.fin_box.y1 <= h as f32);
            }
        }
    }
}
