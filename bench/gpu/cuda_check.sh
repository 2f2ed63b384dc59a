#!/usr/bin/env bash
# The CUDA check of dz-candle-ops in one device call: every op on the GPU against its CPU reference twin
# (outputs poisoned with NaN first), then compute-sanitizer memcheck and racecheck on the quick subset.
#
# Here (build machine, no GPU):
#   source <(bash ../shared/gpu/setup-cuda-toolchain.sh)
#   CARGO_TARGET_DIR=$HOME/.cache/dz-target-cuda cargo build --release -p dz-candle-ops --features cuda --example cuda_check
#   mkdir -p .gpu && cp $HOME/.cache/dz-target-cuda/release/examples/cuda_check .gpu/ && strip .gpu/cuda_check
# There (device tool): run  command="bash bench/gpu/cuda_check.sh"  carry=[".gpu"]
set -u
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
(time ./.gpu/cuda_check) > "$OUT/cuda_check_full.txt" 2>&1
echo "full rc=$?"
tail -20 "$OUT/cuda_check_full.txt"
CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$CS" ]; then
  timeout 200 "$CS" --tool memcheck ./.gpu/cuda_check --quick > "$OUT/memcheck_quick.txt" 2>&1
  echo "memcheck rc=$?"; tail -3 "$OUT/memcheck_quick.txt"
  timeout 150 "$CS" --tool racecheck ./.gpu/cuda_check --quick > "$OUT/racecheck_quick.txt" 2>&1
  echo "racecheck rc=$?"; tail -3 "$OUT/racecheck_quick.txt"
else
  echo "no compute-sanitizer found"
fi
