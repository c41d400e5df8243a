//! Embeddings: photos through a trained model to L2-normalised vectors (optionally the mean of
//! the photo and its mirror image), and the file that keeps them with their image names.
//!
//! File layout: safetensors with one f32 tensor `embeddings` `[N, D]`, and the image names as
//! a JSON list in the metadata entry `names` (row i belongs to `names[i]`).

use crate::crops::CropSet;
use crate::crops::LoadedCropSet;
use crate::data::image::load_rgb;
use crate::fsio::{f32_safetensors, read_f32};
use crate::linalg::normalize_row;
use crate::network::BatchEmbedder;
use crate::runs::{Ensemble, ModelArgs, ModelSpec, Whitened};
use crate::runtime::prefetched;
use crate::transforms::{batch_views, Pipeline};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use indicatif::ProgressBar;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Row-major `[names.len(), dim]` unit vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub names: Vec<String>,
    pub dim: usize,
    pub vectors: Vec<f32>,
}

impl Embeddings {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..(i + 1) * self.dim]
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let metadata = HashMap::from([("names".to_string(), serde_json::to_string(&self.names)?)]);
        let shape = vec![self.names.len(), self.dim];
        let data = f32_safetensors(&[("embeddings", shape, &self.vectors)], Some(metadata))
            .context("serialising embeddings")?;
        crate::fsio::write_bytes_atomic(path, &data)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let bad = |what: &str| {
            anyhow::anyhow!(
                "{}: not a finprint embeddings file ({what})",
                path.display()
            )
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|_| bad("header"))?;
        let names: Vec<String> = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("names"))
            .and_then(|n| serde_json::from_str(n).ok())
            .ok_or_else(|| bad("no names"))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|_| bad("tensors"))?;
        let (shape, vectors) = read_f32(&st, "embeddings", path)?;
        if shape.len() != 2 || shape[0] != names.len() {
            bail!(bad("shape"));
        }
        Ok(Self {
            names,
            dim: shape[1],
            vectors,
        })
    }
}

/// Embed `count` photos, `load(i)` giving photo i, in batches of `batch`, decoding the next
/// batch while the model works.
pub fn embed_images<M: BatchEmbedder, F>(
    model: &M,
    count: usize,
    load: F,
    batch: usize,
    flip_tta: bool,
    progress: &ProgressBar,
) -> Result<Vec<f32>>
where
    F: Fn(usize) -> Result<RgbImage> + Sync,
{
    let mut parts = embed_by_each(
        std::slice::from_ref(model),
        count,
        load,
        batch,
        flip_tta,
        progress,
    )?;
    Ok(parts.pop().unwrap_or_default())
}

/// [`embed_images`] by several models at once: `parts[m]` is model m's `[count, E_m]`. Each
/// photo is decoded once for all of them, and resized once for the models that take the same
/// input (size, fit, mean and std).
pub fn embed_by_each<M: BatchEmbedder, F>(
    models: &[M],
    count: usize,
    load: F,
    batch: usize,
    flip_tta: bool,
    progress: &ProgressBar,
) -> Result<Vec<Vec<f32>>>
where
    F: Fn(usize) -> Result<RgbImage> + Sync,
{
    let input = |m: &M| {
        let c = m.config();
        (
            c.img_size,
            c.fit,
            c.mean.map(|v| v as f32),
            c.std.map(|v| v as f32),
        )
    };
    let mut inputs = Vec::new();
    let view_of: Vec<usize> = models
        .iter()
        .map(|m| {
            let key = input(m);
            inputs.iter().position(|k| *k == key).unwrap_or_else(|| {
                inputs.push(key);
                inputs.len() - 1
            })
        })
        .collect();
    let pipelines: Vec<Pipeline> = inputs
        .iter()
        .map(|&(size, fit, mean, std)| Pipeline::eval(size, fit, mean, std))
        .collect::<Result<_>>()?;
    let batch = batch.max(1);
    let batches = count.div_ceil(batch);
    let mut parts: Vec<Vec<f32>> = models
        .iter()
        .map(|m| Vec::with_capacity(count * m.config().embedding_size as usize))
        .collect();
    progress.set_length(count as u64);
    prefetched(
        batches,
        2,
        |b| {
            let start = b * batch;
            let n = batch.min(count - start);
            batch_views(&pipelines, n, 0, |i| load(start + i)).map(|views| (views, n))
        },
        |_, (views, n)| {
            for ((model, part), &view) in models.iter().zip(&mut parts).zip(&view_of) {
                part.extend(model.embed_unit(&views[view], n, flip_tta)?);
            }
            progress.inc(n as u64);
            Ok(())
        },
    )?;
    Ok(parts)
}

impl Ensemble {
    /// Fused unit embeddings of `count` photos, `load(i)` giving photo i (decoded once for all
    /// the members).
    pub fn embed<F>(
        &self,
        count: usize,
        load: F,
        batch: usize,
        flip_tta: bool,
        progress: &ProgressBar,
    ) -> Result<Vec<f32>>
    where
        F: Fn(usize) -> Result<RgbImage> + Sync,
    {
        let parts = embed_by_each(&self.models, count, load, batch, flip_tta, progress)?;
        fuse_members(&parts, &self.weights, &self.whitened, count)
    }
}

/// How photos are embedded: the option group of every command that embeds.
#[derive(Clone, Debug, clap::Args)]
pub struct EmbedOptions {
    /// Embed each photo as the mean of its embedding and its mirror image's.
    #[arg(long)]
    pub flip_tta: bool,
    /// Photos per batch through the model.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Crop sets embedded and fused by share (NAME=BOXES.csv[+MORE.csv][:SHARE] or full), their
    /// boxes covering the photos [default: the set the first model validated on; whole photos
    /// for --zero-shot].
    #[arg(long, value_delimiter = ',')]
    pub crops: Vec<CropSet>,
}

impl EmbedOptions {
    /// The crop sets to embed: those given, else the ones `spec`'s models validated on.
    pub fn crop_sets(&self, spec: &ModelSpec) -> Result<Vec<LoadedCropSet>> {
        let crops = match self.crops.is_empty() {
            true => spec.validation_crops()?,
            false => self.crops.clone(),
        };
        crate::crops::sets::load_sets(&crops)
    }

    /// Unit embeddings of the photos `names` in `dir` (see [`embed_crops`]).
    pub fn embed(
        &self,
        ensemble: &Ensemble,
        sets: &[LoadedCropSet],
        dir: &Path,
        names: &[String],
        progress: &ProgressBar,
    ) -> Result<Vec<f32>> {
        embed_crops(
            ensemble,
            sets,
            dir,
            names,
            self.batch_size,
            self.flip_tta,
            progress,
        )
    }
}

/// `finprint embed`.
#[derive(Clone, Debug, clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder of photos (.jpg, .jpeg, .png).
    #[arg(long)]
    pub images: PathBuf,
    /// The embeddings file to write (safetensors, image names in its metadata).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub options: EmbedOptions,
}

/// Embed every photo of `args.images` and write the embeddings file; returns what was written.
pub fn run(args: &EmbedArgs, progress: &ProgressBar) -> Result<Embeddings> {
    let spec = args.model.spec();
    let ensemble = spec.load(None)?;
    let sets = args.options.crop_sets(&spec)?;
    let names = crate::data::image::list_photos(&args.images)?;
    let vectors = args
        .options
        .embed(&ensemble, &sets, &args.images, &names, progress)?;
    let embeddings = Embeddings {
        dim: vectors.len() / names.len().max(1),
        names,
        vectors,
    };
    embeddings.save(&args.out)?;
    Ok(embeddings)
}

/// `finprint export-onnx`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExportOnnxArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Folder to write the networks to: one `M-BACKBONE-SIZE.onnx` per network of the models
    /// (M counts from 0 in the order embeddings are fused), its config beside it in
    /// `M-BACKBONE-SIZE.json`. A checkpoint's `onnx/` folder is what `--engine tract` and `onnxruntime` read.
    #[arg(long)]
    pub out: PathBuf,
}

/// Write each network of the models to ONNX from finprint's own layers (see [`write_onnx`]).
/// Returns the files written.
#[cfg(feature = "torch")]
pub fn export_onnx(args: &ExportOnnxArgs) -> Result<Vec<PathBuf>> {
    // Written from libtorch's modules, whichever engine --engine names.
    let libtorch = crate::network::Engine::Libtorch;
    let ensemble = match args.model.spec() {
        ModelSpec::Runs(runs, _) => Ensemble::load(&runs, libtorch)?,
        ModelSpec::ZeroShot(z, _) => Ensemble::zero_shot(&z, libtorch)?,
    };
    write_onnx(&ensemble, &args.out)
}

/// Write network `M` of `ensemble` into `out` as `M-BACKBONE-SIZE.onnx` (input `input`
/// `[N, 3, H, W]`, the photo resized and normalised as its config says; output the embedding
/// before L2 normalisation) and its config beside it as `M-BACKBONE-SIZE.json`: what the ONNX
/// engines read. Returns the ONNX files.
#[cfg(feature = "torch")]
pub fn write_onnx(ensemble: &Ensemble, out: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    ensemble
        .models
        .iter()
        .enumerate()
        .map(|(i, network)| {
            let c = &network.config;
            let model = network
                .model()
                .context("only networks libtorch runs can be written to ONNX")?;
            let stem = out.join(crate::network::onnx_name(i, &c.backbone, c.img_size));
            let path = stem.with_extension("onnx");
            crate::fsio::write_bytes_atomic(&path, &model.to_onnx()?)?;
            let config = serde_json::to_vec_pretty(c)?;
            crate::fsio::write_bytes_atomic(&stem.with_extension("json"), &config)?;
            Ok(path)
        })
        .collect()
}

/// Unit embeddings of the photos `names` in `dir`: the ensemble's embedding of each crop set's
/// crop, fused with the sets' shares as weights.
pub fn embed_crops(
    ensemble: &Ensemble,
    sets: &[LoadedCropSet],
    dir: &Path,
    names: &[String],
    batch: usize,
    flip_tta: bool,
    progress: &ProgressBar,
) -> anyhow::Result<Vec<f32>> {
    let mut parts = Vec::with_capacity(sets.len());
    for set in sets {
        let load = |i: usize| Ok(set.apply(&names[i], &load_rgb(&dir.join(&names[i]))?));
        parts.push(ensemble.embed(names.len(), load, batch, flip_tta, progress)?);
    }
    let weights: Vec<f32> = sets.iter().map(|s| s.set.share as f32).collect();
    Ok(fuse(&parts, &weights, names.len()))
}

/// The members' unit embeddings `parts` fused as an ensemble does: each whitened group's parts
/// fused with equal weights and whitened into one part (weighted as its first member), then
/// all parts fused with their weights (see [`fuse`]).
fn fuse_members(
    parts: &[Vec<f32>],
    weights: &[f32],
    whitened: &[Whitened],
    count: usize,
) -> Result<Vec<f32>> {
    if whitened.is_empty() {
        return Ok(fuse(parts, weights, count));
    }
    let (mut fused, mut kept) = (Vec::new(), Vec::new());
    for (i, part) in parts.iter().enumerate() {
        match whitened
            .iter()
            .find(|g| (g.first..g.first + g.count).contains(&i))
        {
            Some(g) if g.first == i => {
                let group = fuse(&parts[i..i + g.count], &vec![1.0; g.count], count);
                fused.push(g.whitening.apply(&group)?);
            }
            Some(_) => continue,
            None => fused.push(part.clone()),
        }
        kept.push(weights[i]);
    }
    Ok(fuse(&fused, &kept, count))
}

/// Concatenate per-model unit embeddings (`parts[m]` is row-major `[count, d_m]`) with
/// `weights`, and normalise each fused row.
pub fn fuse(parts: &[Vec<f32>], weights: &[f32], count: usize) -> Vec<f32> {
    if parts.len() == 1 {
        return parts[0].clone();
    }
    let dims: Vec<usize> = parts.iter().map(|p| p.len() / count.max(1)).collect();
    let total: usize = dims.iter().sum();
    let mut out = Vec::with_capacity(total * count);
    for i in 0..count {
        let start = out.len();
        for ((p, &d), &w) in parts.iter().zip(&dims).zip(weights) {
            out.extend(p[i * d..(i + 1) * d].iter().map(|v| v * w));
        }
        normalize_row(&mut out[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::whitening::Whitening;

    #[cfg(feature = "torch")]
    #[test]
    fn members_share_each_decoded_photo_and_embed_as_alone() {
        use crate::model::config::ModelConfig;
        use crate::model::happywhale::HappyWhaleModel;
        use crate::transforms::{Fit, ImgSize};
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let model = |size: ImgSize, fit: Fit| {
            let mut cfg =
                ModelConfig::for_backbone("efficientnet_lite0", vec!["w".into()], vec![1])
                    .expect("registry");
            (cfg.img_size, cfg.fit) = (size, fit);
            HappyWhaleModel::new(cfg, tch::Device::Cpu).expect("model")
        };
        // The first two take the same input (one resize for both), the third its own.
        let models = [
            model(ImgSize::square(32), Fit::Squash),
            model(ImgSize::square(32), Fit::Squash),
            model(
                ImgSize {
                    width: 48,
                    height: 32,
                },
                Fit::Pad,
            ),
        ];
        let photos: Vec<RgbImage> = (0..5u32)
            .map(|k| {
                RgbImage::from_fn(40 + 3 * k, 30, |x, y| {
                    image::Rgb([(x * k) as u8, y as u8, 9])
                })
            })
            .collect();
        let loads = AtomicUsize::new(0);
        let load = |i: usize| {
            loads.fetch_add(1, Relaxed);
            Ok(photos[i].clone())
        };
        let hidden = ProgressBar::hidden();
        let parts = embed_by_each(&models, photos.len(), load, 2, false, &hidden).expect("embed");
        assert_eq!(
            loads.swap(0, Relaxed),
            photos.len(),
            "each photo decoded once"
        );
        for (model, part) in models.iter().zip(&parts) {
            let alone = embed_images(model, photos.len(), load, 2, false, &hidden).expect("embed");
            assert_eq!(part, &alone);
        }
        assert_ne!(parts[0], parts[1], "two models, two embeddings");
    }

    #[test]
    fn embeddings_round_trip_through_their_file() {
        let e = Embeddings {
            names: vec!["a.jpg".into(), "b,c.jpg".into()],
            dim: 3,
            vectors: vec![1.0, 0.0, 0.0, 0.0, 0.6, 0.8],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.safetensors");
        e.save(&path).unwrap();
        assert_eq!(Embeddings::load(&path).unwrap(), e);
        assert_eq!(e.row(1), &[0.0, 0.6, 0.8]);
        std::fs::write(&path, b"garbage").unwrap();
        let err = Embeddings::load(&path).unwrap_err().to_string();
        assert!(err.contains("e.safetensors"), "{err}");
    }

    #[test]
    fn a_whitened_group_becomes_one_part_beside_the_other_members() {
        // One photo; members 0 and 1 (1-d each) form a group whose whitening subtracts
        // (0, 1/√2) and swaps the two axes; member 2 (1-d) stays as it is, at weight 2.
        let r = std::f32::consts::FRAC_1_SQRT_2;
        let group = Whitened {
            first: 0,
            count: 2,
            whitening: Whitening {
                mean: vec![0.0, r],
                proj: vec![0.0, 1.0, 1.0, 0.0],
                dim_in: 2,
                dim_out: 2,
            },
        };
        let parts = [vec![1.0], vec![1.0], vec![1.0]];
        let out = fuse_members(&parts, &[1.0, 1.0, 2.0], &[group], 1).unwrap();
        // Group: fuse → (r, r); minus mean → (r, 0); swapped → (0, r); unit → (0, 1).
        // Then (0, 1) at weight 1 beside 1 at weight 2: (0, 1, 2) / √5.
        let s = 5f32.sqrt();
        let want = [0.0, 1.0 / s, 2.0 / s];
        assert!(
            out.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{out:?}"
        );
    }

    #[test]
    fn fused_cosine_is_the_weighted_mean_of_the_models_cosines() {
        // Two photos, two models of dimension 2 and 1; model cosines 0.6 and -1.
        let a = vec![1.0, 0.0, 0.6, 0.8];
        let b = vec![1.0, -1.0];
        let f = fuse(&[a, b], &[1.0, 1.0], 2);
        let cos: f32 = f[..3].iter().zip(&f[3..]).map(|(x, y)| x * y).sum();
        assert!((cos - (0.6 - 1.0) / 2.0).abs() < 1e-6, "{cos}");
        let norm: f32 = f[..3].iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }
}
