#!/bin/bash
# The device chain prepared at the end of session 21 for session 22 (nvidia-h200, ONE GPU, ~20 minutes in
# two calls): the decode sbmm's tail split, checked and timed (PART=k), then A/B'd in serving (PART=srv).
#
# Session 21 (bench/results/h200-s21-2026-12-01.md) found host patches 0017/0018 removing the slow mode
# and making the base 52% faster (588.8 tokens/s), dz-4b24 x 32 24% (385.7): dz / base 65.5%. dz-2b24
# (half the bytes) serves only ~5% faster, and the kernel table shows why: the decode sbmm's time follows
# its rounds of whole K chains, not its bytes (4096 x 4096 4b 2:4, one row a delta: 16 deltas, one wave
# of pair items, 38.5 us; 32, two waves, 68.5; 20, 1.21 waves, 58.4 = 1.90x of streaming them once; a
# decode step of 32 sequences over 32 fine-tunes holds ~20 deltas). Built after the calls: the tail
# split (`set_v4_sbmm_tail_split`, `serve --v4-sbmm-tail-split`, off by default): the whole waves' items
# at split 1, the last, partial wave's items split along K 2, 4 or 8 ways (`v4_sbmm_tail` in dz-kernels;
# the kernels read it from their split word). Predicted: 20 deltas ~42-48 us instead of 58.4.
#
# Build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; each BUILT names the commit)
#
# PART=k, carry [".gpu/k"] (~4 min, in the foreground; never carry .gpu/k and .gpu/srv together: 64 MiB):
#   PART=k COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/next_chain.sh; tar czf $OUT/s22k.tgz -C /tmp s22k
#   - cuda_check --filter "tail split" (new family: 17-40 one-row segments over 4096-row deltas, tails
#     split 8/4/2 ways on an H200, K 256 and 512, 3 codecs, both dtypes; plain, planned and slot-table
#     launches) and --quick --filter sbmm (session 21: 691 passed);
#   - kernel_bench --sbmm: `dz-tail` beside `dz` in every case, `dz-20g-tail`, and the waves sweep
#     (`dz-1r` / `dz-1r-tail`: 8-64 deltas x 1 row at 4096 x 4096 for 4b and 2b 2:4, and 11008 x 4096 and
#     4096 x 11008 for 4b 2:4). The table's last lines (waves.md) say where the tail wins.
#
# PART=srv, carry [".gpu/srv"] (~15 min, detached, then polled; its log /tmp/s22/s22.log):
#   mkdir -p /tmp/s22 && PART=srv COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#     > /tmp/s22/chain.out 2>&1; sleep 540; tail -3 /tmp/s22/s22.log; tar czf $OUT/s22.tgz --exclude=gen -C /tmp s22
#   poll: sleep 170; tail -3 /tmp/s22/s22.log; tar czf $OUT/s22.tgz --exclude=gen -C /tmp s22
#   (keep the gap between calls under ~25 s; never `pkill -f deltazip` in a poll: its own command line matches)
#   Six servers, alternating dz-4b24 x 32, dz-4b24 x 32 with the tail split (`dztail`), the base, twice;
#   two passes each at 16 req/s (128 requests), PASS_METRICS and DZ_PROFILE=wait (profile-split.md per
#   pass), DZ_TP_TRACE=1 (phases.md: decode steps of 32 rows); then dz-2b24 x 32 with the tail split (one
#   server, two passes) and, if time is left, dztail at 7 and 8 req/s (session 21: dz 7 req/s p99 TTFT 0.77
#   s; 8 req/s 3.2 s).
set -u
PART=${PART:?PART=k or PART=srv}
if [ "$PART" = k ]; then
  S=/tmp/s22k; mkdir -p $S
  log() { echo "[s22k $(date +%T)] $*" | tee -a $S/s22k.log; }
  mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
  log "start at ${COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $S/gpu.txt 2>&1
  timeout 200 /tmp/k/bin/cuda_check --filter "tail split" > $S/tail-check.txt 2>&1; log "cuda_check tail split rc=$? $(tail -1 $S/tail-check.txt)"
  timeout 150 /tmp/k/bin/cuda_check --quick --filter sbmm > $S/sbmm-quick.txt 2>&1; log "cuda_check sbmm quick rc=$? $(tail -1 $S/sbmm-quick.txt)"
  timeout 200 /tmp/k/bin/kernel_bench --sbmm --commit "${COMMIT:-unknown}" --out $S/kernels-sbmm > $S/sbmm.log 2>&1
  log "kernel_bench --sbmm rc=$? mismatches $(grep -c MISMATCH $S/sbmm.log)"
  python3 - $S/kernels-sbmm.md <<'PY' | tee $S/waves.md
import sys
print('| path | N x K | codec | deltas | rows | us | x stream once |')
print('|---|---|---|---:|---:|---:|---:|')
for l in open(sys.argv[1]):
    if not l.startswith('| sbmm'):
        continue
    c = [x.strip() for x in l.strip().strip('|').split('|')]
    if c[1] in ('dz', 'dz-tail', 'dz-1r', 'dz-1r-tail', 'dz-20g', 'dz-20g-tail'):
        print('| ' + ' | '.join([c[1], c[2], c[3], c[4], c[5], c[6], c[-3]]) + ' |')
PY
  log done
  exit 0
fi
TAG=s22; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
T0=$(date +%s)
log "start at ${COMMIT:-unknown}"
CODECS="4b24 2b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
summary() { # NAME: tokens/s and TPOT p50 by pass
  grep -E '^\| (dz|base)' $S/$1/serving.md 2>/dev/null | cut -d'|' -f5,9,12,13 | tr '\n' ' '
}
declare -A count=()
for sys in dz dztail base dz dztail base dz2tail; do
  count[$sys]=$(( ${count[$sys]:-0} + 1 )); name=$sys${count[$sys]}
  nvidia-smi dmon -s puc -o T > $S/dmon-$name.txt 2>&1 & DMON=$!
  unset SBMM_TAIL
  [[ $sys == *tail ]] && export SBMM_TAIL=1
  case $sys in
    base) DZ_TP_TRACE=1 PASS_METRICS=1 DZ_PROFILE=wait OUT=$S/$name RATES=16,16 REQS=128 \
            bash $R/gpu/serving.sh base > $S/$name.log 2>&1; rc=$? ;;
    dz2tail) DZ_TP_TRACE=1 PASS_METRICS=1 DZ_PROFILE=wait OUT=$S/$name V4=1 RATES=16,16 REQS=128 \
            bash $R/gpu/serving.sh dz:2b24:32 > $S/$name.log 2>&1; rc=$? ;;
    dz*) DZ_TP_TRACE=1 PASS_METRICS=1 DZ_PROFILE=wait OUT=$S/$name V4=1 RATES=16,16 REQS=128 \
           bash $R/gpu/serving.sh dz:4b24:32 > $S/$name.log 2>&1; rc=$? ;;
  esac
  unset SBMM_TAIL
  kill $DMON 2>/dev/null
  for p in $S/$name/pass-*; do [ -d "$p" ] && python3 $R/gpu/profile_split.py $p > $p/profile-split.md 2>&1; done
  python3 $R/gpu/proc_sample.py --phases $S/$name/serve-*.log > $S/$name/phases.md 2>&1
  log "$name rc=$rc rate | tokens/s | TTFT p99 | TPOT p50 by pass: $(summary $name)"
done
python3 $R/gpu/ab_table.py $S > $S/ab-table.md 2>&1
touch $S/ab.done
if (( $(date +%s) - T0 < ${LAST_START:-780} )); then
  SBMM_TAIL=1 OUT=$S/rates-dztail V4=1 RATES=7,8 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/rates-dztail.log 2>&1
  log "rates-dztail rc=$? rate | tokens/s | TTFT p99 | TPOT p50: $(summary rates-dztail)"
fi
touch $S/all.done; log done
