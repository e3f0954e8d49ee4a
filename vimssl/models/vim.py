"""Vision Mamba encoder (Zhu et al. 2024, arXiv 2401.09417), key-for-key compatible with the
released ``hustvl/Vim-*-midclstok`` checkpoints.

Images -> strided-conv patch tokens (raster order) -> a learned cls token inserted in the middle
of the token sequence -> learned absolute position embedding -> ``depth`` pre-norm residual blocks
of bidirectional Mamba mixers (residual stream in float32) -> final RMSNorm -> head on the cls
token.

This module knows nothing about training frameworks; build models through
:func:`vimssl.models.create_model`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vimssl.layers.norm import RMSNorm
from vimssl.layers.patch_embed import PatchEmbed, grid_size
from vimssl.layers.pos_embed import resample_pos_embed, split_pos_embed
from vimssl.models.blocks import build_blocks, init_blocks, run_blocks, set_blocks_backend
from vimssl.ssm.dispatch import check_backend


class VisionMamba(nn.Module):
    """Vim encoder + classifier.

    Calling the model maps images (B, C, H, W) to logits (B, num_classes) (or to the cls feature
    (B, D) when ``num_classes == 0``). Any input size and aspect ratio works: the position
    embedding is resampled for the actual patch grid.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        stride: int | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 24,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        stride = patch_size if stride is None else stride
        # everything needed to rebuild this model (saved with checkpoints and Hub exports)
        self.config = dict(
            img_size=list(img_size), patch_size=patch_size, stride=stride, in_chans=in_chans,
            num_classes=num_classes, embed_dim=embed_dim, depth=depth, d_state=d_state,
            d_conv=d_conv, expand=expand, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
        )  # fmt: skip
        self.img_size = img_size
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.backend = check_backend(backend)
        self.grid = grid_size(img_size, patch_size, stride)
        num_patches = self.grid[0] * self.grid[1]

        self.patch_embed = PatchEmbed(patch_size, stride, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.layers = build_blocks(
            embed_dim, depth, drop_path_rate, d_state, d_conv, expand, norm_eps, backend
        )
        self.norm_f = RMSNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """The release's init: trunc-normal(0.02) cls/pos/head, lecun-normal patch conv, zero
        Linear biases (but dt_proj's), out_proj kaiming-uniform / sqrt(depth); SSM parameters keep
        the mixer's own init."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.proj.weight
        fan_in = w.shape[1] * w.shape[2] * w.shape[3]
        # lecun normal: truncated normal with variance 1/fan_in (0.8796 corrects the truncation)
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / fan_in) / 0.87962566103423978)
        nn.init.zeros_(self.patch_embed.proj.bias)
        init_blocks(self.layers)
        self._init_head()

    def _init_head(self) -> None:
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    # ----------------------------------------------------------- training hooks
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay: pos/cls embeddings, A_log and D of
        both branches. (Optimiser helpers also exclude every 1-d parameter: norms and biases.)"""
        names = {"pos_embed", "cls_token"}
        names.update(n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False))
        return names

    @property
    def num_layer_ids(self) -> int:
        """Layer ids run from 0 (embeddings) to depth + 1 (final norm and head)."""
        return self.depth + 2

    def layer_id(self, param_name: str) -> int:
        """Layer id of a parameter for layer-wise learning-rate decay."""
        if param_name.startswith(("patch_embed", "cls_token", "pos_embed")):
            return 0
        if param_name.startswith("layers."):
            return int(param_name.split(".")[1]) + 1
        return self.depth + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_backend(self, backend: str) -> None:
        """Switch the kernel path of every mixer (the parameters stay the same)."""
        set_blocks_backend(self.layers, backend)
        self.backend = backend

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head for ``num_classes`` classes (0: no head, the model returns features)."""
        self.num_classes = self.config["num_classes"] = num_classes
        head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head = head.to(self.cls_token.device, self.cls_token.dtype)
        self._init_head()

    # ----------------------------------------------------------------- forward
    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embedding (1, gh*gw + 1, D) for a patch grid, resampled if it differs."""
        if tuple(grid) == tuple(self.grid):
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, self.grid, grid)

    def embed(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with position embedding, and the cls token with its own.

        x: (B, C, H, W) -> patches (B, M, D), cls (B, 1, D). With ``mask`` (B, M) bool, True =
        masked, and ``mask_token`` (1, 1, D), masked patches are replaced by the mask token before
        the position embedding is added (SimMIM).
        """
        tokens, grid = self.patch_embed(x)  # (B, M, D)
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs a mask_token to put in the masked places")
            if mask.shape != tokens.shape[:2]:
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(tokens.shape[:2])}")
            tokens = torch.where(mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
        cls_pos, patch_pos = split_pos_embed(self.pos_embed_for(grid))
        cls = (self.cls_token + cls_pos).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return tokens + patch_pos, cls

    def forward_tokens(
        self, tokens: torch.Tensor, cls: torch.Tensor, last_k: int = 0
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the blocks on patch tokens (B, K, D) in the given order with the cls token
        (B, 1, D) inserted at index K // 2; returns normalised features (B, K + 1, D), or with
        ``last_k > 0`` the list of the last ``last_k`` blocks' normalised outputs."""
        if not 0 <= last_k <= self.depth:
            raise ValueError(f"last_k must be in [0, depth={self.depth}], got {last_k}")
        mid = tokens.shape[1] // 2
        x = torch.cat([tokens[:, :mid], cls, tokens[:, mid:]], dim=1)  # (B, K+1, D)
        return run_blocks(
            self.layers, self.pos_drop(x), self.norm_f, self.backend, self.grad_checkpointing, last_k
        )

    def forward_features(
        self,
        x: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Features of all tokens, (B, K + 1, D) with the cls token at index K // 2.

        ids_keep: (B, K) indices into the M patch tokens: encode only those patches, in that order
        (masked-image pretraining that drops masked tokens). mask / mask_token: see :meth:`embed`.
        """
        tokens, cls = self.embed(x, mask, mask_token)  # (B, M, D), (B, 1, D)
        if ids_keep is not None:
            if ids_keep.ndim != 2 or ids_keep.shape[0] != tokens.shape[0]:
                raise ValueError(f"ids_keep must have shape (B, K), got {tuple(ids_keep.shape)}")
            index = ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = torch.gather(tokens, 1, index)  # (B, K, D)
        return self.forward_tokens(tokens, cls)

    def forward_intermediates(self, x: torch.Tensor, last_k: int) -> list[torch.Tensor]:
        """Normalised outputs (B, M + 1, D) of the last ``last_k`` blocks, oldest first (each
        through the final norm; the last equals :meth:`forward_features`). For linear probes on
        concatenated layers."""
        tokens, cls = self.embed(x)
        return self.forward_tokens(tokens, cls, last_k=last_k)

    @staticmethod
    def cls_index(num_tokens: int) -> int:
        """Index of the cls token in a sequence of ``num_tokens`` = K + 1 features."""
        return (num_tokens - 1) // 2

    def split_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K + 1, D) -> cls feature (B, D) and patch features (B, K, D) in input order."""
        i = self.cls_index(feats.shape[1])
        return feats[:, i], torch.cat([feats[:, :i], feats[:, i + 1 :]], dim=1)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        cls = feats[:, self.cls_index(feats.shape[1])]  # (B, D)
        return cls if pre_logits else self.head(cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))
