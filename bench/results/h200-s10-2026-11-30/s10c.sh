#!/bin/bash
# Session 10's third device chain (detached; polled): the fixes of the first two, checked.
# GPU 1: engines:4 with K = 1 (the reload loop fixed in 46ec60b). CPU meanwhile: the 4-layer 13B-wide
# model. Then both GPUs: the f32 greedy check TP2 vs TP1 (the row-parallel seam fixed in host patch 0002).
set -u
S=/tmp/s10c; mkdir -p $S
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
R=/tmp/k/bench
log() { echo "[s10c $(date +%T)] $*" >> $S/s10c.log; }
log start
( LAYERS=4 DTYPE=f32 KV_CACHE=contiguous DZ_WORK=/tmp/dztp N=8 DISTINCT=4 OUT=$S/tp4 bash $R/gpu/tp_serve.sh gen > $S/tp4gen.log 2>&1; log "tp4 gen rc=$?"; touch $S/tpgen.done ) &
CODECS=4b24 DISTINCT=2 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
DZ_ENGINE_TRACE=1 RUST_LOG=info GPU=1 PORT_BASE=8700 OUT=$S/eng4k1 ENGINES_K=1 ENGINES_KV_BYTES=8GiB SWAP_RATES=1 SWAP_REQS=8 timeout 170 \
    bash $R/gpu/serving.sh engines:4 > $S/eng4k1.log 2>&1; log "engines:4 K=1 rc=$?"
pkill -f "eng4k1/engines-4.toml"; sleep 2
until [ -f $S/tpgen.done ]; do sleep 2; done; log "tp start"
LAYERS=4 DTYPE=f32 KV_CACHE=contiguous DZ_WORK=/tmp/dztp N=8 DISTINCT=4 REQS=0 TP1_GPUS=0 OUT=$S/tp4 \
    bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp4.log 2>&1; log "tp4 rc=$?"
touch $S/all.done; log done
