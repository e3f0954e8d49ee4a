"""Where a transferred encoder comes from: one argument, ``encoder``, that is

- a registry name (``vim_small_patch16_224``): fresh, randomly initialised weights (from scratch);
- a ``.ckpt`` written by this project's training (pretraining or classification): the encoder
  weights inside it, found through the checkpoint's ``vimssl`` entry;
- anything :func:`vimssl.from_pretrained` takes: a Hub repo id or local folder in the vimssl Hub
  format, a released hustvl/Vim repo id or ``.pth`` file.

The head is rebuilt for ``num_classes`` and the position embedding resampled for ``img_size``.
Loading is strict: every encoder tensor must be found (only the head may be new), and what was
not used is reported by name.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from vimssl.checkpoint import build_model, check_meta, read_checkpoint, select_weights
from vimssl.models import MODEL_SIZES, VisionMamba, create_model

log = logging.getLogger("vimssl")


class EncoderSourceError(ValueError):
    pass


def load_encoder(
    source: str,
    *,
    num_classes: int,
    img_size: int | None = None,
    which: str = "auto",
    drop_path_rate: float | None = None,
    backend: str = "auto",
) -> VisionMamba:
    """Build the encoder named by ``source`` with a fresh head of ``num_classes`` (0: no head)."""
    overrides: dict = {"num_classes": num_classes, "backend": backend}
    if img_size is not None:
        overrides["img_size"] = img_size
    if drop_path_rate is not None:
        overrides["drop_path_rate"] = drop_path_rate
    if source in MODEL_SIZES:
        log.info("encoder %s: random initialisation (training from scratch)", source)
        return create_model(source, **overrides)
    path = Path(os.path.expanduser(source))
    if path.suffix == ".ckpt":
        return _from_training_checkpoint(path, which, overrides)
    from vimssl.hub import from_pretrained

    model = from_pretrained(source, which=which, **overrides)
    log.info("encoder from %s: loaded strictly, head rebuilt for %d classes", source, num_classes)
    return model


def read_training_checkpoint(path: str | os.PathLike, which: str = "auto") -> tuple[dict, dict, dict]:
    """(encoder state dict, encoder constructor config, the checkpoint's ``vimssl`` entry) of a
    Lightning checkpoint written by this project (:func:`vimssl.checkpoint.select_weights` picks
    the weights: ``which="model_ema"`` takes a classifier's EMA weights)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    try:
        meta = check_meta(ckpt, str(path))
    except ValueError as err:
        raise EncoderSourceError(
            f"{path} is not a vimssl training checkpoint ({err}). Released Vim weights come as .pth "
            "files or Hub repos: pass those instead."
        ) from None
    encoder = select_weights(ckpt, which, str(path))
    prefixes = tuple(p for p in (meta["encoder_prefix"], meta.get("ema_prefix")) if p)
    unused = Counter(k.split(".")[0] for k in ckpt["state_dict"] if not k.startswith(prefixes))
    meta = {**meta, "unused": dict(unused), "path": str(path)}
    return encoder, dict(meta["encoder_config"]), meta


def _from_training_checkpoint(path: Path, which: str, overrides: dict) -> VisionMamba:
    encoder, config, meta = read_training_checkpoint(path, which)
    new_head = "head.weight" not in encoder
    if new_head:
        config["num_classes"] = 0  # a pretraining encoder: no head in the file
    model = build_model(encoder, config, architecture=meta.get("model_name"), **overrides)
    unused = ", ".join(f"{k}.* ({n} tensors)" for k, n in sorted(meta["unused"].items())) or "none"
    log.info(
        "encoder from %s (%s): %d tensors loaded strictly; not used: %s; head: %s",
        path, meta.get("kind", "?"), len(encoder), unused,
        f"new, {overrides['num_classes']} classes" if new_head or config.get("num_classes") != overrides["num_classes"]
        else "from the checkpoint",
    )  # fmt: skip
    return model
