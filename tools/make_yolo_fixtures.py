"""Build the YOLO detector fixtures of tests/detector.rs (tests/fixtures/yolo/).

Two tiny YOLO-like graphs with seeded random weights: a few strided convolutions and the
decode heads of YOLOv5 (anchors, output `[1, N, 5+C]`) and of YOLOv8 (anchor points, no
objectness, output `[1, 4+C, N]`), exported to ONNX (opset 13, static shapes). A seeded
drawing of a fin at sea (128x96) is letterboxed to 64x64 as ultralytics does it (grey 114) and
saved as `letterboxed.png`: both runtimes are fed that same image. onnxruntime's raw outputs
and the detections after the reference decode and class-wise NMS (numpy, checked against
torchvision's `batched_nms`) are written to `reference.json`, mapped back to two photo sizes
(128x96: scale 1/2, and 64x48: scale 1; both 8 px of padding above).

Thresholds are chosen from the data so that boxes both survive and overlap, and the script
refuses a seed whose scores or IoUs lie too close to a threshold (or to each other) for a
1e-4 difference between runtimes to change the answer.

    .venv/bin/python tools/make_yolo_fixtures.py
"""

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from PIL import Image
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "yolo"
SIZE = 64
PHOTO = (128, 96)
CLASSES = 2
IOU = 0.45
MARGIN = 1e-4


def conv_body(out_channels):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1), nn.SiLU(),
        nn.Conv2d(8, 16, 3, 2, 1), nn.SiLU(),
        nn.Conv2d(16, out_channels, 3, 2, 1),
    )


def grid(g):
    yv, xv = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return torch.stack((xv, yv), -1).float()  # [g, g, 2] as (x, y)


class TinyV5(nn.Module):
    """YOLOv5's Detect head on a stride-8 grid: xy = (2s - 0.5 + cell)·8, wh = (2s)²·anchor."""

    def __init__(self, nc, anchors):
        super().__init__()
        self.nc, self.na = nc, len(anchors)
        self.body = conv_body(self.na * (5 + nc))
        g = SIZE // 8
        self.register_buffer("grid", grid(g).view(1, 1, g, g, 2))
        self.register_buffer("anchors", torch.tensor(anchors).float().view(1, self.na, 1, 1, 2))

    def forward(self, x):
        p = self.body(x)
        g = p.shape[-1]
        p = p.view(1, self.na, 5 + self.nc, g, g).permute(0, 1, 3, 4, 2).sigmoid()
        xy = (p[..., :2] * 2 - 0.5 + self.grid) * 8
        wh = (p[..., 2:4] * 2) ** 2 * self.anchors
        return torch.cat((xy, wh, p[..., 4:]), -1).view(1, -1, 5 + self.nc)


class TinyV8(nn.Module):
    """An anchor-free head as YOLOv8's, without DFL: distances to the sides from each cell's
    centre (up to 4 cells), class scores without objectness."""

    def __init__(self, nc):
        super().__init__()
        self.nc = nc
        self.body = conv_body(4 + nc)
        g = SIZE // 8
        self.register_buffer("points", ((grid(g) + 0.5) * 8).view(1, g * g, 2).permute(0, 2, 1))

    def forward(self, x):
        p = self.body(x).flatten(2)  # [1, 4+C, N]
        ltrb = p[:, :4].sigmoid() * 32
        x0y0 = self.points - ltrb[:, :2]
        x1y1 = self.points + ltrb[:, 2:]
        return torch.cat(((x0y0 + x1y1) / 2, x1y1 - x0y0, p[:, 4:].sigmoid()), 1)


def photo(rng):
    """A fin at sea: sky over waves, a dark triangle, noise."""
    w, h = PHOTO
    y = np.arange(h)[:, None, None]
    sky = np.array([170, 200, 230]) - y * 0.5
    sea = np.array([30, 70, 110]) + (y - h * 0.45) * 0.8
    img = np.where(y < h * 0.45, sky, sea) * np.ones((h, w, 1))
    yy, xx = np.mgrid[0:h, 0:w]
    fin = (yy > 20) & (yy < 55) & (xx > 40 + (55 - yy) * 0.6) & (xx < 80 - (55 - yy) * 0.2)
    img[fin] = [45, 45, 50]
    img += 25 * np.sin(xx * 0.45 + yy * 0.3)[..., None] + rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def letterbox(img):
    """ultralytics' letterbox (auto=False, scaleup=True); returns the image, scale and pads."""
    h, w = img.shape[:2]
    r = min(SIZE / h, SIZE / w)
    nw, nh = round(w * r), round(h * r)
    dw, dh = (SIZE - nw) / 2, (SIZE - nh) / 2
    left, top = round(dw - 0.1), round(dh - 0.1)
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    out = np.full((SIZE, SIZE, 3), 114, np.uint8)
    out[top:top + nh, left:left + nw] = resized
    return out, r, left, top


def candidates(out, layout, conf):
    """Rows (x0 y0 x1 y1 score class) above `conf`, in output order, as ultralytics decodes."""
    rows = out[0] if layout == "v5" else out[0].T
    if layout == "v5":
        obj = rows[:, 4:5]
        cls = rows[:, 5:] * obj
        keep_obj = rows[:, 4] > conf
    else:
        cls = rows[:, 4:]
        keep_obj = np.ones(len(rows), bool)
    j = cls.argmax(1)
    score = cls[np.arange(len(rows)), j]
    keep = keep_obj & (score > conf)
    c = rows[:, :4]
    xyxy = np.stack([c[:, 0] - c[:, 2] / 2, c[:, 1] - c[:, 3] / 2,
                     c[:, 0] + c[:, 2] / 2, c[:, 1] + c[:, 3] / 2], 1)
    return xyxy[keep], score[keep], j[keep], score, keep_obj


def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes, scores, classes):
    """Class-wise greedy NMS; indices kept, most confident first. Also the closest any IoU
    that decided something came to the threshold."""
    order = np.argsort(-scores, kind="stable")
    kept, closest = [], 1.0
    for i in order:
        same = [k for k in kept if classes[k] == classes[i]]
        ious = [iou(boxes[k], boxes[i]) for k in same]
        closest = min([closest] + [abs(v - IOU) for v in ious])
        if all(v <= IOU for v in ious):
            kept.append(i)
    return kept, closest


def unletterbox(boxes, r, left, top, w, h):
    out = boxes.astype(np.float64).copy()
    out[:, [0, 2]] = ((out[:, [0, 2]] - left) / r).clip(0, w)
    out[:, [1, 3]] = ((out[:, [1, 3]] - top) / r).clip(0, h)
    return out


def export(model, x):
    buf = io.BytesIO()
    torch.onnx.export(model, x, buf, input_names=["images"], output_names=["output0"],
                      opset_version=13, dynamo=False)
    return buf.getvalue()


def build(layout, make, x, seed):
    torch.manual_seed(seed)
    model = make().eval()
    with torch.no_grad():
        # Centre each of the head's logits over the cells and spread them (to a deviation of
        # 2.5), so that both classes occur and scores and boxes differ clearly between cells.
        head = model.body[-1]
        logits = model.body(torch.from_numpy(x))
        head.bias.sub_(logits.mean((0, 2, 3)))
        head.weight.mul_(2.5 / logits.std())
        head.bias.mul_(2.5 / logits.std())
    onnx_bytes = export(model, torch.from_numpy(x))
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": x})[0]
    with torch.no_grad():
        torch_gap = float(np.abs(model(torch.from_numpy(x)).numpy() - out).max())

    # A confidence that keeps an eighth to a quarter of the candidates, midway across the
    # widest gap between two scores there.
    _, _, _, score, keep_obj = candidates(out, layout, 0.0)
    s = np.sort(score[keep_obj])[::-1]
    k = max(range(len(s) // 8, len(s) // 4), key=lambda i: s[i] - s[i + 1])
    conf = float((s[k] + s[k + 1]) / 2)
    boxes, scores, classes, all_scores, _ = candidates(out, layout, conf)
    kept, closest = nms(boxes, scores, classes)
    tv = torchvision.ops.batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                                     torch.from_numpy(classes), IOU).tolist()
    assert tv == kept, (tv, kept)

    gaps = np.diff(np.sort(scores))
    checks = {
        "candidates": len(scores), "kept": len(kept), "classes kept": len(set(classes[kept])),
        "score gap": float(gaps.min()), "conf gap": float(np.abs(all_scores - conf).min()),
        "IoU gap": float(closest), "torch vs onnxruntime": torch_gap,
    }
    ok = (len(kept) >= 3 and len(scores) - len(kept) >= 3 and checks["classes kept"] == 2
          and checks["score gap"] > MARGIN and checks["conf gap"] > MARGIN and closest > MARGIN
          and torch_gap < 1e-4)
    return ok, checks, onnx_bytes, out, conf, boxes[kept], scores[kept], classes[kept]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    img, r, left, top = letterbox(photo(np.random.default_rng(0)))
    Image.fromarray(img).save(OUT / "letterboxed.png", optimize=True)
    x = (img.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
    photos = {"128x96": (r, left, top, 128, 96), "64x48": (1.0, 0, 8, 64, 48)}
    assert (r, left, top) == (0.5, 0, 8)

    reference = {"size": SIZE, "iou": IOU, "photos": {}, "models": {}}
    for name, (scale, l, t, w, h) in photos.items():
        reference["photos"][name] = {"width": w, "height": h, "scale": scale, "left": l, "top": t}
    makers = {
        "v5": lambda: TinyV5(CLASSES, [[10, 13], [16, 30], [33, 23]]),
        "v8": lambda: TinyV8(CLASSES),
    }
    for layout, make in makers.items():
        for seed in range(100):
            ok, checks, onnx_bytes, out, conf, boxes, scores, classes = build(
                layout, make, x, seed)
            if ok:
                break
        else:
            raise SystemExit(f"{layout}: no seed gives a clear-cut fixture")
        print(f"{layout}: seed {seed}, output {list(out.shape)}, conf {conf:.4f}, {checks}")
        (OUT / f"{layout}.onnx").write_bytes(onnx_bytes)
        det = {"letterbox": np.concatenate([boxes, scores[:, None], classes[:, None]], 1)}
        for name, (scale, l, t, w, h) in photos.items():
            det[name] = np.concatenate(
                [unletterbox(boxes, scale, l, t, w, h), scores[:, None], classes[:, None]], 1)
        reference["models"][layout] = {
            "file": f"{layout}.onnx",
            "conf": conf,
            "output_shape": list(out.shape),
            "output": [float(v) for v in out.ravel()],
            "detections": {k: [[float(v) for v in row] for row in d] for k, d in det.items()},
        }
    (OUT / "reference.json").write_text(json.dumps(reference) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {OUT} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
