#!/bin/bash
# Session 10's second device chain (detached; polled). nvidia-h200-x2.
# GPU 0: the CUDA check of the deeper-ring v4 kernels, kernel_bench --decode of the new binary and of the
# first chain's (A/B in one call), ncu; then base, then dz zipf. GPU 1: dz-4b24 x 32 (v4), then the engines
# A/B (engines:4 with K = 4: concurrent, never swapped; K = 1: swapping, never concurrent). Then both GPUs:
# the 40-layer 13B TP2 vs TP1 (one GPU visible), and the 4-layer 13B-wide greedy check in f32.
set -u
S=/tmp/s10b; mkdir -p $S
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/ && mkdir -p /tmp/k/bin && cp .gpu/k/*.xz /tmp/k/bin/
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
xz -dc .gpu/k2/kernel_bench_a.xz > /tmp/k/kernel_bench_a && chmod +x /tmp/k/kernel_bench_a
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
R=/tmp/k/bench
log() { echo "[s10b $(date +%T)] $*" >> $S/s10b.log; }
log start
( BIN=/tmp/k/bin OUT=$S/kern MODE=v4 NCU_RUN=1 COMMIT=${COMMIT:-unknown} CUDA_VISIBLE_DEVICES=0 \
    bash $R/gpu/kernels.sh > $S/kern.log 2>&1; log "kernels rc=$?"
  CUDA_VISIBLE_DEVICES=0 timeout 140 /tmp/k/kernel_bench_a --decode --out $S/kern/kernels-a --commit b662246 > $S/kern/kernel_bench_a.log 2>&1
  log "kernel_bench a rc=$?"; touch $S/kern.done ) &
CODECS=4b24 DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
( DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 OUT=$S/tp bash $R/gpu/tp_serve.sh gen > $S/tpgen.log 2>&1; log "tp gen rc=$?"
  LAYERS=4 DTYPE=f32 KV_CACHE=contiguous DZ_WORK=/tmp/dztp N=8 DISTINCT=4 OUT=$S/tp4 bash $R/gpu/tp_serve.sh gen > $S/tp4gen.log 2>&1; log "tp4 gen rc=$?"
  touch $S/tpgen.done ) &
( until [ -f $S/kern.done ]; do sleep 2; done; log "gpu0 free"
  GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/zipf V4=1 RATES=16,64 REQS=96 timeout 150 bash $R/gpu/serving.sh dz:4b24:32@zipf:1.0 > $S/zipf.log 2>&1; log "zipf rc=$?"
  touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
DZ_ENGINE_TRACE=1 RUST_LOG=info GPU=1 PORT_BASE=8600 OUT=$S/eng4k4 ENGINES_K=4 ENGINES_KV_BYTES=8GiB SWAP_RATES=1 SWAP_REQS=8 timeout 150 \
    bash $R/gpu/serving.sh engines:4 > $S/eng4k4.log 2>&1; log "engines:4 K=4 rc=$?"
pkill -f "eng4k4/engines-4.toml"; sleep 2
DZ_ENGINE_TRACE=1 RUST_LOG=info GPU=1 PORT_BASE=8700 OUT=$S/eng4k1 ENGINES_K=1 ENGINES_KV_BYTES=8GiB SWAP_RATES=1 SWAP_REQS=8 timeout 150 \
    bash $R/gpu/serving.sh engines:4 > $S/eng4k1.log 2>&1; log "engines:4 K=1 rc=$?"
pkill -f "eng4k1/engines-4.toml"; sleep 2
until [ -f $S/gpu0.done ] && [ -f $S/tpgen.done ]; do sleep 2; done; log "tp start"
rm -rf /tmp/dzsrv/merged
DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 RATES=4 REQS=32 LOAD_THREADS=4 TP1_GPUS=0 OUT=$S/tp \
    bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp.log 2>&1; log "tp rc=$?"
LAYERS=4 DTYPE=f32 KV_CACHE=contiguous DZ_WORK=/tmp/dztp N=8 DISTINCT=4 REQS=0 TP1_GPUS=0 OUT=$S/tp4 \
    bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp4.log 2>&1; log "tp4 rc=$?"
touch $S/all.done; log done
