#!/bin/bash
# The device chain prepared at the end of session 12 for session 13 (nvidia-h200-x2, ~21 minutes): run it
# detached and poll, as sessions 10-12 did (session 12's chains: bench/results/h200-s12-2026-11-30.md).
#
#   build first (here): bash bench/gpu/build.sh   (.gpu/k and .gpu/srv; check their BUILT files)
#   run:  mkdir -p /tmp/s13 && COMMIT=$(git rev-parse --short HEAD) setsid -f bash bench/gpu/next_chain.sh \
#         > /tmp/s13/chain.out 2>&1; sleep 200; <poll>                 carry: [".gpu/srv", ".gpu/k"]
#   poll (back to back, no carry, at most ~30 s apart): sleep N; cat /tmp/s13/s13.log;
#         tar czf $OUT/s13.tgz --exclude=gen -C /tmp s13
#   Never `pkill -f deltazip` in a poll: the poll's own command line matches and is killed.
#
# What it measures (session 12 built these after its last GPU run):
# A. GPU 0: cuda_check --quick --filter sbmm, then --quick --filter v4 (the slot-table path, `sbmm_slots`,
#    against plain sbmm bit for bit, with an emptied slot riding along; session 12's quick v4 check took
#    137 s; it includes the deeper code ring `_sxd`, forced), racecheck on `_sxd` and memcheck on the sbmm
#    family, racecheck on the sbmm's code ring (`--v4-sbmm-ring`, off by default), then kernel_bench at
#    32-256 rows of three shapes (dz-sxd beside dz-sx and cuBLAS) and `--decode` (dz-ring beside split 1). GPU 1 meanwhile: the 7B generation, then `bench hook` with --slot-tables at 8/32/64 rows
#    (the "another batch each pass" rows: layer plans vs slot tables).
# B. dz-4b24 x 32 at 4/16/64 req/s on both GPUs at once: GPU 0 the default path, GPU 1 --slot-tables (only
#    when A's checks passed), the same load on the host's CPU for both.
# C. GPU 0: base at 4/16/64, then dz-4b24 x 32 under Zipf(1.0) and one hot model at 4/16. GPU 1: 64 fine-tunes (fresh_grace and side-stream copies, CPU cache 180 GiB
#    so every host form stays in memory) at 4 and 16 req/s (session 12: 21.7 tokens/s at 4, thrashing).
set -u
S=/tmp/s13; mkdir -p $S
log() { echo "[s13 $(date +%T)] $*" >> $S/s13.log; }
mkdir -p /tmp/k && rm -rf /tmp/k/bench && cp -r bench /tmp/k/
R=/tmp/k/bench
mkdir -p /tmp/dzsrv && xz -dc .gpu/srv/deltazip.xz > /tmp/dzsrv/deltazip && chmod +x /tmp/dzsrv/deltazip && cp .gpu/srv/corpus.txt /tmp/dzsrv/
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
export DZ_WORK=/tmp/dzsrv DZ=/tmp/dzsrv/deltazip CORPUS=/tmp/dzsrv/corpus.txt
log start
# A
( export CUDA_VISIBLE_DEVICES=0; mkdir -p $S/check
  timeout 90 /tmp/k/bin/cuda_check --quick --filter sbmm > $S/check/sbmm-quick.txt 2>&1; a=$?
  timeout 260 /tmp/k/bin/cuda_check --quick --filter v4 > $S/check/v4-quick.txt 2>&1; b=$?
  log "cuda_check sbmm rc=$a v4 rc=$b"
  [ $a = 0 ] && [ $b = 0 ] && touch $S/check.ok
  # The deeper code ring (_sxd) and the slot tables' no-op descriptors under the sanitizer.
  CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$CS" ]; then
    timeout 80 $CS --tool racecheck /tmp/k/bin/cuda_check --quick --filter shared-deep > $S/check/racecheck-sxd.txt 2>&1
    timeout 80 $CS --tool racecheck /tmp/k/bin/cuda_check --quick --filter sbmm-ring > $S/check/racecheck-ring.txt 2>&1
    timeout 80 $CS --tool memcheck /tmp/k/bin/cuda_check --quick --filter sbmm > $S/check/memcheck-sbmm.txt 2>&1
    log "sanitizer racecheck sxd / memcheck sbmm done"
  fi
  # The 32-row tile's variants beside cuBLAS (dz-sx, and dz-sxd: the deeper code ring, if built); before
  # B, which serves on this GPU.
  mkdir -p $S/kern; timeout 120 /tmp/k/bin/kernel_bench --shapes 4096x4096,13824x5120,4096x11008 --rows 32,64,128,256 \
      --commit "${COMMIT:-unknown}" --out $S/kern/kernels-wide > $S/kern/bench-wide.log 2>&1; log "kernel_bench rc=$?"
  # The sbmm's per-warp code ring (dz-ring) beside split 1 and dz-sx: 32 deltas x 32 rows is issue #5's target.
  timeout 150 /tmp/k/bin/kernel_bench --decode --commit "${COMMIT:-unknown}" --out $S/kern/kernels-decode > $S/kern/bench-decode.log 2>&1
  log "kernel_bench --decode rc=$?"
  touch $S/check.done ) &
CODECS="4b24" DISTINCT=8 OUT=$S/gen bash $R/gpu/serving.sh gen > $S/gen.log 2>&1; log "gen rc=$?"
( export CUDA_VISIBLE_DEVICES=1; H=/tmp/dzhook; rm -rf $H; mkdir -p $H $S/hook
  $DZ synth model --shape llama-7b --layers 2 --out $H/base > $S/hook/gen.log 2>&1 &&
    $DZ synth deltas --base $H/base --count 8 --out-dir $H/d --config $H/serve.toml --device cuda >> $S/hook/gen.log 2>&1 &&
    for rows in 8 32 64; do timeout 120 $DZ bench hook --config $H/serve.toml --fine-tunes 32 --rows $rows --v4-kernels --slot-tables; done \
      > $S/hook/hook.md 2>&1; log "bench hook rc=$?"; rm -rf $H )
until [ -f $S/check.done ]; do sleep 2; done
# B
( GPU=0 PORT_BASE=8200 OUT=$S/dz V4=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/dz.log 2>&1; log "dz rc=$?"
  GPU=0 PORT_BASE=8200 OUT=$S/base RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh base > $S/base.log 2>&1; log "base rc=$?"
  # Zipf(1.0) and one hot model (90% of requests), never measured yet (issue #9's other popularities).
  GPU=0 PORT_BASE=8200 OUT=$S/pop V4=1 RATES=4,16 REQS=96 bash $R/gpu/serving.sh dz:4b24:32@zipf:1.0 dz:4b24:32@hot:0.9 > $S/pop.log 2>&1; log "zipf/hot rc=$?"
  touch $S/gpu0.done ) &
if [ -f $S/check.ok ]; then
  GPU=1 PORT_BASE=8300 OUT=$S/slots V4=1 SLOT_TABLES=1 RATES=4,16,64 REQS=96 bash $R/gpu/serving.sh dz:4b24:32 > $S/slots.log 2>&1; log "dz slot tables rc=$?"
else
  log "checks failed: no slot-table serving run"
fi
# C
GPU=1 PORT_BASE=8300 OUT=$S/n64 V4=1 MAX_DELTAS=64 CPU_CACHE=180GiB RATES=4,16 REQS=96 timeout 360 bash $R/gpu/serving.sh dz:4b24:64 > $S/n64.log 2>&1; log "dz n64 rc=$?"
until [ -f $S/gpu0.done ]; do sleep 2; done
touch $S/all.done; log done
