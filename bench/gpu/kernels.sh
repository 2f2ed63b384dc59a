#!/usr/bin/env bash
# One device call for the kernel-speed issue: the CUDA check (every op against its CPU twin, the
# tensor-core family included), compute-sanitizer memcheck + racecheck on the tensor-core cases, then the
# kernel benchmark (bench/results/kernels-h200.{md,json}) and its plot.
#
# Here (build machine, no GPU):
#   source <(bash ../shared/gpu/setup-cuda-toolchain.sh)
#   CARGO_TARGET_DIR=$HOME/.cache/dz-target-cuda cargo build --release -p dz-candle-ops --features cuda \
#       --example cuda_check --example kernel_bench
#   mkdir -p .gpu && cp $HOME/.cache/dz-target-cuda/release/examples/{cuda_check,kernel_bench} .gpu/ && strip .gpu/* && xz .gpu/*
# There (device tool): command="COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/kernels.sh" carry=[".gpu"]
set -u
OUT=${OUT:-/tmp/kernels}
mkdir -p "$OUT"
# The binaries travel xz-compressed (one call carries at most 64 MiB); unpack them with Python's lzma.
for f in .gpu/*.xz; do
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$f" "${f%.xz}"
  chmod +x "${f%.xz}"
done
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader
T0=$(date +%s)
./.gpu/kernel_bench --out "$OUT/kernels-h200" --commit "${COMMIT:-unknown}" > "$OUT/kernel_bench.log" 2>&1
echo "kernel_bench rc=$? ($(( $(date +%s) - T0 )) s)"
grep -c MISMATCH "$OUT/kernel_bench.log"
python3 bench/kernels/plot.py "$OUT/kernels-h200.json" "$OUT/kernels-h200.png" && echo "plot ok"
T0=$(date +%s)
./.gpu/cuda_check > "$OUT/cuda_check_full.txt" 2>&1
echo "cuda_check rc=$? ($(( $(date +%s) - T0 )) s)"
tail -16 "$OUT/cuda_check_full.txt"
CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$CS" ]; then
  timeout 100 "$CS" --tool memcheck ./.gpu/cuda_check --quick --filter "tensor cores" > "$OUT/memcheck_tc.txt" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck_tc.txt"
  timeout 80 "$CS" --tool racecheck ./.gpu/cuda_check --quick --filter "tensor cores" > "$OUT/racecheck_tc.txt" 2>&1
  echo "racecheck rc=$?"; tail -3 "$OUT/racecheck_tc.txt"
fi
grep -E "^\| delta_matmul \| dz \| 4096 x 4096|^\| sbmm" "$OUT/kernels-h200.md" | cut -c1-150
