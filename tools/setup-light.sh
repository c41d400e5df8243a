#!/usr/bin/env bash
# Install finprint for identifying with trained runs, without libtorch or Python: `embed`,
# `evaluate`, `predict` and `serve` run the networks that training wrote into each checkpoint's
# onnx/ folder (`--engine tract`). One binary goes to PREFIX/bin (default ~/.local/bin); the
# build folder is removed afterwards. Needs a Rust toolchain (1.86+) and gcc.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=${PREFIX:-$HOME/.local}
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
# Without the line tables the release profile keeps for profiling: 23 MB instead of 155.
CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true \
  cargo install --locked --path . --no-default-features --features onnx \
  --root "$PREFIX" --target-dir "$BUILD"
echo "installed $PREFIX/bin/finprint ($(du -h "$PREFIX/bin/finprint" | cut -f1)): run it with" \
  "--models RUN on a run trained by the full build"
