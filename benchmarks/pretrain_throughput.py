"""Masked-image-modeling training throughput on one GPU: full optimiser steps (forward, backward,
AdamW) of :class:`vimssl.pretrain.MaskedPretraining` on synthetic images, bf16 autocast.

    python benchmarks/pretrain_throughput.py --models vim_small_patch16_224 --methods mae simmim \
        --backends cuda torch --batch 128 --out benchmarks/results/pretrain.json

Data loading is left out on purpose: this measures the model. Timed with CUDA events after
warm-up (median of 3 windows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
from pathlib import Path

import torch

from vimssl.optim import build_adamw, param_groups
from vimssl.pretrain import MaskedPretraining


def measure(name: str, method: str, backend: str, img: int, batch: int, iters: int) -> dict:
    torch.manual_seed(0)
    module = MaskedPretraining(model_name=name, img_size=img, method=method, backend=backend).cuda().train()
    groups = param_groups(
        module.named_parameters(), 0.05, {f"encoder.{n}" for n in module.encoder.no_weight_decay()}
    )
    opt = build_adamw(groups, lr=1e-4, betas=(0.9, 0.95))
    x = torch.randn(batch, 3, img, img, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = module(x)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / iters)
    return dict(
        model=name, method=method, path=backend, img_size=img, batch=batch,
        train_img_s=round(batch / statistics.median(times), 1),
        train_peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
        gpu=torch.cuda.get_device_name(0), date=dt.date.today().isoformat(),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vim_small_patch16_224"])
    ap.add_argument("--methods", nargs="+", default=["mae", "simmim"])
    ap.add_argument("--backends", nargs="+", default=["cuda"])
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--torch-batch", type=int, default=16, help="batch of the reference path")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    records = []
    for name in args.models:
        for method in args.methods:
            for backend in args.backends:
                batch = args.torch_batch if backend == "torch" else args.batch
                iters = 2 if backend == "torch" else args.iters
                rec = measure(name, method, backend, args.img_size, batch, iters)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")
    print("\n| model | method | path | px | batch | train img/s | peak GiB |\n|---|---|---|---|---|---|---|")
    for r in records:
        print(
            f"| {r['model']} | {r['method']} | {r['path']} | {r['img_size']} | {r['batch']} "
            f"| {r['train_img_s']:,.0f} | {r['train_peak_gib']:.1f} |"
        )


if __name__ == "__main__":
    main()
