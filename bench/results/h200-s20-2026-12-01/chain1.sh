#!/bin/bash
# The device chain prepared at the end of session 19 for session 20 (nvidia-h200, ONE GPU, ~25 minutes in
# two calls): every serving run alone on the machine, one server at a time.
#
# The carry does not fit in one call (tracked files ~39 MB + .gpu/srv 25 MB + .gpu/k 6.6 MB > 64 MiB):
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   call 1, PART=k (~8 min, in the foreground), carry [".gpu/k"]:
#     PART=k COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/next_chain.sh; tar czf $OUT/s20k.tgz -C /tmp s20
#   call 2, PART=srv (~15 min), carry [".gpu/srv"]: run it detached, and poll with calls that each sleep
#   and copy what is there (a call may sleep minutes; only the GAP between calls must stay under ~25 s,
#   or the machine goes back and takes the detached job with it):
#     mkdir -p /tmp/s20 && PART=srv COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#       > /tmp/s20/chain.out 2>&1; sleep 420; tail -3 /tmp/s20/s20.log; tar czf $OUT/s20.tgz --exclude=gen -C /tmp s20
#     poll: sleep 170; tail -3 /tmp/s20/s20.log; tar czf $OUT/s20.tgz --exclude=gen -C /tmp s20
#   (each poll brings the results so far back: a lease that runs out loses nothing already copied)
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#
# PART=k. At the head:
#   - `kernel_bench` at 128, 192 and 256 rows of the five larger 7B / 13B shapes, `dz` beside the forced
#     `dz-sx` / `dz-sxp` (session 19 moved the quant codecs at 128-255 rows to the pair tile where the
#     32-row tile's grid is uneven: `v4_grid_uneven`);
#   - `cuda_check --quick --filter sbmm` (the decode sbmm takes two tiles a warp by default since
#     session 19, `_sbmm_p2_`; its `sbmm-single` cases keep the one-tile kernel checked) and
#     `kernel_bench --sbmm` (4096 x 4096 4b and 2b 2:4, 1-64 deltas at 32 and 256 rows: `dz` = the pair,
#     `dz-1t` = one tile a warp; session 19's call 3: 68.5 vs 76.8 us at 32 x 1 row, 4b; and `dz-20a` /
#     `dz-20g`: 32 rows over 20 deltas in arrival order and grouped, what host patch 0015 saves);
#   - `cuda_check --filter "wide-x=shared"` (every forced shared-x mode: session 19 folded the 32-row
#     tile's unsplit path into `matmul_sx_mt` and the K split's and balanced schedule's sums into
#     `sum_cut_item`; ptxas gives every entry the same registers, and the same code but for the 8
#     `_sxk4_` entries; cuda_check prints a line as each family ends, so a cut run says which passed);
#   - Nsight Compute on the decode sbmm, pair and one tile (`kernel_bench --profile`): is the pair still
#     latency-bound (eligible warps, long-scoreboard stalls, DRAM %)?
# PART=srv. Session 19 found the dz runs in two modes: 5 of 8 at 310-338 tokens/s (82% of the base), 3 at
#   252-276 (68%), with the same number of forward passes, each ~30% longer in the slow mode. This part
#   runs dz-4b24 x 32 seven times, beside three base runs: three with the defaults (`dz`), two with
#   `--no-v4-sbmm-pair` (`dzone`: the decode sbmm with one tile a warp, session 19's call 3 measured the
#   pair 0.61-0.89x its time) and two with DZ_DECODE_ORDER=arrival (`dzarr`: decode batches in arrival
#   order, not grouped by model by host patch 0015; `deltazip_forward_runs_total` against `_models_total`
#   says how many segments the grouping saves), every run
#   under DZ_PROFILE=wait (the step, the CPU parts and the GPU's backlog at the head, without perturbing
#   the step: session 18), with, for every run:
#     - dmon-*.txt: `nvidia-smi dmon -s puc` (power, temperatures, SM busy %, clocks) each second;
#     - perf-*.txt: `nvidia-smi -q -d PERFORMANCE` after the run (the clock-event counters: power cap,
#       thermal slowdown);
#     - top-*.txt: `top -H` of the server's threads every 10 s (which threads are busy, the load);
#     - topsys-*.txt, vmstat-*.txt: the whole machine's processes every 10 s and `vmstat` every 5 s (other
#       processes, kernel threads such as kswapd or kcompactd, swapping, the hypervisor's steal time: the
#       VM page-locks ~2.3 GiB a delta for uploads, and its NUMA node shows 4.5 GB).
#   `deltazip_forward_{passes,rows,models}_total` (new in session 19) give each run's rows and distinct
#   fine-tunes per forward pass (the log line): whether the slow mode's passes carry more deltas.
#   Then profile-split.md per run and ab-table.md. A slow run with a larger head wait says the GPU ran
#   slower (dmon's clocks, the perf counters say why); a larger CPU share says the host did (top says whom).
set -u
PART=${PART:?PART=k or PART=srv}
TAG=s20; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log "start $PART"
if [ "$PART" = k ]; then
  mkdir -p $S/check $S/kern
  timeout 150 /tmp/k/bin/kernel_bench --shapes 11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
      --rows 128,192,256 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-route > $S/kern/bench.log 2>&1
  log "kernel_bench rc=$? mismatches $(grep -c MISMATCH $S/kern/bench.log)"
  timeout 150 /tmp/k/bin/cuda_check --quick --filter sbmm > $S/check/sbmm-quick.txt 2>&1; log "cuda_check sbmm quick rc=$? $(tail -1 $S/check/sbmm-quick.txt)"
  timeout 150 /tmp/k/bin/kernel_bench --sbmm --commit "${COMMIT:-unknown}" --out $S/kern/kernels-sbmm > $S/kern/sbmm.log 2>&1
  log "kernel_bench --sbmm rc=$? mismatches $(grep -c MISMATCH $S/kern/sbmm.log)"
  timeout 200 /tmp/k/bin/cuda_check --filter "wide-x=shared" > $S/check/wide-shared.txt 2>&1; log "cuda_check wide-x=shared rc=$? $(tail -1 $S/check/wide-shared.txt)"
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  timeout 120 $NCU --clock-control none -k regex:'sbmm_p2_bf16|sbmm_bf16_n1' --set full \
      /tmp/k/bin/kernel_bench --profile > $S/kern/ncu-sbmm.txt 2>&1; log "ncu rc=$?"
  log done
  exit 0
fi
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
# Samples of one run: dmon and top -H in the background (top waits for the server to start).
watch_start() { # watch_start NAME
  nvidia-smi dmon -s puc -o T > $S/dmon-$1.txt 2>&1 & DMON=$!
  vmstat -t 5 > $S/vmstat-$1.txt 2>&1 & VMST=$!
  top -b -d 10 -n 14 -w 160 | grep -A22 "^top -" > $S/topsys-$1.txt 2>&1 & TOPS=$!
  ( for _ in $(seq 90); do P=$(pgrep -f "deltazip serve" | head -1); [ -n "$P" ] && break; sleep 1; done
    [ -n "${P:-}" ] && top -H -b -d 10 -n 14 -w 160 -p "$P" | grep -A16 "^top -" > $S/top-$1.txt ) & TOPW=$!
}
watch_stop() { # watch_stop NAME
  kill $DMON $VMST 2>/dev/null; pkill -P $TOPW 2>/dev/null; kill $TOPW 2>/dev/null; pkill -x top 2>/dev/null
  nvidia-smi -q -d PERFORMANCE > $S/perf-$1.txt 2>&1
}
declare -A count=()
for sys in base dz dzone dzarr base dz dzone dzarr base dz; do
  count[$sys]=$(( ${count[$sys]:-0} + 1 )); name=$sys${count[$sys]}
  watch_start $name
  case $sys in
    base) DZ_PROFILE=wait OUT=$S/$name RATES=16 REQS=128 bash $R/gpu/serving.sh base > $S/$name.log 2>&1; rc=$? ;;
    dz) DZ_PROFILE=wait OUT=$S/$name V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/$name.log 2>&1; rc=$? ;;
    dzone) NO_SBMM_PAIR=1 DZ_PROFILE=wait OUT=$S/$name V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/$name.log 2>&1; rc=$? ;;
    dzarr) DZ_DECODE_ORDER=arrival DZ_PROFILE=wait OUT=$S/$name V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/$name.log 2>&1; rc=$? ;;
  esac
  watch_stop $name
  # tokens/s, TPOT p50, and per forward pass: rows and distinct requested models (deltazip_forward_*_total)
  log "$name rc=$rc $(grep -E '^\| (dz|base)' $S/$name/serving.md 2>/dev/null | head -1 | cut -d'|' -f9,13) $(awk \
      '/^deltazip_forward_passes_total/{p=$2} /^deltazip_forward_rows_total/{r=$2} /^deltazip_forward_models_total/{m=$2}
       /^deltazip_forward_runs_total/{u=$2} END{if (p) printf "rows/pass %.1f models/pass %.1f runs/pass %.1f", r/p, m/p, u/p}' \
      $S/$name/metrics-*.txt 2>/dev/null)"
done
for d in $S/base* $S/dz*; do
  [ -d "$d" ] && python3 $R/gpu/profile_split.py $d > $d/profile-split.md 2>&1
done
python3 $R/gpu/ab_table.py $S > $S/ab-table.md 2>&1
touch $S/all.done; log done
