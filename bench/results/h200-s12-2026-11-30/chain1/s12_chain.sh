#!/bin/bash
# The device chain prepared at the end of session 11 for session 12 (nvidia-h200-x2, ~14 minutes): run it
# detached and poll, as sessions 10-11 did (session 11's chain: bench/results/h200-s11-2026-11-30.md).
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; ~25 minutes cold)
#   run:  mkdir -p /tmp/s12 && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s12/chain.out 2>&1; sleep 200; <poll>                 carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no pause between calls, at most ~30 s apart): sleep N; cat /tmp/s12/s12.log;
#         tar czf $OUT/s12.tgz -C /tmp s12
#
# What it measures (issue #9 first: the CPU's share of a dz step was session 11's finding):
# - GPU 0: kernel_bench --host (the ops' CPU cost), `deltazip bench hook` (the hook's CPU cost per module,
#   32 fine-tunes, 8/32/64 rows; then A/B host-side changes with it alone, ~1 minute a call), then base at
#   4/16/64 req/s, then dz-2b24 x 32.
# - GPU 1: dz-4b24 x 32 at 4/16/64 req/s (the per-pass RowPlan and the norm-major norm table, built after
#   session 11's measurement), then DZ_PROFILE=host at 16/64 (session 11: 86 us of CPU per linear delta
#   call, 75 per norm call, 43 ms of a 75.8 ms step), then N = 8 and N = 64 (4b24).
# Disk: the 7B base (12.6 GiB) and 8 files of each codec (19.5 + ~12 GiB); no 13B (session 11's first
# chain filled the disk with both).
set -u
S=/tmp/s12; mkdir -p $S
log() { echo "[s12 $(date +%T)] $*" >> $S/s12.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log start
CODECS="4b24 2b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
( if [ -f .gpu/k/kernel_bench.xz ]; then
    mkdir -p /tmp/k/bin $S/kern && xz -dc .gpu/k/kernel_bench.xz > /tmp/k/bin/kernel_bench && chmod +x /tmp/k/bin/kernel_bench
    CUDA_VISIBLE_DEVICES=0 timeout 60 /tmp/k/bin/kernel_bench --host > $S/kern/host.md 2>&1; log "kernel_bench --host rc=$?"
  fi
  # The hook's CPU cost per module, apart from a server: a 2-layer 7B-shaped base, 8 delta files, 32 names.
  ( export CUDA_VISIBLE_DEVICES=0; H=/tmp/dzhook; rm -rf $H; mkdir -p $H $S/kern
    $DZ synth model --shape llama-7b --layers 2 --out $H/base > $S/kern/hook-gen.log 2>&1 &&
    $DZ synth deltas --base $H/base --count 8 --out-dir $H/d --config $H/serve.toml --device cuda >> $S/kern/hook-gen.log 2>&1 &&
    for rows in 8 32 64; do timeout 120 $DZ bench hook --config $H/serve.toml --fine-tunes 32 --rows $rows --v4-kernels; done \
      > $S/kern/hook.md 2>&1; log "bench hook rc=$?" )
  GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/dz2 V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:2b24:32 > $S/dz2.log 2>&1; log "dz 2b24 rc=$?"
  touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
DZ_PROFILE=host GPU=1 PORT_BASE=8300 OUT=$S/profhost V4=1 RATES=16,64 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/profhost.log 2>&1; log "profhost rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/n8 V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:8 > $S/n8.log 2>&1; log "dz n8 rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/n64 V4=1 MAX_DELTAS=64 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:64 > $S/n64.log 2>&1; log "dz n64 rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
