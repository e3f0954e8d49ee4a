"""Pure-PyTorch selective scan (Mamba, Gu & Dao 2023) and depthwise causal conv1d.

Same signatures as ``mamba_ssm``'s ``selective_scan_fn`` and ``causal_conv1d``'s
``causal_conv1d_fn``, so the model calls either through :mod:`vimssl.ssm.dispatch`. Runs on the
CPU and any accelerator; all SSM arithmetic is float32 whatever the input dtype.

NOTE on speed (eager PyTorch, measured for the released shapes, L ~ 197): a Python loop over
``unbind``-ed time slices beats indexing inside the loop (whose backward is ~20x slower) and a
chunked cumulative-sum form; the per-step outputs are contracted with C once, after the loop.
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

    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    delta_g = delta.view(bsz, groups, per, seqlen)  # (B, G, H, L)
    u_g = u.view(bsz, groups, per, seqlen)
    A_g = A.float().view(groups, per, d_state)  # (G, H, N)

    # Time-major so that each step is a cheap unbind slice: (L, B, G, H, N)
    decay = torch.exp(torch.einsum("bghl,ghn->lbghn", delta_g, A_g))
    drive = torch.einsum("bghl,bgnl->lbghn", delta_g * u_g, B.float())

    h = torch.zeros_like(drive[0])
    states = []
    for a_t, b_t in zip(decay.unbind(0), drive.unbind(0)):
        h = a_t * h + b_t
        states.append(h)
    hs = torch.stack(states)  # (L, B, G, H, N)
    y = torch.einsum("lbghn,bgnl->bghl", hs, C.float()).reshape(bsz, dim, seqlen)

    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
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
