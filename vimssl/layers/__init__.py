"""Building blocks that know no architecture: patch embedding, position-embedding resampling,
stochastic depth, RMSNorm."""

from vimssl.layers.drop_path import DropPath, drop_path
from vimssl.layers.norm import RMSNorm, add_rms_norm
from vimssl.layers.patch_embed import PatchEmbed, grid_size
from vimssl.layers.pos_embed import resample_pos_embed, split_pos_embed

__all__ = [
    "DropPath",
    "PatchEmbed",
    "RMSNorm",
    "add_rms_norm",
    "drop_path",
    "grid_size",
    "resample_pos_embed",
    "split_pos_embed",
]
