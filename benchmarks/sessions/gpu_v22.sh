#!/usr/bin/env bash
# Sixteenth session (v22, SEQ_WSELF on: the scan backward's first pass makes the gradient carries).
# Usage (device, repo root): source .gpu/activate.sh && bash benchmarks/sessions/gpu_v22.sh tests|bench "$OUT"
#   tests: the triton path's GPU tests (test_gpu_triton.py, test_gpu_graphs.py) on the defaults
#   bench: SEQ_WSELF off/on at 512 px (Vim-T, Vim-S; gpu_switch_ab.sh), then the 1024 px rows with the cuda path,
#          the triton path and DeiT side by side
what=${1:?tests or bench}; out=${2:-/tmp/out}; S=$(date +%s); mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
if [ "$what" = tests ]; then
  timeout ${DEADLINE:-560} python3 -m pytest -q -p no:cacheprovider -k "${TEST_K:-not nothing}" \
    tests/test_gpu_triton.py tests/test_gpu_graphs.py 2>&1 | tail -15 | tee "$out/tests.txt"
  echo "[tests] done at $(( $(date +%s) - S ))s"
  exit 0
fi
AB_SECONDS=${AB_SECONDS:-200} AB_DEADLINE=$((S + ${DEADLINE:-560})) bash "$(dirname "$0")/gpu_switch_ab.sh" \
  SEQ_WSELF "${AB_RUNS:-vim_tiny_patch16_224:512 vim_small_patch16_224:512}" "$out"
echo "[ab] done at $(( $(date +%s) - S ))s"
timeout $((S + ${DEADLINE:-560} - $(date +%s))) python3 benchmarks/throughput.py --graphs --iters 3 \
  --models ${MODELS:-vim_small_patch16_224 vim_base_patch16_224 vim_tiny_patch16_224} --img-sizes 1024 \
  --paths cuda triton deit --out "$out/v22_1024.json" 2>&1 | grep '^|' | tee "$out/v22_1024.md"
echo "[bench] done at $(( $(date +%s) - S ))s"
