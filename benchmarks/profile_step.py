"""Where a training step's GPU time goes: torch.profiler over two forward+backward steps of one
model and path (bf16 autocast, like ``throughput.py``), kernels grouped by name, top first.
``--infer`` profiles the inference step instead (forward under ``torch.inference_mode``).

    python benchmarks/profile_step.py --model vim_small_patch16_224 --path triton --batch 128
"""

from __future__ import annotations

import argparse
import json

import torch
from throughput import build, time_fn, train_step_fn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vim_small_patch16_224")
    ap.add_argument("--path", default="triton")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("--infer", action="store_true", help="profile the inference step")
    ap.add_argument(
        "--ops", action="store_true", help="also list the top PyTorch ops by GPU time, with shapes"
    )
    ap.add_argument(
        "--host", action="store_true", help="also profile the host side (cProfile, top functions)"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.model, args.path, args.img).cuda().train()
    x = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
    y = torch.randint(0, 1000, (args.batch,), device="cuda")

    step = train_step_fn(model, x, y)
    if args.infer:
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)

    wall_ms = 1000 * time_fn(step, warmup=3, iters=5, windows=1)
    acts = [torch.profiler.ProfilerActivity.CUDA] + (
        [torch.profiler.ProfilerActivity.CPU] if args.ops else []
    )
    with torch.profiler.profile(activities=acts, record_shapes=args.ops) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    if args.host:  # where the Python time of a step goes
        import cProfile
        import pstats

        with cProfile.Profile() as pr:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    if args.ops:
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total", row_limit=25
        )
        print(table)
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        # with --ops the CPU-side ops carry their kernels' time too: count the kernels only
        on_gpu = not args.ops or getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA
        if t > 0 and on_gpu:
            rows.append(dict(name=ev.key, ms_per_step=t / 1000 / 2, calls_per_step=ev.count / 2))
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    print(
        f"{args.model} {args.path} {args.img}px batch {args.batch} {'inference' if args.infer else 'training'}: "
        f"{total:.1f} ms of kernels in a "
        f"{wall_ms:.1f} ms step (GPU busy {100 * total / wall_ms:.0f}%), "
        f"{sum(r['calls_per_step'] for r in rows):.0f} launches"
    )
    for r in rows[: args.top]:
        share = 100 * r["ms_per_step"] / total
        print(f"{r['ms_per_step']:8.2f} ms {share:5.1f}% {r['calls_per_step']:6.0f}x  {r['name'][:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(
                    model=args.model,
                    path=args.path,
                    infer=args.infer,
                    total_ms=total,
                    wall_ms=wall_ms,
                    kernels=rows,
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
