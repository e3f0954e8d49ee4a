"""One eager training step of a shallow Vim, for Nsight Compute: every kernel of a block at a full
model's shapes (a block's kernels do not depend on the depth), with hardware counters (stall
reasons, issue-slot use, achieved bandwidth) that CUDA events cannot give.

Only the step after the warm-up steps is profiled (cudaProfilerStart/Stop around it):

    ncu --clock-control none --profile-from-start off -k 'regex:scan|conv_' --set full \
        -o $OUT/step python3 benchmarks/ncu_step.py --model vim_small_patch16_224 --depth 2
    ncu --import $OUT/step.ncu-rep --page details --csv > $OUT/step.csv

``--clock-control none`` leaves the GPU's clocks as they run (ncu locks them to base otherwise).
"""

from __future__ import annotations

import argparse

import torch
from throughput import train_step_fn

import vimssl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vim_small_patch16_224")
    ap.add_argument("--path", default="triton")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--depth", type=int, default=2, help="blocks (the kernels of one block repeat)")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.manual_seed(0)
    model = vimssl.create_model(args.model, img_size=args.img, depth=args.depth, backend=args.path)
    model = model.cuda().train()
    x = torch.randn(args.batch, 3, args.img, args.img, device="cuda")
    y = torch.randint(0, 1000, (args.batch,), device="cuda")
    step = train_step_fn(model, x, y)
    for _ in range(args.warmup):  # compiles the kernels outside the profiled range
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one training step of {args.model} (depth {args.depth}, {args.path} path)")


if __name__ == "__main__":
    main()
