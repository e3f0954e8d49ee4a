"""Mask generators and index bookkeeping of vimssl.mim.masking."""

from __future__ import annotations

import pytest
import torch

from vimssl.mim.masking import MASK_KINDS, make_mask, mask_to_ids, num_masked, random_mask, row_mask

GRIDS = [(8, 8), (14, 14), (6, 10), (1, 7)]
RATIOS = [0.0, 0.3, 0.5, 0.75, 0.9]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mean_run_length(mask: torch.Tensor, grid: tuple[int, int]) -> float:
    """Mean length of the horizontal runs of masked patches (runs do not cross rows)."""
    rows = mask.view(-1, grid[1]).int()  # (B * gh, gw)
    starts = rows[:, 0].sum() + (rows[:, 1:] > rows[:, :-1]).sum()  # 0 -> 1 steps
    return float(rows.sum() / starts.clamp(min=1))


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_count_and_ids(kind, grid, ratio):
    batch, m = 6, grid[0] * grid[1]
    mask = make_mask(kind, batch, grid, ratio, _gen())
    assert mask.shape == (batch, m) and mask.dtype == torch.bool
    n = round(m * ratio)
    assert n == num_masked(m, ratio)
    assert mask.sum(dim=1).tolist() == [n] * batch

    ids_keep, ids_masked, ids_restore = mask_to_ids(mask)
    assert ids_keep.shape == (batch, m - n) and ids_masked.shape == (batch, n)
    both = torch.cat([ids_keep, ids_masked], dim=1)  # (B, M)
    assert torch.equal(both.sort(dim=1).values, torch.arange(m).expand(batch, -1))  # a permutation
    assert not mask.gather(1, ids_keep).any() and mask.gather(1, ids_masked).all()
    assert torch.equal(ids_keep, ids_keep.sort(dim=1).values)  # raster order
    assert torch.equal(ids_masked, ids_masked.sort(dim=1).values)
    # MAE convention: gather(cat([visible, masked]), ids_restore) is raster order again
    values = torch.randn(batch, m, 3)
    vis = values.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, 3))
    msk = values.gather(1, ids_masked.unsqueeze(-1).expand(-1, -1, 3))
    restored = torch.gather(torch.cat([vis, msk], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(restored, values)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_samples_differ_and_generator_reproduces(kind):
    a = make_mask(kind, 8, (8, 8), 0.5, _gen(1))
    b = make_mask(kind, 8, (8, 8), 0.5, _gen(1))
    c = make_mask(kind, 8, (8, 8), 0.5, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) > 1  # not one mask for the whole batch


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_device_argument(kind):
    mask = make_mask(kind, 2, (4, 4), 0.5, None, device="cpu")
    assert mask.device.type == "cpu" and mask.sum().item() == 16


def test_row_mask_forms_long_horizontal_runs():
    grid = (14, 14)
    rand = random_mask(64, grid, 0.6, _gen())
    rows = row_mask(64, grid, 0.6, _gen(), row_fraction=0.0)
    assert _mean_run_length(rows, grid) > 2.5 * _mean_run_length(rand, grid)
    assert _mean_run_length(rows, grid) >= 7  # runs at least gw // 2 long where possible


def test_row_mask_whole_rows():
    grid = (8, 8)
    mask = row_mask(16, grid, 0.5, _gen(), row_fraction=1.0).view(16, 8, 8)
    assert (mask.all(dim=2).sum(dim=1) == 4).all()  # 32 masked = 4 whole rows


def test_block_mask_is_blocky():
    grid = (14, 14)
    rand = random_mask(32, grid, 0.4, _gen()).view(32, 14, 14).float()
    block = make_mask("block", 32, grid, 0.4, _gen()).view(32, 14, 14).float()

    def same_as_right_neighbour(m):
        return (m[:, :, 1:] == m[:, :, :-1]).float().mean()

    assert same_as_right_neighbour(block) > same_as_right_neighbour(rand) + 0.2


def test_errors():
    with pytest.raises(ValueError, match="random, block, row"):
        make_mask("checkerboard", 2, (4, 4), 0.5)
    with pytest.raises(ValueError, match="mask_ratio"):
        random_mask(2, (4, 4), 1.0)
    with pytest.raises(ValueError, match="visible"):
        random_mask(2, (2, 2), 0.9)  # round(3.6) = 4 of 4
    with pytest.raises(ValueError, match="same number"):
        mask_to_ids(torch.tensor([[True, False], [False, False]]))


def test_mask_to_ids_with_the_visible_count_given_agrees():
    # the pretraining module passes the count of a mask it drew (no host sync: CUDA-graph capturable)
    mask = make_mask("random", 3, (4, 4), 0.75)
    given = mask_to_ids(mask, visible=4)
    for a, b in zip(given, mask_to_ids(mask)):
        assert torch.equal(a, b)


def test_mask_to_ids_refuses_an_impossible_visible_count():
    mask = make_mask("random", 2, (4, 4), 0.75)
    with pytest.raises(ValueError, match="visible=17 .* 16 patches"):
        mask_to_ids(mask, visible=17)
