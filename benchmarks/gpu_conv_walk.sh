#!/usr/bin/env bash
# Fourteenth session, one device call: the conv token walks (CONV_WALK) against the tile kernels.
# 1. kernel sweep (benchmarks/triton_core.py --conv-walk): walk widths and spans against the tiles;
# 2. GPU parity tests of the conv variants and the core;
# 3. whole models, CONV_WALK off then on, each in its own process with CUDA graphs
#    (benchmarks/gpu_switch_ab.sh), for the runs in $1 (default Vim-S and Vim-T at 224 px).
# Usage (device, repo root): source .gpu/activate.sh && bash benchmarks/gpu_conv_walk.sh "RUNS" "$OUT"
set -uo pipefail
runs=${1:-"vim_small_patch16_224:224 vim_tiny_patch16_224:224"}
out=${2:-/tmp/out}
tests=${3:-"conv_variants or core_matches"}
mkdir -p "$out"
start=$(date +%s)
timeout 200 python3 benchmarks/triton_core.py --conv-walk --out "$out/conv_walk.json" 2>&1 | grep -v Warning | tee "$out/conv_walk.txt"
echo "[sweep] done at $(($(date +%s) - start))s"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton.py -k "$tests" 2>&1 | tail -5 | tee "$out/tests.txt"
echo "[tests] done at $(($(date +%s) - start))s"
AB_SECONDS=600 AB_DEADLINE=$((start + 575)) bash benchmarks/gpu_switch_ab.sh CONV_WALK "$runs" "$out"
