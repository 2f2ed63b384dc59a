#!/bin/bash
# The device chain prepared at the end of session 17 for session 18 (nvidia-h200, ONE GPU, ~24 minutes):
# every serving run alone on the machine, one server at a time.
# Run it detached and poll WITHOUT GAPS (the machine goes back 30 s after the last call ends, and takes a
# detached job with it); each poll at most ~25 s apart.
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   run:  mkdir -p /tmp/s18 && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s18/chain.out 2>&1; sleep 500; tail -3 /tmp/s18/s18.log      carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry, at most ~25 s apart): sleep 24; tail -3 /tmp/s18/s18.log
#   fetch: tar czf $OUT/s18.tgz --exclude=gen -C /tmp s18
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#   The carry limit is 64 MiB: tracked files (~34 MB) + .gpu/srv (24 MB) + .gpu/k (6 MB): `du -sb` them
#   first (git ls-files | xargs du -cb); if the tree has grown past it, carry .gpu/k in one call and
#   .gpu/srv in the next.
#
# A. Checks: the "sbmm" family (every case also runs the slot tables' shared launch against the plain
#    sbmm, bit for bit: session 17 turned the slot tables on by default); the 64-row tile (session 17,
#    `dz_v4_<variant>_matmul_sx_<t>_n8`, written without a GPU, forced only: V4WideX::Shared64) against the
#    CPU twin in every v4 case past 16 rows ("wide-x=shared-64"); then kernel_bench at 32-256 rows on the
#    7B / 13B shapes, where `dz-sx64` sits beside `dz` (the 32-row tile) and cuBLAS. Session 15: the 32-row
#    tile at 11008 x 4096 4b 2:4 took 36.7 / 54.2 / 97.1 us at 64 / 128 / 256 rows against cuBLAS's ~29-37.
#    If dz-sx64 passes and is faster from some row count on, route those rows to it (V4WideX::Auto).
# B. `bench hook --phases` at the head (the CPU phases per call, synchronized every 8 calls).
# C. One server at a time, 128 requests at 16 req/s, alternated three times: the base, dz-4b24 x 32 with
#    the slot tables (the default since session 17) and with --no-slot-tables (session 17's hook: 39.5
#    against 71.4 us of CPU a decode call where the batch changes; session 16's serving A/B +4%, inside
#    the noise; session 17's dz runs varied by up to 28%, hence three alternations). When the 64-row
#    tile's checks passed (A), the first two alternations also run dz with `--v4-wide64-from 64` (the
#    prompts' 64+ rows on it: session 17's profile put the prompt deltas at 10.6 ms of GPU a step).
#    Compare tokens/s and `mid tokens/s` (session 17: the throughput between the 10th and 90th
#    percentile of completions, the drain left out).
# D. What bounds a step, the warm-up excluded (serving.sh runs it apart; profile_split.py subtracts
#    it), 48 requests each: DZ_PROFILE=wait (host mode plus `head_wait`, a one-byte copy to the host
#    right after the output head, timed: the GPU's backlog at the end of the forward pass) with
#    DZ_TRACE=1 (the hook's and the ops' CPU phases) for the base and dz; then dz in plain host mode
#    (DZ_PROFILE=host), to see whether the wait perturbs the steps (session 17's first head_wait, a
#    device synchronization with the warm-up counted: 8.4 ms a step for the base, 10.6 for dz, and dz's
#    embedding delta at 46 ms a call against 0.5 in host mode). Large head_wait in dz only: the delta
#    kernels' GPU time is the lever (the prompt tile at 64-255 rows, the decode sbmm); near 0: the CPU
#    phases are.
TAG=s18; W=/tmp/dzsrv; . bench/gpu/chain_env.sh
log start
mkdir -p $S/check
# A
timeout 240 /tmp/k/bin/cuda_check --quick --filter sbmm > $S/check/sbmm-quick.txt 2>&1; log "cuda_check sbmm quick rc=$?"
timeout 240 /tmp/k/bin/cuda_check --filter "shared-64" > $S/check/shared-64.txt 2>&1; log "cuda_check shared-64 rc=$?"
ok=1; for f in $S/check/*.txt; do grep -q "^[0-9]* passed, 0 failed" $f || ok=0; done
[ $ok = 1 ] || log "A CHECK FAILED (the 64-row tile is forced only; the serving runs use the sbmm family's code)"
w64=0; grep -q "^[0-9]* passed, 0 failed" $S/check/shared-64.txt && w64=1; log "64-row tile checked: $w64"
mkdir -p $S/kern
timeout 240 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
    --rows 32,64,128,256 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-64 > $S/kern/bench-64.log 2>&1
log "kernel_bench 32-256 rows rc=$?"
# B
( H=/tmp/dzhook; rm -rf $H; mkdir -p $H $S/hook
  $DZ synth model --shape llama-7b --layers 2 --out $H/base > $S/hook/gen.log 2>&1 &&
    $DZ synth deltas --base $H/base --count 8 --out-dir $H/d --config $H/serve.toml --device cuda >> $S/hook/gen.log 2>&1 &&
    timeout 150 $DZ bench hook --config $H/serve.toml --fine-tunes 32 --rows 32 --v4-kernels --slot-tables --prefill 128 --phases > $S/hook/hook.md 2>&1
  log "bench hook rc=$?"
  rm -rf $H )
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
# C
for i in 1 2 3; do
  OUT=$S/base$i RATES=16 REQS=128 bash $R/gpu/serving.sh base > $S/base$i.log 2>&1; log "base $i rc=$?"
  OUT=$S/dz$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz$i.log 2>&1; log "dz $i rc=$?"
  NO_SLOT_TABLES=1 OUT=$S/dzplans$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dzplans$i.log 2>&1; log "dz --no-slot-tables $i rc=$?"
  if [ $w64 = 1 ] && [ $i -le 2 ]; then
    WIDE64_FROM=64 OUT=$S/dzwide$i V4=1 RATES=16 REQS=128 bash $R/gpu/serving.sh dz:4b24:32 > $S/dzwide$i.log 2>&1; log "dz --v4-wide64-from 64 $i rc=$?"
  fi
done
# D
DZ_PROFILE=wait DZ_TRACE=1 OUT=$S/base-wait RATES=16 REQS=48 bash $R/gpu/serving.sh base > $S/base-wait.log 2>&1; log "base wait rc=$?"
DZ_PROFILE=wait DZ_TRACE=1 OUT=$S/dz-wait V4=1 RATES=16 REQS=48 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz-wait.log 2>&1; log "dz wait rc=$?"
DZ_PROFILE=host OUT=$S/dz-host V4=1 RATES=16 REQS=48 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz-host.log 2>&1; log "dz host rc=$?"
python3 $R/gpu/profile_split.py $S/base-wait $S/dz-wait $S/dz-host > $S/profile-split.md 2>&1
python3 $R/gpu/ab_table.py $S > $S/ab-table.md 2>&1
touch $S/all.done; log done
