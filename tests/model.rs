//! The assembled model: checkpoints restore exactly, and a few optimiser steps fit a batch.

mod common;

use finprint::model::happywhale::{HappyWhaleModel, ModelConfig};
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
