"""A stack of bidirectional Mamba residual blocks: built, initialised and run the same way by the
encoder and the MIM decoder. Functions over an ``nn.ModuleList`` (not a module) so that the owners
keep the released state-dict keys ``layers.{i}.*`` and ``norm_f.*``."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vimssl.layers.drop_path import Drop, DropPath
from vimssl.layers.norm import RMSNorm
from vimssl.models.mixer import BiMambaMixer
from vimssl.ssm.dispatch import check_backend, get_ops, resolve_backend


class Block(nn.Module):
    """Mamba-style pre-norm residual block: ``residual += x; out = mixer(norm(residual))``.

    Takes the previous block's mixer output, its drop-path draw and the residual stream, and
    returns its own, so that the drop path, the add and the norm run as one fused step (one
    kernel each way on the triton path).
    NOTE: the released code applies block i's drop-path rate to block i-1's output (and the
    model-wide rate to the last block's); we drop each block's own output with its own rate.
    """

    def __init__(self, dim: int, mixer: BiMambaMixer, drop_path: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden: torch.Tensor | None, residual: torch.Tensor, drop: Drop = None
    ) -> tuple[torch.Tensor, torch.Tensor, Drop]:
        # hidden: (B, L, D) or None for the first block; residual: (B, L, D), float32; drop: the
        # previous block's drop-path draw for hidden. Returns this block's output (not yet
        # dropped), the residual stream and this block's draw.
        ops = get_ops(resolve_backend(self.mixer.backend, residual.device))
        normed, residual = ops.add_rms_norm(hidden, residual, self.norm, drop)
        return self.mixer(normed), residual, self.drop_path.draw(residual.shape[0], residual.device)


def build_blocks(
    dim: int,
    depth: int,
    drop_path_rate: float = 0.0,
    d_state: int = 16,
    d_conv: int = 4,
    expand: int = 2,
    norm_eps: float = 1e-5,
    backend: str = "auto",
) -> nn.ModuleList:
    """``depth`` blocks with stochastic-depth rates linspace(0, drop_path_rate, depth)."""
    check_backend(backend)
    rates = torch.linspace(0, drop_path_rate, depth).tolist()
    return nn.ModuleList(
        Block(
            dim,
            BiMambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend),
            drop_path=rates[i],
            norm_eps=norm_eps,
        )
        for i in range(depth)
    )


@torch.no_grad()
def init_blocks(layers: nn.ModuleList) -> None:
    """The release's init of the blocks: zero Linear biases (but dt_proj's, marked ``_keep_init``),
    out_proj kaiming-uniform / sqrt(depth) (Mamba's pre-norm residual rescale); the SSM
    parameters keep the mixer's own init."""
    for module in layers.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            if not getattr(module.bias, "_keep_init", False):
                nn.init.zeros_(module.bias)
    for blk in layers:
        nn.init.kaiming_uniform_(blk.mixer.out_proj.weight, a=math.sqrt(5))
        blk.mixer.out_proj.weight /= math.sqrt(max(len(layers), 1))


def set_blocks_backend(layers: nn.ModuleList, backend: str) -> None:
    check_backend(backend)
    for blk in layers:
        blk.mixer.backend = backend


def run_blocks(
    layers: nn.ModuleList,
    x: torch.Tensor,
    norm_f: RMSNorm,
    backend: str,
    grad_checkpointing: bool = False,
    last_k: int = 0,
) -> torch.Tensor | list[torch.Tensor]:
    """x (B, L, D) through every block, then the final add + norm: (B, L, D).

    With ``last_k > 0``, returns the outputs of the last ``last_k`` blocks instead, each through
    the final norm (the last one is the usual output), oldest first."""
    residual, hidden, drop = x, None, None
    ckpt = grad_checkpointing and torch.is_grad_enabled() and layers.training
    ops = get_ops(resolve_backend(backend, residual.device))
    outs = []
    for i, blk in enumerate(layers):
        if ckpt:
            hidden, residual, drop = checkpoint(blk, hidden, residual, drop, use_reentrant=False)
        else:
            hidden, residual, drop = blk(hidden, residual, drop)
        if last_k and i >= len(layers) - last_k:
            outs.append(ops.add_rms_norm(hidden, residual, norm_f, drop)[0])
    if last_k:
        return outs
    out, _ = ops.add_rms_norm(hidden, residual, norm_f, drop)
    return out
