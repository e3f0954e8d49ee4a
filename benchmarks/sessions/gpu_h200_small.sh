#!/usr/bin/env bash
# Third H200 call of the thirteenth session: the GPU tests on an H200, and `auto`'s small-batch
# rule (mamba-ssm below 32 scan rows per SM at short sequences) against both paths at the batches
# where it picks mamba-ssm, from CUDA graphs and eager. Usage (device machine, repo root, after
# `source .gpu/activate.sh`): bash benchmarks/sessions/gpu_h200_small.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
SECONDS=0
timeout 300 python3 -m pytest tests/test_gpu_parity.py tests/test_gpu_triton.py tests/test_gpu_graphs.py -q \
  -p no:cacheprovider -x 2>&1 | tee "$out/gpu_tests.log" | tail -4
echo "tests done at ${SECONDS}s"
TP_DEADLINE=565
source benchmarks/sessions/gpu_lib.sh
T=vim_tiny_patch16_224; S=vim_small_patch16_224
tp_run g_t8 60 --graphs --models $T --batch 8 --img-sizes 224 --paths cuda triton
tp_run g_s1 60 --graphs --models $S --batch 1 --img-sizes 224 --paths cuda triton
tp_run g_t1 60 --graphs --models $T --batch 1 --img-sizes 224 --paths cuda triton
tp_run e_s4 60 --models $S --batch 4 --img-sizes 224 --paths cuda triton
tp_run e_t8 60 --models $T --batch 8 --img-sizes 224 --paths cuda triton
tp_run e_s1 60 --models $S --batch 1 --img-sizes 224 --paths cuda triton
echo "finished at ${SECONDS}s"
