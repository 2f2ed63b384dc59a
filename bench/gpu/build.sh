#!/usr/bin/env bash
# Builds what the device calls carry, on this (GPU-less) machine, into git-ignored folders:
#   .gpu/k    cuda_check + kernel_bench (`dz-candle-ops --features cuda`), xz-compressed
#   .gpu/srv  deltazip (`--features nccl`: one binary for one GPU and for tensor parallelism), xz-compressed,
#             and corpus.txt.xz (the KJV text from ../shared/assets/corpora.tar.xz: the serving prompts)
# Both xz -6: the device carries at most 64 MiB with the tracked tree (session 15: 68 MB at -3).
# Each folder gets a BUILT file: the commit and `git status --short` of the tree it was built from.
#
#   bash bench/gpu/build.sh [k] [srv]        (default: both)
#
# Cold on a 2-core machine (session 11): k ~4 minutes, srv ~21 minutes (mistral.rs's CUDA kernels);
# afterwards a change to our crates rebuilds in 1-3 minutes. Target dirs stay outside the clone
# (~/.cache/dz-target-cuda, ~/.cache/dz-target-nccl), so a kept machine reuses them.
#
# Toolchain: nvcc 13.0 from PyPI wheels (../shared/gpu/setup-cuda-toolchain.sh: the H200's driver refuses
# newer PTX) and NCCL's headers and library from the `nvidia-nccl-cu13` wheel, pinned to 2.28.9, the
# version the GPU machine's PyTorch loads at run time (bench/gpu/tp_serve.sh puts it on LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(k srv)
has() { [[ " ${want[*]} " == *" $1 "* ]]; }

host/setup
eval "$(bash ../shared/gpu/setup-cuda-toolchain.sh)"

built() {
    { git rev-parse --short HEAD; git status --short; } > "$1/BUILT"
}

if has k; then
    export CARGO_TARGET_DIR=$HOME/.cache/dz-target-cuda
    cargo build --release -p dz-candle-ops --features cuda --example cuda_check --example kernel_bench
    mkdir -p .gpu/k
    for b in cuda_check kernel_bench; do
        strip -o ".gpu/k/$b" "$CARGO_TARGET_DIR/release/examples/$b"
        rm -f ".gpu/k/$b.xz"
        xz -T2 -6 ".gpu/k/$b"
    done
    built .gpu/k
    ls -la .gpu/k
fi

if has srv; then
    nccl=$HOME/.cache/dz-nccl
    if [[ ! -f $nccl/lib/libnccl.so ]]; then
        tmp=$(mktemp -d)
        python3 -m pip download --no-deps -q -d "$tmp" nvidia-nccl-cu13==2.28.9
        python3 -m zipfile -e "$tmp"/nvidia_nccl_cu13-*.whl "$tmp/x"
        mkdir -p "$nccl/include" "$nccl/lib"
        cp -r "$tmp"/x/nvidia/nccl/include/. "$nccl/include/"
        cp "$tmp"/x/nvidia/nccl/lib/libnccl.so.2 "$nccl/lib/"
        ln -sf libnccl.so.2 "$nccl/lib/libnccl.so"
        rm -rf "$tmp"
    fi
    export NCCL_HOME=$nccl LIBRARY_PATH=$CUDA_HOME/lib:$nccl/lib CARGO_TARGET_DIR=$HOME/.cache/dz-target-nccl
    cargo build --release -p deltazip --features nccl
    mkdir -p .gpu/srv
    strip -o .gpu/srv/deltazip "$CARGO_TARGET_DIR/release/deltazip"
    rm -f .gpu/srv/deltazip.xz
    xz -T2 -6 .gpu/srv/deltazip
    if [[ ! -f .gpu/srv/corpus.txt.xz ]]; then
        tar -xJf ../shared/assets/corpora.tar.xz -O kjv.txt | xz -6 > .gpu/srv/corpus.txt.xz
    fi
    rm -f .gpu/srv/corpus.txt
    built .gpu/srv
    ls -la .gpu/srv
fi
