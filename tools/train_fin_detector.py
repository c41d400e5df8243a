"""Train a small single-class fin detector on a synthetic catalogue and export it to ONNX in
YOLOv8's output layout (`[1, 4+1, N]`: cx cy w h score), for `finprint crop --detector`.

No fin detector ships in a registry, so this one learns from the true fin boxes that
`finprint synth` writes (`fin_boxes.csv`). The model: five strided stages of conv-BN-SiLU down
to a 1/16 grid and an anchor-free head as YOLOv8's without DFL: per cell, the distances from
its centre to the four sides (softplus, in cells) and a class logit. Cells whose centre lies
inside the central part of the true box (FCOS centre sampling) are positive; the class target
is the IoU of the predicted box with the truth (quality-aware, so the most confident box is the
best placed), the box loss is GIoU. Photos are letterboxed as ultralytics does (grey 114) and
flipped, their light jittered. CPU, a few minutes on 2 cores.

    cargo run --release -- synth --out runs/detector/synth-train --individuals 300 --seed 11
    .venv/bin/python tools/train_fin_detector.py --data runs/detector/synth-train \\
        --out runs/detector/fin.onnx
    cargo run --release -- synth --out runs/detector/synth-eval --individuals 100 --seed 12
    cargo run --release -- crop --detector runs/detector/fin.onnx \\
        --images runs/detector/synth-eval/test_images --out runs/detector/crops \\
        --write-boxes runs/detector/found.csv --truth runs/detector/synth-eval/fin_boxes.csv
"""

import argparse
import csv
import io
import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

STRIDE = 16
PAD_GREY = 114


def read_boxes(path):
    """image -> (x0, y0, x1, y1) from a `bbox` file (`[[x0 y0 x1 y1]]`)."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            nums = row["bbox"].replace("[", " ").replace("]", " ").split()
            if len(nums) >= 4:
                out[row["image"]] = tuple(float(v) for v in nums[:4])
    return out


def letterbox(img, size):
    """ultralytics' letterbox (auto=False): the image, scale and left/top padding."""
    w, h = img.size
    r = min(size / h, size / w)
    nw, nh = round(w * r), round(h * r)
    left, top = round((size - nw) / 2 - 0.1), round((size - nh) / 2 - 0.1)
    out = Image.new("RGB", (size, size), (PAD_GREY,) * 3)
    out.paste(img.resize((nw, nh), Image.BILINEAR), (left, top))
    return np.asarray(out), r, left, top


def load(data, size):
    boxes = read_boxes(data / "fin_boxes.csv")
    images, targets = [], []
    for name, (x0, y0, x1, y1) in sorted(boxes.items()):
        path = next(p for p in (data / "train_images" / name, data / "test_images" / name)
                    if p.exists())
        img, r, left, top = letterbox(Image.open(path).convert("RGB"), size)
        images.append(img)
        targets.append([x0 * r + left, y0 * r + top, x1 * r + left, y1 * r + top])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    return x, torch.tensor(targets, dtype=torch.float32)


def cbs(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.SiLU())


class FinDetector(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.body = nn.Sequential(
            cbs(3, 16, 2), cbs(16, 32, 2), cbs(32, 32, 1), cbs(32, 64, 2), cbs(64, 64, 1),
            cbs(64, 96, 2), cbs(96, 96, 1), cbs(96, 96, 1))
        self.head = nn.Conv2d(96, 5, 1)
        nn.init.constant_(self.head.bias[4], -4.0)
        g = size // STRIDE
        yv, xv = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        centres = (torch.stack((xv, yv), 0).float().view(2, -1) + 0.5) * STRIDE
        self.register_buffer("centres", centres[None])  # [1, 2, N]

    def raw(self, x):
        """Boxes (x0 y0 x1 y1, [B, 4, N]) and class logits ([B, N]) for uint8-scaled input."""
        p = self.head(self.body(x)).flatten(2)
        ltrb = F.softplus(p[:, :4]) * STRIDE
        x0y0 = self.centres - ltrb[:, :2]
        x1y1 = self.centres + ltrb[:, 2:]
        return torch.cat((x0y0, x1y1), 1), p[:, 4]

    def forward(self, x):
        """The YOLOv8 layout: [B, 5, N] of cx cy w h score, for RGB input in 0..1."""
        boxes, logit = self.raw(x)
        return torch.cat(((boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2],
                          logit.sigmoid()[:, None]), 1)


def positives(centres, truth, radius=1.5 * STRIDE):
    """[B, N] cells whose centre is inside the truth and within `radius` of its centre."""
    c = centres[0].T[None]  # [1, N, 2]
    t = truth[:, None]  # [B, 1, 4]
    inside = ((c > t[..., :2]) & (c < t[..., 2:])).all(-1)
    mid = (t[..., :2] + t[..., 2:]) / 2
    near = ((c - mid).abs() < radius).all(-1)
    pos = inside & near
    # Every photo has at least its nearest cell to the box's centre.
    nearest = ((c - mid) ** 2).sum(-1).argmin(1)
    pos[torch.arange(len(t)), nearest] = True
    return pos


def augment(x, truth, gen, size):
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    truth = truth.clone()
    truth[flip, 0], truth[flip, 2] = size - truth[flip, 2], size - truth[flip, 0]
    x = x.float() / 255
    gain = 1 + (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5) * 0.4
    bias = (torch.rand(len(x), 1, 1, 1, generator=gen) - 0.5) * 0.2
    return (x * gain + bias).clamp(0, 1), truth


def loss_fn(model, x, truth):
    boxes, logit = model.raw(x)
    pos = positives(model.centres, truth)
    pred = boxes.permute(0, 2, 1)[pos]  # [P, 4]
    gt = truth[:, None].expand(-1, pos.shape[1], -1)[pos]
    giou = torchvision.ops.generalized_box_iou_loss(pred, gt, reduction="mean")
    quality = torch.zeros_like(logit)
    quality[pos] = torchvision.ops.box_iou(pred.detach(), gt).diagonal().clamp(0, 1)
    cls = F.binary_cross_entropy_with_logits(logit, quality, reduction="sum") / pos.sum()
    return cls + 2 * giou


@torch.no_grad()
def mean_iou(model, x, truth):
    model.eval()
    ious = []
    for i in range(0, len(x), 64):
        boxes, logit = model.raw(x[i:i + 64].float() / 255)
        best = logit.argmax(1)
        pred = boxes.permute(0, 2, 1)[torch.arange(len(best)), best]
        ious.append(torchvision.ops.box_iou(pred, truth[i:i + 64]).diagonal())
    model.train()
    return torch.cat(ious).mean().item()


def export(model, size, out, check):
    model.eval()
    buf = io.BytesIO()
    dummy = torch.zeros(1, 3, size, size)
    torch.onnx.export(model, dummy, buf, input_names=["images"], output_names=["output0"],
                      opset_version=13, dynamo=False)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = check.float() / 255
    with torch.no_grad():
        expected = model(x).numpy()
    got = np.concatenate([sess.run(None, {"images": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    gap = float(np.abs(got - expected).max())
    assert gap < 1e-3, f"onnxruntime differs from torch by {gap}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".onnx.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(out)
    return gap


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a catalogue from finprint synth")
    ap.add_argument("--out", type=Path, required=True, help="the ONNX file to write")
    ap.add_argument("--size", type=int, default=160, help="input size (a multiple of 16)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=15.0, help="stop training after this long")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    assert args.size % STRIDE == 0, "--size must be a multiple of 16"
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x, truth = load(args.data, args.size)
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, len(x) // 10)
    val, train = order[:n_val], order[n_val:]
    print(f"{len(train)} training and {n_val} validation photos at {args.size}px")

    model = FinDetector(args.size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * math.ceil(len(train) / args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    start = time.time()
    for epoch in range(args.epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        total = 0.0
        for i in range(0, len(perm), args.batch):
            idx = perm[i:i + args.batch]
            xb, tb = augment(x[idx], truth[idx], gen, args.size)
            loss = loss_fn(model, xb, tb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        minutes = (time.time() - start) / 60
        print(f"epoch {epoch + 1}: loss {total / len(train):.4f}, validation mean IoU "
              f"{mean_iou(model, x[val], truth[val]):.3f} ({minutes:.1f} min)", flush=True)
        if minutes > args.minutes:
            print("time budget reached")
            break
    gap = export(model, args.size, args.out, x[val[:8]])
    print(f"wrote {args.out} (onnxruntime within {gap:.1e} of torch)")


if __name__ == "__main__":
    main()
