#!/bin/bash
# Session 14's second device call (nvidia-h200-x2, ~4 minutes), run detached and polled as next_chain.sh:
#   mkdir -p /tmp/s14b && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/s14_call2.sh \
#       > /tmp/s14b/chain.out 2>&1; sleep N; cat /tmp/s14b/s14b.log; tar czf $OUT/s14b.tgz --exclude=gen -C /tmp s14b
# A. GPU 0: the K-split 32-row tile reduced through L2 (`_sxk`, rewritten in session 14 after the cluster
#    version measured slower than `_sx` over a quarter of K alone): `cuda_check --quick --filter
#    shared-split`, "dense route" (the fallback comparison's tolerance fixed), then kernel_bench at 32-256
#    rows on the 7B and 13B shapes (`dz-sx` beside `dz-sxk` and cuBLAS), then base at 4 / 16 / 64.
# B. GPU 1: the 7B generation, then dz-4b24 x 32 at 4 / 16 / 64 with session 14's defaults (wide
#    segments and the one-op norm delta on).
set -u
S=/tmp/s14b; mkdir -p $S
log() { echo "[s14b $(date +%T)] $*" >> $S/s14b.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log start
( export CUDA_VISIBLE_DEVICES=0; mkdir -p $S/kern $S/check
  timeout 100 /tmp/k/bin/cuda_check --quick --filter shared-split > $S/check/shared-split.txt 2>&1
  log "cuda_check shared-split rc=$?"
  timeout 60 /tmp/k/bin/cuda_check --quick --filter "dense route" > $S/check/dense-route.txt 2>&1
  log "cuda_check dense route rc=$?"
  timeout 120 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
      --rows 32,64,128,256 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-sxk > $S/kern/bench-sxk.log 2>&1
  log "kernel_bench sxk rc=$?"; touch $S/kern.done ) &
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
until [ -f $S/kern.done ]; do sleep 2; done
( GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
