#!/bin/bash
set -u
S=/tmp/s9
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
R=/tmp/k/bench
log() { echo "[s9 $(date +%T)] $*" >> $S/s9.log; }
log "engines start"
GPU=1 PORT_BASE=8500 OUT=$S/eng SWAP_RATES=4 SWAP_REQS=32 timeout 330 bash $R/gpu/serving.sh engines:32 > $S/eng.log 2>&1; log "engines rc=$?"
pkill -f "engines-32.toml"; sleep 2
until [ -f $S/base.done ] && [ -f $S/tpgen.done ]; do sleep 3; done; log "tp start"
rm -rf /tmp/dzsrv/merged
DZ_WORK=/tmp/dztp KV_CACHE=paged N=8 DISTINCT=4 RATES=4 REQS=32 LOAD_THREADS=4 DZ_TP_TRACE=1 OUT=$S/tp bash $R/gpu/tp_serve.sh tp2 tp1 cmp > $S/tp.log 2>&1; log "tp rc=$?"
touch $S/all.done
