#!/usr/bin/env bash
# A/B of one vimssl.ssm.triton_core switch on whole models, then GPU tests, in one device call
# (under 10 minutes on an H100): the triton path only, each run in a process of its own with
# CUDA graphs, the switch off then on, records to OUT/ab_<SWITCH>.json.
# Usage (device machine, repo root, after `source .gpu/activate.sh`):
#   bash benchmarks/sessions/gpu_switch_ab.sh SWITCH "MODEL:PX ..." OUT [PYTEST_K]
#   e.g. bash benchmarks/sessions/gpu_switch_ab.sh SEQ_SAVE_CARRY "vim_small_patch16_224:1024" "$OUT" two_level
# AB_SECONDS (default 360) bounds the A/B part; the tests get what is left until AB_DEADLINE (a
# `date +%s` time; default 570 s from the start), which also lets several calls share one budget.
set -uo pipefail
switch=${1:?a triton_core switch, e.g. BC_IN_CONV}
runs=${2:?model:px pairs}
out=${3:-/tmp/out}
k=${4:-}
budget=${AB_SECONDS:-360}
deadline=${AB_DEADLINE:-$(($(date +%s) + 570))}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
for run in $runs; do
  model=${run%%:*} px=${run##*:}
  for v in False True; do
    left=$((budget - SECONDS))
    until_deadline=$((deadline - $(date +%s) - 10))
    [ "$until_deadline" -lt "$left" ] && left=$until_deadline
    [ "$left" -lt 40 ] && { echo "[$model $px $switch=$v] skipped: ${left}s left" | tee -a "$out/ab.md"; continue; }
    timeout $((left < 120 ? left : 120)) python3 benchmarks/throughput.py --graphs --iters 3 --models "$model" \
      --img-sizes "$px" --paths triton --set "$switch=$v" --out "$out/run_${model%%_patch*}_${px}_$v.json" 2>&1 |
      grep '^| vim' | sed "s/^/[$switch=$v] /" | tee -a "$out/ab.md"
  done
done
# one records file per switch (the device hands back only a few files per call)
python3 - "$out" "$switch" <<'PY'
import glob, json, os, sys
out, switch = sys.argv[1:]
files = sorted(glob.glob(os.path.join(out, "run_*.json")))
records = []
for f in files:
    data = json.load(open(f))
    records += data if isinstance(data, list) else data.get("records", [data])
    os.remove(f)
with open(os.path.join(out, f"ab_{switch}.json"), "w") as fh:
    json.dump(records, fh, indent=1)
PY
echo "[ab] done at ${SECONDS}s"
if [ -n "$k" ]; then
  timeout $((deadline - $(date +%s))) python3 -m pytest -q -p no:cacheprovider tests/test_gpu_triton.py tests/test_gpu_graphs.py \
    -k "$k" 2>&1 | tail -4 | tee "$out/tests.txt"
  echo "[tests] done at ${SECONDS}s"
fi
