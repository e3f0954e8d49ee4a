#!/usr/bin/env bash
# The device calls of v12's A/B (docs/kernel-notes.md, v12): the triton path with its
# SEQ_SKIP_UNREAD, SEQ_FRESH_DECAY and SEQ_WAVES switches on (the default since v12) against each
# off and all off, one call per part, each under 10 minutes on an H100. Usage (device machine, repo root, after `source .gpu/activate.sh`):
#   bash benchmarks/sessions/gpu_ab_session.sh tests "$OUT"    # GPU parity tests of the triton path
#   bash benchmarks/sessions/gpu_ab_session.sh core "$OUT"     # one layer's core: A/B of each switch
#   bash benchmarks/sessions/gpu_ab_session.sh models "$OUT"   # whole models, each path in its own process
set -uo pipefail
part=${1:?tests, core or models}
out=${2:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
off="SEQ_SKIP_UNREAD=False SEQ_FRESH_DECAY=False SEQ_WAVES=False"
case $part in
tests)
  timeout 500 python3 -m pytest tests/test_gpu_triton.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -5
  ;;
core)
  # the Vim-S training shape (the scan backward, FRESH), then the 1024 px shapes (skip, waves)
  for set in "SEQ_FRESH_DECAY=False" "SEQ_FRESH_DECAY=True"; do
    timeout 120 python3 benchmarks/triton_core.py --set $set --out "$out/core_${set}.json" 2>&1 |
      grep -E "^triton_|^k_scan" | sed "s/^/$set /" | tee -a "$out/core.log"
  done
  for set in "$off" "SEQ_WAVES=False SEQ_FRESH_DECAY=False" "SEQ_WAVES=False" ""; do
    tag=$(echo "${set:-all_on}" | tr ' =' '_-')
    timeout 120 python3 benchmarks/triton_core.py --chunks long ${set:+--set $set} --out "$out/long_${tag}.json" 2>&1 |
      grep -E "^chunks" | sed "s/^/[${set:-all on}] /" | tee -a "$out/core.log"
  done
  ;;
models)
  run() {  # model, image size, settings...
    local name=$1 img=$2; shift 2
    local tag=all_on
    [ $# -gt 0 ] && tag=switches_off
    timeout 200 python3 benchmarks/throughput.py --graphs --models "$name" --img-sizes "$img" \
      --paths cuda triton deit --iters 3 ${1:+--set "$@"} --out "$out/tp_${name}_${img}_${tag}.json" 2>&1 |
      grep '^| vim' | sed "s/^/[${tag}] /" | tee -a "$out/throughput.md"
  }
  run vim_small_patch16_224 1024
  run vim_small_patch16_224 1024 $off
  run vim_small_patch16_224 224
  run vim_base_patch16_224 224
  ;;
*)
  echo "unknown part $part (tests, core or models)"; exit 2
  ;;
esac
