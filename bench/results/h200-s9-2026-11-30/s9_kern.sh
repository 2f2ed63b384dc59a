#!/bin/bash
# Session 9, call 2: correctness on GPU0 (cores 8-11, next to the quality pipeline), timing on GPU1 (cores 0-7).
K=/tmp/k; mkdir -p $K/out
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2"; chmod +x "$2"; }
unx $K/in/cuda_check.xz $K/cuda_check; unx $K/in/kernel_bench.xz $K/kernel_bench
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader > $K/out/gpu.txt
(
  export CUDA_VISIBLE_DEVICES=0
  T0=$(date +%s); timeout 420 taskset -c 8-11 $K/cuda_check > $K/out/cuda_check_full.txt 2>&1
  echo "cuda_check full rc=$? $(( $(date +%s)-T0 )) s" >> $K/out/chk.log
  CS=$(ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$CS" ]; then
    T0=$(date +%s); timeout 120 taskset -c 8-11 "$CS" --tool memcheck $K/cuda_check --quick --filter "v4 only" > $K/out/memcheck_v4only.txt 2>&1
    echo "memcheck v4 only rc=$? $(( $(date +%s)-T0 )) s" >> $K/out/chk.log
    T0=$(date +%s); timeout 120 taskset -c 8-11 "$CS" --tool memcheck $K/cuda_check --quick --filter "dense route" > $K/out/memcheck_dense.txt 2>&1
    echo "memcheck dense route rc=$? $(( $(date +%s)-T0 )) s" >> $K/out/chk.log
  fi
  touch $K/chk.done
) &
(
  export CUDA_VISIBLE_DEVICES=1
  T0=$(date +%s); timeout 480 taskset -c 0-7 $K/kernel_bench --out $K/out/kernels-h200 --commit 47174b9 > $K/out/kernel_bench.log 2>&1
  echo "kernel_bench rc=$? $(( $(date +%s)-T0 )) s" >> $K/out/bench.log
  python3 $K/bench/kernels/plot.py $K/out/kernels-h200.json $K/out/kernels-h200.png >> $K/out/bench.log 2>&1
  touch $K/bench.done
) &
wait
