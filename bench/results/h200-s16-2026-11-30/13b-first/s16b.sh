#!/bin/bash
# Issue #9's 13B, the second device call prepared for session 16 (nvidia-h200-x2, ~8 minutes; after
# next_chain.sh, in its own call: it deletes the 7B files first, the disk holds one model family's files).
# Session 15 ran the first 13B call (bench/results/h200-s15-2026-11-30.md section 4): dz x 8 at 2.5x the
# base's TPOT at 4 req/s (110.6 against 44.2 ms; 7B x 32: 2.0x), and x 32 out of GPU memory with the 7B's
# 90 GiB delta budget (serve now refuses that at start-up: at most ~82 GiB fit beside the 13B base, 16 GiB
# of KV cache and the pool's 4 GiB). Detached and polled as next_chain.sh (no gaps between polls):
#   mkdir -p /tmp/s16b && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/s16_13b.sh \
#       > /tmp/s16b/chain.out 2>&1; sleep N; tail -3 /tmp/s16b/s16b.log;   carry: [".gpu/srv"]
#   fetch: tar czf $OUT/s16b.tgz --exclude=gen -C /tmp s16b
# GPU 0: base at 4 / 16, then the base's DZ_PROFILE=events at 4 (its linear layers' GPU time a step);
# GPU 1: dz-4b24 x 8 at 4 / 16, then DZ_PROFILE=events and =host at 4 (what makes its TPOT 2.5x), then
# x 32 at 4 / 16 with GPU_DELTAS=76GiB (the GPU holds ~16 of the 4.6 GiB deltas; the rest from the
# page-locked CPU tier, 160 GiB).
until [ -f /tmp/s16/gen.done ]; do sleep 2; done
TAG=s16b; W=/tmp/dz13; . bench/gpu/chain_env.sh
export SHAPE=llama-13b GPU_DELTAS=76GiB
log start
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen 13b rc=$?"
( GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  DZ_PROFILE=events GPU=0 PORT_BASE=8200 OUT=$S/basee RATES=4 REQS=64 bash $R/gpu/serving.sh base > $S/basee.log 2>&1; log "base events rc=$?"
  touch $S/gpu0.done ) &
until [ -f /tmp/s16/all.done ]; do sleep 2; done; GPU=1 PORT_BASE=8300 OUT=$S/dz8 V4=1 RATES=4,16 REQS=96 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8.log 2>&1; log "dz8 rc=$?"
DZ_PROFILE=events GPU=1 PORT_BASE=8300 OUT=$S/dz8e V4=1 RATES=4 REQS=64 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8e.log 2>&1; log "dz8 events rc=$?"
DZ_PROFILE=host GPU=1 PORT_BASE=8300 OUT=$S/dz8h V4=1 RATES=4 REQS=64 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8h.log 2>&1; log "dz8 host rc=$?"
GPU=1 PORT_BASE=8300 OUT=$S/dz32 V4=1 CPU_CACHE=160GiB RATES=4 REQS=64 timeout 240 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz32.log 2>&1; log "dz32 rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
