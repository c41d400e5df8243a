#!/usr/bin/env bash
# The GPU training screen, run on the device machine from the repository root with gpu/ carried
# (made by tools/gpu_screen/prep.py): every (recipe, fold) of tools/gpu_screen/recipes.py as its
# own process, PAR (10) at a time, for at most BUDGET (430) seconds; RECIPES_LIST picks recipes.
# $OUT gets results.jsonl (read here by tools/gpu_screen/analyse.py), log.txt and gpu.txt; each
# job writes its lines into $OUT/res/ as it goes, so a run cut short still brings them back.
set -u
res=$OUT/res
mkdir -p "$res"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, timm; print(torch.__version__, timm.__version__, torch.cuda.is_available())" >> "$OUT/gpu.txt" 2>&1
for r in ${RECIPES_LIST:-b_full r_full b_fast b_low b_strong r_low b_lite2 r_fast}; do
  for f in 0 1 2 3 4; do echo "$r $f $res"; done
done > /tmp/jobs
start=$(date +%s)
timeout "${BUDGET:-430}" xargs -P "${PAR:-10}" -L1 sh -c 'python3 tools/gpu_screen/recipes.py $0 $1 $2 > $2/log_$0_$1.txt 2>&1' < /tmp/jobs
echo "screen took $(($(date +%s) - start)) s" >> "$OUT/gpu.txt"
cat "$res"/*.jsonl > "$OUT/results.jsonl"
tail -n 3 "$res"/log_* > "$OUT/log.txt"
grep -l -i "error\|Traceback" "$res"/log_* | head -3 | xargs -r tail -n 20 >> "$OUT/log.txt"
nvidia-smi >> "$OUT/gpu.txt" 2>&1
ls "$res" | wc -l
