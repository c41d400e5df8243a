#!/usr/bin/env bash
# Identification of animals never trained on, on a real photo set of ../shared/data (the
# development protocols of its README): train on the `train` animals, measure leave-one-out on
# the `val` animals, with 95% bootstrap intervals over animals and the paired gain over the
# untrained features.
#
#   bash tools/real_set.sh SET [OUT] [`finprint train` flags... | --prepare-only]
#
# SET is nyala, beluga or rightwhale. OUT (default runs/SET) gets data/ (the training animals
# in Kaggle's layout, with an encounter column where the set has one), calib_labels.csv (every
# fifth training animal of dev_split.csv, held out of training to calibrate the trained model's
# fusion with local features), train_labels.csv (all training animals: the untrained features'
# calibration) and val_labels.csv.
# - Nyala: the identity is the animal and its flank (`--group view`), repeated files dropped,
#   no mirror in training, keypoints in the ellipse of the body band.
# - Belugas: one photo per encounter of the val whales, each query's gallery without its own
#   encounter (`--exclude-same encounter`); the photos are tall and narrow, so the input keeps
#   their aspect (EVAL_FLAGS, default `--img-size 128x384 --fit pad`).
# Then the untrained features with local features fused (`--local rootsift`, calibrated on the
# training animals, descriptors whitened on theirs by the default `--local-whitening 0.5`).
# Without train flags it trains the set's default, and measures it alone and
# fused with local features (calibrated on the held-out training animals): right whales the full
# mode (Lite0, 10 epochs, mirrored either way with p .5, no grid shuffle, batches of 32; about 8
# minutes on 2 cores), the others the frozen mode on the three pretrained Lite backbones.
# UNTRAINED=0 leaves out the untrained rows, TRAINED=0 the trained ones.
# Every evaluation also writes its per-query table to OUT (untrained.csv, untrained_local.csv,
# trained.csv, trained_local.csv) for `finprint compare`.
#
# Cross-validation (`tools/crossval.sh`): with FOLDS=K and FOLD=k, the val animals are fold k of
# all the dev animals (every K-th in dev_split.csv's order from the k-th), the others training
# animals. LOCAL_FLAGS replaces the set's local-feature settings; FEATURES names the features
# file (default OUT/local.features), which folds can share; CALIBRATIONS=DIR reuses the
# untrained fusion's calibration an earlier run into DIR saved.
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:?usage: tools/real_set.sh nyala|beluga|rightwhale [OUT] [train flags...]}
shift
FOLDER=$SET
[[ $SET == nyala ]] && FOLDER=nyala-train
SRC=$(realpath "../shared/data/$FOLDER" 2>/dev/null || true)
if [[ -z $SRC || ! -f $SRC/labels.csv ]]; then
  echo "skipped: ../shared/data/$FOLDER not found"
  exit 0
fi
OUT=${1:-runs/$SET}
shift || true
FINPRINT=${FINPRINT:-target/release/finprint}
BOOT=${BOOTSTRAP:-1000}
mkdir -p "$OUT/data"
ln -sfn "$SRC" "$OUT/data/train_images"
# The dev roles of labels.csv's rows (image,individual_id,species,...) written out: data/train.csv
# in Kaggle's layout and the label lists. Column numbers, where set: ENCOUNTER, an encounter
# column (the val animals keep one photo per encounter); GROUP, a part of the identity (nyala's
# flank: `ID/GROUP` in train.csv, a `view` column in the label lists); DEDUPE, a checksum
# (repeated files kept once).
split() {
  awk -F, -v roles="$SRC/dev_split.csv" -v train="$OUT/data/train.csv" -v val="$OUT/val_labels.csv" \
      -v calib="$OUT/calib_labels.csv" -v all="$OUT/train_labels.csv" -v enc="${ENCOUNTER:-0}" \
      -v grp="${GROUP:-0}" -v dedupe="${DEDUPE:-0}" -v folds="${FOLDS:-0}" -v fold="${FOLD:-0}" '
    BEGIN { while ((getline line < roles) > 0) { sub(/\r$/, "", line); split(line, f, ","); role[f[1]] = f[2]
              if (folds && (f[2] == "train" || f[2] == "val")) role[f[1]] = (animals++ % folds == fold) ? "val" : "train"
              if (role[f[1]] == "train" && ++n % 5 == 0) role[f[1]] = "calib" }
            e = enc ? ",encounter" : ""; h = e (grp ? ",view" : "")
            print "image,species,individual_id" e > train; print "image,individual_id" h > val
            print "image,individual_id" h > calib; print "image,individual_id" h > all }
    { sub(/\r$/, "") }
    NR == 1 || (dedupe && copies[$dedupe]++) { next }
    { e = enc ? "," $enc : ""; g = grp ? "," $grp : ""; id = grp ? $2 "/" $grp : $2 }
    role[$2] == "train" { print $1 "," $3 "," id e > train }
    role[$2] == "calib" { print $1 "," $2 e g > calib }
    role[$2] == "train" || role[$2] == "calib" { print $1 "," $2 e g > all }
    role[$2] == "val" && (!enc || !seen[$enc]++) { print $1 "," $2 e g > val }' "$SRC/labels.csv"
}
FLIPS=()
TRAIN=(--mode frozen --model efficientnet_lite0,efficientnet_lite1,efficientnet_lite2)
case $SET in
  nyala)
    # labels.csv: image,individual_id,species,original_split,view,width,height,md5,source.
    # The identity is the animal and its flank; a mirror turns one flank into the other.
    GROUP=5 DEDUPE=8 split
    EXCLUDE=(--group view)
    read -r -a SIZE <<< "${EVAL_FLAGS:-}"
    FLIPS=(--flips none)
    # Keypoints in the ellipse of the body band only: animals photographed at one waterhole
    # share its ground. Descriptors whitened (the default; five folds fused: top-1 +.041,
    # +.019 to +.064; BENCHMARKS.md).
    read -r -a LOCAL <<< "${LOCAL_FLAGS---local-region ellipse:0.1,0.2,0.9,0.8}"
    ;;
  beluga)
    # labels.csv: image,individual_id,species,encounter,date
    ENCOUNTER=4 split
    EXCLUDE=(--exclude-same encounter)
    read -r -a SIZE <<< "${EVAL_FLAGS:---img-size 128x384 --fit pad}"
    # Scars on the back are small and faint: match at about the photos' own 460 px (the
    # default contrast threshold, 0.005, finds about 1,090 keypoints in a back's ellipse;
    # OpenCV's 0.04, about 90), described by DISK (five folds fused, against RootSIFT: top-1
    # .283 -> .343, +.060, +.009 to +.116; BENCHMARKS.md) and whitened (the default).
    read -r -a LOCAL <<< "${LOCAL_FLAGS---local sift-disk --local-size 512}"
    ;;
  rightwhale)
    # labels.csv: image,individual_id,species
    split
    EXCLUDE=()
    read -r -a SIZE <<< "${EVAL_FLAGS:-}"
    # The heads are cropped and rotated to the callosities, so a mark sits near the same place
    # in every photo of its whale: LNBNN weighs the keypoints' positions too (five folds fused:
    # top-1 +.026, +.016 to +.038; BENCHMARKS.md). Descriptors unwhitened, as the trained
    # row below was measured (whitened, the untrained row is level: +.003, −.009 to +.014).
    read -r -a LOCAL <<< "${LOCAL_FLAGS---local-position-weight 1 --local-whitening 0}"
    # Full fine-tuning learns callosities that carry to whales it never saw (five folds, top-1
    # over the untrained features: alone +.152, +.125 to +.181; both with local features, .742 →
    # .788, +.046, +.026 to +.066; BENCHMARKS.md).
    TRAIN=(--mode full --epochs 10 --flips both --hflip-p 0.5 --vflip-p 0.5 --grid-shuffle-p 0 --batch-size 32)
    ;;
  *) echo "unknown set $SET (nyala, beluga or rightwhale)" >&2; exit 2 ;;
esac
echo "$SET: $(($(wc -l < "$OUT/data/train.csv") - 1)) training photos, $(($(wc -l < "$OUT/calib_labels.csv") - 1)) calibration photos, $(($(wc -l < "$OUT/val_labels.csv") - 1)) validation photos"
[[ ${1:-} == --prepare-only ]] && exit 0

EVAL=(--labels "$OUT/val_labels.csv" --images "$SRC" "${EXCLUDE[@]}" --bootstrap "$BOOT")
# RootSIFT unless the set's settings (or LOCAL_FLAGS) name another `--local` method.
[[ " ${LOCAL[*]} " == *" --local "* ]] || LOCAL+=(--local rootsift)
LOCAL+=(--local-features "${FEATURES:-$OUT/local.features}")
# The untrained fusion's calibration: fitted on the training animals and saved, or with
# CALIBRATIONS=DIR the one an earlier run into DIR saved (settings that change neither the
# features nor the fits then cost only the val queries).
CALIBRATE=(--calibration-labels "$OUT/train_labels.csv" --save-calibration "$OUT/untrained_calibration.json")
[[ -n ${CALIBRATIONS:-} ]] && CALIBRATE=(--calibration "$CALIBRATIONS/untrained_calibration.json")
if ((${UNTRAINED:-1})); then
  echo "== untrained: pretrained EfficientNet-Lite0, GeM features, 224×224"
  "$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${EVAL[@]}" --queries "$OUT/untrained.csv"
  if ((${#SIZE[@]})); then
    echo "== untrained, ${SIZE[*]}"
    "$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${SIZE[@]}" "${EVAL[@]}"
  fi
  echo "== untrained Lite0 with local features (${LOCAL[*]}; LNBNN, affine RANSAC) re-scoring its shortlist,"
  echo "   fused by probabilities calibrated on the training animals"
  "$FINPRINT" evaluate --zero-shot efficientnet_lite0 "${SIZE[@]}" "${EVAL[@]}" \
    "${LOCAL[@]}" "${CALIBRATE[@]}" --queries "$OUT/untrained_local.csv"
fi
((${TRAINED:-1})) || exit 0
rm -rf "$OUT/run"
(($#)) || set -- "${TRAIN[@]}" "${SIZE[@]}"
echo "== finprint train $*"
start=$(date +%s)
"$FINPRINT" train --data "$OUT/data" --out "$OUT/run" "${FLIPS[@]}" "$@"
echo "trained in $(($(date +%s) - start)) s"
"$FINPRINT" report "$OUT/run"
echo "== trained, against untrained Lite0 at 224×224"
"$FINPRINT" evaluate --models "$OUT/run" "${EVAL[@]}" --baseline efficientnet_lite0 \
  --queries "$OUT/trained.csv"
echo "== trained, with local features fused, calibrated on the held-out training animals"
"$FINPRINT" evaluate --models "$OUT/run" "${EVAL[@]}" "${LOCAL[@]}" \
  --calibration-labels "$OUT/calib_labels.csv" --save-calibration "$OUT/run/calibration.json" \
  --queries "$OUT/trained_local.csv"
