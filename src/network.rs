//! One network of an ensemble, as an engine runs it. libtorch runs the model finprint trains;
//! tract and onnxruntime run the same network from the ONNX files that training writes into
//! each checkpoint ([`ONNX_DIR`]), which is how `embed`, `evaluate`, `predict` and `serve` run
//! without libtorch. The engines give the same unit embeddings (within 1e-4, tested), and the
//! ArcFace heads score from the same f32 weights ([`ClassHead`]) whichever engine embeds.

use crate::linalg::{matmul, normalize_rows};
use crate::model::config::ModelConfig;
use crate::transforms::{Flips, ImgSize};
use anyhow::{ensure, Context, Result};
use std::path::Path;

/// The folder of a checkpoint that holds its networks in ONNX, named as `finprint export-onnx`
/// names them (`M-BACKBONE-SIZE.onnx`, M in the order the checkpoint's embeddings are fused).
pub const ONNX_DIR: &str = "onnx";

/// The name, in a checkpoint's [`ONNX_DIR`] (or `export-onnx`'s folder), of network `index`:
/// `NAME.onnx` holds the network and `NAME.json` its [`ModelConfig`].
pub fn onnx_name(index: usize, backbone: &str, size: ImgSize) -> String {
    format!("{index}-{backbone}-{size}")
}

/// Which engine runs the networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// libtorch, from the checkpoint's weights (the full build; CPU or GPU).
    Libtorch,
    /// tract, from the ONNX files in the checkpoint's `onnx/` folder (no libtorch needed).
    Tract,
    /// onnxruntime, from the same ONNX files (its library from the PyPI wheel): the fastest on
    /// a CPU.
    Onnxruntime,
}

impl Default for Engine {
    /// onnxruntime where the build has it, as it embeds fastest on a CPU (BENCHMARKS.md);
    /// libtorch where the build may run on a GPU (`cuda`) or has no onnxruntime; else tract.
    fn default() -> Self {
        if cfg!(feature = "onnxruntime") && !cfg!(feature = "cuda") {
            Engine::Onnxruntime
        } else if cfg!(feature = "torch") {
            Engine::Libtorch
        } else {
            Engine::Tract
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum;
        let value = self.to_possible_value().expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

/// An ArcFace head as a classifier: the cosine of an embedding to each class is the best of
/// its sub-centres'.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassHead {
    /// Unit rows `[classes × subcenters, dim]`, a class's sub-centres adjacent.
    centres: Vec<f32>,
    classes: usize,
    subcenters: usize,
    dim: usize,
}

impl ClassHead {
    /// The head of weights `[classes × subcenters, dim]` (row-major, not yet normalised).
    pub fn new(weight: Vec<f32>, classes: usize, subcenters: usize, dim: usize) -> Result<Self> {
        let subcenters = subcenters.max(1);
        ensure!(
            weight.len() == classes * subcenters * dim,
            "a head of {classes} classes × {subcenters} sub-centres × {dim} needs {} weights, \
             not {}",
            classes * subcenters * dim,
            weight.len()
        );
        let mut centres = weight;
        normalize_rows(&mut centres, dim);
        Ok(Self {
            centres,
            classes,
            subcenters,
            dim,
        })
    }

    /// Cosines `[count, classes]` of `count` rows of `dim` values (any length: normalised here).
    pub fn cosines(&self, rows: &[f32], count: usize) -> Vec<f32> {
        let (k, d) = (self.subcenters, self.dim);
        let mut unit = rows[..count * d].to_vec();
        normalize_rows(&mut unit, d);
        let all = matmul(&unit, &self.centres, count, d, self.classes * k, true);
        all.chunks(k)
            .map(|subs| subs.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect()
    }
}

/// What embeds a batch of photos: a network of an ensemble, or a model being trained.
pub trait BatchEmbedder {
    /// The input it takes (size, fit, normalisation), its flips and its embedding size.
    fn config(&self) -> &ModelConfig;
    /// Unit embeddings `[n, E]` of `n` images laid out `[n, 3, H, W]` (normalised, at the
    /// config's input size); with `flip_tta` the mean (unit vectors summed, then normalised)
    /// over the mirror images that the config's flips allow.
    fn embed_unit(&self, chw: &[f32], n: usize, flip_tta: bool) -> Result<Vec<f32>>;
}

/// Tensors of libtorch models: batches in, embeddings out.
#[cfg(feature = "torch")]
mod tensors {
    use super::BatchEmbedder;
    use crate::model::happywhale::HappyWhaleModel;
    use crate::model::heads::normalize;
    use crate::transforms::Flips;
    use anyhow::{Context, Result};
    use tch::{Kind, Tensor};

    /// Tensor `[N, D]` → row-major vector.
    pub fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view(-1))
            .context("tensor to vector")
    }

    /// A batch of CHW images `[n, 3, h, w]` as the model's input tensor, laid out channels-last
    /// (NHWC strides), which libtorch's CPU convolutions keep through the network and run faster.
    pub fn input_tensor(model: &HappyWhaleModel, chw: &[f32], n: usize) -> Tensor {
        let s = model.config.img_size;
        Tensor::from_slice(chw)
            .view([n as i64, 3, i64::from(s.height), i64::from(s.width)])
            .to_device(model.vs.device())
            .permute([0, 2, 3, 1])
            .contiguous()
            .permute([0, 3, 1, 2])
    }

    /// Unit embeddings `[N, E]` of an input batch: with `flip_tta`, the mean over the photo and the
    /// mirror images that show the same animal (the model's [`Flips`]).
    pub fn embed_batch(model: &HappyWhaleModel, xs: &Tensor, flip_tta: bool) -> Tensor {
        let flips = if flip_tta {
            model.config.flips
        } else {
            Flips::None
        };
        unit_with_flips(xs, flips, |x| model.embed(x, false))
    }

    /// `normalize(f(xs))` without gradients, averaged (unit vectors summed, then normalised) with
    /// `f` of each mirror image of `xs` that `flips` allows.
    pub fn unit_with_flips(xs: &Tensor, flips: Flips, f: impl Fn(&Tensor) -> Tensor) -> Tensor {
        tch::no_grad(|| {
            let mut views = flips.views().into_iter();
            let first = normalize(&f(xs));
            match views.len() {
                1 => first,
                _ => {
                    let sum = views
                        .by_ref()
                        .skip(1)
                        .fold(first, |acc, dims| acc + normalize(&f(&xs.flip(dims))));
                    normalize(&sum)
                }
            }
        })
    }

    impl BatchEmbedder for HappyWhaleModel {
        fn config(&self) -> &crate::model::config::ModelConfig {
            &self.config
        }

        fn embed_unit(&self, chw: &[f32], n: usize, flip_tta: bool) -> Result<Vec<f32>> {
            to_vec(&embed_batch(self, &input_tensor(self, chw, n), flip_tta))
        }
    }
}
#[cfg(feature = "torch")]
pub use tensors::{embed_batch, input_tensor, to_vec, unit_with_flips};

/// A model's ArcFace heads as classifiers (none for a pretrained backbone's pooled features).
#[derive(Clone, Debug, Default)]
pub struct Heads {
    /// The identities' head, whose classes are the config's `classes`.
    pub identities: Option<ClassHead>,
    /// The species head, whose classes are the config's `species`.
    pub species: Option<ClassHead>,
}

#[cfg(feature = "torch")]
impl Heads {
    /// The heads of a libtorch model, copied out of it.
    pub fn of(model: &crate::model::happywhale::HappyWhaleModel) -> Result<Self> {
        let c = &model.config;
        let head = |h: &crate::model::heads::ArcFace, classes: usize, subcenters: i64| {
            let weight = to_vec(&h.weight)?;
            ClassHead::new(
                weight,
                classes,
                subcenters as usize,
                c.embedding_size as usize,
            )
        };
        let identities = match model.has_head() {
            true => Some(head(
                model.head(),
                c.classes.len().max(1),
                c.arcface.subcenters,
            )?),
            false => None,
        };
        let species = match model.species_head() {
            Some(h) => Some(head(h, c.species.len(), 1)?),
            None => None,
        };
        Ok(Self {
            identities,
            species,
        })
    }
}

/// A network of an ensemble with its heads.
pub struct Network {
    pub config: ModelConfig,
    pub heads: Heads,
    runner: Runner,
}

enum Runner {
    #[cfg(feature = "torch")]
    Libtorch(Box<crate::model::happywhale::HappyWhaleModel>),
    #[cfg(feature = "onnx")]
    Tract(tract::Plans),
    #[cfg(feature = "onnxruntime")]
    Onnxruntime(crate::onnx::OrtNet),
}

impl Network {
    /// A model libtorch runs; its heads copied out of it.
    #[cfg(feature = "torch")]
    pub fn libtorch(model: crate::model::happywhale::HappyWhaleModel) -> Result<Self> {
        Ok(Self {
            config: model.config.clone(),
            heads: Heads::of(&model)?,
            runner: Runner::Libtorch(Box::new(model)),
        })
    }

    /// The network of the ONNX file `path` (input `[N, 3, H, W]` at `config`'s size, output
    /// the embedding before L2 normalisation), run by `engine` (tract or onnxruntime).
    /// `weights`: the checkpoint's weights file, whose ArcFace heads are read; `None` for
    /// pooled features.
    #[cfg(any(feature = "onnx", feature = "onnxruntime"))]
    pub fn from_onnx(
        path: &Path,
        config: ModelConfig,
        weights: Option<&Path>,
        engine: Engine,
    ) -> Result<Self> {
        let what = path.display().to_string();
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read the network {what}"))?;
        let heads = match weights {
            Some(w) => heads_from_weights(w, &config)?,
            None => Heads::default(),
        };
        Self::from_onnx_bytes(bytes, &what, config, heads, engine)
    }

    /// [`Network::from_onnx`] of a model in memory (`what` names it in errors).
    #[cfg(any(feature = "onnx", feature = "onnxruntime"))]
    fn from_onnx_bytes(
        bytes: Vec<u8>,
        what: &str,
        config: ModelConfig,
        heads: Heads,
        engine: Engine,
    ) -> Result<Self> {
        let (runner, shape) = Runner::of_onnx(bytes, what, engine)?;
        let crate::onnx::NetShape { chw, dim } = shape;
        ensure!(
            dim == config.embedding_size as usize,
            "{what}: the network gives {dim} values, its config says {}",
            config.embedding_size
        );
        let s = config.img_size;
        ensure!(
            chw == [3, s.height as usize, s.width as usize],
            "{what}: the network takes {chw:?}, its config says 3×{}×{}",
            s.height,
            s.width
        );
        Ok(Self {
            config,
            heads,
            runner,
        })
    }

    /// `model` run by `engine`: by libtorch itself, or written to ONNX in memory for the
    /// others.
    #[cfg(feature = "torch")]
    pub fn of_model(
        model: crate::model::happywhale::HappyWhaleModel,
        engine: Engine,
    ) -> Result<Self> {
        match engine {
            Engine::Libtorch => Self::libtorch(model),
            #[cfg(any(feature = "onnx", feature = "onnxruntime"))]
            _ => {
                let heads = Heads::of(&model)?;
                let what = format!("{} (written to ONNX in memory)", model.config.backbone);
                Self::from_onnx_bytes(model.to_onnx()?, &what, model.config, heads, engine)
            }
            #[cfg(not(any(feature = "onnx", feature = "onnxruntime")))]
            _ => anyhow::bail!("this finprint was built without the {engine} engine"),
        }
    }

    /// The libtorch model, when libtorch runs this network.
    #[cfg(feature = "torch")]
    pub fn model(&self) -> Option<&crate::model::happywhale::HappyWhaleModel> {
        match &self.runner {
            Runner::Libtorch(m) => Some(m),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

impl BatchEmbedder for Network {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn embed_unit(&self, chw: &[f32], n: usize, flip_tta: bool) -> Result<Vec<f32>> {
        match &self.runner {
            #[cfg(feature = "torch")]
            Runner::Libtorch(m) => m.embed_unit(chw, n, flip_tta),
            #[cfg(feature = "onnx")]
            Runner::Tract(plans) => self.unit_with_flips(chw, n, flip_tta, |x| plans.run(x, n)),
            #[cfg(feature = "onnxruntime")]
            Runner::Onnxruntime(net) => self.unit_with_flips(chw, n, flip_tta, |x| net.run(x, n)),
        }
    }
}

impl Network {
    /// Unit rows of `n` images through `run` (embeddings before normalisation): with
    /// `flip_tta`, the mean of the photo's and its allowed mirror images' unit rows.
    #[cfg(any(feature = "onnx", feature = "onnxruntime"))]
    fn unit_with_flips(
        &self,
        chw: &[f32],
        n: usize,
        flip_tta: bool,
        run: impl Fn(&[f32]) -> Result<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let flips = match flip_tta {
            true => self.config.flips,
            false => Flips::None,
        };
        let s = self.config.img_size;
        let (h, w) = (s.height as usize, s.width as usize);
        let dim = self.config.embedding_size as usize;
        let mut sum = vec![0.0f32; n * dim];
        let views = flips.views();
        for axes in &views {
            let mut rows = match axes.is_empty() {
                true => run(chw)?,
                false => run(&flipped(chw, n * 3, h, w, axes))?,
            };
            normalize_rows(&mut rows, dim);
            sum.iter_mut().zip(&rows).for_each(|(s, r)| *s += r);
        }
        if views.len() > 1 {
            normalize_rows(&mut sum, dim);
        }
        Ok(sum)
    }
}

#[cfg(any(feature = "onnx", feature = "onnxruntime"))]
impl Runner {
    /// The runner of the ONNX model in `bytes` (`what` names it in errors) for `engine`, and
    /// what its network takes and gives.
    fn of_onnx(
        bytes: Vec<u8>,
        what: &str,
        engine: Engine,
    ) -> Result<(Self, crate::onnx::NetShape)> {
        match engine {
            #[cfg(feature = "onnx")]
            Engine::Tract => {
                let plans = tract::Plans::new(bytes, what)?;
                let shape = plans.shape;
                Ok((Runner::Tract(plans), shape))
            }
            #[cfg(feature = "onnxruntime")]
            Engine::Onnxruntime => {
                let net = crate::onnx::OrtNet::new(&bytes, what)?;
                let shape = net.shape();
                Ok((Runner::Onnxruntime(net), shape))
            }
            other => anyhow::bail!("{what}: this finprint was built without the {other} engine"),
        }
    }
}

/// `planes` images `[h, w]` each mirrored along `axes` (2: rows, 3: columns, as NCHW axes).
#[cfg(any(feature = "onnx", feature = "onnxruntime"))]
fn flipped(xs: &[f32], planes: usize, h: usize, w: usize, axes: &[i64]) -> Vec<f32> {
    let (rows, cols) = (axes.contains(&2), axes.contains(&3));
    let mut out = Vec::with_capacity(xs.len());
    for p in 0..planes {
        let plane = &xs[p * h * w..(p + 1) * h * w];
        for y in 0..h {
            let src = &plane[if rows { h - 1 - y } else { y } * w..][..w];
            match cols {
                true => out.extend(src.iter().rev()),
                false => out.extend_from_slice(src),
            }
        }
    }
    out
}

/// The identities' and species' ArcFace heads of a checkpoint's weights file (`fc.weight` and
/// `species.weight`, as the model's variables are named), read without libtorch.
#[cfg(any(feature = "onnx", feature = "onnxruntime"))]
fn heads_from_weights(path: &Path, config: &ModelConfig) -> Result<Heads> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let read = |name: &str, classes: usize, subcenters: usize| -> Result<ClassHead> {
        let (_, weight) = crate::fsio::read_f32(&file, name, path)?;
        ClassHead::new(weight, classes, subcenters, config.embedding_size as usize)
            .with_context(|| format!("{}: '{name}'", path.display()))
    };
    let identities = read(
        "fc.weight",
        config.classes.len().max(1),
        config.arcface.subcenters.max(1) as usize,
    )?;
    let species = match config.species.is_empty() {
        true => None,
        false => Some(read("species.weight", config.species.len(), 1)?),
    };
    Ok(Heads {
        identities: Some(identities),
        species,
    })
}

#[cfg(feature = "onnx")]
mod tract {
    use crate::onnx::OnnxNet;
    use anyhow::Result;
    use std::sync::Mutex;

    /// An ONNX network and tract's plans of it, one per batch size met (planned when first
    /// met: a service embedding one photo at a time plans for one).
    pub struct Plans {
        bytes: Vec<u8>,
        what: String,
        pub shape: crate::onnx::NetShape,
        plans: Mutex<Vec<(usize, std::sync::Arc<OnnxNet>)>>,
    }

    impl Plans {
        /// Plans of the ONNX model in `bytes` (`what` names it in errors).
        pub fn new(bytes: Vec<u8>, what: &str) -> Result<Self> {
            let what = what.to_string();
            let first = OnnxNet::new(&bytes, &what, 1)?;
            Ok(Self {
                shape: first.shape(),
                bytes,
                what,
                plans: Mutex::new(vec![(1, std::sync::Arc::new(first))]),
            })
        }

        /// Rows `[n, D]` of `n` inputs `[n, C, H, W]`.
        pub fn run(&self, inputs: &[f32], n: usize) -> Result<Vec<f32>> {
            let found = {
                let plans = self.plans.lock().expect("no panic while held");
                plans.iter().find(|(b, _)| *b == n).map(|(_, p)| p.clone())
            };
            let plan = match found {
                Some(p) => p,
                None => {
                    let p = std::sync::Arc::new(OnnxNet::new(&self.bytes, &self.what, n.max(1))?);
                    let mut plans = self.plans.lock().expect("no panic while held");
                    plans.push((n, p.clone()));
                    p
                }
            };
            plan.run(inputs, n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_scores_the_best_of_its_subcentres() {
        // Two classes of two sub-centres in 2-D: class 0 along x and y, class 1 along −x, −y.
        let weight = vec![2.0, 0.0, 0.0, 3.0, -1.0, 0.0, 0.0, -1.0];
        let head = ClassHead::new(weight, 2, 2, 2).unwrap();
        // Rows are normalised first: (3, 4) → (.6, .8); (−1, 0).
        let cos = head.cosines(&[3.0, 4.0, -1.0, 0.0], 2);
        let want = [0.8, -0.6, -0.0, 1.0];
        for (c, w) in cos.iter().zip(want) {
            assert!((c - w).abs() < 1e-6, "{cos:?}");
        }
        assert!(ClassHead::new(vec![0.0; 7], 2, 2, 2).is_err());
    }

    #[cfg(feature = "torch")]
    #[test]
    fn flip_tta_averages_exactly_the_allowed_mirror_images() {
        use crate::transforms::Flips;
        use tch::Tensor;
        // One 2×2 single-channel photo with its only bright pixel top-left; f flattens it.
        let xs = Tensor::from_slice(&[1f32, 0., 0., 0.]).view([1, 1, 2, 2]);
        let f = |x: &Tensor| x.view([1, 4]);
        let at = |flips| to_vec(&unit_with_flips(&xs, flips, f)).unwrap();
        let r = std::f32::consts::FRAC_1_SQRT_2;
        let close = |a: Vec<f32>, b: [f32; 4]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
        assert!(close(at(Flips::None), [1., 0., 0., 0.]));
        assert!(close(at(Flips::Horizontal), [r, r, 0., 0.]));
        assert!(close(at(Flips::Vertical), [r, 0., r, 0.]));
        assert!(close(at(Flips::Both), [0.5; 4]));
    }

    #[cfg(any(feature = "onnx", feature = "onnxruntime"))]
    #[test]
    fn flips_mirror_rows_columns_or_both() {
        // One plane of 2×3.
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(flipped(&x, 1, 2, 3, &[3]), [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
        assert_eq!(flipped(&x, 1, 2, 3, &[2]), [4.0, 5.0, 6.0, 1.0, 2.0, 3.0]);
        assert_eq!(
            flipped(&x, 1, 2, 3, &[2, 3]),
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
        );
    }
}
