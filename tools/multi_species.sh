#!/usr/bin/env bash
# One model for several species, against one model per species, on the real photo sets of
# ../shared/data (development protocols of its README): the training animals of nyala, beluga
# and right whale, each set's validation animals never trained on.
#
#   bash tools/multi_species.sh [OUT] [`finprint train` flags...]
#
# OUT (default runs/multi) gets each set prepared in Kaggle's layout (OUT/SET, by
# tools/real_set.sh with --prepare-only), one run per set (OUT/SET/run) and
# one on all sets together (OUT/run, `train --data A,B,C`: ids kept apart by folder). Every run
# trains alike: without flags, the frozen mode on the three pretrained Lite backbones at their
# own square sizes. Each set's validation animals are then evaluated with the multi-species
# run, with the paired gain over that set's own run (`--baseline RUN`), 95% bootstrap
# intervals over animals. Sets missing from ../shared/data are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/multi}
shift || true
FINPRINT=${FINPRINT:-target/release/finprint}
BOOT=${BOOTSTRAP:-1000}
(($#)) || set -- --mode frozen --model efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
DATA=$(realpath ../shared/data 2>/dev/null || echo ../shared/data)

sets=()
declare -A EVAL
for set in nyala beluga rightwhale; do
  folder=$set
  [[ $set == nyala ]] && folder=nyala-train
  [[ -f $DATA/$folder/labels.csv ]] || continue
  FINPRINT=$FINPRINT bash tools/real_set.sh "$set" "$OUT/$set" --prepare-only
  sets+=("$set")
  EVAL[$set]="--labels $OUT/$set/val_labels.csv --images $DATA/$folder"
done
EVAL[nyala]+=" --group view"
EVAL[beluga]+=" --exclude-same encounter"
((${#sets[@]})) || { echo "skipped: no real set in ../shared/data"; exit 0; }

train() {
  local data=$1 out=$2
  rm -rf "$out"
  echo "== finprint train --data $data ${*:3}"
  local start
  start=$(date +%s)
  # --flips none: a mirror turns a nyala's flank into the other one.
  "$FINPRINT" train --data "$data" --out "$out" --flips none "${@:3}"
  echo "trained in $(($(date +%s) - start)) s"
}
folders=()
for set in "${sets[@]}"; do
  train "$OUT/$set/data" "$OUT/$set/run" "$@"
  folders+=("$OUT/$set/data")
done
train "$(IFS=,; echo "${folders[*]}")" "$OUT/run" "$@"
"$FINPRINT" report "$OUT/run"
for set in "${sets[@]}"; do
  echo "== $set: the multi-species run, against the $set run"
  # shellcheck disable=SC2086 # EVAL holds flags
  "$FINPRINT" evaluate --models "$OUT/run" ${EVAL[$set]} --bootstrap "$BOOT" \
    --baseline "$OUT/$set/run" --json "$OUT/$set.json"
done
