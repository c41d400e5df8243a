"""The PyTorch and onnxruntime references for `examples/bench_model.rs`: the same recipe,
a backbone (timm's; `--backbone`, finprint's registry name) → GeM → BN → Linear 512 → ArcFace,
at the same input size, batch and threads. One JSON line per implementation and measurement, for
`tools/bench.sh`.

Without --images: model images/s on a random batch, inference (L2-normalised embeddings) and
AdamW training steps, each timed per step (median, min, max over --steps after a warm-up), for
PyTorch eager channels-last and contiguous, and onnxruntime inference of the exported network.

With --images DIR --list FILE: end to end, photos decoded (PIL, EXIF-rotated), resized
bilinearly to size × size, normalised, batched by a DataLoader with one worker process (what a
PyTorch user writes), and embedded, by PyTorch (channels-last) and onnxruntime; images/s of
--runs passes over the list after a one-batch warm-up. Several backbones (`--backbone a,b,c`,
end to end only): an ensemble of one model each, every photo decoded once and embedded by all.
"""
import argparse
import io
import json
import math
import os
import statistics
import time
import warnings

warnings.filterwarnings("ignore")
import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# finprint's registry names → timm's (same architecture; weights are random here).
TIMM = {"efficientnet_lite0": "efficientnet_lite0", "efficientnet_lite1": "efficientnet_lite1",
        "efficientnet_lite2": "efficientnet_lite2", "tf_efficientnet_b0_ns": "tf_efficientnet_b0",
        "eca_nfnet_l0": "eca_nfnet_l0", "tf_efficientnet_b6_ns": "tf_efficientnet_b6",
        "tf_efficientnetv2_l": "tf_efficientnetv2_l", "eca_nfnet_l2": "eca_nfnet_l2"}


class GeM(nn.Module):
    def __init__(self, p=3.0, eps=1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class ArcFace(nn.Module):
    def __init__(self, d, n, s=30.0, m=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d))
        nn.init.xavier_uniform_(self.weight)
        self.s, self.cos_m, self.sin_m = s, math.cos(m), math.sin(m)
        self.th, self.mm = math.cos(math.pi - m), math.sin(math.pi - m) * m

    def forward(self, x, label):
        cosine = F.linear(F.normalize(x), F.normalize(self.weight))
        sine = torch.sqrt((1.0 - cosine**2).clamp(0, 1))
        phi = cosine * self.cos_m - sine * self.sin_m
        phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        one_hot = F.one_hot(label, cosine.size(1)).float()
        return (one_hot * phi + (1.0 - one_hot) * cosine) * self.s


class Model(nn.Module):
    def __init__(self, classes, backbone):
        super().__init__()
        self.model = timm.create_model(TIMM[backbone], pretrained=False, num_classes=0, global_pool="")
        self.pooling = GeM()
        features = self.model.num_features
        self.neck = nn.Sequential(nn.BatchNorm1d(features), nn.Linear(features, 512))
        self.fc = ArcFace(512, classes)

    def embed(self, x):
        return self.neck(self.pooling(self.model.forward_features(x)))


class Embed(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return F.normalize(self.m.embed(x))


def stats(values):
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "runs": len(v)}


def per_step(fn, steps, batch):
    """images/s of each of `steps` calls of `fn` after one warm-up call."""
    fn()
    rates = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        rates.append(batch / (time.perf_counter() - t))
    return stats(rates)


def onnx_session(m, args):
    import onnxruntime as ort

    buf = io.BytesIO()
    x = torch.randn(args.batch, 3, args.size, args.size)
    torch.onnx.export(Embed(m).eval(), x, buf, input_names=["x"], output_names=["e"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    return ort, ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])


def line(impl, args, **figures):
    print(json.dumps({"impl": impl, "backbone": "+".join(args.backbone), "size": args.size, "batch": args.batch,
                      "threads": args.threads, **figures}), flush=True)


def model_speed(args, classes=1000):
    if len(args.backbone) != 1:
        raise SystemExit("--backbone names several models: only end to end (--images)")
    backbone = args.backbone[0]
    torch_name = f"PyTorch {torch.__version__.split('+')[0]} eager"
    for layout in ["channels_last", "contiguous"]:
        m = Model(classes, backbone)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        m = m.to(memory_format=fmt)
        x = torch.randn(args.batch, 3, args.size, args.size).to(memory_format=fmt)
        y = torch.randint(0, classes, (args.batch,))
        m.eval()
        with torch.no_grad():
            infer = per_step(lambda: F.normalize(m.embed(x)), args.steps, args.batch)
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=1e-4)

        def step():
            opt.zero_grad()
            F.cross_entropy(m.fc(m.embed(x), y), y).backward()
            opt.step()

        line(f"{torch_name} ({layout.replace('_', '-')})", args, inference_img_s=infer,
             train_img_s=per_step(step, args.steps, args.batch))
    ort, sess = onnx_session(Model(classes, backbone).eval(), args)
    xn = torch.randn(args.batch, 3, args.size, args.size).numpy()
    line(f"onnxruntime {ort.__version__}", args,
         inference_img_s=per_step(lambda: sess.run(None, {"x": xn}), args.steps, args.batch), train_img_s=None)


class Photos(torch.utils.data.Dataset):
    def __init__(self, root, names, size):
        self.root, self.names, self.size = root, names, size

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        from PIL import Image, ImageOps

        with Image.open(os.path.join(self.root, self.names[i])) as im:
            im = ImageOps.exif_transpose(im).convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        a = (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD
        return torch.from_numpy(a.transpose(2, 0, 1).copy())


def end_to_end(args):
    names = [l.strip() for l in open(args.list) if l.strip()]
    loader = torch.utils.data.DataLoader(Photos(args.images, names, args.size), batch_size=args.batch,
                                         num_workers=1)
    # Several backbones: an ensemble, each photo decoded once and embedded by every model.
    ms = [Model(1000, b).eval().to(memory_format=torch.channels_last) for b in args.backbone]
    sessions = [onnx_session(Model(1000, b).eval(), args) for b in args.backbone]
    ort = sessions[0][0]

    def pytorch(x):
        with torch.no_grad():
            x = x.contiguous(memory_format=torch.channels_last)
            for m in ms:
                F.normalize(m.embed(x))

    def onnx(x):
        x = x.numpy()
        for _, sess in sessions:
            sess.run(None, {"x": x})

    for impl, embed in [(f"PyTorch {torch.__version__.split('+')[0]} eager (channels-last)", pytorch),
                        (f"onnxruntime {ort.__version__}", onnx)]:
        embed(torch.randn(args.batch, 3, args.size, args.size))
        rates = []
        for _ in range(args.runs):
            t = time.perf_counter()
            for x in loader:
                embed(x)
            rates.append(len(names) / (time.perf_counter() - t))
        line(impl, args, photos=len(names), e2e_img_s=stats(rates))


def backbones(value):
    names = value.split(",")
    unknown = [n for n in names if n not in TIMM]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown backbone(s) {', '.join(unknown)}")
    return names


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--backbone", default="efficientnet_lite0", type=backbones,
                   help=f"one of {', '.join(sorted(TIMM))}; end to end, several separated by commas")
    a.add_argument("--size", type=int, default=224)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--steps", type=int, default=5)
    a.add_argument("--images")
    a.add_argument("--list")
    a.add_argument("--runs", type=int, default=3)
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    if args.images:
        end_to_end(args)
    else:
        model_speed(args)


if __name__ == "__main__":
    main()
