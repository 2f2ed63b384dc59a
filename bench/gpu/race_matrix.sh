#!/usr/bin/env bash
# Which one-GPU configs answer, and which fail asynchronously (issue #10's 1-GPU comparison, session 6):
# the 13B synth base with 4b24 deltas, contiguous KV cache, on one GPU answered every request with
# `CublasError(CUBLAS_STATUS_EXECUTION_FAILED)` or not at all, while CUDA_LAUNCH_BLOCKING=1 answered.
# This runs a small matrix, shape x KV cache x load threads x launch blocking, each a fresh server asked
# the same few greedy requests (base first, then two fine-tunes), and prints one line per config:
# answers ok / failed, the first error, seconds. Then, if a config failed and compute-sanitizer is
# there, one memcheck run of the first failing config with a single base request.
#
#   DZ=... CORPUS=... bash bench/gpu/race_matrix.sh [SHAPES] [KV] [THREADS] [BLOCKING]
#   e.g. bash bench/gpu/race_matrix.sh "llama-13b llama-7b" "contiguous paged" "4 1" "0"
#
# Base models and deltas are generated once per shape into $W (kept while the machine is warm).
set -u
W=${DZ_WORK:-/tmp/dzrace}
DZ=${DZ:?DZ: a deltazip built with --features cuda or nccl}
OUT=${OUT:-$W/out}
SHAPES=${1:-llama-13b llama-7b}
KVS=${2:-contiguous paged}
THREADS=${3:-4 1}
BLOCKING=${4:-0}
mkdir -p "$W" "$OUT"
export NCCL_NVLS_ENABLE=0
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl}:${LD_LIBRARY_PATH:-}

ask() { # ask PORT MODEL: one greedy completion; prints ok or the error
    local r
    r=$(timeout 60 curl -s "http://127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' \
        -d "{\"model\":\"$2\",\"prompt\":\"def fibonacci(n):\",\"max_tokens\":16,\"temperature\":0}") \
        || { echo "timeout"; return; }
    if echo "$r" | grep -q '"choices"'; then echo ok; else echo "$r" | head -c 600 | tr '\n' ' '; fi
}

port=8400
first_fail=""
echo "| shape | kv cache | load threads | blocking | base | ft-00 | ft-01 | seconds |"
echo "|---|---|---:|---:|---|---|---|---:|"
for shape in $SHAPES; do
    base=$W/$shape
    if [[ ! -f $base/config.json ]]; then
        "$DZ" synth model --shape "$shape" --dtype bf16 --seed 1 --out "$base" > "$OUT/synth-$shape.log" 2>&1
        "$DZ" synth deltas --base "$base" --codec 4b24 --count 2 --seed 7 --out-dir "$base-d" --jobs 4 \
            >> "$OUT/synth-$shape.log" 2>&1
    fi
    for kv in $KVS; do
        for th in $THREADS; do
            for blk in $BLOCKING; do
                cfg=$OUT/$shape-$kv-$th-$blk.toml
                {
                    echo "[base]"; echo "path = \"$base\""; echo 'dtype = "bf16"'; echo 'name = "base"'
                    for i in 0 1; do
                        printf '[[delta]]\nname = "ft-%02d"\npath = "%s-d/ft-%02d.dz"\nmode = "multi-tenant"\n' $i "$base" $i
                    done
                    echo "[runtime]"; echo 'device = "cuda"'; echo "kv_cache = \"$kv\""
                    echo 'kv_cache_bytes = "8GiB"'; echo "load_threads = $th"
                } > "$cfg"
                port=$((port + 1))
                t0=$(date +%s)
                log=$OUT/serve-$shape-$kv-$th-$blk.log
                if [[ $blk == 1 ]]; then
                    CUDA_LAUNCH_BLOCKING=1 "$DZ" serve --config "$cfg" --port $port > "$log" 2>&1 &
                else
                    "$DZ" serve --config "$cfg" --port $port > "$log" 2>&1 &
                fi
                pid=$!
                for _ in $(seq 180); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
                a=$(ask $port base); b=$(ask $port ft-00); c=$(ask $port ft-01)
                kill $pid 2> /dev/null; wait $pid 2> /dev/null
                echo "| $shape | $kv | $th | $blk | $a | $b | $c | $(($(date +%s) - t0)) |"
                [[ -z $first_fail && "$a$b$c" != okokok ]] && first_fail=$cfg
            done
        done
    done
done
CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [[ -n $first_fail && -n $CS ]]; then
    echo "memcheck on $first_fail (one base request)"
    port=$((port + 1))
    timeout 240 "$CS" --tool memcheck --print-limit 20 "$DZ" serve --config "$first_fail" --port $port \
        > "$OUT/memcheck.log" 2>&1 &
    for _ in $(seq 200); do curl -sf "http://127.0.0.1:$port/health" > /dev/null && break; sleep 1; done
    echo "memcheck base: $(ask $port base)"
    sleep 2; pkill -f "compute-sanitizer" 2> /dev/null; sleep 2
    grep -E "^========= (Invalid|Program hit|Error|ERROR)|at 0x|by thread" "$OUT/memcheck.log" | head -20
fi
