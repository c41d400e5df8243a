#!/usr/bin/env bash
# K-fold cross-validation over all the dev animals of a real set: `tools/real_set.sh` on each
# fold (the fold's animals measured, the others trained on and calibrated on), then every
# fold's per-query tables pooled by `finprint compare` into one evaluation of all the animals,
# with 95% intervals over them and paired gains.
#
#   bash tools/crossval.sh SET [OUT] [`finprint train` flags...]
#
# SET is nyala, beluga or rightwhale; OUT defaults to runs/cv/SET. FOLDS (default 5) sets K.
# The environment of tools/real_set.sh applies: TRAINED=0 runs the untrained rows only (no
# training: minutes), UNTRAINED=0 the trained ones only, LOCAL_FLAGS other local settings. The
# folds share one features file, so local features are extracted once per setting;
# CALIBRATIONS=OTHER_OUT reuses the untrained calibrations of an earlier run of the same folds.
# To compare two settings, run each into its own OUT and compare their tables:
#
#   finprint compare "$(ls A/fold*/untrained_local.csv | paste -sd,)" \
#                    "$(ls B/fold*/untrained_local.csv | paste -sd,)"
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:?usage: tools/crossval.sh nyala|beluga|rightwhale [OUT] [train flags...]}
shift
OUT=${1:-runs/cv/$SET}
shift || true
K=${FOLDS:-5}
FINPRINT=${FINPRINT:-target/release/finprint}
mkdir -p "$OUT"
for ((k = 0; k < K; k++)); do
  echo "=== $SET fold $((k + 1)) of $K"
  FOLDS=$K FOLD=$k FEATURES=${FEATURES:-$OUT/local.features} \
    CALIBRATIONS=${CALIBRATIONS:+$CALIBRATIONS/fold$k} \
    bash tools/real_set.sh "$SET" "$OUT/fold$k" "$@"
done
# The folds' tables of NAME, comma-separated, when every fold wrote one.
pooled() {
  local files=() k
  for ((k = 0; k < K; k++)); do
    [[ -f $OUT/fold$k/$1.csv ]] || return 1
    files+=("$OUT/fold$k/$1.csv")
  done
  (IFS=,; echo "${files[*]}")
}
echo "=== $SET: $K folds pooled"
if u=$(pooled untrained_local); then
  echo "== untrained Lite0 alone, then with local features fused"
  "$FINPRINT" compare "$u:embedding_rank" "$u" --json "$OUT/untrained_local.json"
fi
if t=$(pooled trained) && l=$(pooled trained_local); then
  echo "== untrained Lite0, trained, trained with local features fused"
  "$FINPRINT" compare "$t:baseline_rank" "$t" "$l" --json "$OUT/trained.json"
fi
