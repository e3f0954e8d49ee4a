"""The bidirectional Mamba mixer of Vision Mamba ("v2" in the released code, arXiv 2401.09417).

One shared ``in_proj`` (D -> 2E) and ``out_proj`` (E -> D); two full selective-SSM branches,
forward (no suffix) and backward (suffix ``_b``), each with its own depthwise causal conv1d,
``x_proj``, ``dt_proj``, ``A_log`` and ``D``. The backward branch scans the reversed sequence and
its output is reversed back; the two are averaged and gated by SiLU(z).

Parameter names and shapes match the released checkpoints exactly. How the branches are computed
(kernel path) is chosen by ``backend``; every path uses the same parameters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vimssl.ssm.dispatch import SSMOps, check_backend, get_ops, resolve_backend


class BiMambaMixer(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model  # E
        self.dt_rank = math.ceil(d_model / 16)  # R
        self.backend = check_backend(backend)
        e, r, n = self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * e, bias=False)
        for s in ("", "_b"):  # forward, backward branch
            setattr(self, f"conv1d{s}", nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=True))
            setattr(self, f"x_proj{s}", nn.Linear(e, r + 2 * n, bias=False))
            setattr(self, f"dt_proj{s}", nn.Linear(r, e, bias=True))
            setattr(self, f"A{s}_log", nn.Parameter(torch.empty(e, n)))
            setattr(self, f"D{s}", nn.Parameter(torch.empty(e)))
        self.out_proj = nn.Linear(e, d_model, bias=False)
        self.reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 0.001, dt_max: float = 0.1, floor: float = 1e-4) -> None:
        """Mamba's SSM init for both branches: S4D-real A, D = 1, dt bias = softplus^-1(dt) with dt
        log-uniform in [dt_min, dt_max].

        NOTE: the released Vim zeroes ``dt_proj_b.bias`` by accident (a model-wide bias reset after
        this init); we initialise both branches the same way. A released checkpoint loads either way.
        """
        e, n = self.d_inner, self.d_state
        for s in ("", "_b"):
            dt_proj: nn.Linear = getattr(self, f"dt_proj{s}")
            nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            dt_proj.bias._keep_init = True  # model-wide init must leave it alone
            A_log = getattr(self, f"A{s}_log")
            A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(e, 1))
            getattr(self, f"D{s}").fill_(1.0)
            A_log._no_weight_decay = True
            getattr(self, f"D{s}")._no_weight_decay = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: (B, L, D) -> (B, L, D)
        ops = get_ops(resolve_backend(self.backend, hidden.device))
        # (B, L, 2E); the triton path applies in_proj itself (see triton_core.linear)
        xz = ops.linear(hidden, self.in_proj) if ops.linear is not None else self.in_proj(hidden)
        if ops.core_out is not None:
            return ops.core_out(xz, self)  # out_proj inside (see bimamba_core_out_triton)
        y = ops.core(xz, self) if ops.core is not None else bimamba_core(xz, self, ops)  # (B, L, E)
        return self.out_proj(y)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, backend={self.backend!r}"


def bimamba_core(xz: torch.Tensor, m: BiMambaMixer, ops: SSMOps) -> torch.Tensor:
    """Both SSM branches, averaged and gated: xz (B, L, 2E) -> (B, L, E), ready for ``out_proj``.

    The branches run as one stacked problem of 2E channels (forward channels first, then the
    backward branch on the reversed sequence): one conv, one x_proj and one dt_proj matmul
    (block-diagonal weights) and one scan call with B/C in 2 groups. That is the same arithmetic
    as two separate branches, with a third of the kernel launches and no layout copies between
    the conv and the projections (the conv runs on a channel-last view).
    """
    bsz, seqlen, _ = xz.shape
    e, r, n = m.d_inner, m.dt_rank, m.d_state
    x, z = xz.split(e, dim=-1)  # (B, L, E) each
    xs = torch.cat([x, x.flip(1)], dim=-1)  # (B, L, 2E): forward | reversed

    conv_w = torch.cat([m.conv1d.weight, m.conv1d_b.weight]).squeeze(1)  # (2E, K)
    conv_b = torch.cat([m.conv1d.bias, m.conv1d_b.bias])  # (2E,)
    xs = ops.causal_conv1d(xs.transpose(1, 2), conv_w, conv_b, activation="silu")  # (B, 2E, L)

    # [dt | B | C] of both branches from one matmul: (B*L, 2E) @ blockdiag -> (B*L, 2, R+2N)
    x_proj_w = torch.block_diag(m.x_proj.weight, m.x_proj_b.weight)  # (2(R+2N), 2E)
    dbc = F.linear(xs.transpose(1, 2).reshape(bsz * seqlen, 2 * e), x_proj_w).view(-1, 2, r + 2 * n)
    dt = dbc[..., :r].reshape(bsz * seqlen, 2 * r)  # (B*L, 2R): forward | backward
    B = dbc[..., r : r + n].view(bsz, seqlen, 2, n).permute(0, 2, 3, 1).contiguous()  # (B, 2, N, L)
    C = dbc[..., r + n :].view(bsz, seqlen, 2, n).permute(0, 2, 3, 1).contiguous()  # (B, 2, N, L)
    dt_w = torch.block_diag(m.dt_proj.weight, m.dt_proj_b.weight)  # (2E, 2R)
    delta = (dt_w @ dt.t()).view(2 * e, bsz, seqlen).permute(1, 0, 2)  # (B, 2E, L), a strided view

    A = -torch.exp(torch.cat([m.A_log, m.A_b_log]).float())  # (2E, N), float32
    D = torch.cat([m.D, m.D_b]).float()
    dt_bias = torch.cat([m.dt_proj.bias, m.dt_proj_b.bias]).float()
    y = ops.selective_scan(
        xs.contiguous(), delta, A, B, C, D, delta_bias=dt_bias, delta_softplus=True
    )  # (B, 2E, L)

    y_f, y_b = y.split(e, dim=1)
    y = (y_f + y_b.flip(-1)).transpose(1, 2)  # (B, L, E)
    # NOTE: the release halves the sum too. SiLU(z) gates both branches alike, so gating once
    # after the sum equals gating each branch (the released code gates inside each scan).
    return y * F.silu(z) * 0.5
