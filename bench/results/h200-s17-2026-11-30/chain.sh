#!/bin/bash
# The device chain prepared at the end of session 16 for session 17 (nvidia-h200, ONE GPU, ~25 minutes):
# every serving run alone on the machine, one server at a time (session 16: a server beside another on
# the x2 machine shares the host's CPU, and the base ran 248-359 tokens/s there against 425-443 alone).
# Run it detached and poll WITHOUT GAPS (the machine goes back 30 s after the last call ends, and takes a
# detached job with it); or, as session 16's call 2, wait inside the one call (up to ~9.5 minutes).
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   run:  mkdir -p /tmp/s17 && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s17/chain.out 2>&1; sleep 500; tail -3 /tmp/s17/s17.log      carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry, at most ~25 s apart): sleep 25; tail -3 /tmp/s17/s17.log
#   fetch: tar czf $OUT/s17.tgz --exclude=gen -C /tmp s17
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#   The carry limit is 64 MiB: tracked files (~32 MB) + .gpu/srv (25.0 MB) + .gpu/k (6.0 MB) = 63 MB at
#   the end of session 16: `du -sb` them first (git ls-files | xargs du -cb); if the tree has grown past
#   it, carry .gpu/k in one call and .gpu/srv in the next.
#
# A. Checks first (each cuda_check prints only at its end: one filter a run, generous limits):
#    "dense route" (session 16's own-route sbmm: every segment on the dense route or base-only, no
#    shared launch), quick "v4 only" (with its wide-segment cases of the same kind), "wide from rows".
# B. One server at a time, 128 requests at 16 req/s, alternated (session 16 call 2: base 425.5 / 443.2,
#    dz-4b24 x 32 334.9 / 296.9 at `6d6dee2`): the same with session 16's own-route prefill, and dz-2b24
#    x 32 (session 15, beside the base on the other GPU: 14% more tokens/s than dz-4b24), never measured
#    alone.
# C. The base's step split, now that DZ_PROFILE profiles a base served alone (session 16), beside dz's:
#    DZ_PROFILE=host and =events at 16 req/s, 48 requests each. The difference between the two is what dz
#    adds to a step; the base's own split says how much of its step is the host engine's.
# (Between A and B: `bench hook` at 32 rows, the hook's CPU a call on CUDA, for the next CPU work.)
# D. A larger batch: max_seqs 64 (KV 24 GiB; dz with an 84 GiB delta budget, which still holds all 32 of
#    its ~2.4 GiB deltas, so that start-up's budget check passes beside the larger cache) at 16 req/s.
#    Both runs are saturated at 32 sequences a step; if the host's per-step work is partly fixed, dz /
#    base moves with the batch.
TAG=s17; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log start
mkdir -p $S/check
# A
timeout 150 /tmp/k/bin/cuda_check --filter "dense route" > $S/check/dense-route.txt 2>&1; log "cuda_check dense route rc=$?"
timeout 200 /tmp/k/bin/cuda_check --quick --filter "v4 only" > $S/check/v4-only-quick.txt 2>&1; log "cuda_check v4 only quick rc=$?"
timeout 120 /tmp/k/bin/cuda_check --filter "wide from rows" > $S/check/wide-from.txt 2>&1; log "cuda_check wide-from rc=$?"
ok=1; for f in $S/check/*.txt; do grep -q "^[0-9]* passed, 0 failed" $f || ok=0; done
[ $ok = 1 ] || log "A CHECK FAILED: the serving runs below use the failing code"
# The hook's CPU a call (`bench hook`, 2-layer 7B, 8 deltas under 32 names, 32 decode rows): the plan
# built per batch against reused, the slot tables (session 14 at 32 rows: 100 against 38 us), and a
# prompt of 128 tokens per linear layer (the 32-row tile; since session 16 a batch whose every segment
# takes its own route skips the shared launch; 13B serving had 177 us of CPU a prefill linear-delta
# call against 140 of GPU).
( H=/tmp/dzhook; rm -rf $H; mkdir -p $H $S/hook
  $DZ synth model --shape llama-7b --layers 2 --out $H/base > $S/hook/gen.log 2>&1 &&
    $DZ synth deltas --base $H/base --count 8 --out-dir $H/d --config $H/serve.toml --device cuda >> $S/hook/gen.log 2>&1 &&
    timeout 120 $DZ bench hook --config $H/serve.toml --fine-tunes 32 --rows 32 --v4-kernels --slot-tables --prefill 128 > $S/hook/hook.md 2>&1
  log "bench hook rc=$?"
  # Which CUDA driver calls the hook's CPU time goes to (session 16: the step is CPU-bound, and a layer
  # plan built costs ~60 us more than one reused, most of it in the CUDA-side planning: descriptors,
  # the table's allocation and upload, the old plan's frees). Only the text summary comes back.
  NSYS=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
  if [ -n "$NSYS" ]; then
    timeout 180 "$NSYS" profile --trace=cuda,osrt --stats=true --force-overwrite true -o $H/nsys \
      $DZ bench hook --config $H/serve.toml --fine-tunes 32 --rows 32 --v4-kernels --iters 100 > $S/hook/nsys.txt 2>&1
    log "nsys bench hook rc=$?"
  else
    log "no nsys on the machine"
  fi
  rm -rf $H )
CODECS="4b24 2b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
# B
for i in 1 2; do
  OUT=$S/base$i RATES=16 REQS=128 bash $R/gpu/serving.sh base > $S/base$i.log 2>&1; log "base $i rc=$?"
  OUT=$S/dz$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz$i.log 2>&1; log "dz $i rc=$?"
  OUT=$S/dz2b$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:2b24:32 > $S/dz2b$i.log 2>&1; log "dz-2b24 $i rc=$?"
done
# C
for mode in host events; do
  DZ_PROFILE=$mode OUT=$S/base-$mode RATES=16 REQS=48 bash $R/gpu/serving.sh base > $S/base-$mode.log 2>&1; log "base $mode rc=$?"
  DZ_PROFILE=$mode OUT=$S/dz-$mode V4=1 RATES=16 REQS=48 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz-$mode.log 2>&1; log "dz $mode rc=$?"
done
# D
MAX_SEQS=64 KV_BYTES=24GiB OUT=$S/base64 RATES=16 REQS=128 bash $R/gpu/serving.sh base > $S/base64.log 2>&1; log "base max_seqs 64 rc=$?"
MAX_SEQS=64 KV_BYTES=24GiB GPU_DELTAS=84GiB OUT=$S/dz64 V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz64.log 2>&1; log "dz max_seqs 64 rc=$?"
touch $S/all.done; log done
