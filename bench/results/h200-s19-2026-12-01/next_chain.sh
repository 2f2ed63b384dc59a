#!/bin/bash
# The device chain prepared at the end of session 18 for session 19 (nvidia-h200, ONE GPU, ~25 minutes in
# two calls): every serving run alone on the machine, one server at a time.
#
# The carry no longer fits in one call (tracked files ~36 MB + .gpu/srv 25 MB + .gpu/k 6.6 MB > 64 MiB):
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   call 1, PART=k (~4 min, in the foreground), carry [".gpu/k"]:
#     PART=k COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/next_chain.sh; tar czf $OUT/s19k.tgz -C /tmp s19
#   call 2, PART=srv (~21 min), carry [".gpu/srv"]: run it detached and poll WITHOUT GAPS (the machine goes
#   back 30 s after the last call ends, and takes a detached job with it), each poll at most ~25 s apart:
#     mkdir -p /tmp/s19 && PART=srv COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#       > /tmp/s19/chain.out 2>&1; sleep 500; tail -3 /tmp/s19/s19.log
#     poll: sleep 24; tail -3 /tmp/s19/s19.log
#     fetch: tar czf $OUT/s19.tgz --exclude=gen -C /tmp s19
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#
# PART=k. Checks and the kernel sweep at the head:
#   - `cuda_check --quick --filter v4` (the automatic choice now takes the pair tile from 128 rows on deltas
#     larger than 4096 x 4096: `v4_auto_takes_pair`; cuda_check's shapes are smaller, so its forced cases
#     check the kernel) and `--filter shared-pair` (the pair tile: balanced `_sxp_` / `_sxp2_`, and
#     `_sxq_`, the pair tile on the plain grid-stride launch, new at the end of session 18, not yet run);
#   - `kernel_bench --rows 32,64,128,256` on the six 7B / 13B shapes: `dz` (the automatic choice) beside
#     `dz-sx`, `dz-sxp`, `dz-sxq` and cuBLAS. Session 18: the balanced pair tile took 0.81-0.95x the 32-row
#     tile's time at 128-256 rows of the larger shapes (11008 x 4096 4b 2:4 at 256 rows: 81.9 vs 96.8 us;
#     cuBLAS 36.4), while the balanced schedule alone cost 3-7% (`dz-sxb`). If `dz-sxq` beats `dz-sxp`
#     where the pair wins, route those launches to it (`v4_auto_takes_pair` picks the pair; the host's
#     choice of entry is in cuda/mod.rs, `wide_x`).
#   - Nsight Compute on the pair tiles at 128 rows of 11008 x 4096 (`kernel_bench --profile`).
# PART=srv. Serving (128 requests at 16 req/s, one server at a time), three alternations of: the base,
#   dz-4b24 x 32 (the pair tile on: the default since session 18) and dz-4b24 `--no-v4-pair` (session 18's
#   prompt path); then dz-2b24 x 32 twice beside the base's runs (session 17: 79.5% of the base, the byte
#   floor of section 3 of h200-s18-2026-11-30.md is half of 4b24's). Then `DZ_PROFILE=events` for dz and dz
#   `--no-v4-pair` (48 requests): the prompt deltas' GPU time a call (session 17: 142 us) with and
#   without the pair tile. During run 1 of the base and of dz, `nvidia-smi dmon -s u` samples the GPU's
#   busy fraction (dmon-*.txt; the warm-up and start-up are in it too: read the rows of the timed part).
set -u
PART=${PART:?PART=k or PART=srv}
TAG=s19; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log "start $PART"
if [ "$PART" = k ]; then
  mkdir -p $S/check $S/kern
  timeout 150 /tmp/k/bin/cuda_check --quick --filter v4 > $S/check/v4-quick.txt 2>&1; log "cuda_check v4 quick rc=$? $(tail -1 $S/check/v4-quick.txt)"
  timeout 90 /tmp/k/bin/cuda_check --filter shared-pair > $S/check/shared-pair.txt 2>&1; log "cuda_check shared-pair rc=$? $(tail -1 $S/check/shared-pair.txt)"
  timeout 150 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
      --rows 32,64,128,256 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-pair > $S/kern/bench.log 2>&1
  log "kernel_bench rc=$? mismatches $(grep -c MISMATCH $S/kern/bench.log)"
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  timeout 120 $NCU --clock-control none -k regex:'matmul_sx[pq]_bf16|matmul_sx_bf16_n4' --set full \
      /tmp/k/bin/kernel_bench --profile > $S/kern/ncu-pair.txt 2>&1; log "ncu rc=$?"
  grep -E "^  dz_|Duration|Issue Slots Busy|L1/TEX Cache Throughput|Eligible Warps|Waves Per SM" $S/kern/ncu-pair.txt | head -60
  log done
  exit 0
fi
CODECS="4b24 2b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
# The GPU's busy fraction during run 1 of the base and of dz (nvidia-smi dmon's "sm" column: the share of
# each second in which a kernel ran). Session 18 could not tell whether the dz step is bound by the GPU
# (13.9 ms behind the CPU at the head) or by the hook's CPU (15.3 ms more before the head): near 100% in
# dz says the GPU, well below says the CPU.
dmon() { nvidia-smi dmon -s u -o T > "$1" 2>&1 & echo $!; }
for i in 1 2 3; do
  [ $i = 1 ] && P=$(dmon $S/dmon-base1.txt)
  OUT=$S/base$i RATES=16 REQS=128 bash $R/gpu/serving.sh base > $S/base$i.log 2>&1; log "base $i rc=$?"
  [ $i = 1 ] && kill $P
  [ $i = 1 ] && P=$(dmon $S/dmon-dz1.txt)
  OUT=$S/dz$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz$i.log 2>&1; log "dz $i rc=$?"
  [ $i = 1 ] && kill $P
  NO_V4_PAIR=1 OUT=$S/dznopair$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dznopair$i.log 2>&1; log "dz --no-v4-pair $i rc=$?"
  if [ $i -le 2 ]; then
    OUT=$S/dztwo$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:2b24:32 > $S/dztwo$i.log 2>&1; log "dz-2b24 $i rc=$?"
  fi
done
DZ_PROFILE=events OUT=$S/dz-events V4=1 RATES=16 REQS=48 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz-events.log 2>&1; log "dz events rc=$?"
NO_V4_PAIR=1 DZ_PROFILE=events OUT=$S/dznopair-events V4=1 RATES=16 REQS=48 bash $R/gpu/serving.sh dz:4b24:32 > $S/dznopair-events.log 2>&1; log "dz --no-v4-pair events rc=$?"
python3 $R/gpu/profile_split.py $S/dz-events $S/dznopair-events > $S/profile-split.md 2>&1
python3 $R/gpu/ab_table.py $S > $S/ab-table.md 2>&1
touch $S/all.done; log done
