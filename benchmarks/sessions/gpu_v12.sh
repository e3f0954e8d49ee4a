#!/usr/bin/env bash
# v12 whole-model records (each path in its own process, CUDA graphs), one device call under
# 10 minutes on an H100, most important first. Usage (device machine, repo root, after
# `source .gpu/activate.sh`): bash benchmarks/sessions/gpu_v12.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
TP_DEADLINE=570
source benchmarks/sessions/gpu_lib.sh
tp_run s224 120 --graphs --models vim_small_patch16_224 --img-sizes 224 --paths cuda triton
tp_run s1024 150 --graphs --models vim_small_patch16_224 --img-sizes 1024 --paths cuda triton deit
tp_run tb224 180 --graphs --models vim_tiny_patch16_224 vim_base_patch16_224 --img-sizes 224 --paths cuda triton
tp_run t1024 120 --graphs --models vim_tiny_patch16_224 --img-sizes 1024 --paths cuda triton
tp_run s512 120 --graphs --models vim_small_patch16_224 --img-sizes 512 --paths cuda triton
