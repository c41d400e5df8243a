//! AdamW with parameter groups, global gradient clipping, and a linear-warmup + cosine schedule.
//!
//! Written over plain tensors (rather than libtorch's optimiser) so that its state — the moment
//! estimates and the step count — is saved with each checkpoint, and a resumed run continues
//! exactly where it stopped.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Learning rate at `step` of `total`: linear warm-up from 0 over `warmup` steps, then cosine
/// decay from `base` to `base × min_ratio`.
pub fn lr_at(step: usize, total: usize, warmup: usize, base: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).min(1.0);
    let min = base * min_ratio;
    min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
}

/// A set of parameters sharing a learning-rate multiplier and a weight decay.
pub struct Group {
    pub params: Vec<(String, Tensor)>,
    pub lr_mult: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    groups: Vec<Group>,
    moments: HashMap<String, (Tensor, Tensor)>,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken so far.
    pub step: i64,
}

impl AdamW {
    pub fn new(groups: Vec<Group>) -> Self {
        let moments = groups
            .iter()
            .flat_map(|g| g.params.iter())
            .map(|(name, p)| (name.clone(), (p.zeros_like(), p.zeros_like())))
            .collect();
        Self {
            groups,
            moments,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 0,
        }
    }

    pub fn zero_grad(&mut self) {
        for g in &mut self.groups {
            for (_, p) in &mut g.params {
                let mut grad = p.grad();
                if grad.defined() {
                    let _ = grad.detach_().zero_();
                }
            }
        }
    }

    /// Scale all gradients so that their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter())
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let norm = tch::no_grad(|| {
            Tensor::stack(
                &grads
                    .iter()
                    .map(|g| g.norm().to_kind(Kind::Float))
                    .collect::<Vec<_>>(),
                0,
            )
            .norm()
            .double_value(&[])
        });
        if norm > max_norm && norm.is_finite() {
            let scale = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(scale);
                }
            });
        }
        norm
    }

    /// One AdamW update of every parameter with a gradient, at learning rate `lr × lr_mult`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bias1 = 1.0 - b1.powi(self.step as i32);
        let bias2 = 1.0 - b2.powi(self.step as i32);
        tch::no_grad(|| {
            for g in &mut self.groups {
                let lr = lr * g.lr_mult;
                for (name, p) in &mut g.params {
                    let grad = p.grad();
                    if !grad.defined() {
                        continue;
                    }
                    let Some((m, v)) = self.moments.get_mut(name) else {
                        continue;
                    };
                    let _ = m.g_mul_scalar_(b1).g_add_(&(&grad * (1.0 - b1)));
                    let _ = v.g_mul_scalar_(b2).g_add_(&(grad.square() * (1.0 - b2)));
                    if g.weight_decay > 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * g.weight_decay);
                    }
                    let denom = (&*v / bias2).sqrt() + self.eps;
                    let _ = p.g_add_(&(&*m / &denom * (-lr / bias1)));
                }
            }
        });
    }

    /// Save the moments and the step count.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(self.moments.len() * 2 + 1);
        for (name, (m, v)) in &self.moments {
            named.push((format!("m.{name}"), m.shallow_clone()));
            named.push((format!("v.{name}"), v.shallow_clone()));
        }
        named.push(("step".into(), Tensor::from_slice(&[self.step])));
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, path)
            .with_context(|| format!("cannot write optimiser state {}", path.display()))
    }

    /// Restore what [`Self::save`] wrote.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let named: HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .with_context(|| format!("cannot read optimiser state {}", path.display()))?
            .into_iter()
            .collect();
        let get = |key: &str| {
            named
                .get(key)
                .with_context(|| format!("{}: no '{key}'", path.display()))
        };
        self.step = get("step")?.int64_value(&[0]);
        for (name, (m, v)) in &mut self.moments {
            let (sm, sv) = (get(&format!("m.{name}"))?, get(&format!("v.{name}"))?);
            tch::no_grad(|| {
                m.copy_(sm);
                v.copy_(sv);
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        assert!((lr_at(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    fn param(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).set_requires_grad(true)
    }

    #[test]
    fn one_adamw_step_matches_the_hand_computed_update() {
        // After one step, m̂ = g and v̂ = g², so the update is −lr·g/(|g| + eps) − lr·wd·p.
        let p = param(&[1.0, -2.0]);
        let mut opt = AdamW::new(vec![Group {
            params: vec![("p".into(), p.shallow_clone())],
            lr_mult: 2.0,
            weight_decay: 0.1,
        }]);
        (&p * Tensor::from_slice(&[3.0f32, -0.5]))
            .sum(Kind::Float)
            .backward();
        opt.step(0.01);
        let got: Vec<f32> = Vec::try_from(&p).unwrap();
        let lr = 0.02;
        let want = [
            1.0 * (1.0 - lr * 0.1) - lr * 3.0 / (3.0 + 1e-8),
            -2.0 * (1.0 - lr * 0.1) + lr * 0.5 / (0.5 + 1e-8),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn a_second_adamw_step_mixes_the_moments_with_their_bias_corrections() {
        // Gradients 3 then −1 of one parameter 1.0 at lr 0.1, weight decay 0.5.
        let p = param(&[1.0]);
        let mut opt = AdamW::new(vec![Group {
            params: vec![("p".into(), p.shallow_clone())],
            lr_mult: 1.0,
            weight_decay: 0.5,
        }]);
        let mut want = 1.0f64;
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for (t, grad) in [(1, 3.0f64), (2, -1.0)] {
            opt.zero_grad();
            (&p * grad).sum(Kind::Float).backward();
            opt.step(0.1);
            m = 0.9 * m + 0.1 * grad;
            v = 0.999 * v + 0.001 * grad * grad;
            let (m_hat, v_hat) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.999f64.powi(t)));
            want = want * (1.0 - 0.1 * 0.5) - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        }
        // m̂ = (0.27 − 0.1) / 0.19, v̂ = (0.008991 + 0.001) / 0.001999.
        let got = f64::from(Vec::<f32>::try_from(&p).unwrap()[0]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn clipping_scales_the_global_norm() {
        let a = param(&[0.0, 0.0]);
        let b = param(&[0.0]);
        let mut opt = AdamW::new(vec![Group {
            params: vec![
                ("a".into(), a.shallow_clone()),
                ("b".into(), b.shallow_clone()),
            ],
            lr_mult: 1.0,
            weight_decay: 0.0,
        }]);
        // Gradients (3, 4) and (12): global norm 13.
        ((&a * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float) + (&b * 12.0).sum(Kind::Float))
            .backward();
        let before = opt.clip_grad_norm(1.3);
        assert!((before - 13.0).abs() < 1e-4);
        let ga: Vec<f32> = Vec::try_from(a.grad()).unwrap();
        assert!(
            (ga[0] - 0.3).abs() < 1e-4 && (ga[1] - 0.4).abs() < 1e-4,
            "{ga:?}"
        );
    }

    #[test]
    fn saved_state_restores_the_same_trajectory() {
        let run = |restore_after: Option<usize>| {
            let p = param(&[0.5, 1.5, -1.0]);
            let mk = |p: &Tensor| {
                AdamW::new(vec![Group {
                    params: vec![("p".into(), p.shallow_clone())],
                    lr_mult: 1.0,
                    weight_decay: 0.01,
                }])
            };
            let mut opt = mk(&p);
            let dir = tempfile::tempdir().unwrap();
            for step in 0..6 {
                if Some(step) == restore_after {
                    opt.save(&dir.path().join("opt.safetensors")).unwrap();
                    opt = mk(&p);
                    opt.load(&dir.path().join("opt.safetensors")).unwrap();
                }
                opt.zero_grad();
                (&p * &p * 3.0).sum(Kind::Float).backward();
                opt.step(0.05);
            }
            Vec::<f32>::try_from(&p).unwrap()
        };
        assert_eq!(run(None), run(Some(3)));
    }
}
