#!/usr/bin/env bash
# FSDP2 on one GPU: a 0.67B Llama built on the spot (no hub, no network), one plain process
# against a one-rank FSDP2 group (NCCL), with torch's AdamW on the GPU and with CPU offload.
# Usage: bash scripts/gpu_scale_out.sh [OUT]   (SCALE_OUT_QUICK=1: tiny sizes, for a CPU box)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu-scale-out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [[ -n ${SCALE_OUT_QUICK:-} ]]; then
  SHAPE="hidden_size=64, num_layers=2, num_heads=2"; FLAGS="--steps 2 --device cpu"
else
  SHAPE="hidden_size=2048, num_layers=16, num_heads=16"
  FLAGS="--steps 6 --batch-size 16 --micro-batch-size 4 --prompt-len 128 --completion-len 512"
fi
MODEL=${TMPDIR:-/tmp}/scale-out-model
"$PYTHON" -c "from example_trainer.tiny_model import build_tiny_model as b; b('$MODEL', $SHAPE)"
for optimizer in adamw adamw_cpu; do
  # shellcheck disable=SC2086
  "$PYTHON" -m example_trainer.bench.scale_out --ranks 1 --model "$MODEL" $FLAGS \
    --optimizer "$optimizer" --out "$OUT/scale_out_$optimizer.json"
done
