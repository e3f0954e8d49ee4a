"""Training and inference throughput and peak memory of Vim kernel paths and DeiT, on one GPU.

    python benchmarks/throughput.py --models vim_small_patch16_224 --img-sizes 224 512 1024 \
        --paths cuda torch deit --out benchmarks/results/h100.json

Training = forward + backward of a cross-entropy loss under bf16 autocast (no optimizer step);
inference = forward under bf16 autocast and ``torch.inference_mode``. With ``--graphs`` both
are replayed from CUDA graphs (:mod:`vimssl.models.graphs`, what the LightningModules'
``cuda_graphs`` option does) for every path, DeiT included, and the records say
``"cuda_graphs": true, "infer_cuda_graphs": true`` (records without the second field, from
before inference was graphed, have eager inference). Timed with CUDA events after
warm-up, median of several timed windows. DeiT is timm's ViT of the same width with
scaled-dot-product attention, measured in the same run. Writes one JSON record per
(model, img_size, batch, path) with the fields model, img_size, batch, path, train_img_s,
infer_img_s, train_peak_gib, gpu, date.

Each (model, image size, path) is measured in a fresh Python process by default (``--in-process``
measures them one after another in this one), so that no path's peak memory includes what an
earlier one left allocated; the records then say ``"isolated": true``.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as dt
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import vimssl
from vimssl.models.graphs import CudaGraphed

DEIT = {192: "deit_tiny_patch16_224", 384: "deit_small_patch16_224", 768: "deit_base_patch16_224"}
# default batch per image size (tokens per image grow 4x per doubling of the side)
BATCH = {224: 128, 512: 32, 1024: 8}


def build(name: str, path: str, img: int) -> torch.nn.Module:
    if path == "deit":
        import timm

        width = vimssl.models.model_defaults(name)["embed_dim"]
        if width not in DEIT:
            raise SystemExit(f"no DeiT of width {width} to compare {name} with")
        return timm.create_model(DEIT[width], img_size=img, num_classes=1000)
    return vimssl.create_model(name, img_size=img, num_classes=1000, backend=path)


def time_fn(fn, warmup: int, iters: int, windows: int = 3) -> float:
    """Median seconds per call over ``windows`` windows of ``iters`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(windows):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000 / iters)
    return statistics.median(times)


def train_step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, fwd=None):
    """One training step as timed here: forward + cross-entropy backward under bf16 autocast, no
    optimiser (gradients dropped). ``fwd`` computes the logits: ``model`` itself by default, or a
    :class:`CudaGraphed` of it (forward and backward from CUDA graphs)."""
    fwd = fwd or model

    def train_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    return train_step


def measure(name: str, path: str, img: int, batch: int, iters: int, graphs: bool = False) -> dict:
    torch.manual_seed(0)
    model = build(name, path, img).cuda()
    x = torch.randn(batch, 3, img, img, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    fwd = CudaGraphed(model, model, inference=True) if graphs else model
    train_step = train_step_fn(model, x, y, fwd)

    def infer_step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            fwd(x)

    model.train()
    gc.collect()  # what an earlier measurement in this process left in reference cycles
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    train_s = time_fn(train_step, warmup=2, iters=iters)
    peak = torch.cuda.max_memory_allocated() / 2**30
    model.eval()
    infer_s = time_fn(infer_step, warmup=2, iters=iters)
    torch.cuda.empty_cache()
    return dict(
        model=name, img_size=img, batch=batch, path=path,
        train_img_s=round(batch / train_s, 1), infer_img_s=round(batch / infer_s, 1),
        train_peak_gib=round(peak, 2), gpu=torch.cuda.get_device_name(0),
        date=dt.date.today().isoformat(), **({"cuda_graphs": True, "infer_cuda_graphs": True} if graphs else {}),
    )  # fmt: skip


def _setting_owner(name: str):
    """The triton path's module that has the tuning constant ``name``: :mod:`vimssl.ssm.triton_core`
    or :mod:`vimssl.ssm.triton_norm` (the fused norm's), or None."""
    from vimssl.ssm import triton_core as tc
    from vimssl.ssm import triton_norm as tn

    return next((mod for mod in (tc, tn) if name.isupper() and hasattr(mod, name)), None)


@contextlib.contextmanager
def triton_settings(**values):
    """Set triton-path constants (:func:`_setting_owner`'s) for the ``with`` block and restore
    them after it, also when it raises (the sweeps in ``triton_core.py``)."""
    unknown = sorted(k for k in values if _setting_owner(k) is None)
    if unknown:
        raise AttributeError(
            f"vimssl.ssm.triton_core / triton_norm have no setting {', '.join(map(repr, unknown))}"
        )
    saved = {k: (_setting_owner(k), getattr(_setting_owner(k), k)) for k in values}
    try:
        for k, v in values.items():
            setattr(saved[k][0], k, v)
        yield
    finally:
        for k, (mod, v) in saved.items():
            setattr(mod, k, v)


def parse_settings(pairs: list[str]) -> dict:
    """``NAME=VALUE`` pairs as {NAME: value}: settings of :mod:`vimssl.ssm.triton_core` or
    :mod:`vimssl.ssm.triton_norm` (the triton path's tuning constants, e.g.
    ``SEQ_SKIP_UNREAD=False``), VALUE a Python literal; SystemExit naming a pair that is not."""
    values = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if _setting_owner(name) is None:
            raise SystemExit(f"--set {pair}: vimssl.ssm.triton_core / triton_norm have no setting {name!r}")
        try:
            values[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(
                f"--set {pair}: expected NAME=VALUE with VALUE a Python literal (True, 256, (12, 24))"
            ) from None
    return values


def apply_settings(pairs: list[str]) -> dict:
    """:func:`parse_settings`'s settings set on their modules, for the rest of the process (A/B
    runs); returns them."""
    values = parse_settings(pairs)
    for name, value in values.items():
        setattr(_setting_owner(name), name, value)
    return values


def measure_safely(name: str, path: str, img: int, batch: int, iters: int, graphs: bool) -> dict:
    """:func:`measure`, or the record of why it could not run (out of memory)."""
    try:
        return measure(name, path, img, batch, iters, graphs)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(model=name, img_size=img, batch=batch, path=path, error="out of memory")


def measure_isolated(
    name: str, path: str, img: int, batch: int, iters: int, graphs: bool, settings: list[str] = ()
) -> dict:
    """:func:`measure_safely` in a fresh Python process (its record is the last line it prints),
    with the triton path's ``settings`` (see :func:`apply_settings`)."""
    job = dict(name=name, path=path, img=img, batch=batch, iters=iters, graphs=graphs)
    cmd = [sys.executable, __file__, "--worker", json.dumps(job)] + (["--set", *settings] if settings else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(model=name, img_size=img, batch=batch, path=path, error=f"worker failed: {err}"[:500])
    return dict(json.loads(lines[-1]), isolated=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        nargs="+",
        default=["vim_tiny_patch16_224", "vim_small_patch16_224", "vim_base_patch16_224"],
    )
    ap.add_argument("--img-sizes", nargs="+", type=int, default=[224, 512, 1024])
    ap.add_argument("--paths", nargs="+", default=["cuda", "deit", "torch"])
    ap.add_argument("--batch", type=int, default=None, help="override the per-size default batch")
    ap.add_argument("--iters", type=int, default=5, help="calls per timed window")
    ap.add_argument(
        "--torch-max-img", type=int, default=224, help="skip the slow reference path above this size"
    )
    ap.add_argument(
        "--torch-batch", type=int, default=16, help="batch of the reference path (it keeps every state)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the records")
    ap.add_argument(
        "--graphs", action="store_true", help="training and inference steps from CUDA graphs (all paths)"
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="measure every configuration in this process (default: a fresh process each)",
    )
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="NAME=VALUE",
        help="triton path settings (vimssl.ssm.triton_core or triton_norm constants) for this run, recorded in it",
    )  # fmt: skip
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one job, as JSON (internal)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    settings = apply_settings(args.set)
    if args.worker is not None:
        print(json.dumps(measure_safely(**json.loads(args.worker))), flush=True)
        return

    def run(*job):
        rec = measure_safely(*job) if args.in_process else measure_isolated(*job, settings=args.set)
        return dict(rec, settings=settings) if settings and rec.get("path") == "triton" else rec

    records = []
    for name in args.models:
        for img in args.img_sizes:
            for path in args.paths:
                if path == "torch" and img > args.torch_max_img:
                    continue
                batch = args.batch or BATCH.get(img, 8)
                if path == "torch":
                    batch = min(batch, args.torch_batch)
                iters = 2 if path == "torch" else args.iters
                rec = run(name, path, img, batch, iters, args.graphs)
                records.append(rec)
                print(json.dumps(rec), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")
    print("\n| model | px | batch | path | train img/s | infer img/s | train peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['path']} | {r['error']} | | |")
        else:
            print(
                f"| {r['model']} | {r['img_size']} | {r['batch']} | {r['path']}{' (graphs)' if r.get('cuda_graphs') else ''} "
                f"| {r['train_img_s']:,.0f} "
                f"| {r['infer_img_s']:,.0f} | {r['train_peak_gib']:.1f} |"
            )


if __name__ == "__main__":
    main()
