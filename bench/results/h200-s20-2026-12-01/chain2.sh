#!/bin/bash
# Session 20's second call (nvidia-h200, ONE GPU, ~9.5 minutes): what the dz runs' slow mode is.
#
# Session 20's first calls (bench/results/h200-s20-2026-12-01/chain1.sh) found the slow mode (2 of 7 dz
# runs at 278-289 tokens/s against 336-354) in "the rest of the step", outside every profiled part: 32-34
# ms a step against 21-23, with the same GPU backlog at the head (13.2-14.3 ms), the GPU busier in the fast
# runs (dmon: ~82% against ~63%), the same clocks (1980 MHz), no swapping or steal, and the engine thread
# at 95-99% of a core against ~85%. So the host's engine thread does more work, or the same work slower,
# somewhere the profile does not look.
#
# This call: up to three dz-4b24 x 32 servers, each with three passes of 128 requests at 16 req/s:
#   - PASS_METRICS: the counters after each pass (is a slow server slow from its first pass?);
#   - DZ_PROFILE=wait with the forward-pass span (new in session 20): the rest of the step split into
#     inside the pass (attention, activations, launches) and between passes (sampling, responses,
#     scheduling, the next pass's inputs);
#   - DZ_TP_TRACE=1: one line a step (its time, its prompts and decodes) in the server's log;
#   - STACKS_PASS=3: in the third pass, every thread's stack as often as cuda-gdb attaches (stacks.py
#     names the frames with the unstripped build, kept here as /tmp/dz-unstripped).
# Run (carry [".gpu/srv"]): the chain in the background; the foreground copies /tmp/s20b to $OUT every
# 20 s, so a call cut by the time limit keeps what was measured:
#   COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh > /tmp/chain.out 2>&1;
#   for i in $(seq 40); do sleep 14; tar czf $OUT/s20b.tgz -C /tmp s20b 2>/dev/null; [ -f /tmp/s20b/all.done ] && break; done
set -u
TAG=s20b; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
T0=$(date +%s)
log "start at ${COMMIT:-unknown}"
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
for i in 1 2 3; do
  if (( $(date +%s) - T0 > ${LAST_START:-360} )); then log "no time for server $i"; break; fi
  name=dz$i
  vmstat -t 5 > $S/vmstat-$name.txt 2>&1 & VMST=$!
  nvidia-smi dmon -s puc -o T > $S/dmon-$name.txt 2>&1 & DMON=$!
  DZ_TP_TRACE=1 PASS_METRICS=1 STACKS_PASS=3 DZ_PROFILE=wait OUT=$S/$name V4=1 RATES=16,16,16 REQS=128 \
      bash $R/gpu/serving.sh dz:4b24:32 > $S/$name.log 2>&1; rc=$?
  kill $VMST $DMON 2>/dev/null
  for p in $S/$name/pass-*; do [ -d "$p" ] && python3 $R/gpu/profile_split.py $p > $p/profile-split.md 2>&1; done
  log "$name rc=$rc tokens/s, TPOT p50 by pass: $(grep -E '^\| dz' $S/$name/serving.md 2>/dev/null | cut -d'|' -f9,13 | tr '\n' ' ')"
done
touch $S/all.done; log done
