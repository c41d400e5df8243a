#!/usr/bin/env bash
# Identification of animals never trained on, on a real photo set of ../shared/data (the
# development protocols of its README): train on the `train` animals, measure leave-one-out on
# the `val` animals, with 95% bootstrap intervals over animals and the paired gain over the
# untrained features.
#
#   bash tools/real_set.sh SET [OUT] [`finprint train` flags... | --prepare-only]
#
# SET is beluga or rightwhale (nyala: tools/nyala.sh). OUT (default runs/SET) gets data/ (the
# training animals in Kaggle's layout, with an encounter column where the set has one),
# calib_labels.csv (every fifth training animal of dev_split.csv, held out of training to
# calibrate the trained model's fusion with local features), train_labels.csv (all training
# animals: the untrained features' calibration) and val_labels.csv. Belugas: one photo per encounter of the val whales, each query's gallery
# without its own encounter (`--exclude-same encounter`); the photos are tall and narrow, so
# the input keeps their aspect (EVAL_FLAGS, default `--img-size 128x384 --fit pad`).
# Then the untrained features with local features fused (`--local rootsift`, calibrated on the
# training animals). Without train flags it trains the frozen mode on the three pretrained Lite
# backbones. UNTRAINED=0 leaves out the untrained rows (the trained ones only).
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
# The dev roles of labels.csv's rows (image,individual_id,species[,encounter]) written out:
# data/train.csv in Kaggle's layout and the label lists, with the encounter column when
# ENCOUNTER (its column number) is set; the val animals keep one photo per encounter then.
split() {
  awk -F, -v roles="$SRC/dev_split.csv" -v train="$OUT/data/train.csv" -v val="$OUT/val_labels.csv" \
      -v calib="$OUT/calib_labels.csv" -v all="$OUT/train_labels.csv" -v enc="${ENCOUNTER:-0}" '
    BEGIN { while ((getline line < roles) > 0) { sub(/\r$/, "", line); split(line, f, ","); role[f[1]] = f[2]
              if (f[2] == "train" && ++n % 5 == 0) role[f[1]] = "calib" }
            h = enc ? ",encounter" : ""
            print "image,species,individual_id" h > train; print "image,individual_id" h > val
            print "image,individual_id" h > calib; print "image,individual_id" h > all }
    { sub(/\r$/, "") }
    NR == 1 { next }
    { e = enc ? "," $enc : "" }
    role[$2] == "train" { print $1 "," $3 "," $2 e > train }
    role[$2] == "calib" { print $1 "," $2 e > calib }
    role[$2] == "train" || role[$2] == "calib" { print $1 "," $2 e > all }
    role[$2] == "val" && (!enc || !seen[$enc]++) { print $1 "," $2 e > val }' "$SRC/labels.csv"
}
case $SET in
  beluga)
    # labels.csv: image,individual_id,species,encounter,date
    ENCOUNTER=4 split
    EXCLUDE=(--exclude-same encounter)
    read -r -a SIZE <<< "${EVAL_FLAGS:---img-size 128x384 --fit pad}"
    # Scars on the back are small and faint: match at about the photos' own 460 px, with a
    # low contrast threshold (OpenCV's 0.04 finds 90 keypoints on a back, 0.01 about 770).
    LOCAL=(--local-size 512 --local-contrast 0.01)
    ;;
  rightwhale)
    # labels.csv: image,individual_id,species
    split
    EXCLUDE=()
    read -r -a SIZE <<< "${EVAL_FLAGS:-}"
    LOCAL=()
    ;;
  *) echo "unknown set $SET (beluga or rightwhale)" >&2; exit 2 ;;
esac
echo "$SET: $(($(wc -l < "$OUT/data/train.csv") - 1)) training photos, $(($(wc -l < "$OUT/calib_labels.csv") - 1)) calibration photos, $(($(wc -l < "$OUT/val_labels.csv") - 1)) validation photos"
[[ ${1:-} == --prepare-only ]] && exit 0

EVAL=(--labels "$OUT/val_labels.csv" --images "$SRC" "${EXCLUDE[@]}" --bootstrap "$BOOT")
LOCAL+=(--local rootsift --local-features "$OUT/local.features")
if ((${UNTRAINED:-1})); then
  echo "== untrained: pretrained EfficientNet-Lite0, GeM features, 224×224"
  "$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${EVAL[@]}"
  if ((${#SIZE[@]})); then
    echo "== untrained, ${SIZE[*]}"
    "$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${SIZE[@]}" "${EVAL[@]}"
  fi
  echo "== untrained Lite0 with local features (RootSIFT, LNBNN, affine RANSAC) re-scoring its shortlist,"
  echo "   fused by probabilities calibrated on the training animals"
  "$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${SIZE[@]}" "${EVAL[@]}" \
    "${LOCAL[@]}" --calibration-labels "$OUT/train_labels.csv"
fi
rm -rf "$OUT/run"
(($#)) || set -- --mode frozen --model efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 "${SIZE[@]}"
echo "== finprint train $*"
start=$(date +%s)
"$FINPRINT" train --data "$OUT/data" --out "$OUT/run" "$@"
echo "trained in $(($(date +%s) - start)) s"
"$FINPRINT" report "$OUT/run"
echo "== trained, against untrained Lite0 at 224×224"
"$FINPRINT" evaluate --models "$OUT/run" "${EVAL[@]}" --baseline efficientnet_lite0
echo "== trained, with local features fused, calibrated on the held-out training animals"
"$FINPRINT" evaluate --models "$OUT/run" "${EVAL[@]}" "${LOCAL[@]}" \
  --calibration-labels "$OUT/calib_labels.csv" --save-calibration "$OUT/run/calibration.json"
