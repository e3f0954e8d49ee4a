#!/usr/bin/env bash
# Fifteenth session: settings of the gradient carry pass (scan_state_kernel with GRAD) at 1024 px,
# whole models with CUDA graphs, each run in its own process; then its GPU tests. CONFIGS are
# "tag:NAME=VALUE,NAME=VALUE" of vimssl.ssm.triton_core; the default compares the register cap off,
# on, and by the rule (calls 3 and 4 of that session ran switches since removed, see
# docs/benchmarks.md).
# Usage (device, repo root): source .gpu/activate.sh && bash benchmarks/sessions/gpu_grad_pass.sh "$OUT"
out=${1:-/tmp/out}; S=$(date +%s); mkdir -p "$out"
run() { m=$1; shift; tag=$1; shift
  left=$((S + ${DEADLINE:-430} - $(date +%s))); [ $left -lt 45 ] && { echo "skip $m $tag" | tee -a "$out/ab.md"; return; }
  timeout $((left < 110 ? left : 110)) python3 benchmarks/throughput.py --graphs --iters 3 --models "$m" \
    --img-sizes 1024 --paths triton --set "$@" --out "$out/r_${m%%_patch*}_$tag.json" 2>&1 |
    grep '^| vim' | sed "s/^/[$tag $*] /" | tee -a "$out/ab.md"; }
for m in ${MODELS:-vim_small_patch16_224 vim_base_patch16_224 vim_tiny_patch16_224}; do
  for cfg in ${CONFIGS:-"off:SEQ_GRAD_CAP=False" "on:SEQ_GRAD_CAP=True" "rule:SEQ_GRAD_CAP=None"}; do
    # shellcheck disable=SC2046
    run "$m" "${cfg%%:*}" $(echo "${cfg#*:}" | tr ',' ' ')
  done
done
python3 - "$out" <<'PY'  # one records file (the device hands back only a few files per call)
import glob, json, os, sys
recs = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "r_*.json"))):
    d = json.load(open(f)); d = d if isinstance(d, list) else d.get("records", [d])
    tag = os.path.basename(f)[2:-5]
    recs += [dict(r, run=tag) for r in d]; os.remove(f)
json.dump(recs, open(os.path.join(sys.argv[1], "grad_pass.json"), "w"), indent=1)
PY
echo "[ab] done at $(( $(date +%s) - S ))s"
timeout $((S + ${TESTS_DEADLINE:-570} - $(date +%s))) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton.py \
  -k "${TEST_K:-gradient_carr or two_level}" 2>&1 | tail -4 | tee "$out/tests.txt"
echo "[tests] done at $(( $(date +%s) - S ))s"
