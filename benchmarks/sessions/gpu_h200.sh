#!/usr/bin/env bash
# The whole-model table on an H200 (thirteenth session: no H100 was lent), each (model, size,
# path) in its own process with CUDA graphs, most important first, under a deadline; part 1 also
# reads the hardware counters of one Vim-S training step's kernels with Nsight Compute.
# Usage (device machine, repo root, after `source .gpu/activate.sh`), one device call each:
#   bash benchmarks/sessions/gpu_h200.sh "$OUT" 1     # ncu, 224 px (T/S/B), Vim-S at 1024 px
#   bash benchmarks/sessions/gpu_h200.sh "$OUT" 2     # Vim-T/B at 1024 px, 512 px, small batches
set -uo pipefail
out=${1:-/tmp/out}
part=${2:-1}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
SECONDS=0
TP_DEADLINE=560
source benchmarks/sessions/gpu_lib.sh
T=vim_tiny_patch16_224; S=vim_small_patch16_224; B=vim_base_patch16_224
if [ "$part" = 1 ]; then
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  timeout 170 "$ncu" --clock-control none --profile-from-start off -k 'regex:scan|conv_|combine|prep' \
    --set full -f -o /tmp/ncu_s224 python3 benchmarks/ncu_step.py --model $S --depth 2 > "$out/ncu.log" 2>&1
  echo "ncu exit $? at ${SECONDS}s"; tail -3 "$out/ncu.log"
  "$ncu" --import /tmp/ncu_s224.ncu-rep --page details --csv > "$out/ncu_s224_details.csv" 2>&1
  gzip -f "$out/ncu_s224_details.csv"; ls -la "$out"
  tp_run s224 140 --graphs --models $S --img-sizes 224 --paths cuda triton deit
  tp_run tb224 240 --graphs --models $T $B --img-sizes 224 --paths cuda triton deit
  tp_run s1024 150 --graphs --models $S --img-sizes 1024 --paths cuda triton deit
else
  tp_run tb1024 270 --graphs --models $T $B --img-sizes 1024 --paths cuda triton deit
  tp_run x512 270 --graphs --models $S $T $B --img-sizes 512 --paths cuda triton deit
  for b in 8 4 2; do tp_run s224b$b 60 --graphs --models $S --img-sizes 224 --batch $b --paths cuda triton; done
fi
echo "finished at ${SECONDS}s"
