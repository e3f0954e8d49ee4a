"""The one registry of Vim sizes. A size is a row in a table; :func:`create_model` is the only way
code builds a model. Overrides use timm's spellings (``img_size``, ``num_classes``, ``depth``,
``embed_dim``, ``drop_path_rate``, ...) plus ``backend``."""

from __future__ import annotations

import difflib
import inspect

from vimssl.models.vim import VisionMamba

# name -> constructor defaults. Released weights: hustvl/Vim-{tiny,small,base}-midclstok.
MODEL_SIZES: dict[str, dict] = {
    "vim_tiny_patch16_224": dict(embed_dim=192, depth=24, drop_path_rate=0.0),
    "vim_tiny_patch16_stride8_224": dict(embed_dim=192, depth=24, stride=8, drop_path_rate=0.0),
    "vim_small_patch16_224": dict(embed_dim=384, depth=24, drop_path_rate=0.05),
    "vim_small_patch16_stride8_224": dict(embed_dim=384, depth=24, stride=8, drop_path_rate=0.05),
    "vim_base_patch16_224": dict(embed_dim=768, depth=24, drop_path_rate=0.1),
    # NOTE: no released weights; width and depth of Mamba-R's large (arXiv 2405.14858)
    "vim_large_patch16_224": dict(embed_dim=1024, depth=48, drop_path_rate=0.2),
    # small sizes for 32 px images (8x8 grid of 4 px patches): the quickstart and fast CPU tests
    "vim_quickstart": dict(embed_dim=64, depth=4, patch_size=4, img_size=32, num_classes=10),
    "vim_test": dict(embed_dim=32, depth=2, patch_size=4, img_size=32, num_classes=10),
}

_ARGS = [p for p in inspect.signature(VisionMamba.__init__).parameters if p != "self"]


def list_models() -> list[str]:
    return sorted(MODEL_SIZES)


def model_defaults(name: str) -> dict:
    """Constructor arguments of a registered size (a copy)."""
    if name not in MODEL_SIZES:
        close = difflib.get_close_matches(name, MODEL_SIZES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}{hint} Known: {', '.join(list_models())}")
    return dict(MODEL_SIZES[name])


def create_model(name: str, **overrides) -> VisionMamba:
    """Build a registered Vim size, e.g. ``create_model("vim_small_patch16_224", num_classes=10)``."""
    kwargs = model_defaults(name)
    unknown = sorted(set(overrides) - set(_ARGS))
    if unknown:
        raise TypeError(f"unknown argument(s) {', '.join(unknown)} for {name}; valid: {', '.join(_ARGS)}")
    kwargs.update(overrides)
    model = VisionMamba(**kwargs)
    model.model_name = name
    return model
