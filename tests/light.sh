#!/usr/bin/env bash
# The light build (no libtorch: `--no-default-features --features onnx`) identifies with a run
# the full build trained, as the full build does: `predict` scores the same submission,
# `evaluate` gives the same figures, `embed` the same vectors within 1e-4, and `serve` answers
# an identification. Run by tools/test.sh after the full build's tests; target/release/finprint
# is the full build again at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d)
SERVER=
trap '[[ -n $SERVER ]] && kill "$SERVER" 2>/dev/null; rm -rf "$W"' EXIT
fail() { echo "light build: $*" >&2; exit 1; }

cargo build --release --locked --bins
FULL=$W/finprint-full
cp target/release/finprint "$FULL"
"$FULL" synth --out "$W/cat" --individuals 40 --width 192 --height 128 > /dev/null
"$FULL" train --data "$W/cat" --out "$W/run" --mode fast --img-size 96 --epochs 2 \
  --folds 3 --threads 2 2> /dev/null
[[ -f $W/run/best/onnx/0-efficientnet_lite0-96.onnx ]] || fail "training wrote no ONNX network"

cargo build --release --locked --no-default-features --features onnx --bins
LIGHT=$W/finprint-light
cp target/release/finprint "$LIGHT"
! ldd "$LIGHT" | grep -q torch || fail "the light binary links libtorch"
! "$LIGHT" train --help > /dev/null 2>&1 || fail "the light binary should have no train"

score() { "$1" score --solution "$W/cat/test_solution.csv" --submission "$2"; }
for b in full light; do
  bin=$W/finprint-$b
  "$bin" predict --models "$W/run" --data "$W/cat" --out "$W/$b.csv" > /dev/null
  score "$bin" "$W/$b.csv" > "$W/$b.score"
  "$bin" evaluate --models "$W/run" --labels "$W/cat/train.csv" --images "$W/cat/train_images" \
    --bootstrap 0 > "$W/$b.eval"
  "$bin" embed --models "$W/run" --images "$W/cat/test_images" --out "$W/$b.safetensors" > /dev/null
done
echo "predict, full then light: $(cat "$W/full.score") / $(cat "$W/light.score")"
cmp -s "$W/full.score" "$W/light.score" || fail "predict scores differ"
head -2 "$W/light.eval"
cmp -s <(head -2 "$W/full.eval") <(head -2 "$W/light.eval") || fail "evaluate differs"
python3 - "$W/full.safetensors" "$W/light.safetensors" <<'EOF'
import json, struct, sys
def rows(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    t = json.loads(data[8:8 + n])["embeddings"]
    start, end = t["data_offsets"]
    raw = data[8 + n + start:8 + n + end]
    return t["shape"], struct.unpack(f"<{len(raw) // 4}f", raw)
(sa, a), (sb, b) = rows(sys.argv[1]), rows(sys.argv[2])
diff = max(abs(x - y) for x, y in zip(a, b))
print(f"embed: {sa[0]} photos, max |diff| {diff:.1e}")
assert sa == sb and diff <= 1e-4, diff
EOF

PORT=$((20000 + RANDOM % 20000))
"$LIGHT" serve --catalog "$W/catalog" --import "$W/cat" --models "$W/run" --token t \
  --addr "127.0.0.1:$PORT" > "$W/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/api/health" -H 'Authorization: Bearer t' > /dev/null && break
  sleep 1
done
PHOTO=$(ls "$W/cat/test_images" | head -1)
curl -sf -H 'Authorization: Bearer t' -F "photo=@$W/cat/test_images/$PHOTO" \
  "http://127.0.0.1:$PORT/api/identify" > "$W/identify.json" || fail "serve: $(cat "$W/serve.log")"
grep -q '"candidates"' "$W/identify.json" || fail "serve answered $(cat "$W/identify.json")"
echo "serve: identified $PHOTO"
# Both builds' artifacts stay cached: this only puts the full binary back.
cargo build --release --locked --bins
echo "the light build identifies as the full build does"
