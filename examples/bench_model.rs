//! Speed of the assembled model (EfficientNet-Lite0 → GeM → BN → Linear 512 → ArcFace) on this
//! machine: inference and training-step images/s, printed as one JSON line, for
//! `tools/bench_model.sh` to set beside PyTorch's figures for the same recipe.
//!
//!   cargo run --release --example bench_model -- [--size 224] [--batch 16] [--threads 2] [--steps 5]

use finprint::embed::input_tensor;
use finprint::model::happywhale::{HappyWhaleModel, ModelConfig};
use finprint::train::optim::{AdamW, Group};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let (size, batch, threads, steps) = (
        arg("--size", 224),
        arg("--batch", 16),
        arg("--threads", 2),
        arg("--steps", 5),
    );
    tch::set_num_threads(threads as i32);
    tch::manual_seed(0);
    let classes = 1000;
    let names = (0..classes).map(|c| c.to_string()).collect();
    let mut cfg = ModelConfig::for_backbone("efficientnet_lite0", names, vec![1; classes])?;
    cfg.img_size = size as i64;
    let model = HappyWhaleModel::new(cfg, Device::Cpu)?;
    let chw: Vec<f32> = Tensor::randn(
        [(batch * 3 * size * size) as i64],
        (Kind::Float, Device::Cpu),
    )
    .try_into()?;
    let xs = input_tensor(&model, &chw, batch);
    let labels = Tensor::randint(classes as i64, [batch as i64], (Kind::Int64, Device::Cpu));

    let timed = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..steps {
            f();
        }
        (steps * batch) as f64 / t.elapsed().as_secs_f64()
    };
    let infer = timed(&mut || {
        let _ = model.extract(&xs);
    });
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
    let train = timed(&mut || {
        opt.zero_grad();
        let loss = model
            .forward(&xs, &labels, true)
            .cross_entropy_for_logits(&labels);
        loss.backward();
        opt.step(1e-4);
    });
    println!(
        "{{\"impl\": \"finprint (tch)\", \"size\": {size}, \"batch\": {batch}, \"threads\": {threads}, \"inference_img_s\": {infer:.2}, \"train_img_s\": {train:.2}}}"
    );
    Ok(())
}
