#!/usr/bin/env bash
# Short CLI runs on one GPU with the cuda kernel path: MAE pretraining of Vim-S at 224 px, then
# fine-tuning and linear probing of the resulting checkpoint, on the built-in digits upscaled to
# 224 px (no network on the GPU machine). Logs images/s (CSV). Device machine, repo root, after
# `source .gpu/activate.sh`:   bash benchmarks/sessions/gpu_cli_runs.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
common=(--data.init_args.image_size 224 --data.init_args.num_workers 12 --trainer.enable_progress_bar false
        --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir "$out/runs"
        --trainer.log_every_n_steps 2 --model.init_args.backend cuda)
timeout 240 python3 cli.py fit --config configs/trainer/gpu.yaml --config configs/data/quickstart.yaml \
  --config configs/pretrain/mae_vim_small.yaml "${common[@]}" --data.init_args.batch_size 128 \
  --trainer.max_epochs 3 --trainer.limit_val_batches 2 --model.init_args.warmup_epochs 1 \
  --trainer.default_root_dir "$out/pre" > "$out/pretrain.log" 2>&1; echo "pretrain exit $?"
ckpt=$(find "$out/runs" -name last.ckpt | head -1); echo "checkpoint: $ckpt"
timeout 180 python3 cli.py fit --config configs/trainer/gpu.yaml --config configs/data/quickstart.yaml \
  --config configs/finetune/imagenet_vim_small.yaml "${common[@]}" --data.init_args.batch_size 128 \
  --model.init_args.encoder "$ckpt" --model.init_args.ema_decay 0.999 --trainer.max_epochs 2 \
  --trainer.limit_val_batches 2 --trainer.default_root_dir "$out/ft" > "$out/finetune.log" 2>&1; echo "finetune exit $?"
timeout 120 python3 cli.py fit --config configs/trainer/gpu.yaml --config configs/data/quickstart.yaml \
  --config configs/linear/imagenet.yaml "${common[@]}" --data.init_args.batch_size 256 \
  --model.init_args.encoder "$ckpt" --trainer.max_epochs 2 --trainer.limit_val_batches 2 \
  --trainer.default_root_dir "$out/lin" > "$out/linear.log" 2>&1; echo "linear exit $?"
python3 - "$out" <<'PY'
import csv, glob, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(f"{out}/runs/**/metrics.csv", recursive=True)):
    rows = list(csv.DictReader(open(path)))
    rates = [float(r["train/images_per_sec"]) for r in rows if r.get("train/images_per_sec")]
    loss = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    accs = [r.get("val/acc1") for r in rows if r.get("val/acc1")]
    rate = sorted(rates)[len(rates) // 2] if rates else None
    print(f"{path.split('/runs/')[1]}: steps logged {len(loss)}, loss {loss[0] if loss else '-'} -> {loss[-1] if loss else '-'}, "
          f"median images/s {rate}, val/acc1 {accs[-1] if accs else '-'}")
PY
for f in pretrain finetune linear; do grep -E "Error|error|Traceback" "$out/$f.log" | head -3; done
