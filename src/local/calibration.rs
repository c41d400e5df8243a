//! Scores made comparable: each kind of score (embedding cosine, verified local votes) is
//! mapped to P(same individual) by a logistic regression fitted on labelled pairs of animals
//! that are not evaluated; the fused score is their weighted mean, the local score's weight the
//! larger, and a score that carries no signal is fitted flat and leaves the other's ranking as
//! it was.

use super::ransac::Geometry;
use super::store::Extraction;
use super::{IdentityScore, LocalArgs, Score};
use crate::model::whitening::Whitening;
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// P(same | x) = σ(a·x + b).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Logistic {
    pub a: f64,
    pub b: f64,
}

impl Logistic {
    /// Maximum-likelihood fit by Newton's method, each step halved until the penalised
    /// negative log-likelihood falls (a full Newton step from the start can overshoot and run
    /// off to infinity), with a small ridge on `a` so that separable data stays finite. `None`
    /// without both classes.
    pub fn fit(xs: &[f64], same: &[bool]) -> Option<Logistic> {
        let positives = same.iter().filter(|&&s| s).count();
        if positives == 0 || positives == same.len() {
            return None;
        }
        let rate = positives as f64 / same.len() as f64;
        let (mut a, mut b) = (0.0, (rate / (1.0 - rate)).ln());
        let ridge = 1e-3;
        // −log L + ridge·a²/2, log(1 + e^z) − y·z computed without overflow.
        let loss = |a: f64, b: f64| {
            let data: f64 = xs
                .iter()
                .zip(same)
                .map(|(&x, &y)| {
                    let z = a * x + b;
                    (-z.abs()).exp().ln_1p() + z.max(0.0) - if y { z } else { 0.0 }
                })
                .sum();
            data + 0.5 * ridge * a * a
        };
        let mut current = loss(a, b);
        for _ in 0..100 {
            let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (ridge * a, 0.0, ridge, 0.0, 0.0);
            for (&x, &y) in xs.iter().zip(same) {
                let p = sigmoid(a * x + b);
                let r = p - f64::from(u8::from(y));
                let w = p * (1.0 - p);
                ga += r * x;
                gb += r;
                haa += w * x * x;
                hab += w * x;
                hbb += w;
            }
            let det = haa * hbb - hab * hab;
            if det.abs() < 1e-12 {
                break;
            }
            let (mut da, mut db) = ((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det);
            let mut next = loss(a - da, b - db);
            while (next.is_nan() || next > current) && da.abs() + db.abs() > 1e-12 {
                (da, db) = (da / 2.0, db / 2.0);
                next = loss(a - da, b - db);
            }
            a -= da;
            b -= db;
            current = next;
            if da.abs() + db.abs() < 1e-9 {
                break;
            }
        }
        Some(Logistic { a, b })
    }

    pub fn probability(&self, x: f64) -> f64 {
        sigmoid(self.a * x + self.b)
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The local score as the calibration sees it: verified votes grow with the keypoints, so
/// their logarithm.
pub fn local_feature(verified: f32) -> f64 {
    f64::from(verified.max(0.0)).ln_1p()
}

/// The fusion of an embedding's cosine with local matching.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fusion {
    pub embedding: Logistic,
    pub local: Logistic,
    /// The embedding's share of the fused probability, the local one's the rest
    /// ([`EMBEDDING_WEIGHT`]; older calibrations: .5, the mean).
    #[serde(default = "even")]
    pub embedding_weight: f64,
}

/// The embedding's share of the fused probability that new calibrations take. Verified votes
/// tell individuals apart better than an embedding's cosine on every real set measured, and an
/// even mean lets the cosines reorder local matches (belugas' backs, where the untrained
/// embedding finds the right whale first for 6% of photos): a small share leaves the local
/// ranking and breaks its near-ties (cross-validated: README, BENCHMARKS.md).
pub const EMBEDDING_WEIGHT: f64 = 0.05;

fn even() -> f64 {
    0.5
}

impl Fusion {
    /// Fit on shortlisted pairs: `(cosine, verified votes, same individual)`.
    pub fn fit(pairs: &[(f32, f32, bool)]) -> Option<Fusion> {
        let same: Vec<bool> = pairs.iter().map(|p| p.2).collect();
        let cos: Vec<f64> = pairs.iter().map(|p| f64::from(p.0)).collect();
        let local: Vec<f64> = pairs.iter().map(|p| local_feature(p.1)).collect();
        Some(Fusion {
            embedding: Logistic::fit(&cos, &same)?,
            local: Logistic::fit(&local, &same)?,
            embedding_weight: EMBEDDING_WEIGHT,
        })
    }

    /// The two probabilities of the same individual, weighed by [`Fusion::embedding_weight`].
    pub fn probability(&self, cosine: f32, verified: f32) -> f32 {
        let pe = self.embedding.probability(f64::from(cosine));
        let pl = self.local.probability(local_feature(verified));
        let w = self.embedding_weight;
        (w * pe + (1.0 - w) * pl) as f32
    }
}

/// How a shortlisted photo ranks against a query: the fused probability with a calibration,
/// else its verified votes (ties, such as photos without a verified match, keep the
/// embedding's order).
pub fn rank_score(fusion: Option<&Fusion>, cosine: f32, verified: f32) -> f32 {
    match fusion {
        Some(f) => f.probability(cosine, verified),
        None => verified + 1e-3 * cosine,
    }
}

/// A fitted fusion with everything it depends on, saved as JSON: the embedding it was fitted
/// for, how features were extracted and matched, and the `new_individual` threshold on the
/// fused probability chosen on the same calibration animals.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The embedding model's identity (`ModelSpec::identity`).
    pub model: String,
    pub extraction: Extraction,
    pub shortlist: usize,
    pub lnbnn_k: usize,
    /// How shortlisted photos were scored (older calibrations: LNBNN).
    #[serde(default)]
    pub score: Score,
    /// How identities were scored from their photos (older calibrations: their best photo).
    #[serde(default)]
    pub identity_score: IdentityScore,
    /// The map matches were verified with (older calibrations: affine).
    #[serde(default)]
    pub geometry: Geometry,
    /// The largest rotation of a verifying map, in degrees (older calibrations: any, 180).
    #[serde(default = "any_rotation")]
    pub max_rotation: f32,
    /// LNBNN's weight of keypoint positions (older calibrations: none, 0).
    #[serde(default)]
    pub position_weight: f32,
    /// `--local-whitening`'s power (older calibrations: none, 0), and the whitening fitted on
    /// the calibration photos' descriptors, which every matched photo's pass through (none at
    /// power 0, or when they had too few descriptors to fit one).
    #[serde(default)]
    pub whitening_power: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whitening: Option<Whitening>,
    pub fusion: Fusion,
    pub threshold: f32,
    /// The calibration photos, and their queries' MAP@5 with `threshold`.
    pub photos: usize,
    pub map5: f64,
}

fn any_rotation() -> f32 {
    180.0
}

impl Calibration {
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        crate::fsio::write_bytes_atomic(path, json.as_bytes())
    }

    pub fn load(path: &Path) -> Result<Calibration> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let c: Calibration = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a finprint calibration", path.display()))?;
        let w = c.fusion.embedding_weight;
        ensure!(
            (0.0..=1.0).contains(&w),
            "{}: the embedding's weight {w} is not a share between 0 and 1",
            path.display()
        );
        Ok(c)
    }

    /// Refuses a calibration fitted for another model or other local settings (extraction,
    /// shortlist, LNBNN's k, the scoring and the geometry verified, which all change the
    /// scores' scale).
    pub fn check(&self, path: &Path, model: &str, args: &LocalArgs) -> Result<()> {
        let extraction = &args.extraction();
        let (shortlist, lnbnn_k, score) = (args.shortlist, args.lnbnn_k, args.local_score);
        ensure!(
            self.model == model,
            "{} was fitted for the model {}, not {model}",
            path.display(),
            self.model
        );
        ensure!(
            &self.extraction == extraction,
            "{} was fitted for local features {:?}, not {:?}",
            path.display(),
            self.extraction,
            extraction
        );
        ensure!(
            (self.shortlist, self.lnbnn_k) == (shortlist, lnbnn_k),
            "{} was fitted for --shortlist {} --lnbnn-k {}, not {shortlist} and {lnbnn_k}",
            path.display(),
            self.shortlist,
            self.lnbnn_k
        );
        ensure!(
            self.score == score,
            "{} was fitted for --local-score {}, not {score}",
            path.display(),
            self.score
        );
        ensure!(
            self.identity_score == args.identity_score,
            "{} was fitted for --identity-score {}, not {}",
            path.display(),
            self.identity_score,
            args.identity_score
        );
        ensure!(
            self.geometry == args.local_geometry,
            "{} was fitted for --local-geometry {}, not {}",
            path.display(),
            self.geometry,
            args.local_geometry
        );
        ensure!(
            self.max_rotation == args.local_max_rotation,
            "{} was fitted for --local-max-rotation {}, not {}",
            path.display(),
            self.max_rotation,
            args.local_max_rotation
        );
        ensure!(
            self.position_weight == args.local_position_weight,
            "{} was fitted for --local-position-weight {}, not {}",
            path.display(),
            self.position_weight,
            args.local_position_weight
        );
        ensure!(
            self.whitening_power == args.local_whitening,
            "{} was fitted for --local-whitening {}, not {}",
            path.display(),
            self.whitening_power,
            args.local_whitening
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_logistic_that_generated_the_labels() {
        // Labels drawn deterministically in proportion: at each x, round(1000·σ(2x − 1))
        // positives out of 1000.
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for i in 0..21 {
            let x = -2.0 + 0.2 * i as f64;
            let positives = (1000.0 * sigmoid(2.0 * x - 1.0)).round() as usize;
            for j in 0..1000 {
                xs.push(x);
                ys.push(j < positives);
            }
        }
        let fit = Logistic::fit(&xs, &ys).unwrap();
        assert!(
            (fit.a - 2.0).abs() < 0.02 && (fit.b + 1.0).abs() < 0.02,
            "{fit:?}"
        );
        assert_eq!(Logistic::fit(&[1.0, 2.0], &[true, true]), None);
    }

    #[test]
    fn a_fit_that_a_full_newton_step_overshoots_still_converges() {
        // 600 negatives at the quantiles of an exponential (rate 1) and 19 positives spread
        // over 2..7: the full Newton step from the start runs off to a ≈ −3·10⁵. The optimum
        // (damped Newton in double precision, the same ridge): a 1.31936, b −6.61025.
        let mut xs: Vec<f64> = (0..600)
            .map(|j| -(1.0 - (j as f64 + 0.5) / 600.0).ln())
            .collect();
        let mut ys = vec![false; 600];
        xs.extend((0..19).map(|i| 2.0 + 5.0 * (i as f64 + 0.5) / 19.0));
        ys.extend([true; 19]);
        let fit = Logistic::fit(&xs, &ys).unwrap();
        assert!(
            (fit.a - 1.31936).abs() < 1e-4 && (fit.b + 6.61025).abs() < 1e-4,
            "{fit:?}"
        );
        // At the optimum the penalised gradient vanishes.
        let (mut ga, mut gb) = (1e-3 * fit.a, 0.0);
        for (&x, &y) in xs.iter().zip(&ys) {
            let r = fit.probability(x) - f64::from(u8::from(y));
            (ga, gb) = (ga + r * x, gb + r);
        }
        assert!(ga.abs() < 1e-6 && gb.abs() < 1e-6, "{ga} {gb}");
    }

    #[test]
    fn a_score_without_signal_is_fitted_flat_and_keeps_the_other_ranking() {
        // The local score is the same for same and different pairs; the cosine separates.
        let pairs: Vec<(f32, f32, bool)> = (0..200)
            .map(|i| {
                let same = i % 4 == 0;
                let cos = if same { 0.6 } else { 0.3 } + (i % 7) as f32 * 0.02;
                (cos, (i % 5) as f32, same)
            })
            .collect();
        let fusion = Fusion::fit(&pairs).unwrap();
        assert_eq!(fusion.embedding_weight, EMBEDDING_WEIGHT);
        assert!(fusion.local.a.abs() < 0.05, "{fusion:?}");
        assert!(fusion.embedding.a > 1.0);
        // Whatever the local votes, a higher cosine stays ahead.
        assert!(fusion.probability(0.6, 0.0) > fusion.probability(0.4, 4.0));
    }

    #[test]
    fn the_fused_probability_weighs_the_two_and_older_calibrations_take_the_mean() {
        // Saved before the weight: the mean of σ(2·0.5 − 1) = .5 and σ(ln(1 + 3) − 1) = .5954.
        let old: Fusion = serde_json::from_str(
            r#"{"embedding": {"a": 2.0, "b": -1.0}, "local": {"a": 1.0, "b": -1.0}}"#,
        )
        .unwrap();
        assert_eq!(old.embedding_weight, 0.5);
        let (pe, pl) = (0.5, sigmoid(4f64.ln() - 1.0));
        assert!((f64::from(old.probability(0.5, 3.0)) - 0.5 * (pe + pl)).abs() < 1e-6);
        let light = Fusion {
            embedding_weight: 0.05,
            ..old
        };
        let back: Fusion = serde_json::from_str(&serde_json::to_string(&light).unwrap()).unwrap();
        assert_eq!(back, light);
        assert!((f64::from(light.probability(0.5, 3.0)) - (0.05 * pe + 0.95 * pl)).abs() < 1e-6);
        // A photo with one verified vote more and a much lower cosine: the mean ranks it
        // second (.5 + .5954 against .9526 + .5246), the light weight first.
        assert!(old.probability(0.5, 3.0) < old.probability(2.0, 2.0));
        assert!(light.probability(0.5, 3.0) > light.probability(2.0, 2.0));
    }

    #[test]
    fn a_saved_calibration_with_a_weight_outside_0_to_1_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.json");
        let saved = |w: f64| {
            let c = Calibration {
                model: "zero-shot:efficientnet_lite0".into(),
                extraction: Extraction {
                    method: "rootsift".into(),
                    size: 256,
                    keypoints: 2000,
                    contrast: 0.005,
                    region: [0.0, 0.0, 1.0, 1.0],
                    shape: Default::default(),
                    clahe: 0.0,
                },
                shortlist: 100,
                lnbnn_k: 4,
                score: Default::default(),
                identity_score: Default::default(),
                geometry: Default::default(),
                max_rotation: 30.0,
                position_weight: 0.0,
                whitening_power: 0.0,
                whitening: None,
                fusion: Fusion {
                    embedding: Logistic { a: 1.0, b: 0.0 },
                    local: Logistic { a: 1.0, b: 0.0 },
                    embedding_weight: w,
                },
                threshold: 0.5,
                photos: 20,
                map5: 1.0,
            };
            c.save(&path).unwrap();
            c
        };
        let good = saved(0.05);
        assert_eq!(Calibration::load(&path).unwrap(), good);
        saved(1.5);
        let err = format!("{:#}", Calibration::load(&path).unwrap_err());
        assert!(
            err.contains(&path.display().to_string()) && err.contains("weight 1.5"),
            "{err}"
        );
    }
}
