#!/usr/bin/env bash
# Issue #9 on one H200: a 7B-shaped Llama with random weights (`deltazip synth`), N multi-tenant deltas
# (4-bit 2:4, 2-bit 2:4) against the base alone and against the swap baseline (the same N fine-tunes as
# full merged models, K on the GPU, the rest copied in from CPU memory on demand), the same open-loop
# workload from `deltazip bench serve` (uniform popularity, corpus prompts), rows appended to
# $OUT/serving.{md,json}.
#
#   bash bench/gpu/serving.sh STEP...   STEP: gen | base | dz:CODEC:N (e.g. dz:4b24:32) | swap:N (e.g. swap:32)
#                                             | engines:N (e.g. engines:32)
#
# A dz or swap step may end in @POPULARITY (`deltazip bench serve --popularity`: uniform, zipf:S, hot:F),
# e.g. dz:4b24:32@zipf:1.0; default uniform. KV cache: paged, KV_BYTES (default 16GiB) per engine.
# Each server is warmed up first (one request per model, not measured; WARMUP= turns it off).
#
# swap:N decodes SWAP_DISTINCT of the 4b24 files to full bf16 weights in CPU memory at start-up (about
# 13.5 GB each for 7B: keep SWAP_DISTINCT * 13.5 GB well under the machine's RAM) and cycles the N names
# over them; SWAP_K of them on the GPU at once.
#
# engines:N is the other swap baseline (system "swap-engines"): the N fine-tunes as merge-mode models,
# one host engine each, at most ENGINES_K loaded at once (`runtime.merged_gpu_models`): a request for
# an unloaded one waits while the host unloads the least recently used idle engine and reloads the
# wanted one from its merged directory (mistral.rs's own unload_model/reload_model). The base is not
# served. Merging writes full models to disk (13.5 GB each for 7B, under $W/merged): ENGINES_DISTINCT
# of the 4b24 files (default 1) are materialised, once each, and the N names cycle over them (each
# name still loads its own copy onto the GPU). 64 GB disk holds the base, both codecs' 8 files and
# one merged model; 2 with CODECS=4b24 only. Each engine has its own paged KV cache of
# ENGINES_KV_BYTES (default KV_BYTES): ENGINES_K x (13.5 GB + that) must fit the GPU.
#
# Needs $DZ (deltazip with --features cuda or nccl), $CORPUS, python3 (for NCCL's library path only).
#
# DZ_PROFILE=1 (passed through to every server): the forward-pass profile in /metrics
# (deltazip_profile_*: base linear, linear delta, embedding/norm deltas, row lookup, step intervals; each
# part between device synchronizations, so a profiled run is slower: use it for the split, not the speed).
# DZ_PROFILE=host: the same parts timed on the CPU only (issuing their work, no synchronization): at
# full speed, it says whether the CPU's share of a step bounds it. DZ_PROFILE=wait (session 17): host
# mode plus `head_wait`, a one-byte copy to the host right after the output head (where sampling waits
# anyway), timed: the GPU's backlog at the end of the forward pass. `base` steps are profiled too (since
# session 16: the base's layers are wrapped under DZ_PROFILE, only to time them).
# DZ_TRACE=1 (passed through too): the CPU time of named phases of the hook and the ops
# (deltazip_trace_*: the layer plans, the slot tables, the sbmm's describe / upload / launch, the
# admission hook); bench/gpu/profile_split.py prints them per step.
# DZ_TP_TRACE=1 (passed through): a `dz-tp-trace` line and (host patch 0016) a `dz-tp-phases` line a step
# in the server's log: batch, step time, scheduler / inputs / forward / logits / sampling, wall clock.
# DZ_LOGITS_COPY=per-seq (passed through, system suffix +logits-per-seq): host patch 0017 off, each
# sequence's logits copied to the host on their own. DZ_SAMPLER_SORT=always (+sort-always): host patch
# 0018 off, the sampler sorts the vocabulary even when no top-k or top-p uses the order. PASS_METRICS=1: the counters after each rate in
# pass-I/ (profile_split.py per pass); PROC_SAMPLE=1: the server's threads and CPUs from /proc while the
# rates run (proc-TAG.jsonl; proc_sample.py --report lines them up with the steps).
#
# Two jobs can share one machine of several GPUs (bench/gpu/serving_pair.sh; not for ratios between them:
# they share the host's CPU, session 16): GPU=i pins this job to GPU i
# (CUDA_VISIBLE_DEVICES; GPU memory is read from that GPU), PORT_BASE moves its ports (default 8200), and
# each job needs its own OUT. Run `gen` once, before the jobs: two jobs must not generate at once.
set -u
W=${DZ_WORK:-/tmp/dzsrv}
DZ=${DZ:-$W/deltazip}
OUT=${OUT:-$W/out}
SHAPE=${SHAPE:-llama-7b}
DISTINCT=${DISTINCT:-8}     # distinct delta files per codec; N names cycle over them (64 GB disk)
RATES=${RATES:-2,8,32}
REQS=${REQS:-96}
GPU_DELTAS=${GPU_DELTAS:-90GiB}
CPU_CACHE=${CPU_CACHE:-48GiB} # [runtime] cpu_cache_bytes: 64 x 4b 2:4 7B deltas are ~170 GB (x2 machine: 256 GB RAM)
SWAP_DISTINCT=${SWAP_DISTINCT:-4}
SWAP_K=${SWAP_K:-4}
KV_BYTES=${KV_BYTES:-16GiB}
ENGINES_DISTINCT=${ENGINES_DISTINCT:-1}
ENGINES_K=${ENGINES_K:-4}
ENGINES_KV_BYTES=${ENGINES_KV_BYTES:-$KV_BYTES}
MAX_DELTAS=${MAX_DELTAS:-32}  # [scheduler] max_deltas_per_step: uniform over 32 fine-tunes needs 32 to fill a batch
WARMUP=${WARMUP-1}            # non-empty: `bench serve --warmup` (one request per model first: measure a warm server)
KV_CACHE=${KV_CACHE:-auto}
V4=${V4:-}                    # non-empty: `serve --v4-kernels` (the experimental v4 delta kernels, issue #5)
V4_BOTH=${V4_BOTH:-}          # non-empty (with V4): `serve --v4-keep-packed` (both layouts, twice the delta bytes)
V4_SX=${V4_SX:-}              # non-empty (with V4): `serve --v4-sbmm-smem-x` (the experimental shared-memory sbmm)
# DZ_DECODE_ORDER=arrival (passed through to the server): decode batches in arrival order, not grouped by model (host patch 0015)
NO_SBMM_PAIR=${NO_SBMM_PAIR:-}  # non-empty, with V4: `serve --no-v4-sbmm-pair` (the decode sbmm with one tile a warp, not session 19's pair)
SBMM_TAIL=${SBMM_TAIL:-}      # non-empty, with V4: `serve --v4-sbmm-tail-split` (session 21: the last, partial wave's items split along K)
SBMM_XD=${SBMM_XD:-}          # deep or occupancy (with V4): `serve --v4-sbmm-x-direct MODE` (the x-direct decode sbmm; session 15, experimental)
WIDE64_FROM=${WIDE64_FROM:-}  # with V4: `serve --v4-wide64-from N` (session 17's 64-row v4 tile from N rows of a prompt)
NO_V4_PAIR=${NO_V4_PAIR:-}  # non-empty, with V4: `serve --no-v4-pair` (prompts of 128+ rows on the 32-row v4 tile, not session 18's pair tile)
NO_SLOT_TABLES=${NO_SLOT_TABLES:-}  # non-empty: `serve --no-slot-tables` (the per-layer plans rebuilt on every batch change; the slot tables are the default since session 17)
NO_FUSED_NORM=${NO_FUSED_NORM:-}  # non-empty: `serve --no-fused-norm-deltas` (each norm delta in three ops; one op is the default since session 14)
NO_SBMM_WIDE=${NO_SBMM_WIDE:-}  # non-empty (with V4): `serve --no-sbmm-wide-segments` (prefill segments of 17-255 rows as 16-row pieces or the dense route; the 32-row tile is the default since session 14)
POOL_KEEP=${POOL_KEEP:-}      # non-empty: `serve --pool-keep BYTES` (the CUDA memory pool keeps freed memory across synchronizations; session 14, off by default)
DENSE_ROWS=${DENSE_ROWS:-}    # non-empty: `serve --dense-rows N` (prefill through a dense weight from N rows; 0 = never)
PORT_BASE=${PORT_BASE:-8200}
GPU=${GPU:-}
[[ -n $GPU ]] && export CUDA_VISIBLE_DEVICES=$GPU
mkdir -p "$W" "$OUT"
gpu_mem() { nvidia-smi ${GPU:+-i "$GPU"} --query-gpu=memory.used --format=csv,noheader"${1:-}" | head -1; }
export NCCL_NVLS_ENABLE=0
nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${nccl}:${LD_LIBRARY_PATH:-}

config() { # config FILE CODEC N
    {
        echo "[base]"; echo "path = \"$W/base\""; echo 'dtype = "bf16"'; echo 'name = "base"'
        for i in $(seq 0 $(($3 - 1))); do
            printf '[[delta]]\nname = "ft-%02d"\npath = "%s/%s/ft-%02d.dz"\nmode = "multi-tenant"\n' \
                "$i" "$W" "$2" $((i % DISTINCT))
        done
        echo "[runtime]"; echo 'device = "cuda"'
        echo "gpu_delta_bytes = \"$GPU_DELTAS\""; echo "cpu_cache_bytes = \"$CPU_CACHE\""
        echo "kv_cache = \"$KV_CACHE\""; echo "kv_cache_bytes = \"$KV_BYTES\""
        echo "[scheduler]"; echo "max_seqs = ${MAX_SEQS:-32}"; echo "max_deltas_per_step = $MAX_DELTAS"
    } > "$1"
}

swap_config() { # swap_config FILE N
    {
        echo "[base]"; echo "path = \"$W/base\""; echo 'dtype = "bf16"'; echo 'name = "base"'
        for i in $(seq 0 $(($2 - 1))); do
            printf '[[delta]]\nname = "ft-%02d"\npath = "%s/4b24/ft-%02d.dz"\nmode = "swap"\n' \
                "$i" "$W" $((i % SWAP_DISTINCT))
        done
        echo "[runtime]"; echo 'device = "cuda"'; echo "swap_gpu_models = $SWAP_K"
        echo "kv_cache = \"$KV_CACHE\""; echo "kv_cache_bytes = \"$KV_BYTES\""
        echo "[scheduler]"; echo "max_seqs = ${MAX_SEQS:-32}"; echo "max_deltas_per_step = $MAX_DELTAS"
    } > "$1"
}

engines_config() { # engines_config FILE N
    {
        echo "[base]"; echo "path = \"$W/base\""; echo 'dtype = "bf16"'; echo 'name = "base"'; echo 'serve = false'
        for i in $(seq 0 $(($2 - 1))); do
            printf '[[delta]]\nname = "ft-%02d"\npath = "%s/4b24/ft-%02d.dz"\nmode = "merge"\n' \
                "$i" "$W" $((i % ENGINES_DISTINCT))
        done
        echo "[runtime]"; echo 'device = "cuda"'; echo "merged_gpu_models = $ENGINES_K"
        echo "merged_dir = \"$W/merged\""
        echo "kv_cache = \"$KV_CACHE\""; echo "kv_cache_bytes = \"$ENGINES_KV_BYTES\""
        echo "[scheduler]"; echo "max_seqs = ${MAX_SEQS:-32}"; echo "max_deltas_per_step = $MAX_DELTAS"
    } > "$1"
}

serve() { # serve TAG CONFIG PORT (RUST_LOG: the host logs a failed step's error)
    RUST_LOG="${RUST_LOG:-mistralrs_core=error}" \
        "$DZ" serve --config "$2" --port "$3" ${V4:+--v4-kernels} ${V4:+${V4_BOTH:+--v4-keep-packed}} ${V4:+${V4_SX:+--v4-sbmm-smem-x}} ${V4:+${SBMM_XD:+--v4-sbmm-x-direct $SBMM_XD}} ${V4:+${WIDE64_FROM:+--v4-wide64-from $WIDE64_FROM}} ${V4:+${NO_V4_PAIR:+--no-v4-pair}} ${V4:+${NO_SBMM_PAIR:+--no-v4-sbmm-pair}} ${V4:+${SBMM_TAIL:+--v4-sbmm-tail-split}} \
        ${DENSE_ROWS:+--dense-rows "$DENSE_ROWS"} ${NO_SLOT_TABLES:+--no-slot-tables} ${NO_SBMM_WIDE:+--no-sbmm-wide-segments} ${NO_FUSED_NORM:+--no-fused-norm-deltas} ${POOL_KEEP:+--pool-keep "$POOL_KEEP"} > "$OUT/serve-$1.log" 2>&1 &
    echo $! > "$OUT/serve.pid"
    local t0=$(date +%s)
    until curl -sf "http://127.0.0.1:$3/health" > /dev/null; do
        sleep 1
        if ! kill -0 "$(cat "$OUT/serve.pid")" 2> /dev/null; then
            echo "serve $1 exited"; tail -20 "$OUT/serve-$1.log"; return 1
        fi
        if (($(date +%s) - t0 > ${SERVE_WAIT:-900})); then echo "serve $1: not up in time"; return 1; fi
    done
    echo "serve $1 up in $(($(date +%s) - t0)) s"
}

stop() { # this job's server only: another job may share the machine
    local pid; pid=$(cat "$OUT/serve.pid" 2> /dev/null) || return 0
    kill "$pid" 2> /dev/null
    for _ in $(seq 30); do kill -0 "$pid" 2> /dev/null || return 0; sleep 1; done
    kill -9 "$pid" 2> /dev/null; sleep 1
}

bench() { # bench TAG SYSTEM PORT MODELS [POPULARITY]   (RATES, REQS: this run's rates and requests per rate)
    # One `bench serve` per rate: each rate's row is on disk as soon as it is measured, so a call that
    # runs out of time keeps the rates it finished. The warm-up goes with the first rate only.
    local warm=${WARMUP:+--warmup} rate
    # A dz run with a non-default path gets its own system name in the report (dz-4b24+slots, +nowide, +nonorm, +pool, +xd-deep; base+pool).
    if [[ $2 == dz-* ]]; then set -- "$1" "$2${NO_SLOT_TABLES:++noslots}${WIDE64_FROM:++w64-$WIDE64_FROM}${NO_V4_PAIR:++nopair}${NO_SBMM_WIDE:++nowide}${NO_FUSED_NORM:++nonorm}${POOL_KEEP:++pool}${SBMM_XD:++xd-$SBMM_XD}${NO_SBMM_PAIR:++nosp}${SBMM_TAIL:++tail}${DZ_DECODE_ORDER:++$DZ_DECODE_ORDER}${DZ_LOGITS_COPY:++logits-$DZ_LOGITS_COPY}${DZ_SAMPLER_SORT:++sort-$DZ_SAMPLER_SORT}" "${@:3}"; fi
    if [[ $2 == base ]]; then set -- "$1" "$2${POOL_KEEP:++pool}${DZ_LOGITS_COPY:++logits-$DZ_LOGITS_COPY}${DZ_SAMPLER_SORT:++sort-$DZ_SAMPLER_SORT}" "${@:3}"; fi
    # ... and one whose steps may hold fewer fine-tunes than it serves: +mdK (max_deltas_per_step = K).
    local n_models; n_models=$(( $(tr -cd , <<< "$4" | wc -c) + 1 ))
    if [[ $2 == dz-* ]] && (( MAX_DELTAS < n_models )); then set -- "$1" "$2+md$MAX_DELTAS" "${@:3}"; fi
    # Profiled (DZ_PROFILE, DZ_TRACE): the warm-up runs on its own (with one request, not reported), and
    # the counters after it go to warm-metrics-TAG.txt, which profile_split.py subtracts (session 17: the
    # warm-up's delta loads and first calls otherwise dominate a short run's split).
    if [[ -n $warm && -n ${DZ_PROFILE:-}${DZ_TRACE:-} ]]; then
        "$DZ" bench serve --url "http://127.0.0.1:$3" --models "$4" --api completions --rates 1000 \
            --requests 1 --corpus "$CORPUS" --seed 1 --system "$2" --out "$OUT/warmup" --quiet \
            --warmup 2>&1 | tail -2
        curl -s "http://127.0.0.1:$3/metrics" > "$OUT/warm-metrics-$1.txt"
        warm=
    fi
    # PASS_METRICS=1 (session 20): the counters after each rate go to pass-I/metrics-TAG.txt, with the
    # previous ones as pass-I/warm-metrics-TAG.txt, so profile_split.py splits each pass on its own (a
    # slow pass and a fast one can come from one server). PROC_SAMPLE=1: the server's threads and the
    # CPUs from /proc every 0.5 s while the rates run (proc_sample.py; cuda-gdb's attach crashed or
    # stalled the server in session 20).
    local pass=0 prev="$OUT/warm-metrics-$1.txt" sampler=
    if [[ -n ${PROC_SAMPLE:-} ]]; then
        python3 "$(dirname "$0")/proc_sample.py" "$(cat "$OUT/serve.pid")" "$OUT/proc-$1.jsonl" 0.5 & sampler=$!
    fi
    for rate in ${RATES//,/ }; do
        pass=$((pass + 1))
        "$DZ" bench serve --url "http://127.0.0.1:$3" --models "$4" --api completions --rates "$rate" \
            --requests "$REQS" --popularity "${5:-uniform}" --corpus "$CORPUS" --prompt-words 32..160 \
            --max-tokens 32..96 --seed 1 --system "$2" --out "$OUT/serving" --append --quiet \
            $warm 2>&1 | tail -4
        warm=
        if [[ -n ${PASS_METRICS:-} ]]; then
            mkdir -p "$OUT/pass-$pass"
            curl -s "http://127.0.0.1:$3/metrics" > "$OUT/pass-$pass/metrics-$1.txt"
            [[ -f $prev ]] && cp "$prev" "$OUT/pass-$pass/warm-metrics-$1.txt"
            prev="$OUT/pass-$pass/metrics-$1.txt"
        fi
    done
    if [[ -n $sampler ]]; then kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null; fi
    gpu_mem | sed "s/^/  $1 gpu memory used: /"
    curl -s "http://127.0.0.1:$3/metrics" > "$OUT/metrics-$1.txt"
    grep -E "^deltazip_((delta|swap)_(loads_total|hits_total|misses_total|evictions_total|load_seconds_total)|swap_copied_bytes_total|engine_swap_(loads_total|unloads_total|load_seconds_total|unload_seconds_total|load_failures_total)|gpu_delta_bytes|tokens_per_second|forward_[a-z]+_total|profile_[a-z_]+)" "$OUT/metrics-$1.txt" | head -50
    # One line per server run: GPU memory in use after the run, and the server's tier counters.
    python3 - "$1" "$2" "$(echo "$4" | tr ',' '\n' | wc -l)" "${5:-uniform}" \
        "$(gpu_mem ,nounits)" \
        "$OUT/metrics-$1.txt" >> "$OUT/runs.jsonl" << 'PY'
import json, sys
tag, system, n, pop, mem, metrics = sys.argv[1:]
counters = {}
for line in open(metrics):
    if line.startswith("deltazip_") and " " in line:
        k, v = line.rsplit(" ", 1)
        try:
            counters[k] = float(v)
        except ValueError:
            pass
print(json.dumps({"tag": tag, "system": system, "n_models": int(n), "popularity": pop,
                  "gpu_memory_used_mib": int(mem), "metrics": counters}))
PY
}

probe() { # probe PORT: one plain and one streamed completion; on a hang, every thread's stack
    local pid; pid=$(cat "$OUT/serve.pid")
    for stream in false true; do
        local t0=$(date +%s%N)
        if ! timeout 90 curl -sN "http://127.0.0.1:$1/v1/completions" -H 'Content-Type: application/json' \
            -d "{\"model\":\"base\",\"prompt\":\"def fibonacci(n):\",\"max_tokens\":16,\"temperature\":0,\"stream\":$stream}" \
            > "$OUT/probe-$stream.txt"; then
            echo "probe stream=$stream: no answer in 90 s; stacks in $OUT/stacks.txt"
            timeout 120 cuda-gdb -p "$pid" -batch -ex "info threads" -ex "thread apply all bt 12" > "$OUT/stacks.txt" 2>&1
            tail -20 "$OUT/serve-probe.log"
            return 1
        fi
        echo "probe stream=$stream: $((($(date +%s%N) - t0) / 1000000)) ms: $(tail -c 300 "$OUT/probe-$stream.txt")"
    done
}

for arg in "$@"; do
    echo "=== $arg $(date +%T)"
    step=${arg%%@*}
    pop=uniform
    [[ $arg == *@* ]] && pop=${arg#*@}
    sfx=""; [[ $pop == uniform ]] || sfx="-${pop//:/}"   # tags of runs with another popularity
    case $step in
        gen)
            nvidia-smi -L
            [[ -f "$W/base/config.json" ]] || "$DZ" synth model --shape "$SHAPE" --dtype bf16 --seed 1 --out "$W/base" 2>&1 | tail -2
            for c in ${CODECS:-4b24 2b24}; do
                [[ -f "$W/$c/ft-$(printf %02d $((DISTINCT - 1))).dz" ]] || { rm -rf "$W/$c"; "$DZ" synth deltas --base "$W/base" \
                    --codec $c --count "$DISTINCT" --seed 7 --out-dir "$W/$c" --jobs 8 2>&1 | tail -2; }
            done
            df -h "$W" | tail -1 ;;
        probe)
            config "$OUT/base.toml" 4b24 0
            RUST_LOG=${RUST_LOG:-info} serve probe "$OUT/base.toml" $((PORT_BASE)) && probe $((PORT_BASE)); rc=$?; stop
            [[ $rc == 0 ]] || exit 1 ;;
        base)
            config "$OUT/base.toml" 4b24 0
            serve base "$OUT/base.toml" $((PORT_BASE + 1)) && bench base base $((PORT_BASE + 1)) base; stop ;;
        dz:*)
            IFS=: read -r _ codec n <<< "$step"
            config "$OUT/$codec-$n.toml" "$codec" "$n"
            models=$(seq -f 'ft-%02g' 0 $((n - 1)) | paste -sd,)
            serve "$codec-$n$sfx" "$OUT/$codec-$n.toml" $((PORT_BASE + 2)) && bench "$codec-$n$sfx" "dz-$codec" $((PORT_BASE + 2)) "$models" "$pop"; stop ;;
        swap:*)
            n=${step#swap:}
            swap_config "$OUT/swap-$n.toml" "$n"
            models=$(seq -f 'ft-%02g' 0 $((n - 1)) | paste -sd,)
            # No warm-up: K of N models fit; warming all would only cycle them.
            # A miss copies a whole model (12.5 GiB for 7B) from pageable memory, seconds each: fewer
            # requests and rates (SWAP_REQS, SWAP_RATES) keep a run inside one device call.
            serve "swap-$n$sfx" "$OUT/swap-$n.toml" $((PORT_BASE + 3)) && WARMUP= RATES=${SWAP_RATES:-$RATES} REQS=${SWAP_REQS:-$REQS} \
                bench "swap-$n$sfx" swap $((PORT_BASE + 3)) "$models" "$pop"; stop ;;
        engines:*)
            n=${step#engines:}
            engines_config "$OUT/engines-$n.toml" "$n"
            models=$(seq -f 'ft-%02g' 0 $((n - 1)) | paste -sd,)
            # No warm-up (ENGINES_K of N engines fit), fewer requests and rates as for swap:N: a miss
            # reloads a whole model from disk (page cache) with its KV cache, seconds each. Start-up
            # merges the ENGINES_DISTINCT files first (once; kept in $W/merged for later runs).
            serve "engines-$n$sfx" "$OUT/engines-$n.toml" $((PORT_BASE + 4)) && WARMUP= RATES=${SWAP_RATES:-$RATES} REQS=${SWAP_REQS:-$REQS} \
                bench "engines-$n$sfx" swap-engines $((PORT_BASE + 4)) "$models" "$pop"
            df -h "$W" | tail -1; stop ;;
    esac
done
echo "=== done $(date +%T)"
# The device tool brings back at most 8 files: PACK=FILE.tgz packs $OUT into one.
# (An `if`, so that without PACK the script's status is 0: session 11's logs said rc=1 for whole runs.)
if [[ -n ${PACK:-} ]]; then tar czf "$PACK" -C "$(dirname "$OUT")" "$(basename "$OUT")"; fi
