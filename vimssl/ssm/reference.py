"""Pure-PyTorch selective scan (Mamba, Gu & Dao 2023) and depthwise causal conv1d.

Same signatures as ``mamba_ssm``'s ``selective_scan_fn`` and ``causal_conv1d``'s
``causal_conv1d_fn``, so the model calls either through :mod:`vimssl.ssm.dispatch`. Runs on the
CPU and any accelerator; SSM arithmetic is float32 for bf16/fp16/fp32 inputs (float64 stays float64).

NOTE on speed (eager PyTorch, 2-core CPU, measured in this repo): the recurrence is a Python loop
over time. Computing each step's decay exp(delta_t A) and drive delta_t u_t B_t inside the loop from
``unbind``-ed slices was 2-3x faster for whole-model forward+backward than materialising
(L, B, E, N) decay/drive tensors first (large fresh buffers cost more than the extra small ops) and
than a hand-written autograd Function over a preallocated state buffer. Indexing ``x[..., t]`` in
the loop instead of ``unbind`` makes the backward far slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """y_t = C_t . h_t + D * u_t, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, h_0 = 0.

    u, delta: (B, E, L); A: (E, N); B, C: (B, N, L) or grouped (B, G, N, L), group g serving
    channels [g*E/G, (g+1)*E/G); D, delta_bias: (E,); z: (B, E, L), gates the output by SiLU(z).
    Returns (B, E, L) in u's dtype.
    """
    out_dtype = u.dtype
    bsz, dim, seqlen = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)  # (B, 1, N, L)
    groups, d_state = B.shape[1], A.shape[1]
    if dim % groups:
        raise ValueError(f"{dim} channels cannot be split into {groups} groups of B and C")
    per = dim // groups

    f = torch.promote_types(u.dtype, torch.float32)  # compute dtype
    u, delta = u.to(f), delta.to(f)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    # time-major slices: (L, B, G, H) for delta and delta*u, (L, B, G, 1, N) / (L, B, G, N, 1) for B, C
    delta_t = delta.reshape(bsz, groups, per, seqlen).permute(3, 0, 1, 2)
    du_t = (delta * u).reshape(bsz, groups, per, seqlen).permute(3, 0, 1, 2)
    B_t = B.to(f).permute(3, 0, 1, 2).unsqueeze(3)
    C_t = C.to(f).permute(3, 0, 1, 2).unsqueeze(-1)
    A_g = A.to(f).view(groups, per, d_state)  # (G, H, N)

    h = None  # (B, G, H, N)
    ys = []
    for d, du, b, c in zip(delta_t.unbind(0), du_t.unbind(0), B_t.unbind(0), C_t.unbind(0)):
        drive = du.unsqueeze(-1) * b  # (B, G, H, N)
        h = drive if h is None else torch.exp(d.unsqueeze(-1) * A_g) * h + drive
        ys.append(torch.matmul(h, c).squeeze(-1))  # (B, G, H)
    y = torch.stack(ys, dim=-1).reshape(bsz, dim, seqlen)

    if D is not None:
        y = y + D.to(f)[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.to(f))
    return y.to(out_dtype)


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """Depthwise causal conv: x (B, C, L), weight (C, K), bias (C,) -> (B, C, L)."""
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    channels, width = weight.shape
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=channels)
    out = out[..., : x.shape[-1]]  # keep the first L outputs: causal
    return F.silu(out) if activation is not None else out
