"""Pixel targets, the masked loss and the MIM compatibility check of vimssl.mim.targets."""

from __future__ import annotations

import pytest
import torch

from vimssl import create_model
from vimssl.mim.targets import (
    check_mim_compatible,
    denormalize_prediction,
    masked_mse,
    patchify,
    pixel_target,
    unpatchify,
)


def test_patchify_layout_and_round_trip():
    imgs = torch.randn(2, 3, 12, 16)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 3 * 4, 4 * 4 * 3)
    # patch (row 1, col 2) holds pixels [4:8, 8:12], flattened as (p, p, C)
    expected = imgs[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 1 * 4 + 2], expected)
    assert torch.equal(unpatchify(patches, 4, (3, 4), channels=3), imgs)


def test_patchify_one_channel_and_errors():
    imgs = torch.randn(1, 1, 8, 8)
    assert torch.equal(unpatchify(patchify(imgs, 2), 2, (4, 4), channels=1), imgs)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 3, 10, 8), 4)
    with pytest.raises(ValueError, match="do not fit"):
        unpatchify(torch.randn(1, 5, 48), 4, (2, 2))


def test_pixel_target_norm_pix():
    imgs = torch.rand(2, 3, 16, 16) * 5 + 2
    raw = pixel_target(imgs, 4, norm_pix=False)
    assert torch.equal(raw, patchify(imgs, 4))
    target = pixel_target(imgs, 4, norm_pix=True)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(target.var(-1), torch.ones(2, 16), atol=1e-3)  # unbiased, as MAE
    # denormalising the normalised target gives the pixels back
    assert torch.allclose(denormalize_prediction(target, imgs, 4), raw, atol=1e-4)


def test_masked_mse_ignores_visible_patches():
    torch.manual_seed(0)
    target = torch.randn(2, 6, 5)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    pred = torch.randn(2, 6, 5, requires_grad=True)
    loss = masked_mse(pred, target, mask)
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    assert torch.allclose(loss, expected)

    changed = pred.detach().clone()
    changed[~mask] = float("nan")  # anything at visible patches
    changed.requires_grad_(True)
    loss2 = masked_mse(changed, target, mask)
    assert torch.allclose(loss2, loss)
    loss2.backward()
    assert torch.equal(changed.grad[~mask], torch.zeros_like(changed.grad[~mask]))
    assert (changed.grad[mask].abs().sum(-1) > 0).all()


def test_masked_mse_no_masked_patch_is_zero():
    pred = torch.randn(1, 4, 3, requires_grad=True)
    loss = masked_mse(pred, torch.randn(1, 4, 3), torch.zeros(1, 4, dtype=torch.bool))
    assert loss.item() == 0.0


def test_check_mim_compatible():
    assert check_mim_compatible(create_model("vim_test")) == 4
    with pytest.raises(ValueError, match="stride == patch_size"):
        check_mim_compatible(create_model("vim_test", stride=2))
    with pytest.raises(TypeError, match="patch_embed"):
        check_mim_compatible(torch.nn.Linear(2, 2))
