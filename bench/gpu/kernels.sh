#!/usr/bin/env bash
# One device call for the kernel-speed issue: the CUDA check (every op against its CPU twin, the
# tensor-core family included), compute-sanitizer memcheck + racecheck on the tensor-core cases, then the
# kernel benchmark (bench/results/kernels-h200.{md,json}) and its plot.
#
# Here (build machine, no GPU): `bash bench/gpu/build.sh k` (cuda_check + kernel_bench into .gpu/k).
# There (device tool): command="BIN=.gpu/k COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/kernels.sh" carry=[".gpu/k"]
# MODE=v4 (at most ~7.5 minutes by its timeouts, typically 2-4): the v4 kernels first (cuda_check --filter v4, then memcheck on its quick
# cases), a quick tensor-core check (v4 at rows <= 16, v3 past it), then kernel_bench --decode (rows 1-16:
# dz = v4, v3, cuBLAS; sbmm at 32 and 256 rows) into $OUT/kernels-h200-v4.{md,json}; no ncu, no racecheck.
# BENCH=0 (MODE=v4): the checks only, no kernel_bench. MODE=v4 also runs racecheck on the "v4 only sbmm"
# quick cases; NCU_RUN=1 adds Nsight Compute on the sbmm of `kernel_bench --profile` (split 1 and 8),
# DENSE_RUN=1 the dense route's crossover (`--shapes` of 7B, `--rows 32,64,128,256`).
# BIN: the folder the binaries travel in (default .gpu; e.g. BIN=.gpu/k with carry [".gpu/k"]).
set -u
OUT=${OUT:-/tmp/kernels}
BIN=${BIN:-.gpu}
mkdir -p "$OUT"
# The binaries travel xz-compressed (one call carries at most 64 MiB); unpack them with Python's lzma.
for f in "$BIN"/*.xz; do
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "${f%.xz}"
  chmod +x "${f%.xz}"
done
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
if [ "${MODE:-}" = v4 ]; then
  T0=$(date +%s)
  timeout 300 "$BIN"/cuda_check --filter v4 > "$OUT/cuda_check_v4.txt" 2>&1
  echo "cuda_check v4 rc=$? ($(( $(date +%s) - T0 )) s)"; tail -14 "$OUT/cuda_check_v4.txt"
  grep -m 20 -E "FAIL|panicked|error" "$OUT/cuda_check_v4.txt" | cut -c1-200
  CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$CS" ]; then
    T0=$(date +%s)
    timeout 60 "$CS" --tool memcheck "$BIN"/cuda_check --quick --filter "v4 sbmm" > "$OUT/memcheck_v4.txt" 2>&1
    echo "memcheck v4 rc=$? ($(( $(date +%s) - T0 )) s)"; tail -3 "$OUT/memcheck_v4.txt"
    # The split sbmm shares partial sums through shared memory between barriers.
    T0=$(date +%s)
    timeout 60 "$CS" --tool racecheck "$BIN"/cuda_check --quick --filter "v4 only sbmm" > "$OUT/racecheck_v4.txt" 2>&1
    echo "racecheck v4 rc=$? ($(( $(date +%s) - T0 )) s)"; tail -3 "$OUT/racecheck_v4.txt"
  fi
  T0=$(date +%s)
  timeout 45 "$BIN"/cuda_check --quick --filter "tensor cores" > "$OUT/cuda_check_tc.txt" 2>&1
  echo "cuda_check tc quick rc=$? ($(( $(date +%s) - T0 )) s)"; tail -6 "$OUT/cuda_check_tc.txt"
  [ "${BENCH:-1}" = 0 ] && exit 0   # BENCH=0: the checks only
  T0=$(date +%s)
  timeout 140 "$BIN"/kernel_bench --decode --out "$OUT/kernels-h200-v4" --commit "${COMMIT:-unknown}" > "$OUT/kernel_bench_v4.log" 2>&1
  echo "kernel_bench --decode rc=$? ($(( $(date +%s) - T0 )) s)"
  grep MISMATCH "$OUT/kernel_bench_v4.log" | head -5
  grep -E "copy bandwidth" "$OUT/kernel_bench_v4.log"
  grep -E "^\| delta_matmul \| (dz|dz-s[1248]|v3) \| (4096 x 4096|11008 x 4096|13824 x 5120) \| 4b 2:4 \| 1 \| 1 |^\| sbmm \| (dz|v3) " "$OUT/kernel_bench_v4.log" | cut -c1-150
  # NCU=1: Nsight Compute on the --profile cases (the sbmm at split 1 and 8 among them).
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
  if [ "${NCU_RUN:-0}" = 1 ] && [ -n "$NCU" ]; then
    T0=$(date +%s)
    timeout 120 "$NCU" --kernel-name regex:'sbmm' --csv --metrics \
gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,dram__bytes_read.sum,\
smsp__inst_executed.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,lts__t_sectors_srcunit_tex_op_read.sum,\
smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio,smsp__average_warp_latency_issue_stalled_barrier.ratio,\
smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,smsp__issue_active.avg.pct_of_peak_sustained_active \
      "$BIN"/kernel_bench --profile > "$OUT/ncu_sbmm.csv" 2>&1
    echo "ncu rc=$? ($(( $(date +%s) - T0 )) s)"
    python3 - "$OUT/ncu_sbmm.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if rows:
    h = rows[0]; ki = h.index("Kernel Name"); mi = h.index("Metric Name"); vi = h.index("Metric Value")
    for r in rows[1:]:
        print(r[ki][:40], r[mi], r[vi])
PY
  fi
  # DENSE_RUN=1: the dense route's crossover (dense, dense-v4 vs the kernels) at 32-256 rows.
  if [ "${DENSE_RUN:-0}" = 1 ]; then
    T0=$(date +%s)
    timeout 150 "$BIN"/kernel_bench --shapes 4096x4096,11008x4096,4096x11008 --rows 32,64,128,256 \
      --out "$OUT/kernels-h200-dense" --commit "${COMMIT:-unknown}" > "$OUT/kernel_bench_dense.log" 2>&1
    echo "kernel_bench dense rc=$? ($(( $(date +%s) - T0 )) s)"
    grep -E "^\| delta_matmul \| (dz|dense|dense-v4) \| [0-9]+ x [0-9]+ \| 4b 2:4" "$OUT/kernel_bench_dense.log" | cut -c1-120
  fi
  exit 0
fi
T0=$(date +%s)
"$BIN"/kernel_bench --out "$OUT/kernels-h200" --commit "${COMMIT:-unknown}" > "$OUT/kernel_bench.log" 2>&1
echo "kernel_bench rc=$? ($(( $(date +%s) - T0 )) s)"
grep -c MISMATCH "$OUT/kernel_bench.log"
python3 bench/kernels/plot.py "$OUT/kernels-h200.json" "$OUT/kernels-h200.png" && echo "plot ok"
# Nsight Compute on a few cases (kernel time, DRAM and SM throughput, occupancy), ours and cuBLAS's.
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  T0=$(date +%s)
  timeout 150 "$NCU" --kernel-name regex:'dz_|gemm|gemv|cutlass|sm90' --csv --metrics \
gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,launch__grid_size,dram__bytes_read.sum,\
smsp__inst_executed.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active \
    "$BIN"/kernel_bench --profile > "$OUT/ncu.csv" 2>&1
  echo "ncu rc=$? ($(( $(date +%s) - T0 )) s)"
fi
T0=$(date +%s)
# CHECK_FILTER (optional): only the cases of that family/description, e.g. "tensor cores".
"$BIN"/cuda_check ${CHECK_FILTER:+--filter "$CHECK_FILTER"} > "$OUT/cuda_check_full.txt" 2>&1
echo "cuda_check rc=$? ($(( $(date +%s) - T0 )) s)"
tail -16 "$OUT/cuda_check_full.txt"
CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$CS" ]; then
  timeout 100 "$CS" --tool memcheck "$BIN"/cuda_check --quick --filter "tensor cores" > "$OUT/memcheck_tc.txt" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck_tc.txt"
  [ "${RACECHECK:-1}" = 1 ] && timeout 80 "$CS" --tool racecheck "$BIN"/cuda_check --quick --filter "tensor cores" > "$OUT/racecheck_tc.txt" 2>&1
  echo "racecheck rc=$?"; tail -3 "$OUT/racecheck_tc.txt"
fi
grep -E "^\| delta_matmul \| dz \| 4096 x 4096|^\| sbmm" "$OUT/kernels-h200.md" | cut -c1-150
