"""Light decoders for masked image modeling: encoded visible tokens -> pixel predictions.

- :class:`MambaDecoder`: MAE's asymmetric decoder (He et al. 2021) with bidirectional Mamba blocks
  instead of attention: embed the visible tokens, put a learned mask token at every masked place
  (``ids_restore``), add a decoder position embedding, run the blocks, predict ``p*p*C`` pixels
  per patch. Reuses the encoder's :class:`~vimssl.models.vim.Block` and
  :class:`~vimssl.models.mixer.BiMambaMixer`.
- :class:`TransformerDecoder`: the same with pre-norm ``nn.TransformerEncoderLayer`` blocks (MAE's
  own choice).
- :class:`LinearDecoder`: SimMIM's one-layer head (Xie et al. 2021) on the features of all M
  patches (masked ones encoded as mask tokens).

Sequence layout: the decoders keep the encoder's cls token and put it back in the *middle* of the
decoder sequence, at index M // 2 of M + 1 tokens, the slot Vim gives it, so that the decoder
position embedding has the encoder's middle-cls layout and
:func:`vimssl.layers.pos_embed.resample_pos_embed` resamples it for other grids. Predictions are
returned for the M patches only, in raster order.

Nothing here computes targets or losses (see :mod:`vimssl.mim.targets`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vimssl.layers.norm import RMSNorm
from vimssl.layers.pos_embed import join_pos_embed, resample_pos_embed
from vimssl.models.blocks import build_blocks, init_blocks, run_blocks, set_blocks_backend
from vimssl.ssm.dispatch import check_backend

POS_EMBED_KINDS = ("sincos", "learned")
DECODER_KINDS = ("mamba", "transformer")


# ------------------------------------------------------------------------- position embedding
def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding (M, dim) of a (gh, gw) grid in raster order: the first half of
    the channels encodes the row, the second the column (sin then cos, MAE's frequencies)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    gh, gw = grid
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij"
    )  # (gh, gw) each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega  # (M, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, D/2)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()  # (M, D)


def _infer_grid(num_patches: int, init_grid: tuple[int, int]) -> tuple[int, int]:
    if num_patches == init_grid[0] * init_grid[1]:
        return tuple(init_grid)
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"cannot infer the patch grid of {num_patches} patches (init grid {tuple(init_grid)}); pass grid="
        )
    return side, side


class DecoderEmbed(nn.Module):
    """Visible encoder features -> full decoder sequence: linear embed, mask tokens at the masked
    places, cls back in the middle, decoder position embedding.

    visible_feats (B, K + 1, D_enc) with the cls token at index K // 2 (``forward_features`` with
    ``ids_keep``), ids_restore (B, M) -> (B, M + 1, D_dec) with cls at index M // 2.
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, grid: tuple[int, int], pos_embed: str = "sincos"):
        super().__init__()
        if pos_embed not in POS_EMBED_KINDS:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; choose one of {', '.join(POS_EMBED_KINDS)}")
        self.grid = (int(grid[0]), int(grid[1]))
        self.pos_embed_kind = pos_embed
        self.proj = nn.Linear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # (1, M + 1, D_dec), zero cls slot in the middle; sin-cos values also start the learned one
        table = self._sincos(decoder_dim, self.grid)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(table)
        else:
            self.register_buffer("pos_embed", table, persistent=False)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @staticmethod
    def _sincos(dim: int, grid: tuple[int, int]) -> torch.Tensor:
        patches = sincos_pos_embed_2d(dim, grid).unsqueeze(0)  # (1, M, D)
        return join_pos_embed(patches.new_zeros(1, 1, dim), patches)  # (1, M + 1, D)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, gh*gw + 1, D_dec) for a grid: recomputed (sin-cos) or resampled (learned)."""
        if tuple(grid) == self.grid:
            return self.pos_embed
        if self.pos_embed_kind == "sincos":
            return self._sincos(self.pos_embed.shape[-1], grid).to(self.pos_embed.device)
        return resample_pos_embed(self.pos_embed, self.grid, grid)

    def forward(
        self, visible_feats: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        b, n, _ = visible_feats.shape  # n = K + 1
        m = ids_restore.shape[1]
        if ids_restore.shape[0] != b or not 1 <= n - 1 <= m:
            raise ValueError(
                f"visible_feats {tuple(visible_feats.shape)} (K + 1 tokens, cls in the middle) do not "
                f"fit ids_restore {tuple(ids_restore.shape)} (B, M)"
            )
        grid = _infer_grid(m, self.grid) if grid is None else tuple(grid)
        if grid[0] * grid[1] != m:
            raise ValueError(f"grid {grid} has {grid[0] * grid[1]} patches, ids_restore has {m}")
        x = self.proj(visible_feats)  # (B, K + 1, Dd)
        mid = (n - 1) // 2  # the encoder's cls index
        cls, vis = x[:, mid : mid + 1], torch.cat([x[:, :mid], x[:, mid + 1 :]], dim=1)  # (B,1,Dd), (B,K,Dd)
        masked = self.mask_token.to(x.dtype).expand(b, m - vis.shape[1], -1)  # (B, M - K, Dd)
        x = torch.cat([vis, masked], dim=1)  # (B, M, Dd): visible then masked
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # raster order
        x = join_pos_embed(cls, x)  # (B, M + 1, Dd), cls at M // 2
        return x + self.pos_embed_for(grid).to(x.dtype)


def _drop_middle(x: torch.Tensor) -> torch.Tensor:
    # (B, M + 1, D) with cls at M // 2 -> (B, M, D)
    mid = (x.shape[1] - 1) // 2
    return torch.cat([x[:, :mid], x[:, mid + 1 :]], dim=1)


# --------------------------------------------------------------------------------- decoders
class MambaDecoder(nn.Module):
    """MAE-style decoder of bidirectional Mamba blocks (see the module docstring).

    forward(visible_feats (B, K + 1, D_enc), ids_restore (B, M), grid=None) -> (B, M, patch_dim).
    ``grid`` defaults to the init grid, or a square one for another M.
    """

    def __init__(
        self,
        encoder_dim: int,
        patch_dim: int,
        grid: tuple[int, int],
        decoder_dim: int = 512,
        depth: int = 4,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        drop_path_rate: float = 0.0,
        pos_embed: str = "sincos",
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.depth = depth
        self.backend = check_backend(backend)
        self.embed = DecoderEmbed(encoder_dim, decoder_dim, grid, pos_embed)
        self.layers = build_blocks(
            decoder_dim, depth, drop_path_rate, d_state, d_conv, expand, norm_eps, backend
        )
        self.norm_f = RMSNorm(decoder_dim, eps=norm_eps)
        self.pred = nn.Linear(decoder_dim, patch_dim)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """As the encoder: zero Linear biases (but dt_proj's), out_proj kaiming-uniform / sqrt(depth),
        SSM parameters keep the mixer's init; xavier-uniform prediction layer."""
        init_blocks(self.layers)
        nn.init.xavier_uniform_(self.pred.weight)
        nn.init.zeros_(self.pred.bias)

    def no_weight_decay(self) -> set[str]:
        """Mask token, position embedding, and the mixers' A_log and D."""
        names = {"embed.mask_token", "embed.pos_embed"}
        names.update(n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False))
        return names

    def set_backend(self, backend: str) -> None:
        """Switch the kernel path of every mixer (the parameters stay the same)."""
        set_blocks_backend(self.layers, backend)
        self.backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(
        self, visible_feats: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        residual = self.embed(visible_feats, ids_restore, grid)  # (B, M + 1, Dd)
        x = run_blocks(
            self.layers, residual, self.norm_f, self.backend, self.grad_checkpointing
        )  # (B, M + 1, Dd)
        return self.pred(_drop_middle(x))  # (B, M, patch_dim)


class TransformerDecoder(nn.Module):
    """MAE's decoder: pre-norm Transformer blocks (GELU), same interface as :class:`MambaDecoder`."""

    def __init__(
        self,
        encoder_dim: int,
        patch_dim: int,
        grid: tuple[int, int],
        decoder_dim: int = 512,
        depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pos_embed: str = "sincos",
    ) -> None:
        super().__init__()
        if decoder_dim % num_heads:
            raise ValueError(f"decoder_dim {decoder_dim} is not divisible by num_heads {num_heads}")
        self.embed = DecoderEmbed(encoder_dim, decoder_dim, grid, pos_embed)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                decoder_dim,
                num_heads,
                dim_feedforward=int(decoder_dim * mlp_ratio),
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_dim)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """MAE's init: xavier-uniform Linear weights, zero biases (LayerNorms keep 1 / 0)."""
        for module in [*self.layers.modules(), self.pred]:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        return {"embed.mask_token", "embed.pos_embed"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(
        self, visible_feats: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int] | None = None
    ) -> torch.Tensor:
        x = self.embed(visible_feats, ids_restore, grid)  # (B, M + 1, Dd)
        for blk in self.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.pred(_drop_middle(self.norm(x)))  # (B, M, patch_dim)


class LinearDecoder(nn.Module):
    """SimMIM's prediction head: one linear layer per patch token.

    forward(feats (B, M + 1, D) with cls at index M // 2) -> (B, M, patch_dim). (SimMIM's 1x1 conv
    plus pixel shuffle is the same map.)
    """

    def __init__(self, encoder_dim: int, patch_dim: int) -> None:
        super().__init__()
        self.pred = nn.Linear(encoder_dim, patch_dim)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.pred(_drop_middle(feats))


_DECODERS = {"mamba": MambaDecoder, "transformer": TransformerDecoder}


def build_decoder(kind: str, **kwargs) -> nn.Module:
    """``build_decoder("mamba", encoder_dim=..., patch_dim=..., grid=..., ...)``; kwargs go to the class."""
    if kind not in _DECODERS:
        raise ValueError(
            f"unknown decoder kind {kind!r}; choose one of {', '.join(DECODER_KINDS)} "
            "(SimMIM's LinearDecoder is built directly)"
        )
    return _DECODERS[kind](**kwargs)
