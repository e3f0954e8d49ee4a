#!/usr/bin/env bash
# One device call: GPU tests, encoder throughput, MIM throughput, and a few CLI pretraining steps
# on the cuda path. Usage (device machine, from the repo root, after `source .gpu/activate.sh`):
#   bash benchmarks/sessions/gpu_session.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 240 python3 -m pytest tests/test_gpu_parity.py -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -3
timeout 330 python3 benchmarks/throughput.py --out "$out/throughput.json" ${THROUGHPUT_ARGS:-} 2>&1 | grep -v '^{' | tee "$out/throughput.md"
timeout 150 python3 benchmarks/pretrain_throughput.py --methods mae simmim --backends cuda --out "$out/pretrain.json" 2>&1 | grep -v '^{' | tee "$out/pretrain.md"
timeout 200 python3 cli.py fit --config configs/trainer/gpu.yaml --config configs/data/quickstart.yaml \
  --config configs/pretrain/mae_vim_small.yaml --data.init_args.image_size 224 --data.init_args.batch_size 128 \
  --data.init_args.num_workers 12 --trainer.max_epochs 2 --trainer.limit_val_batches 2 --trainer.log_every_n_steps 2 \
  --trainer.enable_progress_bar false --trainer.default_root_dir "$out/run" --model.init_args.backend cuda \
  --model.init_args.warmup_epochs 1 > "$out/cli_fit.log" 2>&1; echo "cli fit exit $?"
tail -5 "$out/cli_fit.log"
find "$out/run" -name metrics.csv -exec cp {} "$out/cli_metrics.csv" \;
