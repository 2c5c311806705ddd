#!/usr/bin/env bash
# One device call of the toy model's UNet stage on the GPU machine (issue 8): build if needed, train until
# $DEADLINE seconds after the start, export the diffusers folder, and leave the results in $OUT. A warm machine
# keeps build-cuda/ and runs/ between calls, so a second call resumes; a cold one resumes from a slim checkpoint
# carried in .devdeps/slim.safetensors (weights + EMA, no optimizer moments) if there is one.
#
# PRESET=grown (issue 8's next run): grow the shipped models/toy with tools/train/results/toy_unet_grown_config.json
# (one more transformer layer at 8x8 and mid; the new layers start as identities) and train it at batch 256 with a
# cosine schedule to MAX_STEPS. Without PRESET: the original from-scratch / resume run. LR, WARMUP, MAX_STEPS,
# LR_SCHEDULE, LR_MIN, BATCH, REUSE override either; TRAIN_ARGS is appended to the trainer's command line.
# Dry run on the CPU machine (no build, tiny budget): SKIP_BUILD=1 BIN=build/tools/train/stylealigned_train
# DEVICE=cpu DEADLINE=120 BATCH=8 OUT=/tmp/dry scripts/device/train_unet_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
DEADLINE=${DEADLINE:-560}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi -L 2>/dev/null; lscpu | grep 'Model name'; nproc
python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
BIN=${BIN:-build-cuda/tools/train/stylealigned_train}
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if ! scripts/device/build_cuda.sh build-cuda > "$OUT/build.log" 2>&1; then
    grep -B2 -A8 'error' "$OUT/build.log" | head -150
    tar -C "$(python3 -c 'import torch,os; print(os.path.dirname(torch.__file__))')" -czf "$OUT/torch_include.tgz" include share/cmake
    exit 1
  fi
  echo "build: $(( $(date +%s) - T0 )) s"
  export LD_LIBRARY_PATH=/tmp/sa-deps/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
VAE=tools/train/checkpoints/toy_vae.safetensors
RUN=${RUN:-runs/unet}
case "${PRESET:-}" in
  grown) START=(--init-from models/toy --unet-config tools/train/results/toy_unet_grown_config.json)
         : "${LR:=2e-4}" "${WARMUP:=200}" "${MAX_STEPS:=3000}" "${LR_SCHEDULE:=cosine}" "${LR_MIN:=1e-5}" ;;
  "") START=() ;;
  *) echo "unknown PRESET '$PRESET' (known: grown)"; exit 2 ;;
esac
SCHEDULE=(--lr-schedule "${LR_SCHEDULE:-constant}")
[ -n "${LR_MIN:-}" ] && SCHEDULE+=(--lr-min "$LR_MIN")
[ -n "${MAX_STEPS:-}" ] && SCHEDULE+=(--max-steps "$MAX_STEPS")
mkdir -p "$RUN"
if [ ! -f "$RUN/checkpoint.safetensors" ] && [ -f .devdeps/slim.safetensors ]; then
  cp .devdeps/slim.safetensors "$RUN"/checkpoint.safetensors
  [ -f .devdeps/loss.csv ] && cp .devdeps/loss.csv "$RUN"/loss.csv
fi
LEFT=$(( DEADLINE - ($(date +%s) - T0) - 45 ))
MIN=$(python3 -c "print(max(0.5, $LEFT / 60))")
echo "training for $MIN minutes"
$BIN unet --run-dir "$RUN" --vae $VAE --device "${DEVICE:-cuda}" --batch ${BATCH:-256} --lr ${LR:-5e-4} \
  --warmup ${WARMUP:-500} "${SCHEDULE[@]}" "${START[@]}" --val-size 512 --val-every 500 --checkpoint-every 2000 --data-reuse ${REUSE:-4} --minutes "$MIN" --resume --progress lines \
  --progress-every 250 --seed 0 ${TRAIN_ARGS:-}
rm -rf /tmp/toy
$BIN export --vae $VAE --unet "$RUN" --out /tmp/toy --overwrite
tar -C /tmp -czf "$OUT/toy_model.tgz" toy
cp "$RUN"/loss.csv "$RUN"/summary.json "$OUT/"
export RUN
python3 - <<'PY' || echo "no slim checkpoint: this python lacks torch/safetensors"
import os
from safetensors import safe_open
from safetensors.torch import save_file
src = os.environ["RUN"] + "/checkpoint.safetensors"
with safe_open(src, "pt") as f:
    meta = f.metadata()
    t = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("adam.")}
save_file(t, "/tmp/slim.safetensors", metadata=meta)
PY
[ -f /tmp/slim.safetensors ] && split -b 15M /tmp/slim.safetensors "$OUT/slim.part-"
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
