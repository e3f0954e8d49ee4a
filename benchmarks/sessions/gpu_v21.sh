#!/usr/bin/env bash
# Fifteenth session (v21, the gradient carry pass's register cap): the 1024 px rows with the cuda
# path, the triton path (and DeiT-S) side by side, then the GPU tests of the chunked scans.
# Usage (device, repo root): source .gpu/activate.sh && bash benchmarks/sessions/gpu_v21.sh "$OUT"
out=${1:-/tmp/out}; S=$(date +%s); mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# the other row the cap applies to (Vim-T at 512 px, batch 32: three waves uncapped, two capped)
for v in False None; do
  timeout 100 python3 benchmarks/throughput.py --graphs --iters 3 --models vim_tiny_patch16_224 --img-sizes 512 \
    --paths triton --set SEQ_GRAD_CAP=$v --out "$out/t512_$v.json" 2>&1 | grep '^| vim' | sed "s/^/[SEQ_GRAD_CAP=$v] /" | tee -a "$out/v21_1024.md"
done
timeout ${BENCH_SECONDS:-330} python3 benchmarks/throughput.py --graphs --iters 3 \
  --models ${MODELS:-vim_small_patch16_224 vim_base_patch16_224 vim_tiny_patch16_224} --img-sizes 1024 \
  --paths cuda triton deit --out "$out/v21_1024.json" 2>&1 | grep '^|' | tee "$out/v21_1024.md"
echo "[bench] done at $(( $(date +%s) - S ))s"
timeout $((S + ${DEADLINE:-540} - $(date +%s))) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton.py \
  -k "${TEST_K:-gradient_carr or two_level or saved_carries or deterministic}" 2>&1 | tail -4 | tee "$out/tests.txt"
echo "[tests] done at $(( $(date +%s) - S ))s"
