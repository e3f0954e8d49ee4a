"""Patch masks for masked image modeling, and the index bookkeeping that goes with them.

Every generator is a pure function ``(batch, grid, mask_ratio, generator, device, ...)`` returning a
bool mask (B, M), M = gh * gw patches in raster (row-major) order, True = masked ("1 is remove" in
MAE). Every sample gets exactly :func:`num_masked` ``= round(M * mask_ratio)`` masked patches, so
the visible tokens of a batch stack into (B, K, D).

- :func:`random_mask`: uniform random patches (MAE, He et al. 2021: argsort of noise).
- :func:`block_mask`: random rectangles of sampled area and aspect ratio (BEiT, Bao et al. 2021;
  the SimMIM paper's "block-wise" baseline).
- :func:`row_mask`: whole rows and contiguous runs within rows, so the masked and the visible
  parts stay contiguous along Vim's raster scan (the row/scan-aligned masking of Mamba MIM work
  such as MAP, arXiv 2410.00871).

Randomness comes from ``generator`` (a ``torch.Generator``; the global RNG when None) and is drawn
on the generator's device (the CPU by default); masks are then moved to ``device``. The block and
row generators seed a Python ``random.Random`` from the generator and loop over samples: they are
meant for a few hundred samples of a few hundred patches per call, not for huge grids.

This module holds no model, loss or training code.
"""

from __future__ import annotations

import math
import random

import torch

MASK_KINDS = ("random", "block", "row")


# ----------------------------------------------------------------------------- helpers
def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Masked patches per sample: ``round(num_patches * mask_ratio)``; at least one stays visible."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n = round(num_patches * mask_ratio)
    if n >= num_patches:
        raise ValueError(
            f"mask_ratio {mask_ratio} masks all {num_patches} patches; at least one must stay visible"
        )
    return n


def _check_grid(grid: tuple[int, int]) -> tuple[int, int]:
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"grid must have positive sides, got {tuple(grid)}")
    return gh, gw


def _rng_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _python_rng(generator: torch.Generator | None) -> random.Random:
    """A Python RNG seeded from ``generator`` (or the global torch RNG): reproducible, and much
    faster than one tiny torch call per random number in per-sample loops."""
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=_rng_device(generator))
    return random.Random(int(seed))


def _fix_count(mask: torch.Tensor, target: int, rng: random.Random) -> torch.Tensor:
    """Unmask or mask random cells of a flat bool mask (M,) until exactly ``target`` are masked."""
    count = int(mask.sum())
    if count > target:
        on = mask.nonzero().flatten().tolist()
        mask[rng.sample(on, count - target)] = False
    elif count < target:
        off = (~mask).nonzero().flatten().tolist()
        mask[rng.sample(off, target - count)] = True
    return mask


# ---------------------------------------------------------------------------- generators
def random_mask(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniformly random patches (MAE): (B, M) bool, True = masked."""
    gh, gw = _check_grid(grid)
    m = gh * gw
    n = num_masked(m, mask_ratio)
    # drawn where the mask is wanted when no generator is given (no host copy: capturable in a
    # CUDA graph), else on the generator's device
    where = device if generator is None and device is not None else _rng_device(generator)
    noise = torch.rand(batch, m, generator=generator, device=where)  # (B, M)
    ids = noise.argsort(dim=1)[:, :n]  # (B, n): the n smallest noises are masked
    mask = torch.zeros(batch, m, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, ids, True)
    return mask.to(device) if device is not None else mask


def block_mask(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_block_patches: int = 4,
    max_block_patches: int | None = None,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
) -> torch.Tensor:
    """Random rectangles (BEiT's block-wise masking): (B, M) bool, True = masked.

    Per sample, blocks are added until the masked count reaches the target: a block's area is
    uniform in ``[min_block_patches, min(max_block_patches, remaining)]`` and its aspect ratio
    log-uniform in ``[min_aspect, 1 / min_aspect]``; a block is kept when it masks at least one new
    patch and no more than the remaining count (``max_attempts`` tries, then random top-up).
    NOTE: BEiT stops short of the target when placement fails; we top up with random patches
    (and trim, for safety) so that the count is exact.
    """
    gh, gw = _check_grid(grid)
    m = gh * gw
    target = num_masked(m, mask_ratio)
    if min_block_patches < 1 or not 0.0 < min_aspect <= 1.0:
        raise ValueError("need min_block_patches >= 1 and 0 < min_aspect <= 1")
    max_block = m if max_block_patches is None else max_block_patches
    log_aspect = (math.log(min_aspect), -math.log(min_aspect))
    rng = _python_rng(generator)

    masks = torch.zeros(batch, gh, gw, dtype=torch.bool)
    for mask in masks:  # (gh, gw) views
        count = 0
        while count < target:
            remaining = target - count
            hi = min(max_block, remaining)
            lo = min(min_block_patches, hi)
            added = 0
            for _ in range(max_attempts):
                area = rng.uniform(lo, hi)
                aspect = math.exp(rng.uniform(*log_aspect))
                h = round(math.sqrt(area * aspect))
                w = round(math.sqrt(area / aspect))
                if not (1 <= h <= gh and 1 <= w <= gw):
                    continue
                top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
                block = mask[top : top + h, left : left + w]  # (h, w) view
                new = h * w - int(block.sum())
                if 0 < new <= remaining:
                    block.fill_(True)
                    added = new
                    break
            if added == 0:
                break  # no block fits: top up below
            count += added
        _fix_count(mask.view(-1), target, rng)
    masks = masks.view(batch, m)  # (B, M)
    return masks.to(device) if device is not None else masks


def row_mask(
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    row_fraction: float = 0.5,
    min_run: int | None = None,
) -> torch.Tensor:
    """Whole rows plus contiguous horizontal runs, aligned with the raster scan: (B, M) bool.

    Of the n masked patches per sample, ``floor(row_fraction * n / gw)`` whole rows are chosen at
    random; the r patches left are spread over other random rows as one contiguous run per row
    (random start), using between ``ceil(r / gw)`` and ``r // min_run`` rows (random, at most the
    free rows), each run at least ``min_run`` long where that is possible (default ``gw // 2``).
    ``row_fraction = 1`` masks as many whole rows as fit and one partial run; 0 only runs.
    """
    gh, gw = _check_grid(grid)
    n = num_masked(gh * gw, mask_ratio)
    if not 0.0 <= row_fraction <= 1.0:
        raise ValueError(f"row_fraction must be in [0, 1], got {row_fraction}")
    min_run = max(1, gw // 2) if min_run is None else min_run
    if not 1 <= min_run <= gw:
        raise ValueError(f"min_run must be in [1, {gw}] for a grid {gh}x{gw}, got {min_run}")
    rng = _python_rng(generator)
    n_full = min(gh, math.floor(row_fraction * n / gw))
    r = n - n_full * gw  # patches left for partial runs

    masks = torch.zeros(batch, gh, gw, dtype=torch.bool)
    for mask in masks:  # (gh, gw) views
        rows = rng.sample(range(gh), gh)  # random row order: whole rows first, then run rows
        mask[rows[:n_full]] = True
        if r == 0:
            continue
        free = gh - n_full
        k_min = math.ceil(r / gw)  # <= free since n < gh * gw
        k = rng.randint(k_min, max(k_min, min(free, r // min_run)))
        lo = min(min_run, r // k)
        left = r
        for j, row in enumerate(rows[n_full : n_full + k]):
            parts = k - j  # runs still to place, this one included
            length = rng.randint(max(lo, left - (parts - 1) * gw), min(gw, left - (parts - 1) * lo))
            start = rng.randint(0, gw - length)
            mask[row, start : start + length] = True
            left -= length
    masks = masks.view(batch, gh * gw)  # (B, M)
    return masks.to(device) if device is not None else masks


_GENERATORS = {"random": random_mask, "block": block_mask, "row": row_mask}


def make_mask(
    kind: str,
    batch: int,
    grid: tuple[int, int],
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> torch.Tensor:
    """Dispatch to ``random_mask`` / ``block_mask`` / ``row_mask`` by name; kwargs go to it."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    return _GENERATORS[kind](batch, grid, mask_ratio, generator, device, **kwargs)


# ------------------------------------------------------------------------------- indices
def mask_to_ids(
    mask: torch.Tensor, visible: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices for encoding the visible patches and putting predictions back in place.

    mask: (B, M) bool, True = masked, the same count K of visible patches in every row. Returns
    ``ids_keep`` (B, K) and ``ids_masked`` (B, M - K), each in raster order, and ``ids_restore``
    (B, M) such that ``torch.gather(torch.cat([visible, masked], 1), 1, ids_restore)`` is in raster
    order again (MAE's convention). ``visible``: K when the caller knows it (a mask it drew), which
    skips counting and checking it on the host (no device synchronisation).
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must have shape (B, M), got {tuple(mask.shape)}")
    mask = mask.bool()
    if visible is None:
        counts = (~mask).sum(dim=1)  # (B,)
        k = int(counts[0]) if mask.shape[0] else 0
        if not bool((counts == k).all()):
            raise ValueError(f"every sample needs the same number of visible patches, got {counts.tolist()}")
    elif not 0 <= visible <= mask.shape[1]:
        raise ValueError(f"visible={visible} is not a patch count of masks with {mask.shape[1]} patches")
    else:
        k = visible
    # stable sort of 0 (visible) before 1 (masked) keeps raster order within each part
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # (B, M)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, M)
    return ids_shuffle[:, :k], ids_shuffle[:, k:], ids_restore
