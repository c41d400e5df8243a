//! Local features: keypoints with descriptors of the marks around them (notches, scars,
//! stripes), matched between photos and verified by geometry, HotSpotter's way. A global
//! embedding proposes a shortlist; [`Matcher::rescore`] scores each shortlisted photo by the
//! LNBNN votes of the query's descriptors that agree with one map (affine, or a homography:
//! [`ransac::Geometry`]), or by the pairwise matches (mutual ratio-test or LighterGlue's) that
//! do ([`Score`]).

pub mod calibration;
#[cfg(feature = "torch")]
pub mod disk;
mod gray;
#[cfg(feature = "torch")]
pub mod lighterglue;
pub mod lnbnn;
pub mod pairwise;
pub mod ransac;
pub mod sift;
pub mod store;
#[cfg(feature = "torch")]
pub mod xfeat;

pub use gray::{resize_longest, Gray};

use crate::model::whitening::Whitening;
use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;
use std::fmt;
use std::str::FromStr;
#[cfg(feature = "torch")]
use std::sync::{Arc, Mutex};

/// A network's variables built by `build` and loaded from its converted checkpoint `path`
/// (`what` names the network in errors, `file` its name in weights/), on the CPU.
#[cfg(feature = "torch")]
fn load_weights<T>(
    path: &std::path::Path,
    what: &str,
    file: &str,
    build: impl FnOnce(&tch::nn::Path) -> T,
) -> Result<(T, tch::nn::VarStore)> {
    ensure!(
        path.is_file(),
        "{what} weights {} not found: run `bash tools/setup.sh` (it fetches and converts them \
         to weights/{file})",
        path.display()
    );
    let mut vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let net = build(&vs.root());
    vs.load(path)
        .with_context(|| format!("loading {what} weights from {}", path.display()))?;
    Ok((net, vs))
}

/// A network loaded once per rayon thread (at least one), so that photos handled in parallel
/// do not wait for one another: a tch module is not used from two threads at once. `flag`
/// names what asked for it in errors.
#[cfg(feature = "torch")]
fn per_thread<T>(flag: &str, load: impl Fn() -> Result<T>) -> Result<Arc<Vec<Mutex<T>>>> {
    let nets = (0..rayon::current_num_threads().max(1))
        .map(|_| Ok(Mutex::new(load()?)))
        .collect::<Result<_>>()
        .with_context(|| flag.to_string())?;
    Ok(Arc::new(nets))
}

/// The copy of [`per_thread`]'s network that belongs to this rayon thread.
#[cfg(feature = "torch")]
fn this_threads<T>(nets: &[Mutex<T>]) -> std::sync::MutexGuard<'_, T> {
    let slot = rayon::current_thread_index().unwrap_or(0) % nets.len();
    nets[slot].lock().unwrap_or_else(|e| e.into_inner())
}

/// Where keypoints are kept, as fractions of the photo (or its crop): the box `x0,y0,x1,y1`,
/// or with `ellipse:` the ellipse inscribed in it. A band on the animal keeps the ground, the
/// water and the frame edges, shared by different animals photographed at one place, from
/// voting; an ellipse fits an animal that fills its crop and tapers to its ends, such as a
/// whale's back seen from above, and leaves out the water in the crop's corners.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Region {
    pub bounds: [f32; 4],
    pub shape: Shape,
}

/// The shape of a [`Region`] within its bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    #[default]
    Box,
    Ellipse,
}

impl Default for Region {
    fn default() -> Self {
        Region {
            bounds: [0.0, 0.0, 1.0, 1.0],
            shape: Shape::Box,
        }
    }
}

impl Region {
    fn contains(&self, x: f32, y: f32) -> bool {
        let [x0, y0, x1, y1] = self.bounds;
        match self.shape {
            Shape::Box => x >= x0 && x <= x1 && y >= y0 && y <= y1,
            Shape::Ellipse => {
                let dx = (2.0 * x - x0 - x1) / (x1 - x0);
                let dy = (2.0 * y - y0 - y1) / (y1 - y0);
                dx * dx + dy * dy <= 1.0
            }
        }
    }
}

impl FromStr for Region {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (shape, bounds) = match s.trim().strip_prefix("ellipse") {
            Some("") => (Shape::Ellipse, "0,0,1,1"),
            Some(rest) => match rest.strip_prefix(':') {
                Some(bounds) => (Shape::Ellipse, bounds),
                None => bail!("region {s:?}: expected x0,y0,x1,y1, ellipse or ellipse:x0,y0,x1,y1"),
            },
            None => (Shape::Box, s),
        };
        let v: Vec<f32> = bounds
            .split(',')
            .map(|p| p.trim().parse::<f32>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("region {s:?}: expected four numbers x0,y0,x1,y1"))?;
        match v[..] {
            [x0, y0, x1, y1]
                if (0.0..=1.0).contains(&x0)
                    && x0 < x1
                    && x1 <= 1.0
                    && (0.0..=1.0).contains(&y0)
                    && y0 < y1
                    && y1 <= 1.0 =>
            {
                Ok(Region {
                    bounds: [x0, y0, x1, y1],
                    shape,
                })
            }
            _ => {
                bail!("region {s:?}: expected x0,y0,x1,y1 with 0 ≤ x0 < x1 ≤ 1 and 0 ≤ y0 < y1 ≤ 1")
            }
        }
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [x0, y0, x1, y1] = self.bounds;
        if self.shape == Shape::Ellipse {
            f.write_str("ellipse:")?;
        }
        write!(f, "{x0},{y0},{x1},{y1}")
    }
}

/// How a shortlisted photo is scored against the query.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Score {
    /// One-vs-many: the query's descriptors vote among the pooled descriptors of the whole
    /// shortlist (LNBNN), each photo's votes verified by RANSAC.
    #[default]
    Lnbnn,
    /// The query against each photo alone: mutual nearest neighbours passing Lowe's ratio test
    /// that agree with one map, counted (what the web page draws).
    Pairwise,
    /// The query against each photo alone: LighterGlue's confident matches of XFeat's
    /// features that agree with one map, their confidences summed (what the web page
    /// draws). Needs `--local xfeat`.
    Lighterglue,
}

/// How the scores of an identity's shortlisted photos combine into the identity's score.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityScore {
    /// Its best photo's.
    #[default]
    Best,
    /// With a calibration: the chance that at least one of its photos shows it, `1 − Π(1 − p)`
    /// over the photos' fused probabilities, so that several matching photos add up.
    NoisyOr,
}

impl IdentityScore {
    pub fn aggregation(self) -> crate::search::Aggregation {
        match self {
            IdentityScore::Best => crate::search::Aggregation::Max,
            IdentityScore::NoisyOr => crate::search::Aggregation::NoisyOr,
        }
    }
}

impl fmt::Display for IdentityScore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentityScore::Best => "best",
            IdentityScore::NoisyOr => "noisy-or",
        })
    }
}

impl fmt::Display for Score {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Score::Lnbnn => "lnbnn",
            Score::Pairwise => "pairwise",
            Score::Lighterglue => "lighterglue",
        })
    }
}

/// The local features' settings, as `evaluate`, `predict` and `serve` take them.
#[derive(Clone, Debug, clap::Args)]
pub struct LocalArgs {
    /// Re-rank the embedding's shortlist by local features: none, rootsift (upright SIFT
    /// keypoints with RootSIFT descriptors), sift-disk (the same keypoints described by DISK's
    /// learned 128-d descriptors; needs weights/disk.safetensors) or xfeat (XFeat's learned
    /// keypoints and 64-d descriptors; needs weights/xfeat.safetensors), scored by LNBNN votes
    /// verified by RANSAC (--local-geometry).
    #[arg(long, default_value = "none", value_parser = ["none", "rootsift", "sift-disk", "xfeat"])]
    pub local: String,
    /// The longer side, in pixels, photos (or crops) are matched at: the scale of the marks.
    #[arg(long, default_value_t = 256)]
    pub local_size: u32,
    /// Keypoints kept per photo, the strongest (XFeat's top-k). 2000 with contrast 0.005, an
    /// ellipse and turns of at most 30° identified more animals on nyala and lost on no real
    /// set (cross-validated, fused), as one setting.
    #[arg(long, default_value_t = 2000)]
    pub local_keypoints: usize,
    /// SIFT's contrast threshold. OpenCV's is 0.04; lower finds more keypoints on smooth,
    /// low-contrast skin and faint stripes: 0.01 identified more animals than 0.04 on all three
    /// real dev sets, and 0.005 (with the keypoints, region and rotation defaults) more again
    /// on nyala (cross-validated). XFeat keeps its detection threshold, 0.05.
    #[arg(long, default_value_t = 0.005)]
    pub local_contrast: f32,
    /// Keypoints are kept only inside this part of the photo: the box x0,y0,x1,y1 (fractions),
    /// or `ellipse:x0,y0,x1,y1` (`ellipse` alone: the whole photo's) the ellipse inscribed in it.
    /// The default, `ellipse`, leaves out a crop's corners, where the background is.
    #[arg(long, default_value = "ellipse")]
    pub local_region: Region,
    /// Equalise contrast before SIFT by CLAHE (8×8 tiles, as OpenCV's) with this clip limit;
    /// 0: off. Evens out a shaded side of the animal, so its faint marks keep their keypoints.
    #[arg(long, default_value_t = 0.0, value_parser = clip_limit)]
    pub local_clahe: f32,
    /// How many of the embedding's nearest photos local matching re-scores (100 found more
    /// than 50 on all three real sets).
    #[arg(long, default_value_t = 100)]
    pub shortlist: usize,
    /// LNBNN: each query descriptor votes for the photos of its k nearest gallery descriptors,
    /// weighted by how much nearer each is than the (k+1)-th.
    #[arg(long, default_value_t = 4)]
    pub lnbnn_k: usize,
    /// LNBNN: neighbours are nearest by descriptor distance plus this weight times the
    /// distance between the keypoints' positions, in fractions of each photo's width and
    /// height. For crops that frame every animal alike, where a mark sits near the same place
    /// in every photo (0: anywhere).
    #[arg(long, default_value_t = 0.0, value_parser = position_weight)]
    pub local_position_weight: f32,
    /// How each shortlisted photo is scored: lnbnn (one-vs-many votes over the pooled
    /// descriptors of the shortlist, verified by RANSAC), pairwise (the query against
    /// each photo alone: verified mutual ratio-test matches, counted) or lighterglue (with
    /// --local xfeat: the query against each photo alone, matched by the LighterGlue network,
    /// needs weights/lighterglue.safetensors; the confidences of the matches verified by
    /// RANSAC, summed).
    #[arg(long, value_enum, default_value_t = Score::Lnbnn)]
    pub local_score: Score,
    /// How an identity's shortlisted photos rank it: best (its best photo) or noisy-or (with a
    /// calibration: 1 − Π(1 − p) over its photos' fused probabilities).
    #[arg(long, value_enum, default_value_t = IdentityScore::Best)]
    pub identity_score: IdentityScore,
    /// Whiten the descriptors before matching: the principal axes of many photos'
    /// descriptors, each scaled by its variance to the power −POWER (0.5: every direction
    /// alike; 0: off), so that matching weighs the rare directions of the marks above the
    /// common ones of skin, glare and water. Fitted with a calibration and saved in it;
    /// without one, on the evaluated photos (evaluate) or on up to 200 catalogue photos at
    /// each start (serve). 0.5 identified more animals on nyala and belugas and lost on no
    /// real set (cross-validated).
    #[arg(long, default_value_t = 0.5, value_parser = whitening_power)]
    pub local_whitening: f32,
    /// The map RANSAC verifies matches with: affine (the default; a pattern seen roughly face
    /// on) or homography (also perspective: a flat pattern, such as a flank or a fluke, seen
    /// at an angle).
    #[arg(long, value_enum, default_value_t = ransac::Geometry::Affine)]
    pub local_geometry: ransac::Geometry,
    /// The largest rotation, in degrees, of a map that verifies matches (180: any). Upright
    /// keypoints match only between photos of about the same orientation, so a map turning
    /// further fits chance matches.
    #[arg(long, default_value_t = 30.0, value_parser = rotation_bound)]
    pub local_max_rotation: f32,
}

/// A number flag's value, refused with a message naming the flag unless it is finite and in
/// `range` (said in words by `expected`).
fn number_flag(
    flag: &str,
    s: &str,
    range: impl std::ops::RangeBounds<f32>,
    expected: &str,
) -> Result<f32> {
    let v: f32 = s
        .parse()
        .with_context(|| format!("{flag} {s:?}: expected {expected}"))?;
    ensure!(
        v.is_finite() && range.contains(&v),
        "{flag} {s}: expected {expected}"
    );
    Ok(v)
}

fn clip_limit(s: &str) -> Result<f32> {
    number_flag("--local-clahe", s, 0.0.., "a clip limit of 0 (off) or more")
}

fn position_weight(s: &str) -> Result<f32> {
    number_flag(
        "--local-position-weight",
        s,
        0.0..,
        "a weight of 0 (off) or more",
    )
}

fn whitening_power(s: &str) -> Result<f32> {
    number_flag(
        "--local-whitening",
        s,
        0.0..=1.0,
        "a power from 0 (off) to 1",
    )
}

fn rotation_bound(s: &str) -> Result<f32> {
    number_flag(
        "--local-max-rotation",
        s,
        0.0..=180.0,
        "degrees from 0 to 180",
    )
}

impl Default for LocalArgs {
    /// The flags' defaults (local matching off).
    fn default() -> Self {
        LocalArgs::from_flags(&[]).expect("the flags' defaults parse")
    }
}

impl LocalArgs {
    /// The settings these command-line flags give (the others at their defaults).
    pub fn from_flags(flags: &[&str]) -> Result<Self> {
        use clap::{Args, FromArgMatches};
        let command = LocalArgs::augment_args(clap::Command::new("local"));
        let matches = command.try_get_matches_from([&["local"], flags].concat())?;
        Ok(LocalArgs::from_arg_matches(&matches)?)
    }

    pub fn enabled(&self) -> bool {
        self.local != "none"
    }

    /// The matcher of these settings (XFeat's loads its weights, and LighterGlue's).
    pub fn matcher(&self) -> Result<Matcher> {
        ensure!(
            self.local_score != Score::Lighterglue || self.local == "xfeat",
            "--local-score lighterglue matches XFeat's features: it needs --local xfeat, not \
             --local {}",
            self.local
        );
        let glue = match self.local_score {
            Score::Lighterglue => Some(Glue::load()?),
            _ => None,
        };
        ensure!(
            self.local_position_weight == 0.0 || self.local_score == Score::Lnbnn,
            "--local-position-weight weighs LNBNN's neighbours: it needs --local-score lnbnn, \
             not {}",
            self.local_score
        );
        ensure!(
            self.local_clahe == 0.0 || self.local == "rootsift",
            "--local-clahe equalises SIFT's input: it needs --local rootsift, not --local {}",
            self.local
        );
        let method = match self.local.as_str() {
            #[cfg(not(feature = "torch"))]
            "xfeat" | "sift-disk" => {
                bail!("--local {} needs libtorch (the full build)", self.local)
            }
            #[cfg(feature = "torch")]
            "sift-disk" => Method::SiftDisk(per_thread("--local sift-disk", || {
                disk::Disk::load(&disk::weights_path())
            })?),
            #[cfg(feature = "torch")]
            "xfeat" => Method::XFeat(per_thread("--local xfeat", || {
                xfeat::XFeat::load(&xfeat::weights_path())
            })?),
            _ => Method::RootSift,
        };
        Ok(Matcher {
            size: self.local_size,
            region: self.local_region,
            clahe: self.local_clahe,
            sift: sift::SiftConfig {
                max_keypoints: self.local_keypoints,
                contrast_threshold: self.local_contrast,
                ..Default::default()
            },
            method,
            k: self.lnbnn_k.max(1),
            position_weight: self.local_position_weight,
            score: self.local_score,
            ransac: ransac::RansacConfig {
                max_rotation: self.local_max_rotation,
                ..ransac::RansacConfig::of(self.local_geometry)
            },
            glue,
        })
    }

    /// How these settings extract features, without loading anything.
    pub fn extraction(&self) -> store::Extraction {
        extraction(
            match self.local.as_str() {
                "none" => "rootsift",
                other => other,
            },
            self.local_size,
            self.local_keypoints,
            self.local_contrast,
            self.local_region,
            self.local_clahe,
        )
    }
}

/// The extraction settings' tag (`method`: rootsift, sift-disk or xfeat): for XFeat the
/// contrast is its detection threshold.
fn extraction(
    method: &str,
    size: u32,
    keypoints: usize,
    contrast: f32,
    region: Region,
    clahe: f32,
) -> store::Extraction {
    store::Extraction {
        method: method.into(),
        size,
        keypoints,
        contrast: match method {
            "xfeat" => XFEAT_THRESHOLD as f32,
            _ => contrast,
        },
        region: region.bounds,
        shape: region.shape,
        clahe,
    }
}

/// One photo's local features: keypoint positions in the matched image's pixels and their
/// descriptors (unit vectors), row-major `[n, dim]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Features {
    /// The matched image's width and height (the photo resized to the matcher's size).
    pub size: [u32; 2],
    pub points: Vec<[f32; 2]>,
    /// The descriptors' length: [`sift::DESC_LEN`] for RootSIFT, [`xfeat::DESC_LEN`] for XFeat.
    pub dim: usize,
    pub descriptors: Vec<f32>,
}

impl Features {
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// The same keypoints with their descriptors mapped by `whitening` (unit rows again).
    pub fn whitened(&self, whitening: &Whitening) -> Result<Features> {
        ensure!(
            self.dim == whitening.dim_in,
            "descriptors of {} values, a whitening of {}",
            self.dim,
            whitening.dim_in
        );
        Ok(Features {
            size: self.size,
            points: self.points.clone(),
            dim: whitening.dim_out,
            descriptors: match self.is_empty() {
                true => Vec::new(),
                false => whitening.apply(&self.descriptors)?,
            },
        })
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// Descriptors a local whitening is fitted on, at most (the covariance of 128-d RootSIFT
/// settles long before).
pub const WHITENING_ROWS: usize = 200_000;

/// The fewest descriptors a whitening is fitted on, per dimension: fewer (a photo or two)
/// leave most directions' variance unknown, and the photos are matched as they are.
pub const WHITENING_MIN_ROWS_PER_DIM: usize = 16;

/// The PCA whitening of these photos' descriptors with `power` (`--local-whitening`), fitted
/// on at most [`WHITENING_ROWS`] of them, spread evenly; `None` at power 0 or with fewer than
/// [`WHITENING_MIN_ROWS_PER_DIM`] descriptors per dimension. No labels are needed: it
/// describes what descriptors of this kind of photo vary along.
pub fn fit_whitening(photos: &[&Features], power: f32) -> Result<Option<Whitening>> {
    let dim = photos.iter().find(|f| !f.is_empty()).map_or(0, |f| f.dim);
    let total: usize = photos.iter().map(|f| f.len()).sum();
    if power == 0.0 || dim == 0 || total < WHITENING_MIN_ROWS_PER_DIM * dim {
        return Ok(None);
    }
    let step = total.div_ceil(WHITENING_ROWS).max(1);
    let rows: Vec<f32> = photos
        .iter()
        .flat_map(|f| f.descriptors.chunks(dim))
        .step_by(step)
        .flatten()
        .copied()
        .collect();
    Whitening::principal(&rows, dim, f64::from(power))
        .context("fitting a whitening of the local descriptors (--local-whitening)")
        .map(Some)
}

/// How one shortlisted photo matched a query.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MatchScore {
    /// The LNBNN votes the photo received.
    pub votes: f32,
    /// The votes of the correspondences consistent with the best map.
    pub verified: f32,
    /// How many correspondences that map kept.
    pub inliers: usize,
}

/// The detector and descriptor a [`Matcher`] extracts with.
#[derive(Clone)]
pub enum Method {
    /// Upright SIFT keypoints with RootSIFT descriptors ([`sift`]).
    RootSift,
    /// XFeat's keypoints and descriptors (`xfeat`, with libtorch): a copy of the network per
    /// rayon thread, so that photos extracted in parallel do not wait for one another (at
    /// least one).
    #[cfg(feature = "torch")]
    XFeat(Arc<Vec<Mutex<xfeat::XFeat>>>),
    /// Upright SIFT keypoints described by DISK's dense descriptors (`sift-disk`, with
    /// libtorch), a copy of the network per rayon thread.
    #[cfg(feature = "torch")]
    SiftDisk(Arc<Vec<Mutex<disk::Disk>>>),
}

/// XFeat's detection threshold, which its extraction records as its contrast.
const XFEAT_THRESHOLD: f64 = 0.05;

impl fmt::Debug for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::RootSift => "RootSift",
            #[cfg(feature = "torch")]
            Method::XFeat(_) => "XFeat",
            #[cfg(feature = "torch")]
            Method::SiftDisk(_) => "SiftDisk",
        })
    }
}

/// The LighterGlue network (`lighterglue`, with libtorch), a copy per rayon thread (at least
/// one), as XFeat's: a tch module is not used from two threads at once.
#[cfg(feature = "torch")]
#[derive(Clone)]
pub struct Glue(Arc<Vec<Mutex<lighterglue::LighterGlue>>>);

/// Without libtorch there is no LighterGlue: no value of this type exists.
#[cfg(not(feature = "torch"))]
#[derive(Clone)]
pub enum Glue {}

impl fmt::Debug for Glue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LighterGlue")
    }
}

#[cfg(not(feature = "torch"))]
impl Glue {
    pub fn load() -> Result<Glue> {
        bail!("--local-score lighterglue needs libtorch (the full build)")
    }

    pub fn correspondences(&self, _: &Features, _: &Features) -> Vec<ransac::Correspondence> {
        match *self {}
    }
}

#[cfg(feature = "torch")]
impl Glue {
    /// The network with the converted weights ([`lighterglue::weights_path`]), once per
    /// rayon thread.
    pub fn load() -> Result<Glue> {
        per_thread("--local-score lighterglue", || {
            lighterglue::LighterGlue::load(&lighterglue::weights_path())
        })
        .map(Glue)
    }

    /// LighterGlue's matches of `a` and `b` above its filter threshold, as correspondences
    /// weighted by their confidence.
    pub fn correspondences(&self, a: &Features, b: &Features) -> Vec<ransac::Correspondence> {
        let net = this_threads(&self.0);
        let threshold = net.config().filter_threshold as f32;
        net.matches(a, b, threshold)
            .into_iter()
            .map(|(i, j, confidence)| ransac::Correspondence {
                from: a.points[i],
                to: b.points[j],
                weight: confidence,
            })
            .collect()
    }
}

/// Extracts local features and scores shortlists with them.
#[derive(Clone, Debug)]
pub struct Matcher {
    pub size: u32,
    pub region: Region,
    /// CLAHE's clip limit before SIFT (0: off).
    pub clahe: f32,
    /// SIFT's settings; for XFeat, `max_keypoints` is its top-k.
    pub sift: sift::SiftConfig,
    pub method: Method,
    pub k: usize,
    /// LNBNN's weight of the keypoints' relative positions ([`lnbnn::vote`]).
    pub position_weight: f32,
    pub score: Score,
    pub ransac: ransac::RansacConfig,
    /// LighterGlue, loaded when `score` is [`Score::Lighterglue`].
    pub glue: Option<Glue>,
}

impl Matcher {
    /// How this matcher extracts features (what a stored file must have been made with).
    pub fn extraction(&self) -> store::Extraction {
        extraction(
            match self.method {
                Method::RootSift => "rootsift",
                #[cfg(feature = "torch")]
                Method::XFeat(_) => "xfeat",
                #[cfg(feature = "torch")]
                Method::SiftDisk(_) => "sift-disk",
            },
            self.size,
            self.sift.max_keypoints,
            self.sift.contrast_threshold,
            self.region,
            self.clahe,
        )
    }

    /// The length of this matcher's descriptors.
    pub fn dim(&self) -> usize {
        match self.method {
            Method::RootSift => sift::DESC_LEN,
            #[cfg(feature = "torch")]
            Method::XFeat(_) => xfeat::DESC_LEN,
            #[cfg(feature = "torch")]
            Method::SiftDisk(_) => disk::DESC_LEN,
        }
    }

    /// The local features of a photo (or crop), resized so its longer side is `size`.
    pub fn extract(&self, image: &RgbImage) -> Features {
        let (size, points, descriptors) = match &self.method {
            Method::RootSift => {
                let mut gray = Gray::from_rgb_longest(image, self.size);
                if self.clahe > 0.0 {
                    gray = gray.clahe(self.clahe);
                }
                let (keypoints, descriptors) = sift::detect_and_describe(&gray, &self.sift);
                let points: Vec<[f32; 2]> = keypoints.iter().map(|kp| [kp.x, kp.y]).collect();
                ([gray.width, gray.height], points, descriptors)
            }
            #[cfg(feature = "torch")]
            Method::XFeat(nets) => {
                let resized = gray::resize_longest(image, self.size);
                let found = this_threads(nets).detect(&resized, self.sift.max_keypoints);
                let (w, h) = resized.dimensions();
                ([w as usize, h as usize], found.points, found.descriptors)
            }
            #[cfg(feature = "torch")]
            Method::SiftDisk(nets) => {
                let resized = gray::resize_longest(image, self.size);
                let gray = Gray::from_rgb_longest(&resized, self.size);
                let (keypoints, _) = sift::detect_and_describe(&gray, &self.sift);
                let points: Vec<[f32; 2]> = keypoints.iter().map(|kp| [kp.x, kp.y]).collect();
                let descriptors = this_threads(nets).describe(&resized, &points);
                ([gray.width, gray.height], points, descriptors)
            }
        };
        let dim = self.dim();
        let (w, h) = (size[0] as f32, size[1] as f32);
        let mut features = Features {
            size: [size[0] as u32, size[1] as u32],
            dim,
            ..Default::default()
        };
        for (&[x, y], d) in points.iter().zip(descriptors.chunks(dim)) {
            if self.region.contains(x / w, y / h) {
                features.points.push([x, y]);
                // Rounded as they are stored, so that stored and fresh features match alike.
                let stored = d.iter().map(|&v| half::f16::from_f32(v).to_f32());
                features.descriptors.extend(stored);
            }
        }
        features
    }

    /// Score each of `gallery` (a query's shortlist) against `query` as [`Self::score`] says:
    /// LNBNN over their pooled descriptors, each photo's correspondences then verified by
    /// RANSAC; or each photo's verified pairwise matches.
    ///
    /// LighterGlue's matches are verified by RANSAC weighted by their confidence, and a photo
    /// scores the sum of its inliers' confidences (`votes`: all its matches'). A confidence is
    /// the network's probability that the match is right, so the sum is the number of right
    /// matches the map keeps to expect: a count would weigh a match at the 0.1 threshold as
    /// much as a sure one.
    pub fn rescore(&self, query: &Features, gallery: &[&Features]) -> Vec<MatchScore> {
        if let Some(glue) = self.glue() {
            return gallery
                .iter()
                .map(|g| {
                    let pairs = glue.correspondences(query, g);
                    let fit = ransac::fit(&pairs, &self.ransac, self.size as f32);
                    MatchScore {
                        votes: pairs.iter().map(|p| p.weight).sum(),
                        verified: fit.weight,
                        inliers: fit.inliers,
                    }
                })
                .collect();
        }
        if self.score == Score::Pairwise {
            return gallery
                .iter()
                .map(|g| {
                    let n = self.pairwise(query, g).len();
                    MatchScore {
                        votes: n as f32,
                        verified: n as f32,
                        inliers: n,
                    }
                })
                .collect();
        }
        let votes = lnbnn::vote(query, gallery, self.k, self.position_weight);
        votes
            .into_iter()
            .map(|v| {
                let pairs: Vec<ransac::Correspondence> = v
                    .matches
                    .iter()
                    .map(|m| ransac::Correspondence {
                        from: query.points[m.query],
                        to: gallery[v.photo].points[m.gallery],
                        weight: m.weight,
                    })
                    .collect();
                let fit = ransac::fit(&pairs, &self.ransac, self.size as f32);
                MatchScore {
                    votes: v.total,
                    verified: fit.weight,
                    inliers: fit.inliers,
                }
            })
            .collect()
    }

    /// The matches a person can check between a query and one candidate: mutual nearest
    /// neighbours that pass the ratio test (LighterGlue's matches when it scores) and agree
    /// with one map, as pairs of points in fractions of each photo's width and height.
    pub fn pairwise(&self, query: &Features, candidate: &Features) -> Vec<pairwise::Line> {
        let side = self.size as f32;
        match self.glue() {
            Some(glue) => {
                let pairs = glue.correspondences(query, candidate);
                pairwise::lines(query, candidate, &pairs, &self.ransac, side)
            }
            None => pairwise::verified(query, candidate, &self.ransac, side),
        }
    }

    /// LighterGlue when it scores.
    fn glue(&self) -> Option<&Glue> {
        (self.score == Score::Lighterglue).then(|| {
            self.glue
                .as_ref()
                .expect("a matcher scoring with LighterGlue has it loaded (LocalArgs::matcher)")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whitening_needs_sixteen_descriptors_a_dimension_and_a_power() {
        // Rows of dimension 2 with variances 4 and 1 (about their mean 0).
        let photo = |n: usize| Features {
            size: [8, 8],
            points: vec![[0.0, 0.0]; n],
            dim: 2,
            descriptors: (0..n)
                .flat_map(|i| match i % 4 {
                    0 => [2.0, 0.0],
                    1 => [-2.0, 0.0],
                    2 => [0.0, 1.0],
                    _ => [0.0, -1.0],
                })
                .collect(),
        };
        let (few, more) = (photo(12), photo(20));
        assert_eq!(
            fit_whitening(&[&few, &Features::default()], 0.5).unwrap(),
            None
        );
        assert_eq!(fit_whitening(&[&few, &more], 0.0).unwrap(), None);
        // 32 rows: the axes' variances stand 4 to 1, so (1, 1) maps to (½, 1) scaled to unit
        // length: (1, 2)/√5, each axis up to its sign.
        let w = fit_whitening(&[&few, &more], 0.5).unwrap().unwrap();
        let x = w.apply(&[1.0, 1.0]).unwrap();
        let (a, b) = (x[0].abs().min(x[1].abs()), x[0].abs().max(x[1].abs()));
        assert!(
            (a - 1.0 / 5f32.sqrt()).abs() < 1e-4 && (b - 2.0 / 5f32.sqrt()).abs() < 1e-4,
            "{x:?}"
        );
    }

    #[test]
    fn regions_parse_as_boxes_or_ellipses_and_print_back() {
        let band: Region = "0.1,0.2,0.9,0.8".parse().unwrap();
        assert_eq!(band.bounds, [0.1, 0.2, 0.9, 0.8]);
        assert_eq!(band.shape, Shape::Box);
        let whole: Region = "ellipse".parse().unwrap();
        assert_eq!(whole.bounds, [0.0, 0.0, 1.0, 1.0]);
        assert_eq!(whole.shape, Shape::Ellipse);
        let inner: Region = "ellipse:0.05,0,0.95,1".parse().unwrap();
        assert_eq!(inner.to_string(), "ellipse:0.05,0,0.95,1");
        assert_eq!(inner.to_string().parse::<Region>().unwrap(), inner);
        assert_eq!(Region::default().to_string(), "0,0,1,1");
        for bad in [
            "ellipses",
            "ellipse:0,0,1",
            "0.5,0,0.4,1",
            "circle:0,0,1,1",
            "0,0,1,2",
        ] {
            assert!(bad.parse::<Region>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn an_ellipse_keeps_its_inside_and_leaves_the_corners_of_its_box() {
        let box_: Region = "0.2,0,0.8,1".parse().unwrap();
        let ellipse: Region = "ellipse:0.2,0,0.8,1".parse().unwrap();
        // Centre (0.5, 0.5), semi-axes 0.3 and 0.5.
        for (x, y) in [
            (0.5, 0.5),
            (0.21, 0.5),
            (0.5, 0.01),
            (0.5 + 0.3 * 0.7, 0.5 + 0.5 * 0.7),
        ] {
            assert!(ellipse.contains(x, y) && box_.contains(x, y), "({x}, {y})");
        }
        // In the box's corners, and just past the ellipse's diagonal (0.72² · 2 > 1).
        for (x, y) in [
            (0.21, 0.02),
            (0.79, 0.98),
            (0.5 + 0.3 * 0.72, 0.5 + 0.5 * 0.72),
        ] {
            assert!(box_.contains(x, y) && !ellipse.contains(x, y), "({x}, {y})");
        }
        assert!(!ellipse.contains(0.1, 0.5) && !box_.contains(0.1, 0.5));
    }

    #[test]
    fn features_extracted_before_regions_had_shapes_read_as_boxes() {
        let old = r#"{"method":"rootsift","size":256,"keypoints":1000,"contrast":0.04,"region":[0.0,0.0,1.0,1.0]}"#;
        let read: store::Extraction = serde_json::from_str(old).unwrap();
        assert_eq!(read.shape, Shape::Box);
        let ellipse = extraction("rootsift", 256, 1000, 0.04, "ellipse".parse().unwrap(), 0.0);
        assert_ne!(read, ellipse);
    }

    /// Spots of one contrast on a photo whose right half lies in shadow (a fifth as bright):
    /// at OpenCV's contrast threshold SIFT loses most of the shaded spots; CLAHE first brings
    /// them back.
    #[test]
    fn clahe_finds_the_marks_on_the_shaded_side() {
        let (w, h) = (256u32, 128u32);
        let photo = RgbImage::from_fn(w, h, |x, y| {
            let mut v = 0.5;
            for i in 0..8 {
                for j in 0..4 {
                    let (cx, cy) = (16.0 + 32.0 * i as f32, 19.0 + 30.0 * j as f32);
                    let d2 = (x as f32 - cx).powi(2) + (y as f32 - cy).powi(2);
                    v += 0.35 * (-d2 / 18.0).exp();
                }
            }
            let shade = if x < w / 2 { 1.0 } else { 0.2 };
            image::Rgb([(v * shade * 255.0).round().min(255.0) as u8; 3])
        });
        let shaded = |flags: &[&str]| {
            let base = ["--local", "rootsift", "--local-region", "0,0,1,1"];
            let args =
                LocalArgs::from_flags(&[&base[..], &["--local-contrast", "0.04"], flags].concat());
            let features = args.unwrap().matcher().unwrap().extract(&photo);
            let side = |right: bool| {
                let p = features.points.iter();
                p.filter(|p| {
                    (p[0] > w as f32 / 2.0 + 8.0) == right && (p[0] - w as f32 / 2.0).abs() > 8.0
                })
                .count()
            };
            (side(false), side(true))
        };
        let (lit, plain) = shaded(&[]);
        let (lit_equalised, equalised) = shaded(&["--local-clahe", "2"]);
        eprintln!(
            "keypoints lit / shaded: {lit} / {plain}, with CLAHE {lit_equalised} / {equalised}"
        );
        assert!(
            plain * 2 < equalised && equalised * 2 > lit_equalised,
            "keypoints lit / shaded: {lit} / {plain} without CLAHE, {lit_equalised} / {equalised} \
             with"
        );
    }

    #[test]
    fn clahe_settings_are_checked() {
        let err = |flags: &[&str]| {
            format!(
                "{:#}",
                LocalArgs::from_flags(flags)
                    .and_then(|a| a.matcher().map(|_| ()))
                    .unwrap_err()
            )
        };
        let negative = err(&["--local-clahe=-1"]);
        assert!(negative.contains("--local-clahe"), "{negative}");
        let xfeat = err(&["--local", "xfeat", "--local-clahe", "2"]);
        assert!(
            xfeat.contains("--local-clahe") && xfeat.contains("rootsift"),
            "{xfeat}"
        );
        let args = LocalArgs::from_flags(&["--local", "rootsift", "--local-clahe", "2"]).unwrap();
        assert_eq!(args.extraction().clahe, 2.0);
        assert_eq!(LocalArgs::default().extraction().clahe, 0.0);
    }

    #[test]
    fn flags_out_of_range_or_without_lnbnn_are_errors_naming_the_flag() {
        for (flag, bad) in [
            ("--local-position-weight", "-0.5"),
            ("--local-position-weight", "inf"),
            ("--local-position-weight", "near"),
            ("--local-max-rotation", "200"),
            ("--local-clahe", "NaN"),
            ("--local-whitening", "1.5"),
        ] {
            let err = format!(
                "{:#}",
                LocalArgs::from_flags(&[&format!("{flag}={bad}")]).unwrap_err()
            );
            assert!(err.contains(flag) && err.contains(bad), "{err}");
        }
        let pairwise =
            LocalArgs::from_flags(&["--local-position-weight", "1", "--local-score", "pairwise"])
                .unwrap();
        let err = format!("{:#}", pairwise.matcher().unwrap_err());
        assert!(
            err.contains("--local-position-weight") && err.contains("pairwise"),
            "{err}"
        );
        let args = LocalArgs::from_flags(&["--local-position-weight", "1.5"]).unwrap();
        assert_eq!(args.matcher().unwrap().position_weight, 1.5);
        assert_eq!(LocalArgs::default().local_position_weight, 0.0);
    }
}
