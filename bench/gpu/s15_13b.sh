#!/bin/bash
# Issue #9's "13B if time allows", prepared in session 14 (never run): a 13B-shaped Llama (5120 / 13824,
# 40 layers; `synth model --shape llama-13b`, ~26 GB bf16) with 8 distinct 4-bit 2:4 deltas (~4.6 GiB
# each), on nvidia-h200-x2, ~8 minutes. Run it after next_chain.sh in its own call: it deletes the 7B
# files first (the disk holds one model family's files). Detached and polled as next_chain.sh:
#   mkdir -p /tmp/s15b && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/s15_13b.sh \
#       > /tmp/s15b/chain.out 2>&1; sleep N; cat /tmp/s15b/s15b.log; tar czf $OUT/s15b.tgz --exclude=gen -C /tmp s15b
# Session 15 ran it with --pool-keep 4GiB on base and dz (the 7B A/B: dz +11-18% at 16 / 64).
# GPU 0: base at 4 / 16 / 64, then swap x 8 at 0.25 / 1 (rates it may sustain) (2 distinct merged models of 26 GB in CPU memory);
# GPU 1: dz-4b24 x 8 at 4 / 16 / 64 (all on the GPU), then x 32 at 4 / 16 (the GPU holds ~19: the rest
# from the page-locked CPU tier, 160 GiB).
rm -rf /tmp/dzsrv/base /tmp/dzsrv/4b24 /tmp/dzsrv/2b24 /tmp/dzsrv/merged
TAG=s15b; W=/tmp/dz13; . bench/gpu/chain_env.sh
export SHAPE=llama-13b
log start
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen 13b rc=$?"
( POOL_KEEP=4GiB GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/swap8 SWAP_DISTINCT=2 SWAP_K=2 SWAP_RATES=0.25,1 SWAP_REQS=12 timeout 300 bash $R/gpu/serving.sh swap:8 > $S/swap8.log 2>&1; log "swap8 rc=$?"
  touch $S/gpu0.done ) &
POOL_KEEP=4GiB GPU=1 PORT_BASE=8300 OUT=$S/dz8 V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8.log 2>&1; log "dz8 rc=$?"
POOL_KEEP=4GiB GPU=1 PORT_BASE=8300 OUT=$S/dz32 V4=1 CPU_CACHE=160GiB RATES=4,16 REQS=96 timeout 400 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz32.log 2>&1; log "dz32 rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
