#!/bin/bash
# Session 14's third device call (nvidia-h200-x2, ~4 minutes, run in the foreground): the default 32-row
# tile now splits K over 4 blocks where a launch has at most a block for two SMs. GPU 0: every quick v4
# check (the automatic choice now takes the split on the check's shapes); GPU 1: "dense route" (the
# slot fallback now compared with the plain op), then kernel_bench over the 7B / 13B shapes at 32-256
# rows (the `dz` column is the new default). Writes /tmp/s14c.
set -u
S=/tmp/s14c; mkdir -p $S/check $S/kern
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
( CUDA_VISIBLE_DEVICES=0 timeout 230 /tmp/k/bin/cuda_check --quick --filter v4 > $S/check/v4-quick.txt 2>&1; echo "v4 rc=$?" >> $S/rc ) &
CUDA_VISIBLE_DEVICES=1 timeout 80 /tmp/k/bin/cuda_check --quick --filter "dense route" > $S/check/dense-route.txt 2>&1; echo "dense rc=$?" >> $S/rc
CUDA_VISIBLE_DEVICES=1 timeout 120 /tmp/k/bin/kernel_bench --shapes 4096x4096,11008x4096,4096x11008,5120x5120,13824x5120,5120x13824 \
    --rows 32,64,128,256 --commit "${COMMIT:-unknown}" --out $S/kern/kernels-auto > $S/kern/bench-auto.log 2>&1; echo "bench rc=$?" >> $S/rc
wait
cat $S/rc
