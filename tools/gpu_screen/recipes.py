"""One (recipe, fold) of the GPU training screen, a PyTorch mirror of `finprint train --mode full`.

Usage: python3 tools/gpu_screen/recipes.py RECIPE FOLD OUT_DIR   (LIMIT=N: the first N photos only)

Trains on the other folds' animals and measures the fold's animals at several epochs: belugas
with one query per encounter and no photo of its encounter in its gallery, right whales with
every photo against the others; each animal scored by its best photo. A recipe over several sets
("beluga+rw") trains one model on all their training animals and measures each set's fold on its
own. Each measurement is alone and fused with the pretrained GeM features (cosine + w ×
pretrained cosine). Appends one JSON line per (set, epoch, w) to OUT_DIR/RECIPE_FOLD.jsonl, with
each query's (animal, rank of its animal).

As finprint's full mode: GeM (p = 3, learnt), BatchNorm1d + Linear to 512, ArcFace (s 30, m 0.5,
the seed's fallback beyond π − m), AdamW (backbone lr 3e-4, heads × 10, decay 1e-4), one epoch of
linear warm-up then a cosine to 0.01, gradients clipped at norm 5. Not as finprint: batches of
32 in bfloat16, weight decay on every parameter, and the augmentations below (flips both ways
with p 0.5 where the set allows them, the affine warp, brightness/contrast and grey; no blur, noise or grid shuffle).
"""
import csv
import json
import math
import os
import sys
import time

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

RECIPES = {
    # name: set (or sets joined by +), arch, epochs evaluated, overrides
    "b_full": ("beluga", "lite0", [0, 5, 10, 20, 30], {}),
    "b_fast": ("beluga", "lite0", [0, 5, 10, 20, 30], {"freeze": 6}),
    "b_low": ("beluga", "lite0", [0, 5, 10, 20, 30], {"lr": 1e-4, "m": 0.3, "subc": 3}),
    "b_lite2": ("beluga", "lite2", [0, 5, 10, 20, 30], {}),
    "b_strong": ("beluga", "lite0", [0, 10, 20, 40], {"lr": 1e-4, "m": 0.3, "aug": 2.0}),
    # The backs' scars are a few pixels at 128x384: the network sees them larger, upsampled.
    "b_x15": ("beluga", "lite0", [0, 5, 10, 20, 30], {"scale": 1.5}),
    "b_x2": ("beluga", "lite0", [0, 5, 10, 20], {"scale": 2.0}),
    "r_full": ("rw", "lite0", [0, 5, 10, 20, 30], {}),
    "r_fast": ("rw", "lite0", [0, 5, 10, 20, 30], {"freeze": 6}),
    "r_low": ("rw", "lite0", [0, 5, 10, 20, 30], {"lr": 1e-4, "m": 0.3, "subc": 3}),
    # A flank's mirror image looks like the other flank: no flips (MIRRORS).
    "n_full": ("nyala", "lite0", [0, 5, 10, 20, 30], {}),
    "n_fast": ("nyala", "lite0", [0, 5, 10, 20, 30], {"freeze": 6}),
    "n_low": ("nyala", "lite0", [0, 5, 10, 20, 30], {"lr": 1e-4, "m": 0.3, "subc": 3}),
    "n_x15": ("nyala", "lite0", [0, 10, 20], {"scale": 1.5}),
    # One model for belugas and right whales (issue 15 item 4), measured on each set's fold.
    "m_br": ("beluga+rw", "lite0", [0, 5, 10, 20, 30], {}),
}
BASE = dict(lr=3e-4, head_mult=10.0, wd=1e-4, m=0.5, s=30.0, subc=1, batch=32, freeze=0, aug=1.0,
            flips=True, scale=1.0)
# Whether a set's mirror images keep the identity (`flips` applies only where they do): a
# nyala's mirrored flank looks like its other flank.
MIRRORS = {"beluga": True, "rw": True, "nyala": False}
WEIGHTS = [0.0, 0.5, 1.0, 2.0]  # fusion weights of the pretrained features' cosine


def load(set_name, limit=0):
    rows = list(csv.DictReader(open(f"gpu/{set_name}.csv")))
    if limit:
        rows = rows[:limit]
    x = np.stack([np.asarray(Image.open(f"gpu/{set_name}/{r['image']}").convert("RGB")) for r in rows])
    return rows, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


class GeM(nn.Module):
    def __init__(self, p=3.0):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)

    def forward(self, x):
        return x.float().clamp(min=1e-6).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class Net(nn.Module):
    def __init__(self, arch, classes, cfg):
        super().__init__()
        self.backbone = timm.create_model(f"tf_efficientnet_{arch}", pretrained=False, num_classes=0,
                                          global_pool="")
        self.backbone.load_state_dict(torch.load(f"gpu/{arch}.pt"), strict=False)
        self.gem = GeM()
        n = self.backbone.num_features
        self.neck = nn.Sequential(nn.BatchNorm1d(n), nn.Linear(n, 512))
        self.arc = nn.Parameter(torch.empty(classes * cfg["subc"], 512))
        nn.init.xavier_uniform_(self.arc)
        self.cfg, self.classes = cfg, classes

    def features(self, x):
        return self.gem(self.backbone.forward_features(x))

    def embed(self, x):
        return self.neck(self.features(x))

    def logits(self, e, y):
        c = self.cfg
        cos = F.linear(F.normalize(e.float()), F.normalize(self.arc))
        cos = cos.view(-1, self.classes, c["subc"]).amax(-1)
        m = c["m"]
        sin = (1 - cos.pow(2)).clamp(0, 1).sqrt()
        phi = cos * math.cos(m) - sin * math.sin(m)
        phi = torch.where(cos > math.cos(math.pi - m), phi, cos - math.sin(math.pi - m) * m)
        hot = F.one_hot(y, self.classes).float()
        return (hot * phi + (1 - hot) * cos) * c["s"]


def normalise(x):  # uint8 → Lite's input
    return (x.float() - 127.0) / 128.0


def upsample(x, scale):
    """A normalised batch enlarged `scale` times (bilinear), as finprint's larger `--img-size`."""
    if scale == 1.0:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)


def augment(x, strength, flips):
    """GPU augmentations of a uint8 batch: with `flips` mirrors both ways (a back seen from above,
    a head cropped to its callosities), an affine warp, brightness/contrast, grey."""
    b = x.shape[0]
    dev = x.device
    x = normalise(x)
    if flips:
        hf = torch.rand(b, device=dev) < 0.5
        x = torch.where(hf[:, None, None, None], x.flip(-1), x)
        vf = torch.rand(b, device=dev) < 0.5
        x = torch.where(vf[:, None, None, None], x.flip(-2), x)
    ang = (torch.rand(b, device=dev) * 2 - 1) * math.radians(15 * strength)
    sc = 1 + (torch.rand(b, device=dev) * 2 - 1) * 0.1 * strength
    tx, ty = [(torch.rand(b, device=dev) * 2 - 1) * 0.06 * strength for _ in range(2)]
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    warp = torch.rand(b, device=dev) < 0.5
    eye = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=dev).expand(b, 2, 3)
    theta = torch.where(warp[:, None, None], theta, eye)
    grid = F.affine_grid(theta, x.shape, align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    bc = (torch.rand(b, device=dev) < 0.5)[:, None, None, None]
    alpha = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.2 * strength
    beta = (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * 0.4 * strength
    x = torch.where(bc, x * alpha + beta, x)
    grey = (torch.rand(b, device=dev) < 0.1)[:, None, None, None]
    x = torch.where(grey, x.mean(1, keepdim=True).expand_as(x), x)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def embed_all(net, x, fn, bs=256):
    net.eval()
    out = []
    for i in range(0, len(x), bs):
        xb = upsample(normalise(x[i:i + bs]), net.cfg["scale"]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(xb.device.type, dtype=torch.bfloat16):
            out.append(F.normalize(fn(xb).float()))
    net.train()
    return torch.cat(out)


def ranks(sim, rows, ids, protocol):
    """Each query's (animal, rank of its animal among animals ranked by their best photo). A
    query's gallery holds no photo of its own encounter and, where photos have a view (nyala's
    flank), only photos of its own view."""
    n = len(rows)
    enc = [r["encounter"] for r in rows]
    view = [r.get("view", "") for r in rows]
    uniq = sorted(set(ids))
    col = torch.tensor([uniq.index(i) for i in ids], device=sim.device)
    seen, out = set(), []
    order = sorted(range(n), key=lambda i: rows[i]["image"])
    for q in order:
        if protocol == "beluga":
            if enc[q] in seen:
                continue
            seen.add(enc[q])
        keep = torch.tensor([enc[g] != enc[q] and view[g] == view[q] for g in range(n)], device=sim.device)
        if not any(ids[g] == ids[q] and enc[g] != enc[q] for g in range(n)):
            continue
        s = torch.where(keep, sim[q], torch.tensor(-9.0, device=sim.device))
        best = torch.full((len(uniq),), -9.0, device=sim.device).scatter_reduce(0, col, s, "amax")
        true = uniq.index(ids[q])
        rank = int((best > best[true]).sum()) + 1
        out.append((ids[q], rank))
    return out


def main():
    name, fold = sys.argv[1], int(sys.argv[2])
    out_dir = sys.argv[3]
    set_names, arch, evals, over = RECIPES[name]
    cfg = {**BASE, **over}
    limit = int(os.environ.get("LIMIT", 0))
    if limit:
        evals = [e for e in evals if e <= 1] + [1]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(fold)
    torch.backends.cudnn.benchmark = True
    # Several sets ("beluga+rw") train one model on all their training animals (ids are already
    # apart: each carries its set's prefix) and are measured each on its own fold's animals.
    sets = []
    for set_name in set_names.split("+"):
        rows, x = load(set_name, limit)
        tr = [i for i, r in enumerate(rows) if int(r["fold"]) != fold]
        va = [i for i, r in enumerate(rows) if int(r["fold"]) == fold]
        sets.append(dict(name=set_name, rows=[rows[i] for i in tr], xt=x[tr].to(dev), xv=x[va].to(dev),
                         vrows=[rows[i] for i in va], flips=cfg["flips"] and MIRRORS[set_name],
                         batches=max(1, len(tr) // cfg["batch"])))
    classes = sorted({r["id"] for s in sets for r in s["rows"]})
    index = {c: k for k, c in enumerate(classes)}
    for s in sets:
        s["y"] = torch.tensor([index[r["id"]] for r in s["rows"]], device=dev)
    net = Net(arch, len(classes), cfg).to(dev).to(memory_format=torch.channels_last)
    for s in sets:
        pre = embed_all(net, s["xv"], net.features)
        s["pre_sim"] = pre @ pre.T
    if cfg["freeze"]:
        for p in [*net.backbone.conv_stem.parameters(), *net.backbone.bn1.parameters()]:
            p.requires_grad_(False)
        for k in range(cfg["freeze"]):
            for p in net.backbone.blocks[k].parameters():
                p.requires_grad_(False)
    head = [*net.gem.parameters(), *net.neck.parameters(), net.arc]
    body = [p for p in net.backbone.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": body, "lr": cfg["lr"]},
                             {"params": head, "lr": cfg["lr"] * cfg["head_mult"]}], weight_decay=cfg["wd"])
    base_lr = [g["lr"] for g in opt.param_groups]
    steps_per = sum(s["batches"] for s in sets)
    total = steps_per * max(evals)
    warm = steps_per
    step, t0 = 0, time.time()

    def record(epoch):
        for s in sets:
            sim = s["pre_sim"]
            if epoch:
                e = embed_all(net, s["xv"], net.embed)
                sim = e @ e.T
            tag = name if len(sets) == 1 else f"{name}:{s['name']}"
            for w in (WEIGHTS if epoch else [0.0]):
                r = ranks(sim + w * s["pre_sim"] if epoch else sim, s["vrows"],
                          [v["id"] for v in s["vrows"]], s["name"])
                top1 = sum(k == 1 for _, k in r) / len(r)
                line = {"recipe": tag, "fold": fold, "epoch": epoch, "w": w, "n": len(r), "top1": top1,
                        "secs": round(time.time() - t0, 1), "q": r}
                with open(f"{out_dir}/{name}_{fold}.jsonl", "a") as fh:
                    fh.write(json.dumps(line) + "\n")
                print(tag, fold, epoch, w, f"n {len(r)} top1 {top1:.3f}", f"{time.time() - t0:.0f}s", flush=True)

    record(0)
    for epoch in range(1, max(evals) + 1):
        # Each set's photos in batches of its own (their sizes differ), the batches shuffled together.
        batches = []
        for k, s in enumerate(sets):
            perm = torch.randperm(len(s["rows"]), device=dev)
            batches += [(k, perm[b * cfg["batch"]:(b + 1) * cfg["batch"]])
                        for b in range(s["batches"])]
        for j in torch.randperm(len(batches)).tolist():
            k, idx = batches[j]
            s = sets[k]
            f = step / warm if step < warm else 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * f
            with torch.autocast(dev, dtype=torch.bfloat16):
                xa = augment(s["xt"][idx], cfg["aug"], s["flips"])
                e = net.embed(upsample(xa, cfg["scale"]).contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(net.logits(e, s["y"][idx]), s["y"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            step += 1
        if epoch in evals:
            record(epoch)


if __name__ == "__main__":
    main()
