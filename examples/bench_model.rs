//! Speed of the assembled model (a backbone of the registry, EfficientNet-Lite0 unless
//! `--backbone` says otherwise → GeM → BN → Linear 512 → ArcFace) on this machine, a JSON
//! line per engine of finprint's (libtorch; the network finprint writes to ONNX run by
//! onnxruntime) for `tools/bench.sh` to set beside PyTorch's and onnxruntime's figures for the
//! same recipe (`tools/bench_model.py`, whose ONNX is PyTorch's export).
//!
//! Without `--images`: inference and training-step images/s on a random batch, each timed per
//! step (median, min, max over `--steps` after a warm-up). With `--images DIR --list FILE`:
//! end to end, the photos named in FILE decoded, resized, normalised and embedded by the
//! library's own path (`embed::embed_by_each`, which `Ensemble::embed` runs: each photo
//! decoded once for all the models, the next batch decoded while the models work), images/s of
//! `--runs` passes after a one-batch warm-up. End to end, `--backbone` may name several
//! (`a,b,c`): an ensemble of one model each, as the frozen mode's members.
//!
//!   cargo run --release --example bench_model -- [--backbone efficientnet_lite0] [--size 224]
//!       [--batch 16] [--threads 2] [--steps 5] [--images DIR --list FILE --runs 3]

mod common;

use clap::Parser;
use common::{stats, vm_hwm_mb};
use finprint::data::image::load_rgb;
use finprint::embed::embed_by_each;
use finprint::model::config::ModelConfig;
use finprint::model::happywhale::HappyWhaleModel;
use finprint::network::{input_tensor, BatchEmbedder, Engine, Network};
use finprint::train::optim::{AdamW, Group};
use indicatif::ProgressBar;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Parser)]
struct Args {
    /// Registry name; end to end, several separated by commas.
    #[arg(long, value_delimiter = ',', default_value = "efficientnet_lite0")]
    backbone: Vec<String>,
    #[arg(long, default_value_t = 224)]
    size: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed steps of the random-batch measurements.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// End to end instead: a folder of photos...
    #[arg(long, requires = "list")]
    images: Option<PathBuf>,
    /// ...and a file naming them (relative to --images), one per line.
    #[arg(long)]
    list: Option<PathBuf>,
    /// Timed passes over the photos.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::fix_threads(args.threads)?;
    let classes = 1000;
    let names: Vec<String> = (0..classes).map(|c| c.to_string()).collect();
    let models = args
        .backbone
        .iter()
        .map(|backbone| {
            let mut cfg = ModelConfig::for_backbone(backbone, names.clone(), vec![1; classes])?;
            cfg.img_size = finprint::transforms::ImgSize::square(args.size as u32);
            HappyWhaleModel::new(cfg, Device::Cpu)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let print = |engine: &str, figures: Vec<(&str, Value)>| {
        let mut line = json!({
            "impl": format!("finprint ({engine})"),
            "backbone": args.backbone.join("+"),
            "size": args.size,
            "batch": args.batch,
            "threads": args.threads,
            "vm_hwm_mb": vm_hwm_mb(),
        });
        for (k, v) in figures {
            line[k] = v;
        }
        println!("{line}");
    };
    match (&args.images, &args.list) {
        (Some(dir), Some(list)) => {
            print("tch", end_to_end(&models, dir, list, &args)?);
            let networks = models
                .into_iter()
                .map(|m| Network::of_model(m, Engine::Onnxruntime))
                .collect::<anyhow::Result<Vec<_>>>()?;
            print("onnxruntime", end_to_end(&networks, dir, list, &args)?);
        }
        _ => match &models[..] {
            [model] => {
                let (tch, onnx) = model_speed(model, classes, &args)?;
                print("tch", tch);
                print("onnxruntime", onnx);
            }
            _ => anyhow::bail!("--backbone names several models: only end to end (--images)"),
        },
    }
    Ok(())
}

/// images/s of each of `steps` calls of `f` after one warm-up call.
fn per_step(steps: usize, batch: usize, f: &mut dyn FnMut()) -> Value {
    f();
    let rates: Vec<f64> = (0..steps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            batch as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    stats(&rates)
}

type Figures = Vec<(&'static str, Value)>;

/// libtorch's inference, tract's and training figures; onnxruntime's inference figures.
fn model_speed(
    model: &HappyWhaleModel,
    classes: usize,
    args: &Args,
) -> anyhow::Result<(Figures, Figures)> {
    let (size, batch) = (args.size, args.batch);
    let chw: Vec<f32> = Tensor::randn(
        [(batch * 3 * size * size) as i64],
        (Kind::Float, Device::Cpu),
    )
    .try_into()?;
    let xs = input_tensor(model, &chw, batch);
    let labels = Tensor::randint(classes as i64, [batch as i64], (Kind::Int64, Device::Cpu));
    let infer = per_step(args.steps, batch, &mut || {
        let _ = model.extract(&xs);
    });
    let mut figures = vec![("inference_img_s", infer)];
    // The same network written to ONNX and run by tract (the light install's engine) and by
    // onnxruntime.
    let bytes = model.to_onnx()?;
    let net = finprint::onnx::OnnxNet::new(&bytes, "bench model", batch)?;
    let tract = per_step(args.steps, batch, &mut || {
        let _ = net.run(&chw, batch).expect("tract runs the model");
    });
    figures.push(("tract_inference_img_s", tract));
    let net = finprint::onnx::OrtNet::new(&bytes, "bench model")?;
    let ort = per_step(args.steps, batch, &mut || {
        let _ = net.run(&chw, batch).expect("onnxruntime runs the model");
    });
    let onnx = vec![("inference_img_s", ort), ("train_img_s", Value::Null)];
    let params = model.vs.trainable_variables();
    let mut opt = AdamW::new(vec![Group {
        params: params
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i.to_string(), p))
            .collect(),
        lr_mult: 1.0,
        weight_decay: 1e-4,
    }]);
    let train = per_step(args.steps, batch, &mut || {
        opt.zero_grad();
        let loss = model
            .forward(&xs, &labels, true)
            .cross_entropy_for_logits(&labels);
        loss.backward();
        opt.step(1e-4);
    });
    figures.push(("train_img_s", train));
    Ok((figures, onnx))
}

fn end_to_end(
    models: &[impl BatchEmbedder],
    dir: &std::path::Path,
    list: &std::path::Path,
    args: &Args,
) -> anyhow::Result<Figures> {
    let names: Vec<String> = std::fs::read_to_string(list)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    anyhow::ensure!(!names.is_empty(), "{} names no photo", list.display());
    let hidden = ProgressBar::hidden();
    let load = |i: usize| Ok(load_rgb(&dir.join(&names[i]))?);
    embed_by_each(
        models,
        args.batch.min(names.len()),
        load,
        args.batch,
        false,
        &hidden,
    )?;
    let mut rates = Vec::new();
    for _ in 0..args.runs.max(1) {
        let t = Instant::now();
        let e = embed_by_each(models, names.len(), load, args.batch, false, &hidden)?;
        rates.push(names.len() as f64 / t.elapsed().as_secs_f64());
        std::hint::black_box(e);
    }
    Ok(vec![
        ("photos", json!(names.len())),
        ("e2e_img_s", stats(&rates)),
    ])
}
