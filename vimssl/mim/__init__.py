"""Masked image modeling pieces: mask generators and their indices, pixel targets and the masked
loss, and light decoders. Imports torch only; the Lightning system that composes them lives
elsewhere."""

from vimssl.mim.decoders import (
    DECODER_KINDS,
    DecoderEmbed,
    LinearDecoder,
    MambaDecoder,
    TransformerDecoder,
    build_decoder,
    sincos_pos_embed_2d,
)
from vimssl.mim.masking import (
    MASK_KINDS,
    block_mask,
    make_mask,
    mask_to_ids,
    num_masked,
    random_mask,
    row_mask,
)
from vimssl.mim.targets import (
    check_mim_compatible,
    denormalize_prediction,
    masked_mse,
    patchify,
    pixel_target,
    unpatchify,
)

__all__ = [
    "DECODER_KINDS",
    "MASK_KINDS",
    "DecoderEmbed",
    "LinearDecoder",
    "MambaDecoder",
    "TransformerDecoder",
    "block_mask",
    "build_decoder",
    "check_mim_compatible",
    "denormalize_prediction",
    "make_mask",
    "mask_to_ids",
    "masked_mse",
    "num_masked",
    "patchify",
    "pixel_target",
    "random_mask",
    "row_mask",
    "sincos_pos_embed_2d",
    "unpatchify",
]
