#!/bin/bash
# The device chain prepared at the end of session 15 for session 16 (nvidia-h200-x2, ~17 minutes): run it
# detached and poll WITHOUT GAPS (session 15 lost a detached job: the machine goes back 30 s after the last
# call ends, and takes the job with it). Session 15's calls: bench/results/h200-s15-2026-11-30.md.
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   run:  mkdir -p /tmp/s16 && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s16/chain.out 2>&1; sleep 200; <poll>                 carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry, at most ~25 s apart; read results between polls only from what a poll
#         printed): sleep 25; tail -3 /tmp/s16/s16.log
#   fetch: tar czf $OUT/s16.tgz --exclude=gen -C /tmp s16
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#   The carry limit is 64 MiB: tracked files (29.1 MB) + .gpu/srv (24.9 MB) + .gpu/k (5.8 MB) = 60 MB at the
#   end of session 15; `du -sb` them first (git ls-files | xargs du -cb), and carry one folder a call if
#   the tree has grown past it.
#
# What it measures (session 15's open questions):
# A. GPU 0, correctness first (each cuda_check prints only at its end: one filter a run, generous limits):
#    "v4 wide from rows" (session 15, never GPU-checked: 16 rows of 11008 x 4096 on the 32-row tile, and
#    WideSx staging rows past m as zeros), then the quick "v4 kernels" and "v4 only" families (3990 cases
#    in session 14, 122 s together). Then kernel_bench over the 7B / 13B shapes at 8-40 rows: the `dz`
#    column at 16, 24, 33 and 40 rows shows whether the zero-filled rows brought the 32-row tile's time
#    for fewer than 32 rows down to its 32-row time (session 15: 33.2 against 25.5 us on 11008 x 4096);
#    then the tile forced from 8 rows (`--wide-from 8`) against the ring-fed tiles of the first run. The
#    same sweep's `dense-v4` column times the v4 dequantize's vector stores (session 15; ~100 us before
#    for 11008 x 4096, ~3x its bytes).
# B. GPU 1 then GPU 0: the pool A/B again, interleaved and repeated (session 15's single pair could not
#    separate +-20% from the calls' noise): dz-4b24 x 32, without / with --pool-keep 4GiB, twice, at 16
#    and 64 req/s, 128 requests each (GPU 1); base the same way (GPU 0, after A). And the slot tables
#    (`--slot-tables`, +slots) in each round: session 15 counted 86-90% of the linear-delta calls building
#    a new layer plan (the batch changes nearly every step); the slot tables build one segment table a
#    pass instead (0-4% in session 12, before the other defaults changed). Last, the x-direct decode sbmm
#    (+xd) at 16 / 64 when the v4 check passed.
TAG=s16; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log start
# A
( export CUDA_VISIBLE_DEVICES=0; mkdir -p $S/check $S/kern
  timeout 300 /tmp/k/bin/cuda_check --filter "wide from rows" > $S/check/wide-from.txt 2>&1; log "cuda_check wide-from rc=$?"
  timeout 200 /tmp/k/bin/cuda_check --quick --filter "v4 kernels" > $S/check/v4-quick.txt 2>&1; log "cuda_check v4 quick rc=$?"
  timeout 200 /tmp/k/bin/cuda_check --quick --filter "v4 only" > $S/check/v4-only-quick.txt 2>&1; log "cuda_check v4 only quick rc=$?"
  # The v4 dequantize's vector stores (session 15): bit-exact against the CPU twin.
  timeout 120 /tmp/k/bin/cuda_check --quick --filter dequantize > $S/check/dequantize.txt 2>&1; log "cuda_check dequantize rc=$?"
  timeout 150 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
      --rows 8,12,16,24,32,33,40 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-rows > $S/kern/bench-rows.log 2>&1
  log "kernel_bench rows rc=$?"
  # The same below the rule's 16 rows, the 32-row tile forced from 8 (`--wide-from 8`): with the zero-filled
  # rows, does 8-12 rows on it now beat the ring-fed tiles (then lower `v4_wide_from_rows`)?
  timeout 100 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
      --rows 8,9,12 --wide-from 8 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-forced > $S/kern/bench-forced.log 2>&1
  log "kernel_bench forced rc=$?"
  # The x-direct decode sbmm tiles (session 15, `set_v4_sbmm_x_direct`: x loaded before each mma, a 6-deep
  # code ring, or a 3-deep one at 3 blocks an SM): kernel_bench's sbmm cases (`dz-xd`, `dz-xo` beside `dz`
  # and the others), then Nsight Compute on them.
  timeout 120 /tmp/k/bin/kernel_bench --decode --shapes 4096x4096 --rows 1 --commit "${COMMIT:-unknown}" \
      --out $S/kern/kernels-sbmm > $S/kern/bench-sbmm.log 2>&1; log "kernel_bench sbmm rc=$?"
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  [ -n "$NCU" ] && timeout 150 "$NCU" --clock-control none --kernel-name regex:'sbmm_x[do]|sbmm_bf16_n1' --launch-count 8 \
      --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
      /tmp/k/bin/kernel_bench --profile > $S/kern/ncu-sbmm-xd.txt 2>&1; log "ncu xd rc=$?"
  # (8 launches: `--profile` runs the default tile 4 times (split 1 and 8), then xd and xo twice each.)
  until [ -f $S/gen.done ]; do sleep 2; done
  for i in 1 2; do
    GPU=0 PORT_BASE=8200 OUT=$S/base$i RATES=16,64 REQS=128 bash $R/gpu/serving.sh base > $S/base$i.log 2>&1; log "base $i rc=$?"
    POOL_KEEP=4GiB GPU=0 PORT_BASE=8200 OUT=$S/basep$i RATES=16,64 REQS=128 bash $R/gpu/serving.sh base > $S/basep$i.log 2>&1; log "base+pool $i rc=$?"
  done
  touch $S/gpu0.done ) &
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"; touch $S/gen.done
# B
for i in 1 2; do
  GPU=1 PORT_BASE=8300 OUT=$S/dz$i V4=1 RATES=16,64 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz$i.log 2>&1; log "dz $i rc=$?"
  POOL_KEEP=4GiB GPU=1 PORT_BASE=8300 OUT=$S/dzp$i V4=1 RATES=16,64 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dzp$i.log 2>&1; log "dz+pool $i rc=$?"
  SLOT_TABLES=1 GPU=1 PORT_BASE=8300 OUT=$S/dzs$i V4=1 RATES=16,64 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dzs$i.log 2>&1; log "dz+slots $i rc=$?"
done
# The x-direct sbmm in serving, if the v4 check (GPU 0, with its x-direct cases) passed.
if grep -q "^[0-9]* passed, 0 failed" $S/check/v4-quick.txt 2>/dev/null; then
  # The faster of the two in kernel_bench's 32 x 32 sbmm case (deep when the bench has no answer).
  XD=$(python3 -c "import json,sys; r=[x for x in json.load(open('$S/kern/kernels-sbmm.json'))['results'] if x['op']=='sbmm' and x['deltas']==32 and x['rows']==32 and x['path'] in ('dz-xd','dz-xo')]; print('occupancy' if r and min(r,key=lambda x:x['time_us'])['path']=='dz-xo' else 'deep')" 2>/dev/null || echo deep)
  SBMM_XD=$XD GPU=1 PORT_BASE=8300 OUT=$S/dzxd V4=1 RATES=16,64 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dzxd.log 2>&1; log "dz+xd-$XD rc=$?"
else
  log "dz+xd skipped: the v4 check did not pass (or has not finished)"
fi
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
