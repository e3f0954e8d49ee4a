#!/usr/bin/env bash
# Third H200 call of the thirteenth session: the GPU tests on an H200, and `auto`'s small-batch
# rule (mamba-ssm below 32 scan rows per SM at short sequences) against both paths at the batches
# where it picks mamba-ssm, from CUDA graphs and eager. Usage (device machine, repo root, after
# `source .gpu/activate.sh`): bash benchmarks/gpu_h200_small.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
SECONDS=0
timeout 300 python3 -m pytest tests/test_gpu_parity.py tests/test_gpu_triton.py tests/test_gpu_graphs.py -q \
  -p no:cacheprovider -x 2>&1 | tee "$out/gpu_tests.log" | tail -4
echo "tests done at ${SECONDS}s"
run() {  # tag, seconds allowed, throughput.py arguments...
  local tag=$1 limit=$2; shift 2
  local left=$((565 - SECONDS))
  [ "$left" -lt 25 ] && { echo "[$tag] skipped: ${left}s left"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" python3 benchmarks/throughput.py --iters 3 "$@" --img-sizes 224 --paths cuda triton \
    --out "$out/tp_$tag.json" 2>&1 | grep '^| vim' | sed "s/^/[$tag] /" | tee -a "$out/throughput.md"
  echo "[$tag] done at ${SECONDS}s"
}
T=vim_tiny_patch16_224; S=vim_small_patch16_224
run g_t8 60 --graphs --models $T --batch 8
run g_s1 60 --graphs --models $S --batch 1
run g_t1 60 --graphs --models $T --batch 1
run e_s4 60 --models $S --batch 4
run e_t8 60 --models $T --batch 8
run e_s1 60 --models $S --batch 1
echo "finished at ${SECONDS}s"
