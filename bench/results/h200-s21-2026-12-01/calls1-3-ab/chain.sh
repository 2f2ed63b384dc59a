#!/bin/bash
# The device chain prepared at the end of session 20 for session 21 (nvidia-h200, ONE GPU, ~25 minutes in
# two parts, each detached and polled): PART=ab (~16 min), what the slow serving mode is, with host
# patches 0017 and 0018 A/B'd; PART=rates (~6 min), the highest rate dz sustains and its p99 TTFT.
#
# Session 20 (bench/results/h200-s20-2026-12-01.md) placed dz's slow mode between forward passes (16.4
# ms a step against 8.8-10.1: sampling, responses, scheduling, the next pass's inputs), in runs of dozens
# of decode steps (median 74.8 against 54.4 ms for 32 rows), switching within one server. Reading the
# host's step found each sequence's logits copied to the host on its own as a view, and candle's
# `to_device` copies a view's whole storage: 32 x 2 MiB of pageable copies a decode step. Host patch 0017
# copies once (`DZ_LOGITS_COPY=per-seq` keeps the old copies). And the sampler sorted the whole
# vocabulary for every sequence at every step though no top-k or top-p used the order (the requests'
# defaults): host patch 0018 draws without sorting (`DZ_SAMPLER_SORT=always` sorts; on a 2-core CPU
# server, 2.7-3.0 against 8.2-10.0 ms of sampling a decode step of 23 sequences). Host patch 0016 times
# the step's phases (`dz-tp-phases` lines: sched, inputs, fwd, logits, sample, other, unix_s).
#
# Build first (here): bash bench/gpu/build.sh srv   (.gpu/srv's BUILT names the commit)
# Run, carry [".gpu/srv"]:
#   mkdir -p /tmp/s21 && PART=ab COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#     > /tmp/s21/chain.out 2>&1; sleep 540; tail -3 /tmp/s21/s21.log; tar czf $OUT/s21.tgz --exclude=gen -C /tmp s21
#   poll: sleep 170; tail -3 /tmp/s21/s21.log; tar czf $OUT/s21.tgz --exclude=gen -C /tmp s21
#   (only the GAP between calls must stay under ~25 s; never `pkill -f deltazip` in a poll: its own
#   command line matches)
#
# Eight servers, one at a time, alternating dz-4b24 x 32 and the base, each with and without patches
# 0017 and 0018 (`dz`, `dzold`, `base`, `baseold`; old = DZ_LOGITS_COPY=per-seq DZ_SAMPLER_SORT=always,
# the host's step as in session 20), each for two passes of 128 requests at 16 req/s (session 20: a dz
# server of three passes took ~190 s, a base one ~100 s), with:
#   - PASS_METRICS: each pass's DZ_PROFILE=wait split (profile-split.md per pass: the rest of the step
#     inside the pass and between passes);
#   - DZ_TP_TRACE=1: a `dz-tp-trace` and a `dz-tp-phases` line a step in serve-*.log;
#   - PROC_SAMPLE: proc-*.jsonl, the server's threads and CPUs every 0.5 s; proc_sample.py --report lines
#     them up with the steps (the engine thread's CPU share, system share, minor faults, context switches,
#     CPUs and their steal, each second beside its steps' phases): a slow second says whether the thread
#     waited for the GPU (logits), was faulting, was descheduled or moved.
# Then ab-table.md (every pass of every run) and phases.md (per run: decode steps of 32 rows, median
# step and phases, fast and slow).
#
# PART=rates (after PART=ab, on the same machine: the model and deltas are already generated), the same
# way (setsid, then polls; its log is /tmp/s21/s21.log too): one dz-4b24 x 32 server and one base server,
# each at 6, 8, 10 and 12 req/s (128 requests a rate). Issue #9 asks for p99 TTFT under 2 s at the highest
# rate dz sustains: 4 req/s gave 0.23 s (session 12), 16 overloads every system here (up to 67 waiting).
set -u
TAG=s21; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log "start at ${COMMIT:-unknown}"
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
if [ "${PART:-ab}" = rates ]; then
  for sys in dz base; do
    name=rates-$sys
    case $sys in
      base) OUT=$S/$name RATES=6,8,10,12 REQS=128 bash $R/gpu/serving.sh base > $S/$name.log 2>&1; rc=$? ;;
      dz) OUT=$S/$name V4=1 RATES=6,8,10,12 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/$name.log 2>&1; rc=$? ;;
    esac
    log "$name rc=$rc rate | tokens/s | TTFT p99 s: $(grep -E '^\| (dz|base)' $S/$name/serving.md 2>/dev/null | cut -d'|' -f5,9,12 | tr '\n' ' ')"
  done
  touch $S/rates.done; log "rates done"
  exit 0
fi
declare -A count=()
for sys in dz dzold base baseold dz dzold base baseold; do
  count[$sys]=$(( ${count[$sys]:-0} + 1 )); name=$sys${count[$sys]}
  nvidia-smi dmon -s puc -o T > $S/dmon-$name.txt 2>&1 & DMON=$!
  unset DZ_LOGITS_COPY DZ_SAMPLER_SORT
  [[ $sys == *old ]] && export DZ_LOGITS_COPY=per-seq DZ_SAMPLER_SORT=always
  case $sys in
    base*) DZ_TP_TRACE=1 PASS_METRICS=1 PROC_SAMPLE=1 DZ_PROFILE=wait OUT=$S/$name RATES=16,16 REQS=128 \
             bash $R/gpu/serving.sh base > $S/$name.log 2>&1; rc=$? ;;
    dz*) DZ_TP_TRACE=1 PASS_METRICS=1 PROC_SAMPLE=1 DZ_PROFILE=wait OUT=$S/$name V4=1 RATES=16,16 REQS=128 \
           bash $R/gpu/serving.sh dz:4b24:32 > $S/$name.log 2>&1; rc=$? ;;
  esac
  unset DZ_LOGITS_COPY DZ_SAMPLER_SORT
  kill $DMON 2>/dev/null
  for p in $S/$name/pass-*; do [ -d "$p" ] && python3 $R/gpu/profile_split.py $p > $p/profile-split.md 2>&1; done
  for j in $S/$name/proc-*.jsonl; do
    [ -f "$j" ] && python3 $R/gpu/proc_sample.py --report "$j" $S/$name/serve-*.log > $S/$name/proc-report.md 2>&1
  done
  python3 $R/gpu/proc_sample.py --phases $S/$name/serve-*.log > $S/$name/phases.md 2>&1
  log "$name rc=$rc tokens/s | TPOT p50 by pass: $(grep -E '^\| (dz|base)' $S/$name/serving.md 2>/dev/null | cut -d'|' -f9,13 | tr '\n' ' ')"
done
python3 $R/gpu/ab_table.py $S > $S/ab-table.md 2>&1
touch $S/all.done; log done
