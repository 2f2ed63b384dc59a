#!/bin/bash
# Session 12's second device chain (nvidia-h200-x2, ~10 minutes): the 32-row v4 matmul tile (checks and
# timing beside cuBLAS), the planned sbmm (`SbmmPlan`, one plan per layer and batch) in serving, and 64
# fine-tunes with delta copies on their own stream and a CPU tier that holds all 64.
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv)
#   run:  mkdir -p /tmp/s12b && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/s12_chain2.sh \
#         > /tmp/s12b/chain.out 2>&1; sleep 200; <poll>                carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry): sleep N; cat /tmp/s12b/s12b.log; tar czf $OUT/s12b.tgz -C /tmp s12b
#
# GPU 0: cuda_check --filter v4 (the new tiles at 17-256 rows against the CPU twin), kernel_bench at
#        32-256 rows of the 7B/13B shapes, `bench hook` (32 fine-tunes, 8/32/64 rows), base at 4/16/64.
# GPU 1: dz-4b24 x 32 at 4/16/64 (chain 1 of this session, same workload: 203.9 / 282.1 / 290.9 tokens/s,
#        base 208.9 / 360.8 / 345.8), DZ_PROFILE=host at 16/64, then 64 fine-tunes (CPU_CACHE 180GiB) at 4/16.
set -u
S=/tmp/s12b; mkdir -p $S
log() { echo "[s12b $(date +%T)] $*" >> $S/s12b.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log start
( export CUDA_VISIBLE_DEVICES=0; mkdir -p $S/kern
  timeout 200 /tmp/k/bin/cuda_check --filter v4 > $S/kern/check-v4.txt 2>&1; log "cuda_check v4 rc=$?"
  timeout 220 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
      --rows 32,64,128,256 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-wide > $S/kern/bench-wide.log 2>&1
  log "kernel_bench wide rc=$?"
  until [ -f $S/gen.done ]; do sleep 2; done
  H=/tmp/dzhook; rm -rf $H; mkdir -p $H
  $DZ synth model --shape llama-7b --layers 2 --out $H/base > $S/kern/hook-gen.log 2>&1 &&
    $DZ synth deltas --base $H/base --count 8 --out-dir $H/d --config $H/serve.toml --device cuda >> $S/kern/hook-gen.log 2>&1 &&
    for rows in 8 32 64; do timeout 120 $DZ bench hook --config $H/serve.toml --fine-tunes 32 --rows $rows --v4-kernels; done \
      > $S/kern/hook.md 2>&1; log "bench hook rc=$?"
  rm -rf $H
  GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  touch $S/gpu0.done ) &
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"; touch $S/gen.done
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
DZ_PROFILE=host GPU=1 PORT_BASE=8300 OUT=$S/profhost V4=1 RATES=16,64 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/profhost.log 2>&1; log "profhost rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/n64 V4=1 MAX_DELTAS=64 CPU_CACHE=180GiB RATES=4,16 REQS=96 timeout 300 bash $R/gpu/serving.sh dz:4b24:64 > $S/n64.log 2>&1; log "dz n64 rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
