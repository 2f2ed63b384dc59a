#!/usr/bin/env bash
# Multi-tenant mode on the GPU through the host (mistral.rs): the same delta served multi-tenant
# (base + per-row delta, dz-candle-ops' CUDA sbmm inside the host's layers) and merged must generate the
# same greedy text. Runs after bench/quality/device_run.sh on the same machine (it reuses the SmolLM2
# base and a compressed delta that run left under $DZ_WORK).
#
#   bash bench/gpu/multitenant_smoke.sh [DELTAZIP_BINARY]
set -u
W=${DZ_WORK:-/tmp/dz}
DZ=${1:-$W/bin/deltazip}
# Not $OUT: the merged model and the delta would not fit what a device call brings back.
OUT=${SMOKE_DIR:-/tmp/mt-smoke}
mkdir -p "$OUT"
ft=$(ls -d "$W"/ft/*/ 2>/dev/null | head -1)
if [[ -z "$ft" || ! -d "$W/base" ]]; then
    echo "no base/fine-tune under $W: run bench/quality/device_run.sh first"
    exit 1
fi
ft=${ft%/}
delta="$OUT/$(basename "$ft")-4b24.dz"
T0=$(date +%s)
"$DZ" compress --base "$W/base" --finetuned "$ft" --out "$delta" --method obs --bits 4 --sparsity 2:4 \
    --calib "$W/corpora/$(basename "$ft").train.txt" --samples 32 --device cuda > "$OUT/compress.log" 2>&1 ||
    { echo "compress failed"; tail -5 "$OUT/compress.log"; exit 1; }
echo "compressed $(basename "$ft") in $(($(date +%s) - T0)) s: $(du -h "$delta" | cut -f1)"
cfg="$OUT/serve.toml"
cat > "$cfg" <<EOF
[base]
path = "$W/base"
dtype = "bf16"
name = "base"
[[delta]]
name = "mt"
path = "$delta"
mode = "multi-tenant"
[[delta]]
name = "merged"
path = "$delta"
mode = "merge"
[runtime]
device = "cuda"
merged_dir = "$OUT/merged"
EOF
echo "delta: $delta"
status=0
for prompt in "def fibonacci(n):" "In the beginning" "The word 'serendipity' means"; do
    for m in mt merged base; do
        T0=$(date +%s%N)
        "$DZ" run --config "$cfg" --model "$m" --prompt "$prompt" --max-tokens 24 > "$OUT/$m.txt" 2> "$OUT/$m.err"
        rc=$?
        printf '%-7s rc=%d %5d ms %q\n' "$m" "$rc" "$((($(date +%s%N) - T0) / 1000000))" "$(head -c 120 "$OUT/$m.txt")"
        [[ $rc == 0 ]] || { tail -3 "$OUT/$m.err"; status=1; }
    done
    # bf16: x.W + x.D (f32 sums) vs x.(W + D) rounded to bf16 may part at a near-tie; report where.
    if cmp -s "$OUT/mt.txt" "$OUT/merged.txt"; then echo "  multi-tenant == merged"; else
        echo "  multi-tenant and merged part at byte $(cmp "$OUT/mt.txt" "$OUT/merged.txt" | grep -o 'byte [0-9]*' | cut -d' ' -f2)"; fi
    if cmp -s "$OUT/mt.txt" "$OUT/base.txt"; then echo "  (same as the base)"; fi
done
exit $status
