#!/usr/bin/env bash
# v12 whole-model records (each path in its own process, CUDA graphs), one device call under
# 10 minutes on an H100, most important first. Usage (device machine, repo root, after
# `source .gpu/activate.sh`): bash benchmarks/gpu_v12.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
run() {  # tag, seconds allowed, throughput.py arguments...
  local tag=$1 limit=$2; shift 2
  local left=$((570 - SECONDS))
  [ "$left" -lt 30 ] && { echo "[$tag] skipped: ${left}s left"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" python3 benchmarks/throughput.py --graphs --iters 3 "$@" --out "$out/tp_$tag.json" 2>&1 |
    grep '^| vim' | sed "s/^/[$tag] /" | tee -a "$out/throughput.md"
  echo "[$tag] done at ${SECONDS}s"
}
run s224 120 --models vim_small_patch16_224 --img-sizes 224 --paths cuda triton
run s1024 150 --models vim_small_patch16_224 --img-sizes 1024 --paths cuda triton deit
run tb224 180 --models vim_tiny_patch16_224 vim_base_patch16_224 --img-sizes 224 --paths cuda triton
run t1024 120 --models vim_tiny_patch16_224 --img-sizes 1024 --paths cuda triton
run s512 120 --models vim_small_patch16_224 --img-sizes 512 --paths cuda triton
