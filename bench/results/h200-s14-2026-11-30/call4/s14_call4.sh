#!/bin/bash
# Session 14's fourth device call (nvidia-h200-x2, ~3.5 minutes, detached and polled as next_chain.sh):
# base (GPU 0) beside dz-4b24 x 32 (GPU 1) at 4 / 16 / 64 req/s, at the same time, with every session-14
# default on: wide prefill segments, the one-op norm delta, and the 32-row tile split over 4 blocks where
# a launch has at most a block for two SMs (prefill segments of 17-63 rows of the 7B's 4096-wide layers).
#   mkdir -p /tmp/s14d && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/s14_call4.sh \
#       > /tmp/s14d/chain.out 2>&1; sleep N; cat /tmp/s14d/s14d.log; tar czf $OUT/s14d.tgz --exclude=gen -C /tmp s14d
set -u
S=/tmp/s14d; mkdir -p $S
log() { echo "[s14d $(date +%T)] $*" >> $S/s14d.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log start
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
( GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  touch $S/gpu0.done ) &
GPU=1 PORT_BASE=8300 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
