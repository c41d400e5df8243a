#!/usr/bin/env bash
# Identification of animals never trained on, on the real nyala photos of ../shared/data
# (development protocol of its README): train on the `train` animals, measure leave-one-out on
# the `val` animals, identity = animal + flank, gallery = the other photos of the same flank,
# repeated files (same md5) dropped. Prints zero-shot and trained figures.
#
#   bash tools/nyala.sh [OUT] [`finprint train` flags... | --prepare-only]
#
# Without flags it trains as measured best here: the frozen mode, the three pretrained
# EfficientNet-Lite backbones' GeM features whitened on the training animals (a few minutes).
# The best gradient training measured here: `--mode fast --freeze-stages 6 --epochs 10 --lr 3e-4`.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(realpath ../shared/data/nyala-train 2>/dev/null || true)
if [[ -z $SRC || ! -f $SRC/labels.csv ]]; then
  echo "skipped: ../shared/data/nyala-train not found"
  exit 0
fi
OUT=${1:-runs/nyala}
shift || true
FINPRINT=${FINPRINT:-target/release/finprint}
mkdir -p "$OUT/data"
ln -sfn "$SRC" "$OUT/data/train_images"
# labels.csv: image,individual_id,species,original_split,view,width,height,md5,source
awk -F, -v roles="$SRC/dev_split.csv" -v train="$OUT/data/train.csv" -v val="$OUT/val_labels.csv" -v calibration="$OUT/train_labels.csv" '
  BEGIN { while ((getline line < roles) > 0) { sub(/\r$/, "", line); split(line, f, ","); role[f[1]] = f[2] }
          print "image,species,individual_id" > train; print "image,individual_id,view" > val
          print "image,individual_id,view" > calibration }
  { sub(/\r$/, "") }
  NR == 1 || seen[$8]++ { next }
  role[$2] == "train" { print $1 "," $3 "," $2 "/" $5 > train; print $1 "," $2 "," $5 > calibration }
  role[$2] == "val"   { print $1 "," $2 "," $5 > val }' "$SRC/labels.csv"
echo "nyala: $(($(wc -l < "$OUT/data/train.csv") - 1)) training photos, $(($(wc -l < "$OUT/val_labels.csv") - 1)) validation photos"
# `--prepare-only`: stop here, with OUT/data (training catalogue) and OUT/val_labels.csv written.
[[ ${1:-} == --prepare-only ]] && exit 0

echo "== zero-shot: pretrained EfficientNet-Lite0, GeM features"
"$FINPRINT" evaluate --zero-shot efficientnet_lite0 --labels "$OUT/val_labels.csv" --images "$SRC" --group view
echo "== zero-shot with local features (RootSIFT in the body band, LNBNN, affine RANSAC) re-scoring"
echo "   its shortlist, fused by probabilities calibrated on the training animals"
"$FINPRINT" evaluate --zero-shot efficientnet_lite0 --labels "$OUT/val_labels.csv" --images "$SRC" --group view \
  --local rootsift --local-region 0.1,0.2,0.9,0.8 --calibration-labels "$OUT/train_labels.csv"
rm -rf "$OUT/run"
echo "== finprint train (--flips none: a mirror turns one flank into the other)"
(($#)) || set -- --mode frozen --model efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
"$FINPRINT" train --data "$OUT/data" --out "$OUT/run" --flips none "$@"
"$FINPRINT" report "$OUT/run"
echo "== trained"
"$FINPRINT" evaluate --models "$OUT/run" --labels "$OUT/val_labels.csv" --images "$SRC" --group view
