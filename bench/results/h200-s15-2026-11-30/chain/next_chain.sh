#!/bin/bash
# The device chain prepared at the end of session 14 for session 15 (nvidia-h200-x2, ~16 minutes): run it
# detached and poll, as sessions 10-14 did (session 14's calls: bench/results/h200-s14-2026-11-30.md).
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   run:  mkdir -p /tmp/s15 && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s15/chain.out 2>&1; sleep 200; <poll>                 carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry, at most ~30 s apart): sleep N; cat /tmp/s15/s15.log;
#         tar czf $OUT/s15.tgz --exclude=gen -C /tmp s15
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#
# What it measures (the open questions of session 14's note):
# A. GPU 0: Nsight Compute on the decode sbmm (`kernel_bench --profile`: 32 deltas x 1 row of 4096 x
#    4096 4b 2:4 among its cases; session 13 profiled only the 32-row matmul tile): occupancy, stall
#    reasons, issue rate. Serving's GPU time is mostly this kernel at high fine-tune diversity (32 distinct
#    deltas a decode step stream ~75 GiB; the sbmm runs at 1.56-1.64x the stream-once time). Then
#    `cuda_check --quick --filter sbmm`, "norm delta" and "embedding" (the unchecked embedding op, session
#    14, which the hook now takes: no id read-back, so no synchronization a run of rows) on the default
#    paths, then the whole kernel_bench
#    (kernels-h200.{md,json}; plot with bench/kernels/plot.py here), ~5 minutes.
# B. GPU 1: the 7B generation, then dz-4b24 x 32 at 16 req/s with DZ_PROFILE=1 (every session-14 default
#    on: is the norm delta's 238 us a synchronized call, unexplained in session 14, gone with the one op?),
#    again with `--pool-keep 4GiB` (session 14's hypothesis for that 238 us: the CUDA memory pool's
#    release threshold is 0, so after each synchronization every allocation maps memory again, and a
#    profiled part, bracketed by synchronizations, pays that for each of its allocations), then with
#    DZ_PROFILE=host (the CPU's share under the new defaults), then DZ_PROFILE=events (session 14, never
#    run: each part's span on the GPU timeline between two CUDA events, no synchronization; beside host
#    mode's CPU time it says which of the two bounds each part).
# C. GPU 0 then: base, base `--pool-keep 4GiB` (the report's base+pool), dz-2b24 x 32 at 4 / 16 / 64
#    (dz-2b24 not yet run with session 14's defaults), swap x 32 at 0.25 / 0.5 / 1 req/s (16 requests
#    each: the rates swap may sustain, for the report's "Sustained capacity" ratio); GPU 1: dz-4b24 x 32 and dz-4b24+pool at 4 / 16 / 64
#    (an A/B of the pool setting, each beside its base twin), then Zipf(1.0) and one hot model at 4 / 16.
#    Every dz run's metrics-*.txt now counts `deltazip_linear_delta_calls_total{outcome=plan_reused|
#    plan_built|...}`: how often a batch change cost the layers new plans (bench hook: ~100 against ~40 us
#    of CPU a layer call at 32 rows), never measured in serving.
#    If +pool helps both, make it the default (dz_loader::gpu_mem::set_pool_keep_bytes). Last, dz-4b24 x 32
#    with at most 12 fine-tunes a step (`max_deltas_per_step`, the report's +md12) at 16 / 64: a step of
#    ~20 distinct 7B deltas streams ~50 GiB of them; fewer a step, fewer bytes a token, longer waits.
TAG=s15; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log start
# A
( export CUDA_VISIBLE_DEVICES=0; mkdir -p $S/kern $S/check
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    timeout 200 "$NCU" --clock-control none --kernel-name regex:'sbmm' --launch-count 6 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
        /tmp/k/bin/kernel_bench --profile > $S/kern/ncu-sbmm.txt 2>&1
    log "ncu sbmm rc=$?"
  else
    log "no ncu"
  fi
  timeout 120 /tmp/k/bin/cuda_check --quick --filter sbmm > $S/check/sbmm-quick.txt 2>&1; log "cuda_check sbmm rc=$?"
  timeout 60 /tmp/k/bin/cuda_check --quick --filter "norm delta" > $S/check/norm-delta.txt 2>&1; log "cuda_check norm rc=$?"
  # embedding_delta_add_unchecked (session 14, never run on a GPU; the hook's embedding path now): every
  # embedding case both ways, and the out-of-range id in the "errors" family.
  timeout 90 /tmp/k/bin/cuda_check --quick --filter embedding > $S/check/embedding.txt 2>&1; log "cuda_check embedding rc=$?"
  # The whole benchmark with session 14's defaults (the K split at 32-64 rows), for kernels-h200.{md,json,png}
  # (last regenerated in session 9): every shape, codec and row count, sbmm included.
  timeout 420 /tmp/k/bin/kernel_bench --commit "${COMMIT:-unknown}" --out $S/kern/kernels-h200 > $S/kern/bench-full.log 2>&1
  log "kernel_bench full rc=$?"
  touch $S/kern.done ) &
CODECS="4b24 2b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
# B
DZ_PROFILE=1 GPU=1 PORT_BASE=8300 OUT=$S/prof V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/prof.log 2>&1; log "profile rc=$?"
DZ_PROFILE=1 POOL_KEEP=4GiB GPU=1 PORT_BASE=8300 OUT=$S/profp V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/profp.log 2>&1; log "profile pool rc=$?"
DZ_PROFILE=host GPU=1 PORT_BASE=8300 OUT=$S/profh V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/profh.log 2>&1; log "profile host rc=$?"
DZ_PROFILE=events GPU=1 PORT_BASE=8300 OUT=$S/profe V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/profe.log 2>&1; log "profile events rc=$?"
until [ -f $S/kern.done ]; do sleep 2; done
# C
( GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  POOL_KEEP=4GiB GPU=0 PORT_BASE=8200 OUT=$S/basep RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/basep.log 2>&1; log "base+pool rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/dz2 V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:2b24:32 > $S/dz2.log 2>&1; log "dz2b rc=$?"
  # swap x 32 at rates it may keep up with: the report's "Sustained capacity" compares dz and swap there
  # (session 14: at 4 req/s swap's tokens/s depend on the run's length; 32.6 over 48 requests).
  GPU=0 PORT_BASE=8200 OUT=$S/swap32 SWAP_RATES=0.25,0.5,1 SWAP_REQS=16 timeout 420 bash $R/gpu/serving.sh swap:32 > $S/swap32.log 2>&1; log "swap32 low rates rc=$?"
  touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
POOL_KEEP=4GiB GPU=1 PORT_BASE=8300 OUT=$S/dzp V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dzp.log 2>&1; log "dz+pool rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/pop V4=1 RATES=4,16 REQS=96 bash $R/gpu/serving.sh dz:4b24:32@zipf:1.0 dz:4b24:32@hot:0.9 > $S/pop.log 2>&1; log "zipf/hot rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/md12 V4=1 MAX_DELTAS=12 RATES=16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/md12.log 2>&1; log "dz md12 rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
