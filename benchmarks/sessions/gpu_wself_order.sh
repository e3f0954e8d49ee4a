#!/usr/bin/env bash
# SEQ_WSELF off, on with tickets, on in program-id order: whole training steps on one machine.
# Usage (device, repo root): source .gpu/activate.sh && bash benchmarks/sessions/gpu_wself_order.sh "$OUT"
out=${1:-/tmp/out}; S=$(date +%s); mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for run in ${RUNS:-vim_tiny_patch16_224:512 vim_small_patch16_224:1024}; do
  model=${run%%:*} px=${run##*:}
  for cfg in off:SEQ_WSELF=False ticket:SEQ_WSELF_TICKET=True order:SEQ_WSELF_TICKET=False; do
    name=${cfg%%:*} set=${cfg#*:}
    left=$((S + ${DEADLINE:-330} - $(date +%s)))
    [ "$left" -lt 30 ] && { echo "[$model $px $name] skipped" | tee -a "$out/order.md"; continue; }
    timeout $((left < 100 ? left : 100)) python3 benchmarks/throughput.py --graphs --iters 3 --models "$model" \
      --img-sizes "$px" --paths triton --set $set --out "$out/order_${model%%_patch*}_${px}_$name.json" 2>&1 |
      grep '^| vim' | sed "s/^/[$name] /" | tee -a "$out/order.md"
  done
done
echo "[order] done at $(( $(date +%s) - S ))s"
