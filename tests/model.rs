//! The assembled model: checkpoints restore exactly, inference equals the plain op-by-op graph,
//! and a few optimiser steps fit a batch.

mod common;

use finprint::model::config::ModelConfig;
use finprint::model::happywhale::HappyWhaleModel;
use finprint::model::layers::pad_same;
use finprint::network::input_tensor;
use finprint::train::optim::{AdamW, Group};
use tch::{Device, Kind, Tensor};

fn config(classes: usize) -> ModelConfig {
    let names = (0..classes).map(|c| format!("id{c}")).collect();
    let mut cfg = ModelConfig::for_backbone("efficientnet_lite0", names, vec![2; classes]).unwrap();
    cfg.img_size = finprint::transforms::ImgSize::square(64);
    cfg.embedding_size = 32;
    cfg
}

#[test]
fn save_then_load_restores_every_weight_and_the_embeddings() {
    let _guard = common::serial();
    tch::manual_seed(0);
    let model = HappyWhaleModel::new(config(5), Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path()).unwrap();
    let back = HappyWhaleModel::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(back.config, model.config);
    let (a, b) = (model.vs.variables(), back.vs.variables());
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs");
    }
    let xs = Tensor::randn([2, 3, 64, 64], (Kind::Float, Device::Cpu));
    let (ea, eb) = (model.extract(&xs), back.extract(&xs));
    assert!(ea.equal(&eb));
    assert_eq!(ea.size(), [2, 32]);
    let norms = ea.norm_scalaropt_dim(2.0, [1i64].as_slice(), false);
    assert!(norms.allclose(
        &Tensor::ones([2], (Kind::Float, Device::Cpu)),
        1e-5,
        1e-5,
        false
    ));
}

#[test]
fn a_missing_checkpoint_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = HappyWhaleModel::load(dir.path(), Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");
}

#[test]
fn adamw_steps_fit_a_small_batch() {
    let _guard = common::serial();
    tch::manual_seed(1);
    let model = HappyWhaleModel::new(config(4), Device::Cpu).unwrap();
    let params = model.vs.trainable_variables();
    let names: Vec<String> = (0..params.len()).map(|i| i.to_string()).collect();
    let mut opt = AdamW::new(vec![Group {
        params: names.into_iter().zip(params).collect(),
        lr_mult: 1.0,
        weight_decay: 0.0,
    }]);
    let xs = Tensor::randn([8, 3, 64, 64], (Kind::Float, Device::Cpu));
    let labels = Tensor::from_slice(&[0i64, 1, 2, 3, 0, 1, 2, 3]);
    let loss_at = |m: &HappyWhaleModel| {
        m.forward(&xs, &labels, true)
            .cross_entropy_for_logits(&labels)
    };
    let first = tch::no_grad(|| loss_at(&model).double_value(&[]));
    for _ in 0..15 {
        opt.zero_grad();
        loss_at(&model).backward();
        opt.step(1e-3);
    }
    let last = tch::no_grad(|| loss_at(&model).double_value(&[]));
    assert!(last < first * 0.5, "loss {first} -> {last}");
}

/// Lite0's embedding op by op, as the reference graph has it: each convolution on a padded copy
/// of its input, then BatchNorm and ReLU6, each a new tensor; GeM, BatchNorm1d, Linear, L2.
fn plain_lite0_embedding(model: &HappyWhaleModel, xs: &Tensor) -> Tensor {
    let vars = model.vs.variables();
    let var = |name: String| &vars[&name];
    let bn = |x: &Tensor, p: &str, eps: f64| {
        x.batch_norm(
            Some(var(format!("{p}.weight"))),
            Some(var(format!("{p}.bias"))),
            Some(var(format!("{p}.running_mean"))),
            Some(var(format!("{p}.running_var"))),
            false,
            0.0,
            eps,
            false,
        )
    };
    let conv_bn = |x: &Tensor, conv: String, norm: String, stride: i64, act: bool| {
        let w = var(format!("{conv}.weight"));
        let (k, groups) = (w.size()[2], if w.size()[1] == 1 { w.size()[0] } else { 1 });
        let y = pad_same(x, k, stride, 1).conv2d(
            w,
            None::<Tensor>,
            [stride; 2],
            [0; 2],
            [1; 2],
            groups,
        );
        let y = bn(&y, &norm, 1e-3);
        if act {
            y.relu6()
        } else {
            y
        }
    };
    let mut x = conv_bn(xs, "model._conv_stem".into(), "model._bn0".into(), 2, true);
    // Lite0's block groups start at these blocks; groups 2, 3, 4 and 6 start with stride 2.
    let (firsts, stride2) = ([0, 1, 3, 5, 8, 11, 15], [1, 3, 5, 11]);
    for i in 0..16 {
        let b = format!("model._blocks.{i}");
        let mut y = x.shallow_clone();
        if vars.contains_key(&format!("{b}._expand_conv.weight")) {
            y = conv_bn(
                &y,
                format!("{b}._expand_conv"),
                format!("{b}._bn0"),
                1,
                true,
            );
        }
        let stride = if stride2.contains(&i) { 2 } else { 1 };
        y = conv_bn(
            &y,
            format!("{b}._depthwise_conv"),
            format!("{b}._bn1"),
            stride,
            true,
        );
        y = conv_bn(
            &y,
            format!("{b}._project_conv"),
            format!("{b}._bn2"),
            1,
            false,
        );
        x = if firsts.contains(&i) { y } else { y + &x };
    }
    x = conv_bn(&x, "model._conv_head".into(), "model._bn1".into(), 1, true);
    let p = var("pooling.p".into());
    let pooled = x
        .clamp_min(1e-6)
        .pow(p)
        .mean_dim(&[-2i64, -1][..], false, Kind::Float)
        .pow(&p.reciprocal());
    let e = bn(&pooled, "neck.0", 1e-5)
        .linear(var("neck.1.weight".into()), Some(var("neck.1.bias".into())));
    &e / e
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12)
}

#[test]
fn inference_embeddings_equal_the_plain_op_by_op_graph() {
    let _guard = common::serial();
    tch::manual_seed(0);
    let mut model = HappyWhaleModel::new(config(5), Device::Cpu).unwrap();
    // BatchNorms away from the identity, so that folding them into the convolutions matters.
    tch::no_grad(|| {
        for (name, mut t) in variables_in_order(&model) {
            let n = t.size();
            let fresh = if name.ends_with("running_var")
                || (name.contains("bn") && name.ends_with("weight"))
            {
                Tensor::rand(n.as_slice(), (Kind::Float, Device::Cpu)) + 0.5
            } else if name.ends_with("running_mean")
                || name.contains("bn") && name.ends_with("bias")
            {
                Tensor::randn(n.as_slice(), (Kind::Float, Device::Cpu)) * 0.1
            } else {
                continue;
            };
            t.copy_(&fresh);
        }
    });
    for size in [64, 67] {
        model.config.img_size = finprint::transforms::ImgSize::square(size);
        let chw: Vec<f32> = Tensor::randn(
            [4 * 3 * size as i64 * size as i64],
            (Kind::Float, Device::Cpu),
        )
        .try_into()
        .unwrap();
        let xs = input_tensor(&model, &chw, 4);
        let got = model.extract(&xs);
        let want = tch::no_grad(|| plain_lite0_embedding(&model, &xs.contiguous()));
        let diff = (&got - &want).abs().max().double_value(&[]);
        eprintln!("{size} px: max |diff| {diff:.2e}");
        assert!(diff <= 1e-4, "{size} px: max |diff| {diff:.2e}");
    }
}

/// The model's variables in their names' order: the map `variables()` gives iterates in a
/// random order each run, and a test's random draws over them must not.
fn variables_in_order(model: &HappyWhaleModel) -> Vec<(String, Tensor)> {
    let mut variables: Vec<_> = model.vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    variables
}

/// Every weight of `model` moved off its initial value, so that folding and every weight's
/// place matter: convolution weights drawn again (He-normal over the fan-in, so that
/// activations keep their scale through depth), the other weights, biases and NFNet's gains
/// `v·(1 + noise) + noise` (noise uniform in ±0.1); then the BatchNorm statistics follow the
/// network's own activations (training-mode passes over random inputs), so that the embedding
/// depends on the input. (NFNet gains drawn at random grow its activations to 1e5, where
/// libtorch and the ONNX runtimes part by 10%; onnxruntime and tract agree with each other.)
fn perturb(model: &HappyWhaleModel) {
    tch::no_grad(|| {
        for (name, mut v) in variables_in_order(model) {
            let size = v.size();
            if size.len() == 4 && name.ends_with("weight") {
                let fan_in = (size[1] * size[2] * size[3]) as f64;
                v.copy_(&(Tensor::randn_like(&v) * (2.0 / fan_in).sqrt()));
            } else if !name.contains("running_") {
                let noise = || Tensor::rand_like(&v) * 0.2 - 0.1;
                v.copy_(&(&v * (noise() + 1.0) + noise()));
            }
        }
        let names = model.vs.variables();
        if !names.keys().any(|n| n.ends_with("running_mean")) {
            return;
        }
        let (h, w) = (model.config.img_size.height, model.config.img_size.width);
        let xs = Tensor::randn(
            [4, 3, i64::from(h), i64::from(w)],
            (Kind::Float, Device::Cpu),
        );
        for _ in 0..200 {
            let _ = model.embed(&xs, true);
        }
    });
}

/// The model written to ONNX and run by each ONNX engine gives its embeddings: the largest
/// |difference| of the L2-normalised rows over a batch of 3 (tract planned for 2: a padded last
/// batch too), by engine.
#[cfg(any(feature = "onnx", feature = "onnxruntime"))]
fn onnx_differences(model: &HappyWhaleModel) -> Vec<(&'static str, f64)> {
    let s = model.config.img_size;
    let (h, w) = (i64::from(s.height), i64::from(s.width));
    let xs = Tensor::randn([3, 3, h, w], (Kind::Float, Device::Cpu));
    let want = model.extract(&xs);
    let spread = (want.get(0) - want.get(1)).abs().max().double_value(&[]);
    eprintln!(
        "{}: unit embeddings of two inputs differ by up to {spread:.3}",
        model.config.backbone
    );
    assert!(spread > 1e-3, "inputs that differ embed alike: {spread}");
    let bytes = model.to_onnx().unwrap();
    let input = Vec::<f32>::try_from(xs.contiguous().view(-1)).unwrap();
    let runs = common::onnx_engines(&bytes, &input, 3);
    assert!(!runs.is_empty());
    runs.into_iter()
        .map(|run| {
            assert_eq!(run.chw, [3, h as usize, w as usize], "{}", run.engine);
            let got = Tensor::from_slice(&run.rows).view([3, run.dim as i64]);
            let got = finprint::model::heads::normalize(&got);
            assert_eq!(got.size(), want.size(), "{}", run.engine);
            (run.engine, (got - &want).abs().max().double_value(&[]))
        })
        .collect()
}

/// Each architecture of the registry (MBConv with ReLU6 and TF "SAME" padding; SiLU,
/// squeeze-excitation and symmetric padding; fused MBConv and conv blocks; NFNet's
/// standardised convolutions, ECA and average-pooled shortcuts), at odd non-square sizes, with
/// the trained neck and as zero-shot features.
#[cfg(any(feature = "onnx", feature = "onnxruntime"))]
#[test]
fn networks_written_to_onnx_give_the_embeddings_libtorch_gives() {
    let _guard = common::serial();
    tch::manual_seed(1);
    let cases = [
        ("efficientnet_lite0", 75, 53, true),
        ("efficientnet_lite0", 64, 64, false),
        ("tf_efficientnet_b0_ns", 61, 70, true),
        ("tf_efficientnetv2_s", 67, 45, true),
        ("eca_nfnet_l0", 59, 66, true),
    ];
    for (backbone, w, h, neck) in cases {
        let mut cfg = ModelConfig::for_backbone(backbone, vec!["a".into()], vec![1]).unwrap();
        cfg.img_size = finprint::transforms::ImgSize {
            width: w,
            height: h,
        };
        cfg.embedding_size = 24;
        let mut model = HappyWhaleModel::new(cfg, Device::Cpu).unwrap();
        perturb(&model);
        if !neck {
            model = model.pooled_features();
        }
        for (engine, diff) in onnx_differences(&model) {
            let case = format!("{backbone} {w}×{h} neck {neck}, {engine}");
            eprintln!("{case}: ONNX differs by up to {diff:.2e}");
            assert!(diff <= 1e-4, "{case}: {diff}");
        }
    }
}
