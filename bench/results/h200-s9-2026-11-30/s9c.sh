#!/bin/bash
set -u
S=/tmp/s9
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
R=/tmp/k/bench
log() { echo "[s9 $(date +%T)] $*" >> $S/s9.log; }
( GPU=0 PORT_BASE=8600 OUT=$S/eng2 SWAP_RATES=1 SWAP_REQS=16 timeout 330 bash $R/gpu/serving.sh engines:32 > $S/eng2.log 2>&1; log "engines2 rc=$?"; pkill -f "eng2/engines-32.toml" ) &
GPU=1 PORT_BASE=8700 OUT=$S/d0 V4=1 DENSE_ROWS=0 RATES=4,16,64 REQS=96 timeout 200 bash $R/gpu/serving.sh dz:4b24:32 > $S/d0.log 2>&1; log "dense0 rc=$?"
GPU=1 PORT_BASE=8800 OUT=$S/zipf V4=1 RATES=16,64 REQS=96 timeout 120 bash $R/gpu/serving.sh dz:4b24:32@zipf:1.0 > $S/zipf.log 2>&1; log "zipf rc=$?"
wait; touch $S/c.done
