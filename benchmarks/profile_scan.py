"""One scan forward and one scan backward of the ``triton`` path at the Vim-S training shape
(B 128, L 197, E 768, N 16, bf16), after a warm-up pair: a target for Nsight Compute.

    ncu --kernel-name regex:scan_ --launch-skip 2 --launch-count 2 --section WarpStateStats \\
        --section SourceCounters -o scan python benchmarks/profile_scan.py --be 64
"""

from __future__ import annotations

import argparse

import torch

from vimssl.models.mixer import BiMambaMixer
from vimssl.ssm import triton_core as tc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--be", type=int, default=tc.SEQ_BE_BWD, help="channels per scan program")
    ap.add_argument("--keep", action="store_true", help="the backward keeps its recomputed decays")
    args = ap.parse_args()
    tc.SEQ_BE_FWD = tc.SEQ_BE_BWD = args.be
    tc.SEQ_KEEP = args.keep
    bsz, seqlen, e, n = 128, 197, 768, 16
    bf = dict(device="cuda", dtype=torch.bfloat16)
    xc = torch.randn(bsz, seqlen, 2 * e, **bf)
    z = torch.randn(bsz, seqlen, e, **bf)
    bc = torch.randn(bsz, seqlen, 2, 2 * n, device="cuda")  # B and C, packed float32
    dt = torch.randn(bsz, seqlen, 2 * e, **bf) - 2
    m = BiMambaMixer(e // 2, d_state=n).cuda()  # Mamba's init: S4D-real A, D = 1
    _, _, _, _, At2, D, dtb = tc.derived_weights(tc._core_params(m), torch.bfloat16)
    gy, dz = torch.randn(bsz, seqlen, e, **bf), torch.empty(bsz, seqlen, e, **bf)
    for _ in range(2):
        _, ysum, _ = tc.scan_fwd(xc, dt, bc, z, At2, D, dtb, True)
        tc.scan_bwd(xc, dt, bc, z, At2, D, dtb, gy, ysum, dz)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
