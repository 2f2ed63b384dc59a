#!/usr/bin/env bash
# The quality benchmark (issue 6) on a GPU machine, end to end: GGUF -> f32 base, four fine-tunes with
# PyTorch, then `deltazip bench quality --device cuda` per fine-tune and recipe, then one report in $OUT.
#
#     bash bench/quality/device_run.sh [INPUT_DIR]
#
# Run from the repository root. INPUT_DIR holds any of the inputs; they are stashed in $DZ_WORK/in, so they
# can arrive over several calls (one device call carries at most 64 MiB):
#   smollm2.gguf.part*   the SmolLM2-135M-Instruct Q4_1 GGUF split with `split -b`, parts concatenated in
#                        name order and checked against GGUF_SHA256 below
#   deltazip[.xz]        the deltazip binary, built with --features cuda (xz-compressed or not)
#   gguf-*.whl           the `gguf` wheel (pip download --no-deps --only-binary=:all: gguf)
#   corpora.tar.xz       from bench/quality/corpora.sh OUT --tar corpora.tar.xz
# Until every input is there it stashes and exits 0. Then it runs the stages below, skipping finished
# ones (everything lives in $DZ_WORK, default /tmp/dz), and stops by itself at $DZ_BUDGET_S seconds
# (default 560: a 600 s call leaves time for the report): run it again, with or without INPUT_DIR, to go on.
# Every call ends by writing the report of what is finished so far to $OUT (quality.md, quality.json,
# quality.png, finetunes.json, device_run.log, logs/).
#
# Stages: base (setup.py, ~15 s) -> fine-tunes (FT_PARALLEL=2 at a time on the GPU, each <= FT_MAX_S of training)
# -> bench jobs (one per fine-tune x recipe, both methods; DZ_JOBS at a time, started as soon as their
# fine-tune exists, so they overlap the next fine-tune) -> report.
#
# Environment: DZ_WORK, DZ_BUDGET_S, DZ_WAIT_S (0: the binary must be there to start), DZ_JOBS (4), DZ_DOMAINS ("py_stdlib pydocs kjv gcide"),
# DZ_DEVICE (cuda), FT_PARALLEL (2), FT_MAX_S (150), FT_STEPS (800), FT_LR (2e-4), FT_BATCH (16), FT_SEQ_LEN (1024),
# FT_ARGS_<domain> (more finetune.py options for one domain; default: ft_args_of below), DZ_SAMPLES (64), DZ_SEQ_LEN (512), DZ_EVAL_WINDOWS (32),
# DZ_EVAL_SEQ_LEN (512), DZ_RECIPES ("t10 t16 2b50 4b24 2b24 8b sign"), DZ_BENCH_ARGS (more `bench quality`
# options, e.g. "--table-damp 10", "--damp 0.1" or "--budget-error plain").
set -uo pipefail
T0=$(date +%s)
REPO=$(pwd)
W=${DZ_WORK:-/tmp/dz}
OUTDIR=${OUT:-$W/out}
BUDGET=${DZ_BUDGET_S:-560}
DEADLINE=$((T0 + BUDGET))
JOBS=${DZ_JOBS:-4}
DOMAINS=${DZ_DOMAINS:-"py_stdlib pydocs kjv gcide"}
RECIPES=${DZ_RECIPES:-"t10 t16 2b50 4b24 2b24 8b sign"}
GGUF_BYTES=98362432
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$W/in" "$W/ft" "$W/res" "$W/partial" "$W/logs" "$OUTDIR"
LOG=$W/device_run.log
exec > >(tee -a "$LOG") 2>&1

say() { echo "[device_run +$(($(date +%s) - T0))s] $*"; }
left() { echo $((DEADLINE - $(date +%s))); }

# The general (forgetting) text of each fine-tune: a domain it was not tuned on, far from its own.
general_of() {
    case $1 in
        py_stdlib | pydocs) echo kjv ;;
        kjv) echo pydocs ;;
        gcide) echo py_stdlib ;;
        *) echo kjv ;;
    esac
}

# Per-domain fine-tune settings, appended after the FT_* ones (argparse keeps the last); FT_ARGS_<domain>
# replaces a domain's. kjv: its held-out tenth is the epistles, far from the Genesis..Luke it trained on
# (held-out base ppl 22.0 vs 14.3 on the validation tail), and with the cosine stretched over 800 steps it
# overfitted at a nearly constant lr 2e-4 after 1.8 epochs (validation 10.25, 10.20, 10.48, 12.21 at steps
# 50..200; held-out drop 19.9%). So: train on the whole 90% before the held-out part (Luke..Acts, next to
# the epistles, included) with an interleaved validation, and a schedule that anneals within ~2.5 epochs
# (56 steps an epoch). See bench/quality/README.md.
ft_args_of() {
    local v="FT_ARGS_$1"
    if [[ -n ${!v+x} ]]; then echo "${!v}"; return; fi
    case $1 in
        kjv) echo "--val-split interleaved --lr 1.5e-4 --warmup 20 --steps 140 --min-lr-frac 0.05 --eval-every 20 --patience 3 --stop-drop 0.9" ;;
        *) echo "" ;;
    esac
}

# --- stash inputs ---------------------------------------------------------------------------------------
if [[ $# -ge 1 && -d "$1" ]]; then
    for f in "$1"/*; do
        [[ -f $f ]] || continue
        cp -f "$f" "$W/in/" && say "stashed $(basename "$f") ($(wc -c < "$f") bytes)"
    done
fi
# xz through Python's lzma: the machine may lack xz-utils.
unxz_to() { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"; }
if [[ -f $W/in/deltazip.xz && ! -x $W/in/deltazip ]]; then
    unxz_to "$W/in/deltazip.xz" "$W/in/deltazip.tmp" && chmod +x "$W/in/deltazip.tmp" && mv "$W/in/deltazip.tmp" "$W/in/deltazip"
fi
[[ -f $W/in/deltazip ]] && chmod +x "$W/in/deltazip"
missing=()
parts_bytes=$(cat "$W"/in/smollm2.gguf.part* 2>/dev/null | wc -c)
[[ -f $W/smollm2.gguf || $parts_bytes -eq $GGUF_BYTES ]] || missing+=("smollm2.gguf.part* ($parts_bytes of $GGUF_BYTES bytes)")
# DZ_WAIT_S > 0: the binary may come later (a later call drops it into $W/in): start the base and the
# fine-tunes without it, and let the bench jobs wait up to DZ_WAIT_S seconds for it.
WAIT_DZ=${DZ_WAIT_S:-0}
[[ -x $W/in/deltazip || $WAIT_DZ -gt 0 ]] || missing+=("deltazip")
ls "$W"/in/gguf-*.whl > /dev/null 2>&1 || missing+=("gguf-*.whl")
[[ -f $W/in/corpora.tar.xz ]] || missing+=("corpora.tar.xz")
if [[ ${#missing[@]} -gt 0 ]]; then
    say "waiting for inputs: ${missing[*]} (run again with a folder holding them)"
    exit 0
fi
DZ=$W/in/deltazip
say "inputs complete; $(nproc) cores, $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi')"
[[ -x $DZ ]] && { "$DZ" --version 2> /dev/null || true; }

# --- base -------------------------------------------------------------------------------------------------
stage_base() {
    local t=$(date +%s)
    if [[ ! -f $W/smollm2.gguf ]]; then
        cat "$W"/in/smollm2.gguf.part* > "$W/smollm2.gguf.tmp"
        local sum
        sum=$(sha256sum "$W/smollm2.gguf.tmp" | cut -d' ' -f1)
        if [[ $sum != "$GGUF_SHA256" ]]; then
            say "the GGUF parts do not add up to the expected file (sha256 $sum): remove $W/in/smollm2.gguf.part* and carry them again"
            rm -f "$W/smollm2.gguf.tmp"
            return 1
        fi
        mv "$W/smollm2.gguf.tmp" "$W/smollm2.gguf"
    fi
    if [[ ! -d $W/site/gguf ]]; then
        # A pure-Python wheel is a zip: unpacked, it is importable (no pip needed).
        python3 -m zipfile -e "$(ls "$W"/in/gguf-*.whl | head -n 1)" "$W/site" || return 1
    fi
    if [[ ! -f $W/corpora/gcide.txt ]]; then
        mkdir -p "$W/corpora" && python3 -m tarfile -e "$W/in/corpora.tar.xz" "$W/corpora" || return 1
    fi
    if [[ ! -f $W/base/model.safetensors ]]; then
        PYTHONPATH=$W/site python3 bench/smollm2/setup.py --out "$W/base" --gguf "$W/smollm2.gguf" \
            --dtype float32 --cache "$W/cache" || return 1
    fi
    say "stage base done ($(($(date +%s) - t))s)"
}
stage_base || { say "stage base failed"; exit 1; }

# --- fine-tunes (sequential, GPU) ---------------------------------------------------------------------------
finetune() {
    local d=$1 t=$(date +%s)
    [[ -f $W/ft/$d/finetune.json ]] && return 0
    # Start only with time for the whole run (tokenize, train, evaluate, save) left in this call.
    local l=$(left) need=$((${FT_MAX_S:-150} + 50))
    if ((l < need)); then say "fine-tune $d: not started, $l s left in this call (needs $need)"; return 1; fi
    say "fine-tune $d: starting"
    timeout --signal=KILL "$l" python3 bench/quality/finetune.py --base "$W/base" --text "$W/corpora/$d.txt" \
        --out "$W/ft/$d" --train-text "$W/corpora/$d.train.txt" --device "${DZ_DEVICE:-cuda}" \
        --batch "${FT_BATCH:-16}" --seq-len "${FT_SEQ_LEN:-1024}" --steps "${FT_STEPS:-800}" --lr "${FT_LR:-2e-4}" --max-seconds "${FT_MAX_S:-150}" \
        --eval-windows "${DZ_EVAL_WINDOWS:-32}" --eval-seq-len "${DZ_EVAL_SEQ_LEN:-512}" $(ft_args_of "$d") \
        > "$W/logs/finetune-$d.log" 2>&1
    local rc=$?
    tail -n 3 "$W/logs/finetune-$d.log"
    # rc 2: saved, but the held-out drop is below the 25% target (the report flags it).
    if [[ $rc -ne 0 && $rc -ne 2 ]]; then say "fine-tune $d failed (rc $rc)"; rm -rf "$W/ft/$d"; return 1; fi
    say "fine-tune $d done ($(($(date +%s) - t))s, rc $rc)"
}

# --- bench jobs ---------------------------------------------------------------------------------------------
# One job = one fine-tune x one recipe, both methods; done when its result JSON exists.
bench_job() {
    local d=$1 r=$2 stem=$W/res/$1-$2
    [[ -f $stem.json ]] && return 0
    # Wait for the fine-tune (it trains while earlier jobs run).
    while [[ ! -f $W/ft/$d/finetune.json ]]; do
        (($(left) > 30)) || return 1
        [[ -f $W/ft.finished ]] && return 1
        sleep 3
    done
    local l=$(left)
    ((l > 30)) || return 1
    local g t=$(date +%s)
    g=$(general_of "$d")
    RAYON_NUM_THREADS=$(($(nproc) / JOBS)) timeout --signal=KILL "$l" nice -n 5 "$DZ" bench quality \
        --base "$W/base" --finetuned "$d=$W/ft/$d" --domain-text "$d=$W/corpora/$d.txt" \
        --general-text "$W/corpora/$g.txt" --calib "$W/corpora/$d.train.txt" \
        --recipes "$r" --methods obs,rtn --device "${DZ_DEVICE:-cuda}" \
        --samples "${DZ_SAMPLES:-64}" --seq-len "${DZ_SEQ_LEN:-512}" \
        --eval-windows "${DZ_EVAL_WINDOWS:-32}" --eval-seq-len "${DZ_EVAL_SEQ_LEN:-512}" \
        --workdir "$W/work/$d-$r" --results "$W/partial/$d-$r" ${DZ_BENCH_ARGS:-} > "$W/logs/bench-$d-$r.log" 2>&1
    local rc=$?
    rm -rf "$W/work/$d-$r"
    # Written next to each other in partial/, then moved: res/ only ever holds finished jobs.
    if [[ $rc -eq 0 && -f $W/partial/$d-$r.json ]]; then
        mv "$W/partial/$d-$r.md" "$stem.md"
        mv "$W/partial/$d-$r.json" "$stem.json"
        say "bench $d $r done ($(($(date +%s) - t))s): $(grep -c '"recipe"' "$stem.json") rows"
    else
        say "bench $d $r stopped (rc $rc, $(($(date +%s) - t))s); see logs/bench-$d-$r.log"
        return 1
    fi
}
export -f bench_job left say general_of
export W DZ DEADLINE T0 JOBS DZ_DEVICE DZ_SAMPLES DZ_SEQ_LEN DZ_EVAL_WINDOWS DZ_EVAL_SEQ_LEN

# FT_PARALLEL chains of fine-tunes share the GPU (a 135M model leaves an H200 mostly idle).
rm -f "$W/ft.finished"
(
    doms=($DOMAINS)
    n=${FT_PARALLEL:-2}
    for ((c = 0; c < n; c++)); do
        (for ((i = c; i < ${#doms[@]}; i += n)); do finetune "${doms[$i]}"; done) &
    done
    wait
    touch "$W/ft.finished"
) &
FT_PID=$!
# The binary, if it is still to come (DZ_WAIT_S): poll $W/in for it (deltazip.xz is unpacked here).
wait_dz() {
    local until=$(($(date +%s) + WAIT_DZ))
    while [[ ! -x $DZ ]]; do
        if [[ -f $W/in/deltazip.xz ]]; then
            unxz_to "$W/in/deltazip.xz" "$W/in/deltazip.tmp" && chmod +x "$W/in/deltazip.tmp" \
                && mv "$W/in/deltazip.tmp" "$DZ" && break
        fi
        (($(date +%s) < until && $(left) > 60)) || return 1
        sleep 5
    done
    say "deltazip is here: $("$DZ" --version 2> /dev/null)"
}
jobs_list=()
if ! wait_dz; then
    say "no deltazip binary in $W/in after $WAIT_DZ s: no bench jobs this call"
    DOMAINS_RUN=""
else
    DOMAINS_RUN=$DOMAINS
fi
for d in $DOMAINS_RUN; do for r in $RECIPES; do jobs_list+=("$d $r"); done; done
((${#jobs_list[@]} == 0)) || printf '%s\n' "${jobs_list[@]}" | xargs -P "$JOBS" -L 1 bash -c 'bench_job "$0" "$1"'
wait "$FT_PID"

# --- report -------------------------------------------------------------------------------------------------
# Count this call's jobs by name: res/ may also hold jobs of earlier calls with other DZ_DOMAINS/DZ_RECIPES
# (counting every file there said "12 of 8").
job_names=()
done_jobs=0
for j in "${jobs_list[@]}"; do
    job_names+=("${j/ /-}")
    [[ -f $W/res/${j/ /-}.json ]] && done_jobs=$((done_jobs + 1))
done
all_res=$(ls "$W"/res/*.json 2> /dev/null | wc -l)
say "$done_jobs of ${#jobs_list[@]} bench jobs finished$( ((all_res > done_jobs)) && echo " ($((all_res - done_jobs)) more from earlier calls in the report)")"
mkdir -p "$OUTDIR/logs"
cp -f "$W"/logs/*.log "$OUTDIR/logs/" 2> /dev/null
python3 bench/quality/report.py --results "$W/res" --finetunes "$W/ft" --out "$OUTDIR/quality" \
    --jobs "${job_names[@]}" || say "report failed"
cp -f "$LOG" "$OUTDIR/device_run.log"
say "finished this call in $(($(date +%s) - T0))s"
