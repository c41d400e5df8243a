"""Write the reference fixtures of tests/parity.rs (and one of tests/pretrained.rs).

Reference tools only, never finprint dependencies. Once:

    .venv/bin/pip install timm==1.0.31 torchvision==0.28.0 safetensors numpy
    .venv/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0

then `.venv/bin/python -W ignore tools/make_fixtures.py`. It writes to tests/fixtures/:

* `<name>.safetensors` + `<name>.json` for reduced-size variants built by the reference code
  (timm's `_gen_efficientnet` / `_gen_efficientnetv2_s` / `NormFreeNet`, the Lite package's
  `EfficientNet`) with seeded random weights and BatchNorm statistics set near each layer's actual
  input statistics, then perturbed (see `calibrate`; NFNets have none, and their convolutions'
  `gain`s are drawn too, so no residual branch starts at zero). Besides the weights (timm or
  lukemelas names, no `num_batches_tracked`, no classifier) the file holds `__input__`
  (2×3×64×64) and `__input_odd__` (2×3×57×71, so TF "SAME" padding is asymmetric) and the
  eval-mode feature maps before pooling, `__features__` and `__features_odd__`. The JSON holds
  the configuration.
* `shapes.json`: name → shape of every backbone variable of every full-size variant of
  finprint's registry, as the reference code builds them (on the meta device, so no memory).
* `lite0_pretrained.safetensors` (when weights/efficientnet_lite0.safetensors exists): ImageNet
  logits of the real Lite0 for a deterministic 2×3×224×224 pixel pattern (see `pattern`).
"""

import json
import os

import efficientnet_lite_pytorch
import timm
import torch
from efficientnet_lite_pytorch import EfficientNet as LiteNet
from safetensors.torch import load_file, save_file
from timm.models.efficientnet import _gen_efficientnet, _gen_efficientnetv2_l, _gen_efficientnetv2_m, _gen_efficientnetv2_s
from timm.models.nfnet import NormFreeNet, _nfnet_cfg, model_cfgs as nf_cfgs

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TF = dict(bn_eps=1e-3, pad_type="same")


def randomise(model, seed):
    """Seeded random weights with BatchNorm statistics that matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith(".gain"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or name.endswith(".bias") and t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var") or t.dim() == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)


def calibrate(model, features, g):
    """Set each BatchNorm's running statistics near those of its actual input (perturbed, so they
    matter), in forward order, so that activations stay O(1) through the random network."""

    def hook(bn, inputs):
        x = inputs[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        bn.running_mean.copy_(mean + torch.randn(mean.shape, generator=g) * 0.1 * var.sqrt())
        bn.running_var.copy_(var * (torch.rand(var.shape, generator=g) + 0.5))

    hooks = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.eval()
    with torch.no_grad():
        features(torch.randn(4, 3, 64, 64, generator=g))
    for h in hooks:
        h.remove()


def backbone_state(model):
    skip = ("num_batches_tracked", "classifier.", "_fc.", "head.fc.")
    return {k: v.contiguous() for k, v in model.state_dict().items() if not any(s in k for s in skip)}


def write_fixture(name, model, features, config, seed):
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    calibrate(model, features, g)
    x = torch.randn(2, 3, 64, 64, generator=g)
    x_odd = torch.randn(2, 3, 57, 71, generator=g)
    with torch.no_grad():
        tensors = backbone_state(model)
        tensors.update({
            "__input__": x,
            "__features__": features(x),
            "__input_odd__": x_odd,
            "__features_odd__": features(x_odd),
        })
    save(tensors, name + ".safetensors")
    scale = tensors["__features__"].abs().max().item()
    config.update({"max_abs_feature": scale, "shape": list(tensors["__features__"].shape)})
    with open(os.path.join(OUT, name + ".json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")
    print(f"make_fixtures: {name}: {sum(v.numel() for v in tensors.values())} floats, max |feature| {scale:.3g}")


def save(tensors, name):
    path = os.path.join(OUT, name)
    save_file(tensors, path)
    os.chmod(path, 0o644)


def timm_config(family, channel, depth):
    return {"family": family, "channel_multiplier": channel, "depth_multiplier": depth,
            "reference": f"timm {timm.__version__}"}


def tiny_fixtures():
    torch.manual_seed(0)
    b = _gen_efficientnet("tf_efficientnet_b0", channel_multiplier=0.35, depth_multiplier=0.5, **TF)
    write_fixture("tf_efficientnet_tiny", b, b.forward_features,
                  timm_config("tf_efficientnet_b", 0.35, 0.5), seed=1)
    v2 = _gen_efficientnetv2_s("tf_efficientnetv2_s", channel_multiplier=0.25, depth_multiplier=0.25, **TF)
    write_fixture("tf_efficientnetv2_s_tiny", v2, v2.forward_features,
                  timm_config("tf_efficientnetv2_s", 0.25, 0.25), seed=2)
    # image_size=None: dynamic TF "SAME" padding, as finprint pads (static padding is the same at
    # the configured size only).
    lite = LiteNet.from_name("efficientnet-lite0", image_size=None, width_coefficient=0.25, depth_coefficient=0.5)
    write_fixture("efficientnet_lite_tiny", lite, lite.extract_features,
                  {"family": "efficientnet_lite", "width": 0.25, "depth": 0.5,
                   "reference": f"efficientnet-lite-pytorch {efficientnet_lite_pytorch.__version__}"},
                  seed=3)
    # The eca_nfnet_l* blocks (ECA, grouped 3×3s, a deep-quad stem, downsampling shortcuts),
    # narrow and shallow: 4 channels a group, channels rounded to 4.
    nf = dict(depths=(1, 2, 2, 1), channels=(16, 24, 32, 48), stem_chs=8, group_size=4, ch_div=4, feat_mult=1.5)
    cfg = _nfnet_cfg(depths=nf["depths"], channels=nf["channels"], feat_mult=nf["feat_mult"],
                     group_size=nf["group_size"], bottle_ratio=0.25, attn_layer="eca", attn_kwargs=dict(),
                     act_layer="silu")
    net = NormFreeNet(cfg, stem_chs=nf["stem_chs"], ch_div=nf["ch_div"])
    write_fixture("eca_nfnet_tiny", net, net.forward_features,
                  {"family": "eca_nfnet", **nf, "reference": f"timm {timm.__version__}"}, seed=4)


def shapes():
    builders = {f"efficientnet_lite{n}": lambda n=n: LiteNet.from_name(f"efficientnet-lite{n}") for n in range(5)}
    mult = [(1.0, 1.0), (1.0, 1.1), (1.1, 1.2), (1.2, 1.4), (1.4, 1.8), (1.6, 2.2), (1.8, 2.6), (2.0, 3.1)]
    for n, (c, d) in enumerate(mult):
        builders[f"tf_efficientnet_b{n}_ns"] = lambda n=n, c=c, d=d: _gen_efficientnet(
            f"tf_efficientnet_b{n}", channel_multiplier=c, depth_multiplier=d, **TF)
    builders["tf_efficientnetv2_s"] = lambda: _gen_efficientnetv2_s("tf_efficientnetv2_s", **TF)
    builders["tf_efficientnetv2_m"] = lambda: _gen_efficientnetv2_m("tf_efficientnetv2_m", **TF)
    builders["tf_efficientnetv2_l"] = lambda: _gen_efficientnetv2_l("tf_efficientnetv2_l", **TF)
    for n in range(3):
        builders[f"eca_nfnet_l{n}"] = lambda n=n: NormFreeNet(nf_cfgs[f"eca_nfnet_l{n}"])
    out = {}
    with torch.device("meta"):
        for name, build in builders.items():
            out[name] = {k: list(v.shape) for k, v in backbone_state(build()).items()}
    with open(os.path.join(OUT, "shapes.json"), "w") as f:
        f.write("{\n")
        f.write(",\n".join(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in out.items()))
        f.write("\n}\n")
    print(f"make_fixtures: shapes.json: {len(out)} variants")


def pattern():
    """Deterministic 2×3×224×224 pixels in 0..255: ((i · 7919) mod 251) over the flat index."""
    return (torch.arange(2 * 3 * 224 * 224, dtype=torch.int64) * 7919 % 251).float().view(2, 3, 224, 224)


def lite0_pretrained():
    path = os.path.join(ROOT, "weights", "efficientnet_lite0.safetensors")
    if not os.path.exists(path):
        print("make_fixtures: skipped lite0_pretrained (run tools/fetch_weights.sh)")
        return
    model = LiteNet.from_name("efficientnet-lite0", image_size=None)
    model.load_state_dict(load_file(path), strict=False)
    model.eval()
    with torch.no_grad():
        logits = model((pattern() - 127.0) / 128.0)
    save({"__logits__": logits.contiguous()}, "lite0_pretrained.safetensors")
    print(f"make_fixtures: lite0_pretrained: top-1 {logits.argmax(1).tolist()}")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    tiny_fixtures()
    shapes()
    lite0_pretrained()
