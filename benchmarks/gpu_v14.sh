#!/usr/bin/env bash
# v14 (conv forward and dx programs walk token spans, weights loaded once): the walk sweep at
# four shapes, then whole-model A/B against one tile per program (the layout before v14), each
# run in its own process with CUDA graphs, in one device call under 10 minutes on an H100.
# Usage (device machine, repo root, after `source .gpu/activate.sh`): bash benchmarks/gpu_v14.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
timeout 150 python3 benchmarks/triton_core.py --conv-walk --out "$out/walk.json" 2>&1 | grep -v Warning | tee "$out/walk.txt"
# the fill with the least conv time (forward twice, as the step runs it, plus the backward) summed
# over the 224 px shapes
fill=$(python3 - "$out/walk.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["conv_walk"] if "224" in r["shape"]]
names = [k[4:-3] for k in rows[0] if k.startswith("fwd_") and k != "fwd_one_tile_ms"]
cost = {n: sum(2 * r[f"fwd_{n}_ms"] + r[f"bwd_{n}_ms"] for r in rows) for n in names}
print(min(cost, key=cost.get)[4:])
PY
)
fill=${fill:-8}
echo "[walk] done at ${SECONDS}s; best fill $fill" | tee -a "$out/ab.md"
ab() {  # tag, model, img size
  local tag=$1 model=$2 img=$3
  for v in "CONV_WALK_SPLIT=1000000" "CONV_WALK_FILL=$fill"; do
    local left=$((565 - SECONDS))
    [ "$left" -lt 40 ] && { echo "[$tag $v] skipped: ${left}s left"; return; }
    timeout $((left < 100 ? left : 100)) python3 benchmarks/throughput.py --graphs --iters 3 --models "$model" \
      --img-sizes "$img" --paths triton --set $v --out "$out/ab_${tag}_${v%%=*}.json" 2>&1 |
      grep '^| vim' | sed "s/^/[$tag $v] /" | tee -a "$out/ab.md"
  done
  echo "[$tag] done at ${SECONDS}s"
}
ab t224 vim_tiny_patch16_224 224
ab b224 vim_base_patch16_224 224
ab s224 vim_small_patch16_224 224
ab s1024 vim_small_patch16_224 1024
