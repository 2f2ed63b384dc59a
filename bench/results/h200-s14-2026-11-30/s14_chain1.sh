#!/bin/bash
# The device chain prepared at the end of session 13 for session 14 (nvidia-h200-x2, ~20 minutes): run it
# detached and poll, as sessions 10-13 did (session 13's calls: bench/results/h200-s13-2026-11-30.md).
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   run:  mkdir -p /tmp/s14 && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s14/chain.out 2>&1; sleep 200; <poll>                 carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry, at most ~30 s apart): sleep N; cat /tmp/s14/s14.log;
#         tar czf $OUT/s14.tgz --exclude=gen -C /tmp s14
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#
# What it measures:
# A. GPU 0: cuda_check --quick --filter v4 (~145 s; among them the "wide segments" cases: sbmm's prefill
#    segments of 17-255 rows through the 32-row tile, `--sbmm-wide-segments`, built in session 13 after
#    its last device call, never run on a GPU) and --filter "dense route" (routed segments now written
#    in place; the slot comparison's new tolerance); then kernel_bench at 32 / 64
#    rows on 4096 x 1024, 4096 x 2048 and 4096 x 4096: `_sx` over a
#    quarter and a half of K = 4096 in one block, beside `_sxk` (K = 4096 split over 4 / 2 blocks), which
#    session 13 measured slower than `_sx` (32.7 vs 23.0 us at 32 rows): what a rank costs besides its K
#    blocks (cluster barriers, reduction); and cuda_check --filter "norm delta" (the one-op norm delta
#    against its CPU twin). GPU 1: the 7B generation, then `bench hook` at 8 / 32 / 64 rows (each norm's
#    three ops beside the one op; the layer plans beside the slot tables).
# B. The N = 32 table in one call, with the page-locked CPU tier (session 13; N = 32 was last measured
#    without it): GPU 0 base at 4 / 16 / 64, then dz-4b24 x 32 at 16 req/s with DZ_PROFILE=1 (every part
#    between device synchronizations: the GPU's share of the step, never measured; session 12's
#    DZ_PROFILE=host found 35 of 62 ms of CPU in the profiled parts). GPU 1: dz-4b24 x 32 at 4 / 16 / 64,
#    then swap x 32 at 4 req/s (session 11: 7.7 tokens/s; session 13's swap x 64: 32.9).
# C. GPU 1: N = 64 page-locked at 4 / 16 / 64 (session 13: 203.1 / 244.8 at 4 / 16). GPU 0: dz-4b24 x 32
#    with --sbmm-wide-segments, then with --fused-norm-deltas (the norm delta in one op, built in session
#    13 after its last device call), each at 4 / 16 / 64 and only if its check in A passed (against GPU
#    1's default run of B; the report names them dz-4b24+wide, dz-4b24+norm), then dz-2b24 x 32 at
#    4 / 16 / 64 (needs CODECS to include 2b24 at gen).
set -u
S=/tmp/s14; mkdir -p $S
log() { echo "[s14 $(date +%T)] $*" >> $S/s14.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log start
# A
( export CUDA_VISIBLE_DEVICES=0; mkdir -p $S/kern $S/check
  # Every v4 case (session 13 changed the 32-row tile's K loop for `_sxk`; `_sx` itself was only
  # compared with the other paths by kernel_bench since), the wide segments among them.
  timeout 200 /tmp/k/bin/cuda_check --quick --filter v4 > $S/check/v4-quick.txt 2>&1; v=$?
  log "cuda_check v4 rc=$v"; [ $v = 0 ] && touch $S/wide.ok
  timeout 90 /tmp/k/bin/cuda_check --quick --filter "dense route" > $S/check/dense-route.txt 2>&1
  log "cuda_check dense route rc=$?"
  timeout 90 /tmp/k/bin/cuda_check --quick --filter "norm delta" > $S/check/norm-delta.txt 2>&1; n=$?
  log "cuda_check norm delta rc=$n"; [ $n = 0 ] && touch $S/norm.ok
  timeout 90 /tmp/k/bin/kernel_bench --shapes 4096x1024,4096x2048,4096x4096 --rows 32,64 \
      --commit "${COMMIT:-unknown}" --out $S/kern/kernels-ksplit > $S/kern/bench-ksplit.log 2>&1
  log "kernel_bench k-split rc=$?"; touch $S/kern.done ) &
CODECS="4b24 2b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
# GPU 1 meanwhile: `bench hook` (each norm's three-op path beside the one op, `--fused-norm-deltas`;
# the layer plans beside the slot tables) at 8 / 32 / 64 rows.
( export CUDA_VISIBLE_DEVICES=1; H=/tmp/dzhook; rm -rf $H; mkdir -p $H $S/hook
  $DZ synth model --shape llama-7b --layers 2 --out $H/base > $S/hook/gen.log 2>&1 &&
    $DZ synth deltas --base $H/base --count 8 --out-dir $H/d --config $H/serve.toml --device cuda >> $S/hook/gen.log 2>&1 &&
    for rows in 8 32 64; do timeout 120 $DZ bench hook --config $H/serve.toml --fine-tunes 32 --rows $rows --v4-kernels --slot-tables; done \
      > $S/hook/hook.md 2>&1; log "bench hook rc=$?"; rm -rf $H )
until [ -f $S/kern.done ]; do sleep 2; done
# B and C
( GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  DZ_PROFILE=1 GPU=0 PORT_BASE=8200 OUT=$S/prof V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/prof.log 2>&1; log "profile rc=$?"
  if [ -f $S/wide.ok ]; then
    GPU=0 PORT_BASE=8200 OUT=$S/wide V4=1 SBMM_WIDE=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/wide.log 2>&1; log "dz wide segments rc=$?"
  fi
  if [ -f $S/norm.ok ]; then
    GPU=0 PORT_BASE=8200 OUT=$S/norm V4=1 FUSED_NORM=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/norm.log 2>&1; log "dz fused norm rc=$?"
  fi
  GPU=0 PORT_BASE=8200 OUT=$S/dz2 V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:2b24:32 > $S/dz2.log 2>&1; log "dz2b rc=$?"
  touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/swap32 SWAP_RATES=4 SWAP_REQS=48 timeout 400 bash $R/gpu/serving.sh swap:32 > $S/swap32.log 2>&1; log "swap32 rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/n64 V4=1 MAX_DELTAS=64 CPU_CACHE=180GiB RATES=4,16,64 REQS=96 timeout 420 bash $R/gpu/serving.sh dz:4b24:64 > $S/n64.log 2>&1; log "dz n64 rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
