#!/usr/bin/env bash
# One device call of the toy model's UNet stage on the GPU machine (issue 8): build if needed, train until
# $DEADLINE seconds after the start, export the diffusers folder, and leave the results in $OUT. A warm machine
# keeps build-cuda/ and runs/ between calls, so a second call resumes; a cold one resumes from a slim checkpoint
# carried in .devdeps/slim.safetensors (weights + EMA, no optimizer moments) if there is one.
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi -L; lscpu | grep 'Model name'; nproc
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
if ! scripts/device/build_cuda.sh build-cuda > "$OUT/build.log" 2>&1; then
  grep -B2 -A8 'error' "$OUT/build.log" | head -150
  tar -C "$(python3 -c 'import torch,os; print(os.path.dirname(torch.__file__))')" -czf "$OUT/torch_include.tgz" include share/cmake
  exit 1
fi
echo "build: $(( $(date +%s) - T0 )) s"
export LD_LIBRARY_PATH=/tmp/sa-deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
BIN=build-cuda/tools/train/stylealigned_train
VAE=tools/train/checkpoints/toy_vae.safetensors
mkdir -p runs/unet
if [ ! -f runs/unet/checkpoint.safetensors ] && [ -f .devdeps/slim.safetensors ]; then
  cp .devdeps/slim.safetensors runs/unet/checkpoint.safetensors
  [ -f .devdeps/loss.csv ] && cp .devdeps/loss.csv runs/unet/loss.csv
fi
LEFT=$(( DEADLINE - ($(date +%s) - T0) - 45 ))
MIN=$(python3 -c "print(max(0.5, $LEFT / 60))")
echo "training for $MIN minutes"
$BIN unet --run-dir runs/unet --vae $VAE --device cuda --batch ${BATCH:-256} --lr ${LR:-5e-4} --warmup 500 \
  --val-size 512 --val-every 500 --checkpoint-every 2000 --data-reuse ${REUSE:-4} --minutes "$MIN" --resume --progress lines \
  --progress-every 250 --seed 0
rm -rf /tmp/toy
$BIN export --vae $VAE --unet runs/unet --out /tmp/toy --overwrite
tar -C /tmp -czf "$OUT/toy_model.tgz" toy
cp runs/unet/loss.csv runs/unet/summary.json "$OUT/"
python3 - <<'PY'
from safetensors import safe_open
from safetensors.torch import save_file
src = "runs/unet/checkpoint.safetensors"
with safe_open(src, "pt") as f:
    meta = f.metadata()
    t = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("adam.")}
save_file(t, "/tmp/slim.safetensors", metadata=meta)
PY
split -b 15M /tmp/slim.safetensors "$OUT/slim.part-"
echo "total: $(( $(date +%s) - T0 )) s"
# Issue 9's CUDA numbers, when asked for: SDXL-size UNet at 1024x1024, batch 8 (4 images + CFG), random weights.
if [ "${BENCH_SECONDS:-0}" -gt 0 ]; then
  B=build-cuda/benchmarks/stylealigned_bench_unet
  for args in "--dtype fp16" "--dtype fp16 --no-style-align" "--dtype bf16" "--dtype fp32"; do
    echo "bench: $args"
    timeout $(( BENCH_SECONDS / 4 )) $B --config sdxl --width 1024 --height 1024 --batch 8 --device cuda \
      --reps 5 --warmup 2 --no-split $args 2>&1 | tail -n 3
  done
fi
echo "total with bench: $(( $(date +%s) - T0 )) s"
