#!/bin/bash
# Session 13's second device call (nvidia-h200-x2, ~7 minutes): page-locked CPU tier at N = 64, the upload
# speed it rests on, the slot-table check's diagnosis, ncu on the 32-row tile, and dz at N = 8 beside the
# swap baseline measured in the first call. Run detached and poll, as sessions 10-13 did.
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   run:  mkdir -p /tmp/s13b && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s13b/chain.out 2>&1; sleep 200; <poll>                 carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry, at most ~30 s apart): sleep N; cat /tmp/s13b/s13b.log;
#         tar czf $OUT/s13b.tgz --exclude=gen -C /tmp s13b
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#
# GPU 0: cuda_check --quick --filter sbmm (session 13's first call failed the slot-table comparison in the
#   dense-route family only; the check now says whether the shared launch ran and whether the plain op
#   repeats itself), the page-locked upload case, kernel_bench --upload (pageable vs page-locked copies of
#   2.5 GiB), ncu on the 32-row tile (`_matmul_sx_`, 4096 x 4096 at 32 and 128 rows), then dz-4b24 x 8 at
#   4 / 16 req/s (the first call measured swap x 8: 85.2 tokens/s at 4 req/s).
# GPU 1: dz-4b24 x 64 at 4 / 16 req/s with the CPU tier page-locked (the first call, pageable: 83.7 / 83.6
#   tokens/s, 276 GPU loads taking 370 s in all).
set -u
S=/tmp/s13b; mkdir -p $S
log() { echo "[s13b $(date +%T)] $*" >> $S/s13b.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log start
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
( GPU=1 PORT_BASE=8300 OUT=$S/n64 V4=1 MAX_DELTAS=64 CPU_CACHE=180GiB RATES=4,16 REQS=96 timeout 400 bash $R/gpu/serving.sh dz:4b24:64 > $S/n64.log 2>&1
  log "dz n64 (page-locked) rc=$?"; touch $S/gpu1.done ) &
( export CUDA_VISIBLE_DEVICES=0; mkdir -p $S/check $S/kern
  timeout 90 /tmp/k/bin/cuda_check --quick --filter sbmm > $S/check/sbmm-quick.txt 2>&1; log "cuda_check sbmm rc=$?"
  timeout 150 /tmp/k/bin/cuda_check --quick --filter page-locked > $S/check/page-locked.txt 2>&1; log "cuda_check page-locked rc=$?"
  timeout 90 /tmp/k/bin/kernel_bench --upload > $S/kern/upload.md 2>&1; log "kernel_bench --upload rc=$?"
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [ -n "$NCU" ]; then
    timeout 150 $NCU --clock-control none --kernel-name regex:matmul_sx_ --launch-count 4 \
      --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats /tmp/k/bin/kernel_bench --profile > $S/kern/ncu-sx.txt 2>&1
    log "ncu rc=$?"
  fi )
GPU=0 PORT_BASE=8200 OUT=$S/dz8 V4=1 RATES=4,16 REQS=96 bash $R/gpu/serving.sh dz:4b24:8 > $S/dz8.log 2>&1; log "dz8 rc=$?"
until [ -f $S/gpu1.done ]; do sleep 2; done
touch $S/all.done; log done
