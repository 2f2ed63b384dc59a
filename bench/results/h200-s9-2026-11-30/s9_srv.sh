#!/bin/bash
# Session 9 serving chain (detached): gen; dz v4 on GPU1 after the kernel bench; base on GPU0 after quality;
# DZ_PROFILE dz on GPU1; then TP2/TP1 on both.
set -u
S=/tmp/s9; mkdir -p $S
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
R=/tmp/k/bench
log() { echo "[s9 $(date +%T)] $*" >> $S/s9.log; }
CODECS=4b24 DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
(DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 OUT=$S/tp bash $R/gpu/tp_serve.sh gen > $S/tpgen.log 2>&1; log "tp gen rc=$?"; touch $S/tpgen.done) &
( until ! pgrep -f quality/device_run.sh > /dev/null && [ -f /tmp/k/chk.done ]; do sleep 3; done; log "gpu0 free"
  GPU=0 PORT_BASE=8200 OUT=$S/gpu0 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/gpu0.log 2>&1; log "base rc=$?"; touch $S/base.done ) &
until [ -f /tmp/k/bench.done ]; do sleep 3; done; log "gpu1 free"
GPU=1 PORT_BASE=8300 OUT=$S/gpu1 V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/gpu1.log 2>&1; log "dz v4 rc=$?"
DZ_PROFILE=1 GPU=1 PORT_BASE=8400 OUT=$S/prof V4=1 RATES=16 REQS=64 bash $R/gpu/serving.sh dz:4b24:32 > $S/prof.log 2>&1; log "profile rc=$?"
until [ -f $S/base.done ] && [ -f $S/tpgen.done ]; do sleep 3; done; log "tp start"
rm -rf /tmp/dzsrv/merged
DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 RATES=4 REQS=32 LOAD_THREADS=4 DZ_TP_TRACE=1 OUT=$S/tp bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp.log 2>&1; log "tp rc=$?"
touch $S/all.done
