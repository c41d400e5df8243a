//! The heads on a backbone's feature map: GeM pooling, the BatchNorm1d + Linear neck that gives
//! the embedding, and ArcFace (with sub-centers and per-class dynamic margins) for training.

use super::config::ArcFaceConfig;
use super::layers::values;
use crate::onnx::{Attr, Graph, Value};
use tch::{nn, Kind, Tensor};

/// Generalised-mean pooling, `(mean(clamp(x, eps)^p))^(1/p)` over H×W, with a learnable `p`.
#[derive(Debug)]
pub struct Gem {
    pub p: Tensor,
    eps: f64,
}

impl Gem {
    /// `p` starts at `p_init` (3 in the seed), `eps` is 1e-6.
    pub fn new(vs: nn::Path, p_init: f64) -> Self {
        let p = vs.var("p", &[1], nn::Init::Const(p_init));
        Self { p, eps: 1e-6 }
    }

    /// `[N, C, H, W]` → `[N, C]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.clamp_min(self.eps)
            .pow(&self.p)
            .mean_dim(&[-2i64, -1][..], false, Kind::Float)
            .pow(&self.p.reciprocal())
    }
}

impl Gem {
    /// This pooling in an ONNX graph, `[N, C, H, W]` → `[N, C]`, under `name`.
    pub fn emit(&self, g: &mut Graph, name: &str, x: &Value) -> Value {
        let (n, c) = (x.shape[0], x.shape[1]);
        let eps = g.scalar(&format!("{name}.eps"), self.eps as f32);
        let p = g.weight(&format!("{name}.p"), &[1], &values(&self.p));
        let inv = tch::no_grad(|| self.p.reciprocal());
        let inv = g.weight(&format!("{name}.p_reciprocal"), &[1], &values(&inv));
        let ys = g.node("Clip", name, &[&x.name, &eps], &[], x.shape.clone());
        let ys = g.node("Pow", name, &[&ys.name, &p], &[], x.shape.clone());
        let ys = g.node(
            "GlobalAveragePool",
            name,
            &[&ys.name],
            &[],
            vec![n, c, 1, 1],
        );
        let ys = g.node("Pow", name, &[&ys.name, &inv], &[], vec![n, c, 1, 1]);
        let flat = [("axis", Attr::Int(1))];
        g.node("Flatten", name, &[&ys.name], &flat, vec![n, c])
    }
}

#[derive(Debug)]
pub struct ArcFace {
    /// `[classes × subcenters, dim]`, normalised on use.
    pub weight: Tensor,
    /// `[classes]`: each class's margin (saved with the model, not trained).
    pub margins: Tensor,
    classes: i64,
    cfg: ArcFaceConfig,
}

impl ArcFace {
    /// `class_counts` (images per class) sets the dynamic margins when the config asks for them.
    pub fn new(
        vs: nn::Path,
        dim: i64,
        classes: i64,
        cfg: ArcFaceConfig,
        class_counts: Option<&[usize]>,
    ) -> Self {
        let k = cfg.subcenters.max(1);
        // The seed's xavier_uniform_ on an [out, in] matrix.
        let bound = (6.0 / (dim + classes * k) as f64).sqrt();
        let weight = vs.var(
            "weight",
            &[classes * k, dim],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let mut margins = vs.zeros_no_train("margins", &[classes]);
        let values: Vec<f32> = (0..classes as usize)
            .map(|c| match (cfg.dynamic, class_counts) {
                (Some(d), Some(counts)) => d.margin(counts.get(c).copied().unwrap_or(1)) as f32,
                _ => cfg.m as f32,
            })
            .collect();
        tch::no_grad(|| margins.copy_(&Tensor::from_slice(&values)));
        Self {
            weight,
            margins,
            classes,
            cfg,
        }
    }

    pub fn config(&self) -> &ArcFaceConfig {
        &self.cfg
    }

    /// Cosine of each embedding `[N, D]` to each class `[N, C]`: the best of its sub-centers.
    pub fn cosine(&self, emb: &Tensor) -> Tensor {
        let cos = normalize(emb).matmul(&normalize(&self.weight).tr());
        let k = self.cfg.subcenters.max(1);
        if k == 1 {
            cos
        } else {
            cos.view([-1, self.classes, k]).amax(&[2i64][..], false)
        }
    }

    /// Training logits: `s·cos θ` for the other classes and `s·cos(θ + m)` (with the seed's
    /// fallbacks) for the true class, with label smoothing.
    pub fn forward(&self, emb: &Tensor, labels: &Tensor) -> Tensor {
        let cosine = self.cosine(emb);
        self.margin_logits(&cosine, labels)
    }

    /// The margin and scale applied to class cosines `[N, C]`.
    pub fn margin_logits(&self, cosine: &Tensor, labels: &Tensor) -> Tensor {
        let m = self.margins.view([1, -1]).to_device(cosine.device());
        let sine = cosine
            .square()
            .neg()
            .g_add_scalar(1.0)
            .clamp(0.0, 1.0)
            .sqrt();
        let phi = cosine * m.cos() - &sine * m.sin();
        let phi = if self.cfg.easy_margin {
            phi.where_self(&cosine.gt(0.0), cosine)
        } else {
            // Beyond θ = π − m, cos(θ + m) would rise again: use cos θ − sin(π − m)·m instead.
            let th = (std::f64::consts::PI - &m).cos();
            let mm = (std::f64::consts::PI - &m).sin() * &m;
            phi.where_self(&cosine.gt_tensor(&th), &(cosine - mm))
        };
        let n = cosine.size()[1];
        let mut one_hot = labels.to_kind(Kind::Int64).one_hot(n).to_kind(Kind::Float);
        if self.cfg.ls_eps > 0.0 {
            one_hot = one_hot * (1.0 - self.cfg.ls_eps) + self.cfg.ls_eps / n as f64;
        }
        (&one_hot * phi + (1.0 - &one_hot) * cosine) * self.cfg.s
    }

    /// Inference logits `s·cos θ`, for fusing with kNN scores.
    pub fn logits(&self, emb: &Tensor) -> Tensor {
        self.cosine(emb) * self.cfg.s
    }
}

/// L2-normalise the rows of `[N, D]` (as `F.normalize`, eps 1e-12).
pub fn normalize(xs: &Tensor) -> Tensor {
    xs / xs
        .norm_scalaropt_dim(2.0, &[-1i64][..], true)
        .clamp_min(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::DynamicMargin;
    use std::f64::consts::PI;

    fn close(a: &Tensor, b: &[f64], tol: f64) {
        let a: Vec<f64> = Vec::try_from(a.flatten(0, -1).to_kind(Kind::Double)).unwrap();
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    /// An ArcFace over 2-d embeddings whose class centers point at the given angles.
    fn head(angles: &[f64], cfg: ArcFaceConfig, counts: Option<&[usize]>) -> ArcFace {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let classes = angles.len() as i64 / cfg.subcenters;
        let mut head = ArcFace::new(vs.root(), 2, classes, cfg, counts);
        let w: Vec<f32> = angles
            .iter()
            .flat_map(|a| [a.cos() as f32, a.sin() as f32])
            .collect();
        tch::no_grad(|| head.weight.copy_(&Tensor::from_slice(&w).view([-1, 2])));
        head
    }

    #[test]
    fn gem_with_p_one_is_the_mean_and_large_p_nears_the_max() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let xs = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 6.0]).view([1, 1, 2, 2]);
        let gem = Gem::new(vs.root() / "a", 1.0);
        close(&gem.forward(&xs), &[3.0], 1e-5);
        let gem3 = Gem::new(vs.root() / "b", 3.0);
        // ((1 + 8 + 27 + 216) / 4)^(1/3) = 63^(1/3)
        close(&gem3.forward(&xs), &[63f64.powf(1.0 / 3.0)], 1e-4);
        // Values below eps are clamped, not raised to a power as negatives.
        let neg = Tensor::from_slice(&[-1.0f32, 0.0, 0.0, 0.0]).view([1, 1, 2, 2]);
        close(&gem3.forward(&neg), &[1e-6], 1e-9);
    }

    #[test]
    fn arcface_logits_match_hand_computed_values() {
        // Embedding at angle 0; class 0 at 60°, class 1 at 0°; the label is class 0.
        let cfg = ArcFaceConfig {
            s: 10.0,
            m: 0.5,
            ..ArcFaceConfig::default()
        };
        let head = head(&[PI / 3.0, 0.0], cfg, None);
        let emb = Tensor::from_slice(&[2.0f32, 0.0]).view([1, 2]);
        let logits = head.forward(&emb, &Tensor::from_slice(&[0i64]));
        // θ = π/3: 10·cos(π/3 + 0.5) for the label, 10·cos 0 for the other class.
        close(&logits, &[10.0 * (PI / 3.0 + 0.5).cos(), 10.0], 1e-4);
        close(&head.logits(&emb), &[10.0 * (PI / 3.0).cos(), 10.0], 1e-4);
    }

    #[test]
    fn beyond_pi_minus_m_the_seed_falls_back_to_cos_minus_mm() {
        // θ = 170° and m = 0.5: θ + m > π, so the logit is cos θ − sin(π − m)·m.
        let theta = 170f64.to_radians();
        let cfg = ArcFaceConfig {
            s: 1.0,
            m: 0.5,
            ..ArcFaceConfig::default()
        };
        let head = head(&[theta], cfg.clone(), None);
        let emb = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]);
        let logits = head.forward(&emb, &Tensor::from_slice(&[0i64]));
        close(&logits, &[theta.cos() - (PI - 0.5).sin() * 0.5], 1e-5);
        // easy_margin keeps cos θ where cos θ <= 0.
        let easy = self::head(
            &[theta],
            ArcFaceConfig {
                easy_margin: true,
                ..cfg
            },
            None,
        );
        close(
            &easy.forward(&emb, &Tensor::from_slice(&[0i64])),
            &[theta.cos()],
            1e-5,
        );
    }

    #[test]
    fn label_smoothing_mixes_phi_and_cos() {
        let cfg = ArcFaceConfig {
            s: 1.0,
            m: 0.5,
            ls_eps: 0.1,
            ..ArcFaceConfig::default()
        };
        let head = head(&[PI / 3.0, 0.0], cfg, None);
        let emb = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]);
        let logits = head.forward(&emb, &Tensor::from_slice(&[0i64]));
        let (phi0, cos0) = ((PI / 3.0 + 0.5).cos(), (PI / 3.0).cos());
        let phi1 = 0.5f64.cos(); // class 1 at θ = 0
                                 // one-hot smoothed to [0.95, 0.05]
        close(
            &logits,
            &[0.95 * phi0 + 0.05 * cos0, 0.05 * phi1 + 0.95 * 1.0],
            1e-5,
        );
    }

    #[test]
    fn subcenters_take_the_best_center_of_each_class() {
        // Two classes × two centers: class 0 at 90° and 10°, class 1 at 45° and 180°.
        let cfg = ArcFaceConfig {
            s: 1.0,
            subcenters: 2,
            ..ArcFaceConfig::default()
        };
        let angles = [90f64, 10.0, 45.0, 180.0].map(f64::to_radians);
        let head = head(&angles, cfg, None);
        let emb = Tensor::from_slice(&[1.0f32, 0.0]).view([1, 2]);
        close(
            &head.cosine(&emb),
            &[10f64.to_radians().cos(), 45f64.to_radians().cos()],
            1e-5,
        );
    }

    #[test]
    fn dynamic_margins_follow_image_counts() {
        let d = DynamicMargin::default();
        assert!((d.margin(1) - 0.321).abs() < 1e-12);
        assert!((d.margin(100) - (0.271 * 100f64.powf(-0.364) + 0.05)).abs() < 1e-12);
        let cfg = ArcFaceConfig {
            s: 1.0,
            dynamic: Some(d),
            ..ArcFaceConfig::default()
        };
        let head = head(&[PI / 3.0, PI / 3.0], cfg, Some(&[1, 100]));
        close(&head.margins, &[d.margin(1), d.margin(100)], 1e-6);
        let emb = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).view([2, 2]);
        let logits = head.forward(&emb, &Tensor::from_slice(&[0i64, 1]));
        let c = (PI / 3.0).cos();
        close(
            &logits,
            &[
                (PI / 3.0 + d.margin(1)).cos(),
                c,
                c,
                (PI / 3.0 + d.margin(100)).cos(),
            ],
            1e-5,
        );
    }
}
