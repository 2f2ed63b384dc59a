#!/bin/bash
# Session 10's device chain (detached with setsid; polled by later calls). nvidia-h200-x2.
# GPU 0: CUDA check + kernel bench (v4 sbmm split sweep, ncu, dense crossover), then base, base with
# max_seqs 64, swap:32. GPU 1: dz-4b24 x 32 (v4), the same with max_seqs 64, a DZ_PROFILE run, one merged
# engine (engines:1, K=1, traced). Then both GPUs: TP2 vs TP1 (TP1 with one GPU visible) and the 4-layer
# 13B-wide greedy check.
set -u
S=/tmp/s10; mkdir -p $S
mkdir -p /tmp/k && cp -r bench /tmp/k/ && mkdir -p /tmp/k/bin && cp .gpu/k/*.xz /tmp/k/bin/
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
R=/tmp/k/bench
log() { echo "[s10 $(date +%T)] $*" >> $S/s10.log; }
log start
( BIN=/tmp/k/bin OUT=$S/kern MODE=v4 NCU_RUN=1 DENSE_RUN=1 COMMIT=${COMMIT:-unknown} CUDA_VISIBLE_DEVICES=0 \
    bash $R/gpu/kernels.sh > $S/kern.log 2>&1; log "kernels rc=$?"; touch $S/kern.done ) &
CODECS=4b24 DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
( DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 OUT=$S/tp bash $R/gpu/tp_serve.sh gen > $S/tpgen.log 2>&1; log "tp gen rc=$?"
  LAYERS=4 DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 OUT=$S/tp4 bash $R/gpu/tp_serve.sh gen > $S/tp4gen.log 2>&1; log "tp4 gen rc=$?"
  touch $S/tpgen.done ) &
( until [ -f $S/kern.done ]; do sleep 2; done; log "gpu0 free"
  GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/base64 MAX_SEQS=64 RATES=16,64 REQS=128 bash $R/gpu/serving.sh base > $S/base64.log 2>&1; log "base64 rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/swap SWAP_RATES=4 SWAP_REQS=24 timeout 300 bash $R/gpu/serving.sh swap:32 > $S/swap.log 2>&1; log "swap rc=$?"
  pkill -f "swap/swap-32.toml"; touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/dz64 V4=1 MAX_SEQS=64 RATES=16,64 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz64.log 2>&1; log "dz64 rc=$?"
DZ_PROFILE=1 GPU=1 PORT_BASE=8300 OUT=$S/prof V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/prof.log 2>&1; log "prof rc=$?"
DZ_ENGINE_TRACE=1 RUST_LOG=info GPU=1 PORT_BASE=8600 OUT=$S/eng1 ENGINES_K=1 SWAP_RATES=1 SWAP_REQS=4 timeout 240 \
    bash $R/gpu/serving.sh engines:1 > $S/eng1.log 2>&1; log "engines:1 rc=$?"
pkill -f "eng1/engines-1.toml"
until [ -f $S/gpu0.done ] && [ -f $S/tpgen.done ]; do sleep 2; done; log "tp start"
rm -rf /tmp/dzsrv/merged
DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 RATES=4 REQS=32 LOAD_THREADS=4 TP1_GPUS=0 OUT=$S/tp \
    bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp.log 2>&1; log "tp rc=$?"
LAYERS=4 DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 RATES=4 REQS=16 TP1_GPUS=0 OUT=$S/tp4 \
    bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp4.log 2>&1; log "tp4 rc=$?"
touch $S/all.done; log done
