#!/bin/bash
# Session 16's second device call (nvidia-h200, ONE GPU, ~7 minutes): run detached, poll without gaps
# (as next_chain.sh). Carry [".gpu/srv", ".gpu/k"].
#   mkdir -p /tmp/s16d && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/s16_call2.sh \
#       > /tmp/s16d/chain.out 2>&1; sleep N; tail -3 /tmp/s16d/s16d.log
#   fetch: tar czf $OUT/s16d.tgz --exclude=gen -C /tmp s16d
# A. The new routing rule (v4_wide_from_rows: 9 rows on deltas of at least 40 M weights): its check
#    ("v4 wide from rows": 9 rows now take the 32-row tile by default) and kernel_bench at 8-16 rows.
# B. Base and dz-4b24 x 32 at 16 req/s, one server at a time on the one GPU, alternated twice
#    (base, dz, base, dz). In session 16's first call each base run shared the host's CPU with a dz
#    run on the other GPU (as in sessions 14-15), and the same base configuration gave 248-359 tokens/s
#    there (427-459 in session 15's call): this measures dz / base without a neighbour.
TAG=s16d; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log start
mkdir -p $S/check $S/kern
timeout 120 /tmp/k/bin/cuda_check --filter "wide from rows" > $S/check/wide-from.txt 2>&1; log "cuda_check wide-from rc=$?"
timeout 60 /tmp/k/bin/kernel_bench --shapes 11008x4096,4096x11008,13824x5120,5120x13824,4096x4096 \
    --rows 8,9,12,16 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-rule > $S/kern/bench-rule.log 2>&1
log "kernel_bench rule rc=$?"
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
for i in 1 2; do
  GPU=0 PORT_BASE=8200 OUT=$S/base$i RATES=16 REQS=128 bash $R/gpu/serving.sh base > $S/base$i.log 2>&1; log "base $i rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/dz$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz$i.log 2>&1; log "dz $i rc=$?"
done
touch $S/all.done; log done
