#!/usr/bin/env bash
# Branch next/bc-in-conv (prepared in the tenth session, not measured yet): the packed float32
# B/C rebuilt inside the backward's conv recompute (BC_IN_CONV) instead of kept from the forward.
# One device call under 10 minutes on an H100: whole-model A/B of the switch (triton path, each
# run in its own process, CUDA graphs), then the GPU tests of the core and of the graphed steps.
# Usage (device machine, repo root, branch checked out, after `source .gpu/activate.sh`):
#   bash benchmarks/gpu_bc_in_conv.sh "$OUT"
# Merge if memory drops (v16 measured 2-4%) and Vim-S 224 px training stays at or above 1,723
# img/s (3.0x the cuda path's 574.2).
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
ab() {  # tag, model, img size
  for v in False True; do
    local left=$((300 - SECONDS))
    [ "$left" -lt 40 ] && { echo "[$1 BC_IN_CONV=$v] skipped: ${left}s left"; return; }
    timeout $((left < 80 ? left : 80)) python3 benchmarks/throughput.py --graphs --iters 3 --models "$2" \
      --img-sizes "$3" --paths triton --set BC_IN_CONV=$v --out "$out/ab_${1}_$v.json" 2>&1 |
      grep '^| vim' | sed "s/^/[$1 BC_IN_CONV=$v] /" | tee -a "$out/ab.md"
  done
}
ab s224 vim_small_patch16_224 224
ab t512 vim_tiny_patch16_224 512
ab t224 vim_tiny_patch16_224 224
echo "[ab] done at ${SECONDS}s"
timeout $((570 - SECONDS)) python3 -m pytest -q -x tests/test_gpu_triton.py tests/test_gpu_graphs.py \
  -k "core_matches or two_level or deterministic or split_forward or graph" 2>&1 | tail -4 | tee "$out/tests.txt"
echo "[tests] done at ${SECONDS}s"
