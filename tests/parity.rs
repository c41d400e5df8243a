//! Parity of the backbones with their reference implementations (timm 1.0.31 and
//! efficientnet-lite-pytorch 0.1.0), from the fixtures `tools/make_fixtures.py` writes in
//! `tests/fixtures/`: reduced-size variants with random weights must give the reference feature
//! maps, and every full-size variant of the registry must have the reference's variable names and
//! shapes. Also the registry itself.

mod common;

use finprint::model::efficientnet::{efficientnet, EfficientNetConfig};
use finprint::model::efficientnet_lite::{efficientnet_lite, LiteConfig};
use finprint::model::nfnet::{nfnet, NfNetConfig};
use finprint::model::{self, Backbone};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

use common::serial;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read_json(name: &str) -> Value {
    let path = fixture(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn build(config: &Value, p: &nn::Path) -> Box<dyn Backbone> {
    let f = |key: &str| {
        config[key]
            .as_f64()
            .unwrap_or_else(|| panic!("no {key} in {config}"))
    };
    let four = |key: &str| -> [i64; 4] {
        serde_json::from_value(config[key].clone()).unwrap_or_else(|e| panic!("{key}: {e}"))
    };
    match config["family"].as_str() {
        Some("tf_efficientnet_b") => Box::new(efficientnet(
            p,
            &EfficientNetConfig::TF_B0
                .with_multipliers(f("channel_multiplier"), f("depth_multiplier")),
        )),
        Some("tf_efficientnetv2_s") => Box::new(efficientnet(
            p,
            &EfficientNetConfig::TF_V2_S
                .with_multipliers(f("channel_multiplier"), f("depth_multiplier")),
        )),
        Some("efficientnet_lite") => Box::new(efficientnet_lite(
            p,
            &LiteConfig::new(f("width"), f("depth")),
        )),
        Some("eca_nfnet") => Box::new(nfnet(
            p,
            &NfNetConfig {
                depths: four("depths").map(|d| d as usize),
                channels: four("channels"),
                stem_chs: f("stem_chs") as i64,
                group_size: f("group_size") as i64,
                ch_div: f("ch_div") as i64,
                feat_mult: f("feat_mult"),
                ..NfNetConfig::ECA_NFNET_L0
            },
        )),
        other => panic!("unknown family {other:?}"),
    }
}

/// Largest absolute difference, and the largest absolute reference value.
fn max_diff(got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.size(), want.size());
    let diff = (got - want).abs().max().double_value(&[]);
    (diff, want.abs().max().double_value(&[]))
}

/// Build the fixture's variant, load its weights and compare eval-mode features with the
/// reference's on an even and an odd input size. The tolerance is the model issue's 1e-4 of the
/// largest reference value (at least 1e-4 absolute): float32 rounding differs between the two
/// graphs, and eval mode folds each BatchNorm into its convolution.
fn check_fixture(name: &str) {
    let _serial = serial();
    let config = read_json(&format!("{name}.json"));
    let weights = fixture(&format!("{name}.safetensors"));
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = build(&config, &vs.root());
    vs.load(&weights)
        .unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&weights)
        .unwrap_or_else(|e| panic!("{}: {e}", weights.display()))
        .into_iter()
        .collect();
    let ours = vs.variables();
    let unused: Vec<&String> = tensors
        .keys()
        .filter(|k| !k.starts_with("__") && !ours.contains_key(*k))
        .collect();
    assert!(
        unused.is_empty(),
        "{name}: reference variables finprint lacks: {unused:?}"
    );
    for (input, features) in [
        ("__input__", "__features__"),
        ("__input_odd__", "__features_odd__"),
    ] {
        let xs = &tensors[input];
        let ys = tch::no_grad(|| net.forward_features(xs, false));
        let (diff, scale) = max_diff(&ys, &tensors[features]);
        eprintln!(
            "{name} {:?}: max |diff| {diff:.2e}, max |reference| {scale:.3}",
            xs.size()
        );
        assert!(
            diff <= 1e-4 * scale.max(1.),
            "{name} {input}: max |diff| {diff} (scale {scale})"
        );
        // Stages run piecewise give the same result as the whole network.
        let n = net.num_stages();
        let split = tch::no_grad(|| {
            let mid = net.forward_stages(xs, false, 0, 3);
            net.forward_stages(&net.forward_stages(&mid, false, 3, n - 1), false, n - 1, n)
        });
        assert_eq!(max_diff(&split, &ys).0, 0., "{name}: split stages differ");
    }
}

#[test]
fn tf_efficientnet_matches_timm() {
    check_fixture("tf_efficientnet_tiny");
}

#[test]
fn tf_efficientnetv2_matches_timm() {
    check_fixture("tf_efficientnetv2_s_tiny");
}

#[test]
fn efficientnet_lite_matches_the_reference_package() {
    check_fixture("efficientnet_lite_tiny");
}

#[test]
fn eca_nfnet_matches_timm() {
    check_fixture("eca_nfnet_tiny");
}

#[test]
fn every_variant_has_the_reference_variables() {
    let _serial = serial();
    let shapes = read_json("shapes.json");
    for v in model::variants() {
        let want: BTreeMap<String, Vec<i64>> = serde_json::from_value(shapes[v.name].clone())
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        let vs = nn::VarStore::new(Device::Cpu);
        let net = v.build(&vs.root());
        let got: BTreeMap<String, Vec<i64>> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: missing {missing:?}, extra {extra:?}",
            v.name
        );
        for (k, shape) in &want {
            assert_eq!(&got[k], shape, "{}: {k}", v.name);
        }
        let head = want
            .get("conv_head.weight")
            .or(want.get("_conv_head.weight"))
            .or(want.get("final_conv.weight"))
            .expect("head");
        assert_eq!(net.num_features(), head[0], "{}", v.name);
        // Stem, block stages, head.
        let stages = match v.arch {
            model::Arch::NfNet(_) => 6,
            _ if v.name.starts_with("tf_efficientnetv2_s") => 8,
            _ => 9,
        };
        assert_eq!(net.num_stages(), stages, "{}", v.name);
    }
}

#[test]
fn registry_builds_by_name_and_refuses_unknown_names() {
    let _serial = serial();
    assert_eq!(model::variants().len(), 19);
    let lite0 = model::variant("efficientnet_lite0").expect("lite0");
    assert_eq!(
        (lite0.input_size, lite0.weights_file()),
        (224, Some("efficientnet_lite0.safetensors".to_string()))
    );
    assert_eq!(
        model::variant("tf_efficientnet_b3_ns").map(|v| v.input_size),
        Some(300)
    );
    assert_eq!(
        model::variant("eca_nfnet_l2").map(|v| v.input_size),
        Some(320)
    );
    let vs = nn::VarStore::new(Device::Cpu);
    let net = model::build_backbone("tf_efficientnet_b0_ns", &vs.root()).expect("b0");
    assert_eq!(net.num_features(), 1280);
    let ys = tch::no_grad(|| {
        net.forward_features(
            &Tensor::zeros([1, 3, 65, 63], (Kind::Float, Device::Cpu)),
            false,
        )
    });
    assert_eq!(ys.size(), [1, 1280, 3, 2]);
    let err = model::build_backbone("resnet50", &vs.root())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("resnet50")
            && err.contains("efficientnet_lite0")
            && err.contains("tf_efficientnetv2_l"),
        "{err}"
    );
}

#[test]
fn normalisation_follows_each_variant() {
    let pixels = Tensor::from_slice(&[127u8, 127, 127, 127, 255, 0]).view([2, 3, 1, 1]);
    let lite = model::variant("efficientnet_lite0")
        .expect("lite0")
        .normalize(&pixels);
    let got: Vec<f32> = lite.flatten(0, -1).try_into().expect("floats");
    // (x − 127) / 128: the first image is grey 127 everywhere, the second 127, 255, 0 per channel.
    let want = [0., 0., 0., 0., 1., -127. / 128.];
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    let b0 = model::variant("tf_efficientnet_b0_ns")
        .expect("b0")
        .normalize(&pixels);
    let red: f32 = b0.double_value(&[1, 1, 0, 0]) as f32;
    assert!((red - (1. - 0.456) / 0.224).abs() < 1e-5, "{red}");
}
