"""MIM decoders of vimssl.mim.decoders, and an end-to-end MAE-style sanity run on vim_test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vimssl import create_model
from vimssl.mim.decoders import (
    LinearDecoder,
    MambaDecoder,
    TransformerDecoder,
    build_decoder,
    sincos_pos_embed_2d,
)
from vimssl.mim.masking import mask_to_ids, random_mask
from vimssl.mim.targets import masked_mse, pixel_target

ENC_DIM, PATCH_DIM, GRID = 24, 4 * 4 * 3, (4, 4)
SMALL = dict(
    mamba=dict(decoder_dim=16, depth=2, d_state=4, backend="torch"),
    transformer=dict(decoder_dim=16, depth=2, num_heads=4),
)


def _decoder(kind: str, pos_embed: str = "sincos", grid=GRID):
    torch.manual_seed(0)
    kwargs = dict(encoder_dim=ENC_DIM, patch_dim=PATCH_DIM, grid=grid, pos_embed=pos_embed)
    return build_decoder(kind, **kwargs, **SMALL[kind])


def _inputs(batch: int, grid: tuple[int, int], ratio: float = 0.75, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask(batch, grid, ratio, g)
    ids_keep, _, ids_restore = mask_to_ids(mask)
    feats = torch.randn(batch, ids_keep.shape[1] + 1, ENC_DIM, generator=g)  # (B, K + 1, D)
    return feats, ids_restore, mask


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_shapes_and_gradients(kind, pos_embed):
    dec = _decoder(kind, pos_embed)
    feats, ids_restore, mask = _inputs(3, GRID)
    feats.requires_grad_(True)
    pred = dec(feats, ids_restore)
    assert pred.shape == (3, 16, PATCH_DIM)
    masked_mse(pred, torch.randn_like(pred), mask).backward()
    no_grad = [n for n, p in dec.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert feats.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["mamba", "transformer"])
@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_other_grid(kind, pos_embed):
    dec = _decoder(kind, pos_embed)
    feats, ids_restore, _ = _inputs(2, (6, 6))
    assert dec(feats, ids_restore).shape == (2, 36, PATCH_DIM)  # square grid inferred
    feats, ids_restore, _ = _inputs(2, (3, 5))
    assert dec(feats, ids_restore, grid=(3, 5)).shape == (2, 15, PATCH_DIM)
    with pytest.raises(ValueError, match="grid"):
        dec(feats, ids_restore)  # 15 patches: not square, not the init grid


def test_visible_tokens_land_in_place():
    """The decoder's input sequence holds each visible token at its raster slot, the mask token at
    the masked slots and the encoder's cls token in the middle."""
    dec = _decoder("mamba")
    feats, ids_restore, mask = _inputs(2, GRID, ratio=0.5)
    seq = dec.embed(feats, ids_restore) - dec.embed.pos_embed  # (B, M + 1, Dd), cls at M // 2
    proj = dec.embed.proj(feats)  # (B, K + 1, Dd), cls at K // 2
    k = feats.shape[1] - 1
    m = ids_restore.shape[1]
    assert torch.allclose(seq[:, m // 2], proj[:, k // 2], atol=1e-6)
    patches = torch.cat([seq[:, : m // 2], seq[:, m // 2 + 1 :]], dim=1)  # (B, M, Dd)
    vis = torch.cat([proj[:, : k // 2], proj[:, k // 2 + 1 :]], dim=1)  # (B, K, Dd)
    ids_keep, ids_masked, _ = mask_to_ids(mask)
    for b in range(2):
        assert torch.allclose(patches[b, ids_keep[b]], vis[b], atol=1e-6)
        assert torch.allclose(
            patches[b, ids_masked[b]], dec.embed.mask_token[0].expand(m // 2, -1), atol=1e-6
        )


def test_mamba_decoder_set_backend_and_checkpointing():
    dec = _decoder("mamba")
    feats, ids_restore, _ = _inputs(2, GRID)
    ref = dec(feats, ids_restore)
    dec.set_backend("auto")
    assert all(blk.mixer.backend == "auto" for blk in dec.layers)
    dec.set_grad_checkpointing(True)
    dec.train()
    assert torch.allclose(dec(feats, ids_restore), ref, atol=1e-6)
    with pytest.raises(ValueError, match="backend"):
        dec.set_backend("jax")


def test_no_weight_decay_names_exist():
    dec = _decoder("mamba", "learned")
    names = dict(dec.named_parameters())
    nwd = dec.no_weight_decay()
    assert {"embed.mask_token", "embed.pos_embed", "layers.0.mixer.A_log"} <= nwd <= set(names)


def test_linear_decoder_and_errors():
    dec = LinearDecoder(ENC_DIM, PATCH_DIM)
    feats = torch.randn(2, 17, ENC_DIM)
    out = dec(feats)
    assert out.shape == (2, 16, PATCH_DIM)
    patches = torch.cat([feats[:, :8], feats[:, 9:]], dim=1)  # cls at index 8 dropped
    assert torch.allclose(out, dec.pred(patches))
    with pytest.raises(ValueError, match="mamba, transformer"):
        build_decoder("conv", encoder_dim=4, patch_dim=4, grid=(2, 2))
    with pytest.raises(ValueError, match="pos_embed"):
        MambaDecoder(4, 4, (2, 2), decoder_dim=8, pos_embed="rope")
    with pytest.raises(ValueError, match="num_heads"):
        TransformerDecoder(4, 4, (2, 2), decoder_dim=10, num_heads=4)


def test_sincos_pos_embed():
    emb = sincos_pos_embed_2d(16, (3, 5))
    assert emb.shape == (15, 16)
    assert torch.allclose(emb[0], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1] * 2))
    assert len({tuple(r.tolist()) for r in emb}) == 15  # all positions distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, (2, 2))


def test_end_to_end_mae_loss_decreases():
    """vim_test encoder + Mamba decoder + random mask + masked MSE: Adam lowers the loss."""
    torch.manual_seed(0)
    encoder = create_model("vim_test", num_classes=0, backend="torch")
    p = encoder.patch_embed.patch_size
    decoder = MambaDecoder(
        encoder.embed_dim, p * p * 3, encoder.grid, decoder_dim=16, depth=1, d_state=4, backend="torch"
    )
    # smooth images, so that masked patches are predictable from visible ones
    imgs = F.interpolate(torch.rand(4, 3, 4, 4), size=(32, 32), mode="bilinear")  # (B, 3, 32, 32)
    target = pixel_target(imgs, p, norm_pix=True)  # (B, M, P)
    mask = random_mask(4, encoder.grid, 0.75, torch.Generator().manual_seed(0))
    ids_keep, _, ids_restore = mask_to_ids(mask)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-2)

    losses = []
    for _ in range(30):
        feats = encoder.forward_features(imgs, ids_keep=ids_keep)  # (B, K + 1, D)
        loss = masked_mse(decoder(feats, ids_restore), target, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert losses[-1] < 0.9, losses  # beats predicting each patch's mean (loss ~1)
