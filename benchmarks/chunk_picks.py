"""The triton path's chunk lengths (``vimssl.ssm.triton_core.chunk_lengths``: the two-level scans'
tokens per chunk, forward and backward) at a grid of shapes, without a GPU: what a change to the
wave model's settings would move before any device time goes on it.

    python benchmarks/chunk_picks.py                                  # the picks on an H100 (132 SMs)
    python benchmarks/chunk_picks.py --set SEQ_PROGRAM_STEPS=20       # only the shapes it changes

The grid: the inner widths of Vim-T/S/B/L (384, 768, 1536, 2048 channels), token counts of the
usual image sizes (patch 16: 224-2048 px, with the class token) and of masked-pretraining subsets
(a quarter and a half of them), batches 1-128. With ``--set`` (``NAME=VALUE`` as in
``throughput.py``) the table lists the shapes whose picks differ from the defaults', and the
last line counts them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from throughput import parse_settings, triton_settings  # noqa: E402

WIDTHS = {"Vim-T": 384, "Vim-S": 768, "Vim-B": 1536, "Vim-L": 2048}  # inner channels (2 d_model)
PXS = (224, 256, 384, 512, 640, 768, 1024, 1280, 2048)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def token_counts() -> list[int]:
    """Every image size's tokens (patch 16 and a class token) and those of a quarter and a half of
    its patches (masked pretraining's encoder sees a subset), ascending."""
    out = set()
    for px in PXS:
        patches = (px // 16) ** 2
        out |= {patches + 1, patches // 4 + 1, patches // 2 + 1}
    return sorted(out)


def picks(sms: int, widths: dict[str, int], batches=BATCHES) -> dict[tuple[str, int, int], tuple[int, int]]:
    """(model, tokens, batch) -> (forward, backward) chunk lengths on a GPU of ``sms`` SMs under the
    current settings (a length equal to the token count: not chunked)."""
    from vimssl.ssm import triton_core as tc

    gpu = SimpleNamespace(device=torch.device("cuda", 0))  # chunk_lengths reads only the device
    return {
        (name, tokens, batch): tc.chunk_lengths(gpu, batch, tokens, e, sms=sms)
        for name, e in widths.items()
        for tokens in token_counts()
        for batch in batches
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sms", type=int, default=132, help="streaming multiprocessors (H100 and H200: 132)")
    ap.add_argument("--models", nargs="*", default=list(WIDTHS), choices=list(WIDTHS))
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="settings to compare")
    args = ap.parse_args(argv)
    widths = {m: WIDTHS[m] for m in args.models}
    base = picks(args.sms, widths)
    if not args.set:
        print("| model | tokens | batch | forward chunk | backward chunk |\n|---|---|---|---|---|")
        for (name, tokens, batch), (f, b) in base.items():
            print(f"| {name} | {tokens} | {batch} | {f} | {b} |")
        return 0
    applied = parse_settings(args.set)  # (SystemExit naming a setting that does not exist)
    with triton_settings(**applied):  # (put back after: main() also runs inside the tests)
        new = picks(args.sms, widths)
    changed = [(k, base[k], new[k]) for k in base if base[k] != new[k]]
    print(f"settings: {applied}; {args.sms} SMs")
    print(
        "| model | tokens | batch | defaults (forward, backward) | with the settings |\n|---|---|---|---|---|"
    )
    for (name, tokens, batch), old, now in changed:
        print(f"| {name} | {tokens} | {batch} | {old} | {now} |")
    print(f"{len(changed)} of {len(base)} shapes pick other chunk lengths")
    return 0


if __name__ == "__main__":
    sys.exit(main())
