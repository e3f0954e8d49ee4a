#!/usr/bin/env bash
# One device call for the triton path: its GPU tests, the kernel sweep, then the throughput table
# (cuda, triton and DeiT side by side, each in its own process), most important rows first (about 9 minutes
# in all on an H100: the last rows may not fit one device call). Usage (device
# machine, repo root, after `source .gpu/activate.sh`):  bash benchmarks/sessions/gpu_triton_session.sh "$OUT"
# If the scan variants' parity tests fail, the measurements fall back to the plain dB/dC sums.
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
if ! timeout 120 python3 -m pytest tests/test_gpu_triton.py -k variants -q -p no:cacheprovider > "$out/gpu_tests_variants.log" 2>&1; then
  echo "scan variant tests FAILED: measuring with SEQ_RS = False"; tail -30 "$out/gpu_tests_variants.log"
  sed -i 's/^SEQ_RS = True/SEQ_RS = False/' vimssl/ssm/triton_core.py
fi
tail -1 "$out/gpu_tests_variants.log"
timeout 150 python3 -m pytest tests/test_gpu_triton.py "tests/test_gpu_parity.py::test_auto_picks_the_fastest_path_there_is_on_gpu" \
  -k "not variants" -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -4
timeout 100 python3 benchmarks/triton_core.py --sweep --out "$out/core.json" 2>&1 | grep -E "^sweep seq|_ms|registers" | tee "$out/core.log"
timeout 90 python3 benchmarks/triton_core.py --chunks long --out "$out/chunks_long.json" 2>&1 | grep -E "^chunks" | tee "$out/chunks_long.log"
run() {  # name, image sizes...
  local name=$1; shift
  timeout "${TP_TIMEOUT:-150}" python3 benchmarks/throughput.py --models "$name" --img-sizes "$@" --paths cuda triton deit \
    --iters 3 --out "$out/throughput_${name}_$1.json" 2>&1 | grep -v '^{' | grep '^| vim' | tee -a "$out/throughput.md"
}
run vim_small_patch16_224 224
run vim_tiny_patch16_224 224
run vim_base_patch16_224 224
run vim_small_patch16_224 512 1024
run vim_tiny_patch16_224 512
run vim_base_patch16_224 512
run vim_base_patch16_224 1024
run vim_tiny_patch16_224 1024
