#!/usr/bin/env bash
# Model speed side by side in one run: finprint (tch) beside PyTorch (channels-last and
# contiguous) and onnxruntime on the same recipe, batch, input size and threads.
#   bash tools/bench_model.sh [--size 224 --batch 16 --threads 2 --steps 5]
# Needs `bash tools/setup.sh`; installs the reference packages (efficientnet-lite-pytorch,
# onnx, onnxruntime) into .venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import efficientnet_lite_pytorch, onnxruntime, onnx" 2>/dev/null ||
  .venv/bin/pip install --quiet --disable-pip-version-check numpy onnx onnxruntime &&
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps efficientnet-lite-pytorch==0.1.0
cargo build --release --quiet --example bench_model
out=$(mktemp)
target/release/examples/bench_model "$@" | tee "$out"
.venv/bin/python -W ignore tools/bench_model.py "$@" | tee -a "$out"
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ours = rows[0]
print(f"\n| implementation | inference img/s | ratio | training img/s | ratio |\n|---|---|---|---|---|")
for r in rows:
    ri = r["inference_img_s"] / ours["inference_img_s"]
    t = r["train_img_s"]
    rt = "-" if t is None else f"{t / ours['train_img_s']:.2f}"
    print(f"| {r['impl']} | {r['inference_img_s']:.1f} | {ri:.2f} | {'-' if t is None else f'{t:.1f}'} | {rt} |")
print(f"\nLite0 + GeM + BN + Linear 512 + ArcFace, {ours['size']} px, batch {ours['batch']}, {ours['threads']} threads; ratio = implementation / finprint.")
PY
