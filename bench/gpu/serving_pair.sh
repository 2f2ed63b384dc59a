#!/usr/bin/env bash
# Two serving.sh jobs side by side on a machine with two GPUs (issue #9): one device call measures twice
# as many systems. `gen` runs once first (the jobs share the synthetic base and delta files, read only);
# then job 0 runs on GPU 0 and job 1 on GPU 1, each with its own ports and output folder. Everything
# stops by DEADLINE_S (default 560 s after the start) and $OUT is packed into one file (the device tool
# brings back at most 8 files), so a call that runs out of time keeps what finished.
#
# Not for ratios between the two jobs: the two servers and their clients share the host's CPU, which
# bounds a serving step. In session 16 the base ran at 248-359 tokens/s beside a dz job and 425-443 alone
# (bench/results/h200-s16-2026-11-30.md). Measure dz / base one server at a time (bench/gpu/next_chain.sh).
#
#   JOB0="base dz:4b24:32" JOB1="dz:2b24:32 swap:32" bash bench/gpu/serving_pair.sh
#
# Inputs: .gpu/srv/deltazip.xz (or $DZ) and .gpu/srv/corpus.txt.xz (or $CORPUS). CLEAN: folders to delete
# first (e.g. the 2-GPU run's /tmp/dztp: the machine's disk holds one set of synthetic models at a time).
# Every other setting of serving.sh (RATES, REQS, SWAP_REQS, ...) passes through to both jobs.
set -u
T0=$(date +%s)
DEADLINE=$((T0 + ${DEADLINE_S:-560}))
here=$(cd "$(dirname "$0")" && pwd)
export DZ_WORK=${DZ_WORK:-/tmp/dzsrv}
W=$DZ_WORK
OUT=${OUT:-$W/out}
PACK=${PACK:-$OUT/serving.tgz}
mkdir -p "$W" "$OUT"
[[ -n ${CLEAN:-} ]] && rm -rf $CLEAN
export DZ=${DZ:-$W/deltazip}
if [[ ! -x $DZ ]]; then
    xz -dc .gpu/srv/deltazip.xz > "$DZ.tmp" && chmod +x "$DZ.tmp" && mv "$DZ.tmp" "$DZ" || exit 1
fi
export CORPUS=${CORPUS:-$W/corpus.txt}
[[ -f $CORPUS ]] || xz -dc .gpu/srv/corpus.txt.xz > "$CORPUS" || exit 1
"$DZ" --version

OUT=$OUT/gen timeout $((DEADLINE - $(date +%s))) bash "$here/serving.sh" gen
pids=()
for g in 0 1; do
    job=JOB$g
    [[ -n ${!job:-} ]] || continue
    # shellcheck disable=SC2086
    GPU=$g PORT_BASE=$((8200 + 100 * g)) OUT=$OUT/gpu$g PACK= \
        timeout $((DEADLINE - $(date +%s))) bash "$here/serving.sh" ${!job} > "$OUT/gpu$g.log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
pkill -f "deltazip serve" 2> /dev/null   # servers of a job cut off by the deadline
for g in 0 1; do [[ -f $OUT/gpu$g.log ]] && { echo "--- gpu$g"; grep -vE "^\s*$" "$OUT/gpu$g.log" | tail -40; }; done
echo "=== pair done in $(($(date +%s) - T0)) s"
# Options before the paths (GNU tar ignores a trailing --exclude); exit status 1 = a file changed while
# read (a log still written), which keeps the archive.
tar czf "$PACK.tmp" --exclude='*.tgz' --exclude='*.tgz.tmp' -C "$(dirname "$OUT")" "$(basename "$OUT")"
(($? <= 1)) && mv "$PACK.tmp" "$PACK"
