#!/usr/bin/env bash
# Builds the trainer and the UNet benchmark on the GPU machine against its pip PyTorch's libtorch (CUDA), with the
# dependencies carried in .devdeps (scripts/device/make_deps.sh). Usage: build_cuda.sh [build dir] [targets...]
set -euo pipefail
cd "$(dirname "$0")/../.."
B=${1:-build-cuda}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(stylealigned_train stylealigned_bench_unet)
if [ ! -d /tmp/sa-deps ]; then tar -C /tmp -xJf .devdeps/sa-deps.tar.xz; fi
TORCH_PREFIX=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX;/tmp/sa-deps" -DICU_ROOT=/tmp/sa-deps \
  -DSTYLEALIGNED_FMT_HEADER_ONLY=ON -DSTYLEALIGNED_BUILD_TESTS=OFF -DSTYLEALIGNED_BUILD_TOOLS=OFF -DSTYLEALIGNED_WITH_OPENCV=OFF \
  -DSTYLEALIGNED_BUILD_BENCHMARKS=ON -DSTYLEALIGNED_BUILD_TRAINER=ON \
  -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,/tmp/sa-deps/lib/x86_64-linux-gnu -Wl,-rpath,/tmp/sa-deps/lib/x86_64-linux-gnu" \
  -DCMAKE_SHARED_LINKER_FLAGS="-Wl,-rpath-link,/tmp/sa-deps/lib/x86_64-linux-gnu" \
  -DTORCH_CUDA_ARCH_LIST=9.0 -DCMAKE_CUDA_ARCHITECTURES=90
cmake --build "$B" -j "$(nproc)" -- -k 0 "${targets[@]}"
