#!/usr/bin/env bash
# Issue #10 on a 2-GPU machine: a 13B-shaped Llama (random weights, `deltazip synth`) with 32 multi-tenant
# deltas served with tensor_parallel = 2 and on one GPU; greedy outputs compared (tp_check.py) and the
# same open-loop workload measured on both (`deltazip bench serve`).
#
#   bash bench/gpu/tp_serve.sh PHASE...      PHASE: gen | tp1 | tp2 | cmp
#
# Needs: $DZ (a deltazip built with --features nccl), $CORPUS (a text file for prompts), python3; NCCL
# from PyTorch's wheel. State lives in $W (kept while the machine is warm); results go to $OUT.
set -u
W=${DZ_WORK:-/tmp/dztp}
DZ=${DZ:-$W/deltazip}
OUT=${OUT:-$W/out}
CODEC=${CODEC:-4b24}
DISTINCT=${DISTINCT:-8}   # distinct delta files; 32 names cycle over them (disk: 128 GB)
N=${N:-32}
# LAYERS (e.g. 4): a 13B-wide model with that many layers (its own base and deltas folders). The greedy
# check of session 9 could not tell sharding from rounding on the 40-layer synthetic model: its random
# layers amplify bf16 summation-order differences until the flat next-token distributions' argmax flips
# (base TP2 vs TP1: 0.13-0.25 apart in first-token log-probs). A shallow model keeps rounding small,
# while a wrongly sharded delta still moves the log-probs by the delta's own effect.
BASE=base13b${LAYERS:+-l$LAYERS}
DELTAS=deltas${LAYERS:+-l$LAYERS}
# DTYPE (default bf16): the base's dtype in the served config. f32 shrinks the summation-order rounding
# by 2^16, so a check in f32 tells sharding errors from rounding outright (the v4 kernels take f16/bf16
# only: the generic and tensor-core kernels run).
DTYPE=${DTYPE:-bf16}
# The configs are per model and dtype: session 10 generated the 40- and 4-layer models into one $W, and
# both runs then served the 4-layer one through the shared tp1.toml / tp2.toml.
CFG=${LAYERS:+l$LAYERS-}$DTYPE
RATES=${RATES:-4,16}
REQS=${REQS:-64}          # 0: the greedy check only, no throughput run
# Requests in flight at once (host patch 0011 keeps the NCCL ranks in step however requests overlap;
# before it, more than 1 hung).
MAX_INFLIGHT=${MAX_INFLIGHT:-256}
# KV_CACHE (default auto: paged on CUDA). With "contiguous" the host's default scheduler decodes only the
# sequences of one length per step: concurrent requests then take turns (session 7, TP2: TPOT ~1.1 s for
# ~19 sequences; session 4, one GPU: 0.6-0.8 s). DZ_TP_TRACE=1: one line per step and rank
# in serve-*.log (host patch 0013; `grep dz-tp-trace`).
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$W" "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl}:${LD_LIBRARY_PATH:-}

config() { # config FILE TP GPU_DELTA_BYTES
    {
        echo "[base]"; echo "path = \"$W/$BASE\""; echo "dtype = \"$DTYPE\""; echo 'name = "base"'
        for i in $(seq 0 $((N - 1))); do
            f=$(printf '%s/%s/ft-%02d.dz' "$W" "$DELTAS" $((i % DISTINCT)))
            printf '[[delta]]\nname = "ft-%02d"\npath = "%s"\nmode = "multi-tenant"\n' "$i" "$f"
        done
        echo "[runtime]"; echo 'device = "cuda"'; echo "tensor_parallel = $2"
        echo "gpu_delta_bytes = \"$3\""; echo 'cpu_cache_bytes = "200GiB"'
        echo "kv_cache = \"${KV_CACHE:-auto}\""
        echo "load_threads = ${LOAD_THREADS:-1}"
        echo "[scheduler]"; echo "max_seqs = 32"; echo "max_deltas_per_step = 8"
    } > "$1"
}

serve() { # serve NAME CONFIG PORT: start, wait for /health (up to 420 s)
    # RUST_LOG: the host logs a failed step's error (sessions 8-9's TP1 cuBLAS failures left no line).
    # TP1_GPUS (e.g. 0): the GPUs tp1 sees. Unset, it sees both, as in sessions 6-9, whose TP1 runs
    # alone had CUBLAS_STATUS_EXECUTION_FAILED; every one-GPU run with one GPU visible had none.
    local vis=()
    [[ $1 == tp1 && -n ${TP1_GPUS:-} ]] && vis=(env CUDA_VISIBLE_DEVICES="$TP1_GPUS")
    "${vis[@]}" env RUST_LOG="${RUST_LOG:-mistralrs_core=error}" RUST_BACKTRACE="${RUST_BACKTRACE:-1}" \
        "$DZ" serve --config "$2" --port "$3" > "$OUT/serve-$1.log" 2>&1 &
    echo $! > "$W/serve-$1.pid"
    local t0=$(date +%s)
    until curl -sf "http://127.0.0.1:$3/health" > /dev/null; do
        sleep 2
        if ! kill -0 "$(cat "$W/serve-$1.pid")" 2> /dev/null; then
            echo "serve $1 exited"; tail -20 "$OUT/serve-$1.log"; return 1
        fi
        if (($(date +%s) - t0 > 420)); then echo "serve $1: not up in 420 s"; tail -5 "$OUT/serve-$1.log"; return 1; fi
    done
    echo "serve $1 up in $(($(date +%s) - t0)) s"
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | sed "s/^/  $1 gpu /"
}

stop() {
    kill "$(cat "$W/serve-$1.pid")" 2> /dev/null
    sleep 3
    pkill -f "deltazip serve" 2> /dev/null
    sleep 2
}

phase_gen() {
    nvidia-smi -L
    python3 -c 'import torch; print("torch nccl", torch.cuda.nccl.version())'
    echo "nccl lib: $nccl"; ldd "$DZ" | grep -E "nccl|not found"
    if [[ ! -f "$W/$BASE/config.json" ]]; then
        "$DZ" synth model --shape llama-13b ${LAYERS:+--layers "$LAYERS"} --dtype bf16 --seed 1 \
            --out "$W/$BASE" 2>&1 | tail -2
    fi
    if [[ ! -f "$W/$DELTAS/ft-$(printf %02d $((DISTINCT - 1))).dz" ]]; then
        rm -rf "${W:?}/$DELTAS"
        "$DZ" synth deltas --base "$W/$BASE" --codec "$CODEC" --count "$DISTINCT" --seed 7 \
            --out-dir "$W/$DELTAS" --jobs 8 2>&1 | tail -3
    fi
    df -h "$W" | tail -1
    configs
    "$DZ" serve --config "$W/tp2-$CFG.toml" --dry-run | grep -v "^  ft-" | tee "$OUT/plan-tp2.txt"
}

configs() { # the two configs of this model and dtype (written by gen, and by a run when missing)
    config "$W/tp1-$CFG.toml" 1 "90GiB"
    config "$W/tp2-$CFG.toml" 2 "90GiB"
}

models() { seq -f 'ft-%02g' 0 $((N - 1)) | paste -sd,; }

phase_run() { # phase_run tp1|tp2 PORT
    echo "kv_cache = ${KV_CACHE:-auto}, DZ_TP_TRACE = ${DZ_TP_TRACE:-}"
    [[ -f "$W/$1-$CFG.toml" ]] || configs
    serve "$1" "$W/$1-$CFG.toml" "$2" || { stop "$1"; return 1; }
    # The base and the first, a middle and the last fine-tune (names exist for any N).
    python3 "$here/tp_check.py" collect "http://127.0.0.1:$2" "$OUT/check-$1.json" \
        "base,ft-00,$(printf 'ft-%02d,ft-%02d' $((N / 2)) $((N - 1)))"
    [[ $REQS == 0 ]] || "$DZ" bench serve --url "http://127.0.0.1:$2" --models "$(models)" --api completions \
        --rates "$RATES" --requests "$REQS" --max-inflight "$MAX_INFLIGHT" --popularity uniform --corpus "$CORPUS" \
        --prompt-words 32..128 --max-tokens 32..64 --seed 1 --system "13b${LAYERS:+-l$LAYERS}-$CODEC-$1" \
        --out "$OUT/tp-bench" --append --quiet 2>&1 | tail -12
    grep -E "^deltazip_(gpu|delta|tokens)" <(curl -s "http://127.0.0.1:$2/metrics") | head -12
    stop "$1"
    trace_summary "$OUT/serve-$1.log"
}

trace_summary() { # trace_summary LOG: per rank, from the DZ_TP_TRACE lines (none: nothing printed)
    # Ranks write to one log: only whole lines (rank first, every field key=number) count. Session 8's
    # summary took interleaved fragments for ranks ("rank 44911.:"); then the lines move to a capped
    # gzip file, so the log travels back (the device tool refused the uncut tarball).
    grep -hE "^dz-tp-trace rank=[0-9]+( [a-z_]+=[0-9.]+)+$" "$1" | awk '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        r = v["rank"]; n[r]++; run[r] += v["running"]; sy[r] += v["sync_ms"]; st[r] += v["step_ms"]
        if (v["decode"] > 0) { nd[r]++; d[r] += v["decode"]; dl[r] += v["decode_lens"]; sd[r] += v["step_ms"] }
    } END {
        for (r in n) printf "  trace rank %s: %d steps, %.1f running, %.2f ms sync, %.2f ms step; " \
            "%d decode steps: %.1f sequences (%.1f lengths), %.2f ms\n", r, n[r], run[r] / n[r],
            sy[r] / n[r], st[r] / n[r], nd[r], nd[r] ? d[r] / nd[r] : 0, nd[r] ? dl[r] / nd[r] : 0,
            nd[r] ? sd[r] / nd[r] : 0
    }'
    if grep -q "^dz-tp-trace " "$1"; then
        grep "dz-tp-trace" "$1" | head -n 20000 | gzip > "${1%.log}-trace.txt.gz"
        grep -v "dz-tp-trace" "$1" > "$1.tmp"; mv "$1.tmp" "$1"
    fi
}

for p in "$@"; do
    echo "=== $p $(date +%T)"
    case $p in
        gen) phase_gen ;;
        tp1) phase_run tp1 8101 ;;
        tp2) phase_run tp2 8102 ;;
        cmp) python3 "$here/tp_check.py" compare "$OUT/check-tp1.json" "$OUT/check-tp2.json" | tee "$OUT/check.md" ;;
    esac
done
echo "=== done $(date +%T)"
