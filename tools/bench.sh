#!/usr/bin/env bash
# Every benchmark of finprint, side by side with what a user would pick instead (PyTorch eager,
# timm, onnxruntime, faiss-cpu, OpenCV), on this machine in one run: writes BENCHMARKS.md,
# bench/results.json and bench/*.png.
#
#   bash tools/bench.sh [--smoke] [--out DIR] [--md FILE] [--only SECTION,...]
#
# The full run (last: 18.7 minutes after the build, 2 cores at a load of about 2, before the
# model and end-to-end sections measured three backbones and an ensemble: about 10 minutes more,
# and the reference solution's large backbones another 10) installs the references into .venv-bench from PyPI
# on first use (a few GB, pinned below) and reads the real photos of ../shared/data/nyala-train
# when present (skipped otherwise). --smoke takes seconds, needs no reference and no data, and
# writes to target/bench-smoke/: CI runs it so that the command cannot rot. --only nyala,plots runs
# those sections again on top of the last bench/results.json, keeping the other figures.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
for a in "$@"; do [[ $a == --smoke ]] && smoke=1; done

ref=()
if ((!smoke)); then
  # The references, pinned; torch is the version finprint's libtorch comes from.
  pins=(torch==2.13.0 torchvision==0.28.0 timm==1.0.31 onnx==1.23.2 onnxruntime==1.32.0
    faiss-cpu==1.15.1 numpy==2.4.6 pillow==13.0.0 opencv-python-headless==5.0.0.93)
  if ! .venv-bench/bin/python -W ignore -c "import torch, timm, onnx, onnxruntime, faiss, PIL, cv2" 2>/dev/null; then
    echo "bench: installing the references into .venv-bench (${pins[*]})"
    python3 -m venv .venv-bench
    .venv-bench/bin/pip install --quiet --disable-pip-version-check "${pins[@]}"
  fi
  ref=(--ref-python .venv-bench/bin/python)
fi

cargo build --release --quiet --bin finprint \
  --example bench_model --example bench_knn --example bench_identify --example bench_catalog --example bench_plots --example bench_sift --example bench_xfeat
exec python3 tools/bench.py "${ref[@]}" "$@"
