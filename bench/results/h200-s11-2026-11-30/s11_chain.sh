#!/bin/bash
# Session 11's device work, in two parts (prepared at the end of session 10, split in session 11).
#
# PART=kern (one GPU, synchronous, ~6 minutes; kind nvidia-h200, carry [".gpu/k"]):
#   command: PART=kern COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/next_chain.sh; tar czf $OUT/k.tgz -C /tmp s11
#   The CUDA check of the v4 family (the v4 matmul on the item grid with its split swept, the one-upload
#   sbmm tables, the experimental shared-memory sbmm) with memcheck and racecheck, the decode kernel
#   bench (single-delta splits, the copy of the same bytes, dz-sx beside dz-s1) with ncu, then
#   cuda_check --filter sbmm.
#
# PART=srv (both GPUs of nvidia-h200-x2, ~17 minutes, detached and polled; carry [".gpu/srv", ".gpu/k"]):
#   run:  mkdir -p /tmp/s11 && PART=srv COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh > /tmp/s11/chain.out 2>&1; sleep 150; <poll>
#   poll (back to back, no pause between calls): sleep N; cat /tmp/s11/s11.log; tar czf $OUT/s11.tgz -C /tmp s11
#   GPU 0: kernel_bench --decode (when .gpu/k has it), base, then swap:32 (its INVALID_CONTEXT fix). GPU 1: dz-4b24 x 32 (v4), a DZ_PROFILE=1 run
#   (decode and prompt steps apart), a DZ_PROFILE=host run (the CPU's share of a step), dz with the
#   shared-memory sbmm (SX=1, when PART=kern's check passed), engines:32 with K = 1 (the reload-loop fix;
#   the swap-engines baseline). Then both GPUs: the 40-layer 13B with all 32 fine-tunes, TP2 (the issue's
#   run, with the fixed row-parallel seam) against TP1 on one visible GPU (its 90 GiB delta budget holds
#   about 18 of the 32: it swaps), each with the greedy check.
set -u
S=/tmp/s11; mkdir -p $S
log() { echo "[s11 $(date +%T)] $*" >> $S/s11.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench

if [ "${PART:-}" = kern ]; then
  mkdir -p /tmp/k/bin && cp .gpu/k/*.xz /tmp/k/bin/
  log "kern start"
  BIN=/tmp/k/bin OUT=$S/kern MODE=v4 NCU_RUN=1 COMMIT=${COMMIT:-unknown} bash $R/gpu/kernels.sh > $S/kern.log 2>&1
  log "kernels rc=$?"
  timeout 150 /tmp/k/bin/cuda_check --filter sbmm > $S/kern/cuda_check_sbmm.txt 2>&1
  log "cuda_check sbmm rc=$?"
  cat $S/kern.log; tail -4 $S/kern/cuda_check_sbmm.txt
  exit 0
fi

[ "${PART:-}" = srv ] || { echo "PART=kern or PART=srv" >&2; exit 2; }
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log "srv start"
CODECS=4b24 DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
( DZ_WORK=/tmp/dztp KV_CACHE=paged N=32 DISTINCT=8 OUT=$S/tp bash $R/gpu/tp_serve.sh gen > $S/tpgen.log 2>&1
  log "tp gen rc=$?"; touch $S/tpgen.done ) &
# GPU 0 first: the decode kernel bench again with the host's split rule of after PART=kern (.gpu/k rebuilt).
( if [ -f .gpu/k/kernel_bench.xz ]; then
    mkdir -p /tmp/k/bin $S/kern2 && xz -dc .gpu/k/kernel_bench.xz > /tmp/k/bin/kernel_bench && chmod +x /tmp/k/bin/kernel_bench
    CUDA_VISIBLE_DEVICES=0 timeout 120 /tmp/k/bin/kernel_bench --decode --out $S/kern2/kernels-h200-v4 \
        --commit "${COMMIT:-unknown}" > $S/kern2/kernel_bench_v4.log 2>&1; log "kernel_bench 2 rc=$?"
  fi
  GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/swap SWAP_RATES=4 SWAP_REQS=24 timeout 300 bash $R/gpu/serving.sh swap:32 > $S/swap.log 2>&1
  log "swap rc=$?"; pkill -f "swap/swap-32.toml"; touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
DZ_PROFILE=1 GPU=1 PORT_BASE=8300 OUT=$S/prof V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/prof.log 2>&1; log "prof rc=$?"
DZ_PROFILE=host GPU=1 PORT_BASE=8300 OUT=$S/profhost V4=1 RATES=16,64 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/profhost.log 2>&1; log "profhost rc=$?"
# The shared-memory sbmm (experimental): only when PART=kern's v4 check (its cases included) passed.
if [ "${SX:-0}" = 1 ]; then
  GPU=1 PORT_BASE=8300 OUT=$S/dzsx V4=1 V4_SX=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dzsx.log 2>&1; log "dz sx rc=$?"
fi
DZ_ENGINE_TRACE=1 GPU=1 PORT_BASE=8600 OUT=$S/eng ENGINES_K=1 ENGINES_KV_BYTES=8GiB SWAP_RATES=1 SWAP_REQS=16 timeout 240 \
    bash $R/gpu/serving.sh engines:32 > $S/eng.log 2>&1; log "engines:32 K=1 rc=$?"
pkill -f "eng/engines-32.toml"; sleep 2
until [ -f $S/gpu0.done ] && [ -f $S/tpgen.done ]; do sleep 2; done; log "tp start"
rm -rf /tmp/dzsrv/merged
DZ_WORK=/tmp/dztp KV_CACHE=paged N=32 DISTINCT=8 RATES=4 REQS=32 LOAD_THREADS=4 TP1_GPUS=0 OUT=$S/tp \
    bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp.log 2>&1; log "tp rc=$?"
touch $S/all.done; log done
