#!/usr/bin/env bash
# Fourteenth session: the conv token walks (CONV_WALK) against the tile kernels, in one device call.
# 1. kernel sweep (benchmarks/triton_core.py --conv-walk [--walks $WALKS]);
# 2. GPU tests: pytest $TEST_FILES -k $TEST_K (default: the conv variants' and the core's parity
#    tests; TEST_FILES=none skips them);
# 3. whole models, CONV_WALK off then on, each in its own process with CUDA graphs
#    (benchmarks/sessions/gpu_switch_ab.sh), for the model:px runs in $1.
# Usage (device, repo root):
#   source .gpu/activate.sh && bash benchmarks/sessions/gpu_conv_walk.sh "vim_small_patch16_224:224" "$OUT"
# with WALKS="128,1,8 128,1,-2" (channels, warps, programs per SM or -spans per row) and
# TEST_FILES="tests/test_gpu_graphs.py" TEST_K="" to change steps 1 and 2.
set -uo pipefail
runs=${1:-"vim_small_patch16_224:224 vim_tiny_patch16_224:224"}
out=${2:-/tmp/out}
files=${TEST_FILES:-tests/test_gpu_triton.py}
k=${TEST_K-"conv_variants or core_matches"}
mkdir -p "$out"
start=$(date +%s)
walks=()
[ -n "${WALKS:-}" ] && walks=(--walks $WALKS)
timeout 200 python3 benchmarks/triton_core.py --conv-walk "${walks[@]}" --out "$out/conv_walk.json" 2>&1 |
  grep -v Warning | tee "$out/conv_walk.txt"
echo "[sweep] done at $(($(date +%s) - start))s"
if [ "$files" != none ]; then
  # shellcheck disable=SC2086
  timeout "${TESTS_SECONDS:-200}" python3 -m pytest -q -p no:cacheprovider $files -k "$k" 2>&1 |
    tail -5 | tee "$out/tests.txt"
  echo "[tests] done at $(($(date +%s) - start))s"
fi
AB_SECONDS=600 AB_DEADLINE=$((start + ${DEADLINE:-575})) bash benchmarks/sessions/gpu_switch_ab.sh CONV_WALK "$runs" "$out"
