#!/usr/bin/env bash
# Identification of animals never trained on, on a real photo set of ../shared/data (the
# development protocols of its README): train on the `train` animals, measure leave-one-out on
# the `val` animals, with 95% bootstrap intervals over animals and the paired gain over the
# untrained features.
#
#   bash tools/real_set.sh SET [OUT] [`finprint train` flags... | --prepare-only]
#
# SET is beluga or rightwhale (nyala: tools/nyala.sh). OUT (default runs/SET) gets data/ (the
# training animals in Kaggle's layout, with an encounter column where the set has one) and
# val_labels.csv. Belugas: one photo per encounter of the val whales, each query's gallery
# without its own encounter (`--exclude-same encounter`); the photos are tall and narrow, so
# the input keeps their aspect (EVAL_FLAGS, default `--img-size 128x384 --fit pad`).
# Then the untrained features with local features fused (`--local rootsift`, calibrated on the
# training animals). Without train flags it trains the frozen mode on the three pretrained Lite
# backbones.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:?usage: tools/real_set.sh beluga|rightwhale [OUT] [train flags...]}
shift
SRC=$(realpath "../shared/data/$SET" 2>/dev/null || true)
if [[ -z $SRC || ! -f $SRC/labels.csv ]]; then
  echo "skipped: ../shared/data/$SET not found"
  exit 0
fi
OUT=${1:-runs/$SET}
shift || true
FINPRINT=${FINPRINT:-target/release/finprint}
BOOT=${BOOTSTRAP:-1000}
mkdir -p "$OUT/data"
ln -sfn "$SRC" "$OUT/data/train_images"
case $SET in
  beluga)
    # labels.csv: image,individual_id,species,encounter,date
    awk -F, -v roles="$SRC/dev_split.csv" -v train="$OUT/data/train.csv" -v val="$OUT/val_labels.csv" '
      BEGIN { while ((getline line < roles) > 0) { sub(/\r$/, "", line); split(line, f, ","); role[f[1]] = f[2] }
              print "image,species,individual_id,encounter" > train; print "image,individual_id,encounter" > val }
      { sub(/\r$/, "") }
      NR == 1 { next }
      role[$2] == "train" { print $1 "," $3 "," $2 "," $4 > train }
      role[$2] == "val" && !seen[$4]++ { print $1 "," $2 "," $4 > val }' "$SRC/labels.csv"
    EXCLUDE=(--exclude-same encounter)
    read -r -a SIZE <<< "${EVAL_FLAGS:---img-size 128x384 --fit pad}"
    # Scars on the back are small and faint: match at about the photos' own 460 px, with a
    # low contrast threshold (OpenCV's 0.04 finds 90 keypoints on a back, 0.01 about 770).
    LOCAL=(--local-size 512 --local-contrast 0.01)
    ;;
  rightwhale)
    # labels.csv: image,individual_id,species
    awk -F, -v roles="$SRC/dev_split.csv" -v train="$OUT/data/train.csv" -v val="$OUT/val_labels.csv" '
      BEGIN { while ((getline line < roles) > 0) { sub(/\r$/, "", line); split(line, f, ","); role[f[1]] = f[2] }
              print "image,species,individual_id" > train; print "image,individual_id" > val }
      { sub(/\r$/, "") }
      NR == 1 { next }
      role[$2] == "train" { print $1 "," $3 "," $2 > train }
      role[$2] == "val" { print $1 "," $2 > val }' "$SRC/labels.csv"
    EXCLUDE=()
    read -r -a SIZE <<< "${EVAL_FLAGS:-}"
    LOCAL=()
    ;;
  *) echo "unknown set $SET (beluga or rightwhale)" >&2; exit 2 ;;
esac
echo "$SET: $(($(wc -l < "$OUT/data/train.csv") - 1)) training photos, $(($(wc -l < "$OUT/val_labels.csv") - 1)) validation photos"
[[ ${1:-} == --prepare-only ]] && exit 0

EVAL=(--labels "$OUT/val_labels.csv" --images "$SRC" "${EXCLUDE[@]}" --bootstrap "$BOOT")
echo "== untrained: pretrained EfficientNet-Lite0, GeM features, 224×224"
"$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${EVAL[@]}"
if ((${#SIZE[@]})); then
  echo "== untrained, ${SIZE[*]}"
  "$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${SIZE[@]}" "${EVAL[@]}"
fi
echo "== untrained Lite0 with local features (RootSIFT, LNBNN, affine RANSAC) re-scoring its shortlist,"
echo "   fused by probabilities calibrated on the training animals"
"$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${SIZE[@]}" "${EVAL[@]}" \
  --local rootsift "${LOCAL[@]}" --calibration-labels "$OUT/data/train.csv"
rm -rf "$OUT/run"
(($#)) || set -- --mode frozen --model efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 "${SIZE[@]}"
echo "== finprint train $*"
start=$(date +%s)
"$FINPRINT" train --data "$OUT/data" --out "$OUT/run" "$@"
echo "trained in $(($(date +%s) - start)) s"
"$FINPRINT" report "$OUT/run"
echo "== trained, against untrained Lite0 at 224×224"
"$FINPRINT" evaluate --models "$OUT/run" "${EVAL[@]}" --baseline efficientnet_lite0
