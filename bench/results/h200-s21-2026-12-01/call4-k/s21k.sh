#!/bin/bash
# Session 21, call 4 (carry [".gpu/k"]): the pair decode sbmm with an L2 prefetch (`_sbmm_p2f4_`,
# `_sbmm_p2f8_`; set_v4_sbmm_prefetch): checked against the CPU (cuda_check --quick --filter sbmm: the
# sbmm cases, now also under each prefetch distance), timed beside the pair (kernel_bench --sbmm:
# `dz-pf4`, `dz-pf8`, `dz-20g-pf4`, `dz-20g-pf8`), and Nsight Compute on the pair with and without it.
set -u
S=$OUT/s21k; mkdir -p $S
log() { echo "[s21k $(date +%T)] $*" | tee -a $S/s21k.log; }
mkdir -p /tmp/k/bin && for b in cuda_check kernel_bench; do xz -dc .gpu/k/$b.xz > /tmp/k/bin/$b && chmod +x /tmp/k/bin/$b; done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > $S/gpu.txt 2>&1
timeout 200 /tmp/k/bin/cuda_check --quick --filter sbmm > $S/sbmm-quick.txt 2>&1; log "cuda_check sbmm quick rc=$? $(tail -1 $S/sbmm-quick.txt)"
timeout 150 /tmp/k/bin/kernel_bench --sbmm --commit "${COMMIT:-unknown}" --out $S/kernels-sbmm > $S/sbmm.log 2>&1
log "kernel_bench --sbmm rc=$? mismatches $(grep -c MISMATCH $S/sbmm.log)"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout 120 $NCU --clock-control none -k regex:'sbmm_p2f?[48]?_bf16' --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
    /tmp/k/bin/kernel_bench --profile > $S/ncu-pf.txt 2>&1; log "ncu rc=$?"
python3 - $S/kernels-sbmm.md <<'PY' | tee $S/summary.md
import sys
rows = [l for l in open(sys.argv[1]) if l.startswith('| sbmm')]
for l in rows:
    c = [x.strip() for x in l.strip().strip('|').split('|')]
    if c[1] in ('dz', 'dz-1t', 'dz-pf4', 'dz-pf8') or c[1].startswith('dz-20'):
        print('| ' + ' | '.join(c[:8]) + ' | ' + c[-3] + ' |')
PY
log done
