#!/usr/bin/env bash
# v13 (x_proj / dt_proj matmuls per branch, XPROJ_SPLIT): the matmuls one by one, whole-model
# A/B of the switch (each run in its own process, CUDA graphs) and the GPU parity tests, in one
# device call under 10 minutes on an H100. Usage (device machine, repo root, after
# `source .gpu/activate.sh`): bash benchmarks/gpu_v13.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
timeout 120 python3 benchmarks/xproj_matmuls.py --out "$out/xproj.json" 2>&1 | tee "$out/xproj.txt"
echo "[xproj] done at ${SECONDS}s"
ab() {  # tag, model, img size, then on/off order
  local tag=$1 model=$2 img=$3
  for v in False True; do
    local left=$((560 - SECONDS))
    [ "$left" -lt 40 ] && { echo "[$tag $v] skipped: ${left}s left"; return; }
    timeout $((left < 100 ? left : 100)) python3 benchmarks/throughput.py --graphs --iters 3 --models "$model" \
      --img-sizes "$img" --paths triton --set XPROJ_SPLIT=$v --out "$out/ab_${tag}_$v.json" 2>&1 |
      grep '^| vim' | sed "s/^/[$tag XPROJ_SPLIT=$v] /" | tee -a "$out/ab.md"
  done
  echo "[$tag] done at ${SECONDS}s"
}
ab t224 vim_tiny_patch16_224 224
ab b224 vim_base_patch16_224 224
left=$((560 - SECONDS))
if [ "$left" -gt 60 ]; then
  timeout "$left" python3 -m pytest -q -x tests/test_gpu_triton.py 2>&1 | tail -5 | tee "$out/tests.txt"
fi
echo "[tests] done at ${SECONDS}s"
ab s224 vim_small_patch16_224 224
ab s1024 vim_small_patch16_224 1024
