#!/usr/bin/env bash
# Issue 9's CUDA measurements in one device call: CPU vs CUDA parity of a StyleAligned UNet forward (SD1.5 config,
# random weights, same seed), then the SDXL-size UNet at 1024x1024, batch 8, fp16 / bf16, StyleAligned vs vanilla.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/bench_log.txt") 2>&1
nvidia-smi -L; lscpu | grep 'Model name'
scripts/device/build_cuda.sh build-cuda stylealigned_bench_unet > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
export LD_LIBRARY_PATH=/tmp/sa-deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
B=build-cuda/benchmarks/stylealigned_bench_unet
P="--config sd15 --width 256 --height 256 --batch 8 --reps 1 --warmup 0 --no-split"
$B $P --device cpu --save-output /tmp/cpu32.safetensors | tail -n 1 | cut -c 1-300
$B $P --device cuda --save-output /tmp/cuda32.safetensors | tail -n 1 | cut -c 1-300
$B $P --device cuda --dtype fp16 --save-output /tmp/cuda16.safetensors | tail -n 1 | cut -c 1-300
$B $P --device cuda --dtype bf16 --save-output /tmp/cudabf16.safetensors | tail -n 1 | cut -c 1-300
python3 - <<'PY'
from safetensors.torch import load_file
ref = load_file("/tmp/cpu32.safetensors")["output"].double()
for name in ["cuda32", "cuda16", "cudabf16"]:
    x = load_file(f"/tmp/{name}.safetensors")["output"].double()
    d = (x - ref).abs()
    print(f"parity {name} vs cpu fp32: max abs {d.max().item():.3e}, mean abs {d.mean().item():.3e}, "
          f"ref max {ref.abs().max().item():.3f}, rel l2 {(d.norm() / ref.norm()).item():.3e}")
PY
X="--config sdxl --width 1024 --height 1024 --batch 8 --device cuda --reps 5 --warmup 2 --no-split"
for args in "--dtype fp16 --compare-vanilla" "--dtype bf16 --compare-vanilla"; do
  echo "bench: $args"
  $B $X $args | tail -n 1
done
