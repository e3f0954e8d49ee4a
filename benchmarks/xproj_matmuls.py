"""The triton path's small matmuls (x_proj and dt_proj, forward and backward) one by one: as one
block-diagonal matmul over both branches (what the core did up to v12) against one matmul per
branch on strided views (no zero blocks, and dt_proj without the B/C columns). One GPU.

    python benchmarks/xproj_matmuls.py --out $OUT/xproj.json

For each model at batch 128 and 224 px (and Vim-S at 1024 px, batch 8): the median time of each
op both ways (CUDA events via ``triton.testing.do_bench``) and the largest difference between
the two results (they use the same bf16 inputs and float32 accumulation, so it should be a few
bf16 ulps at most).
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

# (name, d_model, batch, tokens)
SHAPES = [("vim_tiny", 192, 128, 197), ("vim_small", 384, 128, 197), ("vim_base", 768, 128, 197),
          ("vim_small_1024", 384, 8, 4097)]  # fmt: skip


def ops(d: int, bsz: int, seqlen: int, dev="cuda", dtype=torch.bfloat16) -> dict:
    e, n = 2 * d, 16
    r = -(-d // 16)
    p = r + 2 * n
    bl = bsz * seqlen
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, device=dev, dtype=dtype, generator=g) * 0.1

    xc, ddt, du = rnd(bl, 2 * e), rnd(bl, 2 * e), rnd(bl, 2 * e)
    xwb = [rnd(p, e), rnd(p, e)]  # x_proj weight per branch (P, E)
    dwb = [rnd(e, r), rnd(e, r)]  # dt_proj weight per branch (E, R)
    x_w = torch.block_diag(*xwb)  # (2P, 2E)
    dt_w = torch.block_diag(
        *[torch.cat([w, torch.zeros(e, 2 * n, device=dev, dtype=dtype)], 1) for w in dwb]
    )  # (2E, 2P)
    dbc, d_dbc2 = rnd(bl, 2 * p), rnd(bl, 2 * p)
    E, P = (slice(0, e), slice(e, 2 * e)), (slice(0, p), slice(p, 2 * p))
    R = (slice(0, r), slice(p, p + r))

    def x_proj_split():
        out = torch.empty(bl, 2 * p, device=dev, dtype=dtype)
        for i in range(2):
            torch.mm(xc[:, E[i]], x_w[P[i], E[i]].t(), out=out[:, P[i]])
        return out

    def dt_split():
        out = torch.empty(bl, 2 * e, device=dev, dtype=dtype)
        for i in range(2):
            torch.mm(dbc[:, R[i]], dt_w[E[i], R[i]].t(), out=out[:, E[i]])
        return out

    def d_dbc_split():
        out = torch.zeros(bl, 2 * p, device=dev, dtype=dtype)  # (the B/C columns are written later)
        for i in range(2):
            torch.mm(ddt[:, E[i]], dt_w[E[i], R[i]], out=out[:, R[i]])
        return out

    def d_dt_w_full():
        m = ddt.t() @ dbc
        return torch.stack([m[E[i], R[i]] for i in range(2)]).float()

    def d_dt_w_split():  # (2, E, R): one batched matmul on strided views
        a = ddt.view(bl, 2, e).permute(1, 2, 0)
        b = dbc.view(bl, 2, p)[:, :, :r].permute(1, 0, 2)
        return torch.bmm(a, b).float()

    def du_full():
        return du.clone().addmm_(d_dbc2, x_w)

    def du_split():
        out = du.clone()
        for i in range(2):
            out[:, E[i]].addmm_(d_dbc2[:, P[i]], x_w[P[i], E[i]])
        return out

    def d_x_w_full():
        m = d_dbc2.t() @ xc
        return torch.stack([m[P[i], E[i]] for i in range(2)]).float()

    def d_x_w_split():
        a = d_dbc2.view(bl, 2, p).permute(1, 2, 0)
        b = xc.view(bl, 2, e).permute(1, 0, 2)
        return torch.bmm(a, b).float()

    def d_dbc_full():
        return ddt @ dt_w

    clone_ms = do_bench(lambda: du.clone(), return_mode="median")
    pairs = {
        "x_proj": (lambda: xc @ x_w.t(), x_proj_split),
        "dt_proj": (lambda: dbc @ dt_w.t(), dt_split),
        "d_dbc (dt_proj input grad)": (d_dbc_full, d_dbc_split),
        "d_dt_w": (d_dt_w_full, d_dt_w_split),
        "du += d_dbc @ x_w (incl. a clone)": (du_full, du_split),
        "d_x_w": (d_x_w_full, d_x_w_split),
    }
    res = {"clone_ms": clone_ms}  # (in both du timings)
    for k, (full, split) in pairs.items():
        a, b = full(), split()
        if k.startswith("d_dbc"):
            a = a[:, torch.cat([torch.arange(r), torch.arange(p, p + r)])]
            b = b[:, torch.cat([torch.arange(r), torch.arange(p, p + r)])]
        diff = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
        t_full = do_bench(full, return_mode="median")
        t_split = do_bench(split, return_mode="median")
        res[k] = dict(full_ms=t_full, split_ms=t_split, rel_max_diff=diff)
        print(
            f"  {k:36s} full {t_full * 1e3:8.1f} us  split {t_split * 1e3:8.1f} us  diff {diff:.1e}",
            flush=True,
        )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, d, bsz, seqlen in SHAPES:
        print(f"{name} (d_model {d}, batch {bsz}, {seqlen} tokens)", flush=True)
        out["shapes"][name] = ops(d, bsz, seqlen)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
