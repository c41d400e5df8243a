//! The seed's `HappyWhaleModel`: backbone → GeM → BatchNorm1d → Linear (embedding) → ArcFace,
//! and its checkpoints (safetensors weights + a JSON config).
//!
//! Variable names follow the seed's PyTorch module, so its checkpoints converted to
//! safetensors load as they are: `model.*` (the timm backbone), `pooling.p`, `neck.0.*`
//! (BatchNorm1d), `neck.1.*` (Linear), `fc.weight` (ArcFace). The optional species head is
//! `species.*`: a cosine classifier of the species on the same embedding.

use super::config::{ArcFaceConfig, ModelConfig, CONFIG_FILE, WEIGHTS_FILE};
use super::heads::{normalize, ArcFace, Gem};
use super::layers::values;
use super::{build_backbone, variant, Backbone};
use crate::fsio;
use crate::onnx::{Attr, Graph};
use crate::transforms::{Fit, ImgSize};
use anyhow::{bail, Context, Result};
use std::path::Path;
use tch::{nn, nn::ModuleT, Device, Kind, Tensor};

#[derive(Debug)]
pub struct HappyWhaleModel {
    pub vs: nn::VarStore,
    pub config: ModelConfig,
    backbone: Box<dyn Backbone>,
    pooling: Gem,
    neck_bn: nn::BatchNorm,
    neck_fc: nn::Linear,
    fc: ArcFace,
    species: Option<ArcFace>,
    /// Embed with the GeM-pooled backbone features, skipping the neck (see [`Self::zero_shot`]).
    pooled_only: bool,
}

impl HappyWhaleModel {
    /// A model with fresh weights (the backbone's random init; see
    /// [`Self::load_backbone_weights`] for pretrained ones).
    pub fn new(config: ModelConfig, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let backbone = build_backbone(&config.backbone, &(&root / "model"))?;
        let features = backbone.num_features();
        let pooling = Gem::new(&root / "pooling", config.gem_p);
        let neck_bn = nn::batch_norm1d(&root / "neck" / "0", features, Default::default());
        let neck_fc = nn::linear(
            &root / "neck" / "1",
            features,
            config.embedding_size,
            Default::default(),
        );
        let fc = ArcFace::new(
            &root / "fc",
            config.embedding_size,
            config.classes.len().max(1) as i64,
            config.arcface.clone(),
            Some(&config.class_counts),
        );
        // ArcFace without a margin: logits s·cos θ of the species centres.
        let species = (!config.species.is_empty()).then(|| {
            let plain = ArcFaceConfig {
                m: 0.0,
                subcenters: 1,
                ls_eps: 0.0,
                dynamic: None,
                ..config.arcface.clone()
            };
            let n = config.species.len() as i64;
            ArcFace::new(&root / "species", config.embedding_size, n, plain, None)
        });
        Ok(Self {
            vs,
            config,
            backbone,
            pooling,
            neck_bn,
            neck_fc,
            fc,
            species,
            pooled_only: false,
        })
    }

    /// The pretrained backbone alone, whose embedding is its GeM-pooled features (p = 3): the
    /// zero-shot baseline that training must beat.
    pub fn zero_shot(
        backbone: &str,
        img_size: Option<ImgSize>,
        fit: Fit,
        device: Device,
    ) -> Result<Self> {
        let mut config = ModelConfig::for_backbone(backbone, vec!["-".into()], vec![1])?;
        if let Some(s) = img_size {
            config.img_size = s;
        }
        config.fit = fit;
        let mut model = Self::new(config, device)?;
        model.load_backbone_weights(&pretrained_weights(backbone)?)?;
        Ok(model.pooled_features())
    }

    /// This model's backbone alone: its embedding is the GeM-pooled features.
    pub fn pooled_features(mut self) -> Self {
        self.config.embedding_size = self.backbone.num_features();
        self.pooled_only = true;
        self
    }

    pub fn backbone(&self) -> &dyn Backbone {
        self.backbone.as_ref()
    }

    /// Whether the model has a trained neck and ArcFace head (not zero-shot features).
    pub fn has_head(&self) -> bool {
        !self.pooled_only
    }

    pub fn head(&self) -> &ArcFace {
        &self.fc
    }

    /// The species head, trained with `--species-weight`; its classes are `config.species`.
    pub fn species_head(&self) -> Option<&ArcFace> {
        self.species.as_ref().filter(|_| !self.pooled_only)
    }

    /// Pooled features `[N, C]` of a backbone feature map.
    pub fn pool(&self, feature_map: &Tensor) -> Tensor {
        self.pooling.forward(feature_map)
    }

    /// The embedding `[N, E]` of pooled features (not normalised).
    pub fn neck(&self, pooled: &Tensor, train: bool) -> Tensor {
        self.neck_bn.forward_t(pooled, train).apply(&self.neck_fc)
    }

    /// The embedding `[N, E]` of a normalised image batch (not L2-normalised).
    pub fn embed(&self, xs: &Tensor, train: bool) -> Tensor {
        let map = self.backbone.forward_features(xs, train);
        if self.pooled_only {
            return self.pool(&map);
        }
        self.neck(&self.pool(&map), train)
    }

    /// This model's embedding as an ONNX model, written from its own layers: what
    /// [`Self::embed`] computes in eval mode (not L2-normalised), input `input` `[N, 3, H, W]`
    /// (normalised, at the model's input size), one output `[N, E]`. BatchNorms are folded into
    /// the convolution or linear layer before them.
    pub fn to_onnx(&self) -> Result<Vec<u8>> {
        let mut g = Graph::new();
        let s = self.config.img_size;
        let x = g.input("input", &[-1, 3, i64::from(s.height), i64::from(s.width)]);
        let map = tch::no_grad(|| self.backbone.emit(&mut g, &x))?;
        let pooled = self.pooling.emit(&mut g, "pooling", &map);
        let out = if self.pooled_only {
            pooled
        } else {
            let (ws, bs) = tch::no_grad(|| self.folded_neck());
            let ws = g.weight("neck.1.weight", &ws.size(), &values(&ws));
            let bs = g.weight("neck.1.bias", &bs.size(), &values(&bs));
            let trans = [("transB", Attr::Int(1))];
            let shape = vec![pooled.shape[0], self.config.embedding_size];
            g.node("Gemm", "neck.1", &[&pooled.name, &ws, &bs], &trans, shape)
        };
        g.output(&out);
        Ok(g.to_bytes(&self.config.backbone))
    }

    /// The neck's Linear with its BatchNorm1d (eval mode) folded in: weights and bias.
    fn folded_neck(&self) -> (Tensor, Tensor) {
        let (bn, fc) = (&self.neck_bn, &self.neck_fc);
        let eps = nn::BatchNormConfig::default().eps;
        let ones = Tensor::ones_like(&bn.running_var);
        let gamma = bn.ws.as_ref().unwrap_or(&ones);
        let scale = gamma / (&bn.running_var + eps).sqrt();
        let shift = match &bn.bs {
            Some(beta) => beta - &bn.running_mean * &scale,
            None => -(&bn.running_mean * &scale),
        };
        let ws = &fc.ws * scale.view([1, -1]);
        let bs = fc.ws.mv(&shift);
        let bs = match &fc.bs {
            Some(b) => bs + b,
            None => bs,
        };
        (ws, bs)
    }

    /// ArcFace training logits `[N, classes]`.
    pub fn forward(&self, xs: &Tensor, labels: &Tensor, train: bool) -> Tensor {
        self.fc.forward(&self.embed(xs, train), labels)
    }

    /// L2-normalised embeddings for search, in eval mode without gradients.
    pub fn extract(&self, xs: &Tensor) -> Tensor {
        tch::no_grad(|| normalize(&self.embed(xs, false)))
    }

    /// Copy pretrained backbone weights (names as the backbone's own checkpoint, without the
    /// `model.` prefix) from a safetensors file.
    pub fn load_backbone_weights(&mut self, path: &Path) -> Result<()> {
        let file: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
            .with_context(|| format!("cannot read weights {}", path.display()))?
            .into_iter()
            .collect();
        let mut missing = Vec::new();
        for (name, mut var) in self.vs.variables() {
            let Some(own) = name.strip_prefix("model.") else {
                continue;
            };
            match file.get(own) {
                Some(src) if src.size() == var.size() => {
                    tch::no_grad(|| var.copy_(&src.to_kind(Kind::Float)))
                }
                Some(src) => bail!(
                    "{}: '{own}' has shape {:?}, the model expects {:?}",
                    path.display(),
                    src.size(),
                    var.size()
                ),
                None => missing.push(own.to_string()),
            }
        }
        if !missing.is_empty() {
            missing.sort();
            bail!(
                "{}: {} backbone weights missing, e.g. {}",
                path.display(),
                missing.len(),
                missing[..missing.len().min(5)].join(", ")
            );
        }
        Ok(())
    }

    /// Write `dir/config.json` and `dir/model.safetensors`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let config = serde_json::to_vec_pretty(&self.config)?;
        // tch picks the format from the extension, so the temporary name keeps it.
        let tmp = dir.join(format!("model.{}.tmp.safetensors", std::process::id()));
        self.vs
            .save(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(WEIGHTS_FILE))
            .with_context(|| format!("cannot write {}", dir.join(WEIGHTS_FILE).display()))?;
        fsio::write_bytes_atomic(&dir.join(CONFIG_FILE), &config)
    }

    /// Rebuild a model saved by [`Self::save`].
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read(&config_path)
            .with_context(|| format!("cannot read model config {}", config_path.display()))?;
        let config: ModelConfig = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not a finprint model config", config_path.display()))?;
        let mut model = Self::new(config, device)?;
        let weights = dir.join(WEIGHTS_FILE);
        model
            .vs
            .load(&weights)
            .with_context(|| format!("cannot load weights {}", weights.display()))?;
        Ok(model)
    }
}

/// Where converted pretrained weights live: `$FINPRINT_WEIGHTS`, else `weights/` in the current
/// folder, else the `weights/` of the source tree this binary was built from
/// (`tools/fetch_weights.sh` fills it).
pub fn weights_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("FINPRINT_WEIGHTS") {
        return dir.into();
    }
    let local = std::path::PathBuf::from("weights");
    if local.is_dir() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights")
}

/// The pretrained weights file of `backbone`, which must exist.
pub fn pretrained_weights(backbone: &str) -> Result<std::path::PathBuf> {
    let v = variant(backbone).with_context(|| format!("unknown backbone {backbone:?}"))?;
    let Some(file) = v.weights_file() else {
        bail!("no pretrained weights are known for {backbone}; train with --pretrained false");
    };
    let path = weights_dir().join(file);
    anyhow::ensure!(
        path.is_file(),
        "pretrained weights {} not found: run `bash tools/fetch_weights.sh`, or train with --pretrained false",
        path.display()
    );
    Ok(path)
}
