#!/usr/bin/env bash
# Set up and run finprint's checks: formatting, lints, and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cargo fmt --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
# The web page in headless Chromium: upload, candidates, confirm, the individual's sighting.
bash tests/browser/run.sh
# The bench command in miniature (seconds, no references, no data; figures not checked).
bash tools/bench.sh --smoke
# The light build (no libtorch): lints, unit tests, and a run the full build trained, identified
# by it as by the full build (predict, evaluate, embed, serve).
cargo clippy --release --locked --no-default-features --features onnx --lib --bins -- -D warnings
cargo test --release --locked --no-default-features --features onnx --lib
bash tests/light.sh
# The GPU build: `--features cuda` puts models on a GPU when libtorch finds one. Last, as it
# rebuilds the crate with the feature.
cargo build --release --locked --features cuda --bins
