#!/bin/bash
# Session 15's third device call (nvidia-h200-x2, ~2.5 minutes, in the foreground): the 32-row tile from
# 8-9 rows on deltas of at least 40 M weights (`v4_wide_from_rows`, 119f9a3). GPU 0: every quick v4 check
# (the new family "v4 wide from rows": 11008 x 4096 at 7-16 rows, both layouts, an sbmm with 7-16-row
# segments); GPU 1: kernel_bench over the 7B / 13B shapes at 8, 9, 12, 16 and 32 rows (the `dz` column
# is the new default; `v4-16`/`dz-s*` keep the ring-fed tiles). Writes $OUT/k.
set -u
S=$OUT/k; mkdir -p $S
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
( CUDA_VISIBLE_DEVICES=0 timeout 170 /tmp/k/bin/cuda_check --quick --filter v4 > $S/v4-quick.txt 2>&1; echo "v4 rc=$?" >> $S/rc ) &
CUDA_VISIBLE_DEVICES=1 timeout 120 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
    --rows 8,9,12,16,32 --commit "${COMMIT:-unknown}" --out $S/kernels-wide-from > $S/bench.log 2>&1; echo "bench rc=$?" >> $S/rc
wait
cat $S/rc; tail -3 $S/v4-quick.txt
