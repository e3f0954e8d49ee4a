"""Checkpoints from outside a Hub folder: the released hustvl/Vim ``.pth`` files and bare state dicts.

* :func:`load_released_checkpoint` reads a released training dictionary (``model``, ``model_ema``,
  ``optimizer``, ``epoch``, ``args`` = ``argparse.Namespace``, ...) with ``weights_only=True``:
  vimssl never runs code from a checkpoint. Only ``argparse.Namespace`` is allow-listed.
* :func:`infer_config` reads the constructor arguments off the tensor shapes.
* :func:`convert_checkpoint` resamples the middle-cls position embedding for a new image size.
* :func:`build_model` builds a :class:`~vimssl.models.VisionMamba` (a registered size when one
  matches) and loads a state dict strictly, with overrides (``img_size``, ``num_classes``, ...).

Imports torch only; the Hub side (downloads, Hub folders, model cards) lives in :mod:`vimssl.hub`.
"""

from __future__ import annotations

import argparse
import inspect
import os
import pickle
import re
import warnings
from collections.abc import Mapping

import torch

from vimssl.layers.patch_embed import grid_size
from vimssl.layers.pos_embed import resample_pos_embed
from vimssl.models.registry import MODEL_SIZES, create_model
from vimssl.models.vim import VisionMamba

# wrappers that add a prefix to every key: DDP / DataParallel, torch.compile, SSL systems
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "encoder.", "backbone.")
# entries that are not parameters and are safe to drop (torch.optim.swa_utils.AveragedModel's counter)
KNOWN_NON_PARAMETER_KEYS = frozenset({"n_averaged"})
# the keys every Vim state dict has
REQUIRED_KEYS = ("patch_embed.proj.weight", "cls_token", "pos_embed", "norm_f.weight")
_VIM_KEY = re.compile(
    r"^(patch_embed\.proj\.(weight|bias)|cls_token|pos_embed|norm_f\.weight|head\.(weight|bias)"
    r"|layers\.\d+\.(norm\.weight|mixer\.[\w.]+))$"
)
_WHICH = ("auto", "model", "model_ema")
_CONSTRUCTOR_ARGS = inspect.signature(VisionMamba.__init__).parameters


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle refers to a global (class or function) outside the allow-list."""


class NotAVimCheckpointError(ValueError):
    """The state dict does not have the layout of a Vision Mamba encoder."""


def _preview(keys, n: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > n else shown


# ------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike) -> object:
    """``torch.load`` with ``weights_only=True`` and only ``argparse.Namespace`` allow-listed.

    Raises :class:`UnsafeCheckpointError` (naming the offending globals) when the pickle needs
    anything else: vimssl refuses to execute code from checkpoints.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            names = _unsafe_globals(path) or re.findall(r"GLOBAL ([\w.]+)", str(err))
            raise UnsafeCheckpointError(
                f"{path} needs the global(s) {', '.join(names) or '<unknown>'} to unpickle, which are "
                "not plain tensors, containers or argparse.Namespace. vimssl refuses to execute code "
                "from checkpoints (torch.load is always called with weights_only=True). If you trust "
                "the file, load it yourself and pass its state dict to vimssl.checkpoint.build_model."
            ) from None


def _unsafe_globals(path: str) -> list[str]:
    # called inside the safe_globals context, so argparse.Namespace is not listed
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files are not supported by the scanner
        return []


def select_state_dict(checkpoint: object, which: str = "auto") -> dict[str, torch.Tensor]:
    """Pick the weights out of a training dictionary.

    ``which="model"``: the ``model`` entry (the weights the release's reported top-1 was measured
    with); ``"model_ema"``: the EMA weights; ``"auto"``: ``model``, else ``state_dict`` (Lightning),
    else ``model_ema``. A bare state dict (every value a tensor) is returned as it is for
    ``auto``/``model``.
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {', '.join(_WHICH)}, got {which!r}")
    if not isinstance(checkpoint, Mapping):
        raise NotAVimCheckpointError(f"expected a dict in the checkpoint, got {type(checkpoint).__name__}")
    is_bare = bool(checkpoint) and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
    if is_bare:
        if which == "model_ema":
            raise KeyError("this checkpoint is a bare state dict: it has no separate model_ema weights")
        return dict(checkpoint)
    candidates = {"auto": ("model", "state_dict", "model_ema"), "model": ("model",)}.get(which, (which,))
    for key in candidates:
        sd = checkpoint.get(key)
        if isinstance(sd, Mapping) and sd:
            return dict(sd)
    state = {k: type(v).__name__ for k, v in checkpoint.items()}
    raise KeyError(
        f"no {' / '.join(candidates)} weights in this checkpoint (an entry may be missing or None); "
        f"its entries: {state}"
    )


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``, ``encoder.``, ``backbone.``) shared by
    every key, and drop known non-parameter entries. Returns the new dict and the dropped keys."""
    sd = dict(state_dict)
    dropped = sorted(k for k in sd if k.rsplit(".", 1)[-1] in KNOWN_NON_PARAMETER_KEYS)
    for k in dropped:
        del sd[k]
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                changed = True
    return sd, dropped


def load_released_checkpoint(path: str | os.PathLike, which: str = "auto") -> dict[str, torch.Tensor]:
    """State dict of a released hustvl/Vim ``.pth`` file (or any file in the same format, or a bare
    state dict in a ``.pth`` / ``.safetensors`` file), wrapper prefixes stripped.

    Safe to call on untrusted files (see :func:`read_checkpoint`). Dropped keys are named in a
    warning.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        if which == "model_ema":
            raise KeyError(f"{path} holds a single state dict: there are no model_ema weights to pick")
        raw = load_file(path)
    else:
        raw = select_state_dict(read_checkpoint(path), which)
    sd, dropped = clean_state_dict(raw)
    if dropped:
        warnings.warn(f"dropped non-parameter entries from {path}: {', '.join(dropped)}", stacklevel=2)
    return sd


# --------------------------------------------------------------------------------------- inference
def check_vim_keys(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`NotAVimCheckpointError` unless the keys have the Vim layout."""
    missing = [k for k in REQUIRED_KEYS if k not in state_dict]
    foreign = [k for k in state_dict if not _VIM_KEY.match(k)]
    if not missing and not foreign:
        return
    msg = "this is not a Vision Mamba (Vim) state dict"
    if missing:
        msg += f"; missing {len(missing)} key(s) every Vim has: {_preview(missing)}"
    if foreign:
        msg += f"; {len(foreign)} key(s) Vim does not have: {_preview(foreign)}"
    if any(".attn." in k for k in foreign):
        msg += " (attention weights: this looks like a ViT / transformer checkpoint)"
    raise NotAVimCheckpointError(msg)


def _solve_stride(num_patches: int, patch_size: int, img_size: int) -> tuple[int, int] | None:
    """Stride and image size that give ``num_patches`` square patches, or None."""
    side = round(num_patches**0.5)
    if side * side != num_patches:
        return None
    # prefer non-overlapping patches, then half-overlapping (the released "+" models), then others
    for stride in dict.fromkeys([patch_size, patch_size // 2, *range(patch_size, 0, -1)]):
        if stride > 0 and img_size >= patch_size and (img_size - patch_size) // stride + 1 == side:
            return stride, img_size
    return patch_size, side * patch_size  # another resolution with non-overlapping patches


def infer_config(state_dict: Mapping[str, torch.Tensor], img_size: int = 224) -> dict:
    """Constructor arguments of :class:`VisionMamba` read off the tensor shapes.

    Width, channels and patch size from ``patch_embed.proj.weight`` (D, C, p, p); depth from the
    largest layer index; ``d_state`` and ``expand`` from ``A_log`` (E, N) and ``in_proj`` (2E, D);
    ``d_conv`` from ``conv1d.weight`` (E, 1, K); classes from ``head.weight`` (0 without a head).
    Stride from the number of position slots at ``img_size`` (197 at 224 px: stride 16; 730:
    stride 8); a square grid that fits no stride at ``img_size`` means non-overlapping patches at
    ``side * patch`` px. ``drop_path_rate`` and ``norm_eps`` cannot be read off and are left out.
    """
    check_vim_keys(state_dict)
    embed_dim, in_chans, ph, pw = state_dict["patch_embed.proj.weight"].shape
    if ph != pw:
        raise NotAVimCheckpointError(f"patch_embed.proj.weight has non-square {ph}x{pw} patches")
    num_patches = state_dict["pos_embed"].shape[1] - 1
    solved = _solve_stride(num_patches, ph, img_size)
    if solved is None:
        raise NotAVimCheckpointError(
            f"pos_embed has {num_patches} patch slots, not a square grid; build the model yourself "
            "with the right img_size and load the state dict into it"
        )
    stride, size = solved
    layers = {int(k.split(".")[1]) for k in state_dict if k.startswith("layers.")}
    depth = max(layers) + 1 if layers else 0
    config = dict(
        img_size=size, patch_size=ph, stride=stride, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
        num_classes=state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0,
    )  # fmt: skip
    if depth:
        mixer = "layers.0.mixer."
        inner, d_state = state_dict[mixer + "A_log"].shape  # (E, N)
        config["d_state"] = d_state
        config["expand"] = state_dict[mixer + "in_proj.weight"].shape[0] // (2 * embed_dim)
        config["d_conv"] = state_dict[mixer + "conv1d.weight"].shape[-1]
        if inner != config["expand"] * embed_dim:
            raise NotAVimCheckpointError(
                f"A_log has {inner} rows, in_proj says {config['expand'] * embed_dim}"
            )
    return {k: int(v) for k, v in config.items()}


def match_registry(config: Mapping) -> str | None:
    """The registered size whose architecture (not head or regularisation) equals ``config``."""
    defaults = {k: p.default for k, p in _CONSTRUCTOR_ARGS.items() if k != "self"}
    keys = "patch_size stride in_chans embed_dim depth d_state d_conv expand img_size".split()

    def norm(args: Mapping) -> dict:
        full = {**defaults, **args}
        full["stride"] = full["stride"] or full["patch_size"]
        size = full["img_size"]
        full["img_size"] = [size, size] if isinstance(size, int) else list(size)
        return {k: full[k] for k in keys}

    target = norm(config)
    return next((name for name, args in MODEL_SIZES.items() if norm(args) == target), None)


# ------------------------------------------------------------------------------ conversion, loading
def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


def convert_checkpoint(
    state_dict: Mapping[str, torch.Tensor], new_img_size: int | tuple[int, int], config: Mapping | None = None
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose ``pos_embed`` fits ``new_img_size`` (middle-cls aware
    bicubic resampling). ``config``: the checkpoint's constructor arguments (inferred if None)."""
    config = dict(config) if config is not None else infer_config(state_dict)
    patch = config.get("patch_size", 16)
    stride = config.get("stride") or patch
    old_grid = grid_size(_pair(config.get("img_size", 224)), patch, stride)
    new_grid = grid_size(_pair(new_img_size), patch, stride)
    sd = dict(state_dict)
    sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], old_grid, new_grid)
    return sd


def load_strict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        found = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        parts = [f"{len(x)} {what}: {_preview(x, 4)}" for what, x in found if x]
        raise NotAVimCheckpointError(f"the weights do not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=True)


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    config: Mapping | None = None,
    *,
    architecture: str | None = None,
    strict: bool = True,
    **overrides,
) -> VisionMamba:
    """Build a model for ``state_dict`` and load it.

    config: constructor arguments of the checkpoint (inferred from the shapes if None);
    architecture: registry name (found by :func:`match_registry` if None; a plain
    ``VisionMamba`` if none matches). Overrides: any constructor argument; ``img_size`` resamples
    the position embedding, ``num_classes`` loads the checkpoint's head and then replaces it with
    a fresh one (``reset_classifier``). With ``strict=False`` keys that do not fit are skipped
    and named in a warning.
    """
    config = dict(config) if config is not None else infer_config(state_dict)
    unknown = sorted(set(overrides) - set(_CONSTRUCTOR_ARGS))
    if unknown:
        raise TypeError(
            f"unknown override(s) {', '.join(unknown)}; valid: {', '.join(list(_CONSTRUCTOR_ARGS)[1:])}"
        )
    num_classes = overrides.pop("num_classes", None)
    sd = dict(state_dict)
    if "img_size" in overrides:
        sd = convert_checkpoint(sd, overrides["img_size"], config)
    kwargs = {**config, **overrides}
    architecture = architecture if architecture in MODEL_SIZES else match_registry(config)
    model = create_model(architecture, **kwargs) if architecture else VisionMamba(**kwargs)
    if strict:
        load_strict(model, sd)
    else:
        own = model.state_dict()
        misfit = [k for k, v in sd.items() if k in own and v.shape != own[k].shape]
        result = model.load_state_dict({k: v for k, v in sd.items() if k not in misfit}, strict=False)
        skipped = [*result.missing_keys, *result.unexpected_keys, *misfit]
        if skipped:
            warnings.warn(
                f"strict=False: kept the model's own values for {len(result.missing_keys)} missing key(s) "
                f"and {len(misfit)} shape mismatch(es), ignored {len(result.unexpected_keys)} unexpected "
                f"key(s): {_preview(skipped, 8)}",
                stacklevel=2,
            )
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


# ------------------------------------------------------ checkpoints written by vimssl's training
META_KEY = "vimssl"  # the checkpoint entry written by the LightningModules' on_save_checkpoint
_REQUIRED_META = ("encoder_config", "encoder_prefix")


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint dictionary of a ``.ckpt`` written by a vimssl LightningModule.

    Loaded with ``weights_only=True`` (only ``argparse.Namespace`` allow-listed besides plain
    containers); raises ``UnsafeCheckpointError`` for anything else, ``ValueError`` when the file
    has no ``vimssl`` entry or the entry lacks what export needs.
    """
    checkpoint = read_checkpoint(path)
    check_meta(checkpoint, os.fspath(path))
    return checkpoint


def check_meta(checkpoint: object, source: str) -> dict:
    """The checkpoint's ``vimssl`` entry, or a ``ValueError`` that names ``source`` and what is
    missing."""
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{source} is not a Lightning checkpoint (no state_dict entry)")
    meta = checkpoint.get(META_KEY)
    if not isinstance(meta, Mapping):
        raise ValueError(
            f"{source} has no {META_KEY!r} entry, so the encoder's configuration and key prefix are "
            "unknown: it was not written by a vimssl LightningModule (MaskedPretraining or the "
            "classifier), or by an older vimssl. To export other weights, build the model with "
            "vimssl.checkpoint.build_model(state_dict) and save it with vimssl.save_pretrained."
        )
    missing = [k for k in _REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"the {META_KEY!r} entry of {source} lacks {', '.join(missing)}")
    return dict(meta)


def select_weights(checkpoint: Mapping, which: str = "auto", source: str = "the checkpoint") -> dict:
    """The model's state dict (prefix stripped) out of a vimssl Lightning checkpoint.

    ``"auto"``: the weights under ``encoder_prefix`` in ``state_dict`` (with Lightning's
    ``WeightAveraging`` callback that is the averaged model); ``"model"``: the raw trained
    weights (``current_model_state`` under ``WeightAveraging``); ``"model_ema"``: the EMA weights
    (the entry's ``ema_prefix``, or ``state_dict`` under ``WeightAveraging``). A linear probe's
    feature BatchNorm (``feature_norm_prefix``) is folded into the head.
    """
    meta = check_meta(checkpoint, source)
    if which not in _WHICH:
        raise ValueError(f"which must be one of {', '.join(_WHICH)}, got {which!r}")
    averaged = isinstance(checkpoint.get("current_model_state"), Mapping)  # WeightAveraging
    weights, prefix = checkpoint["state_dict"], meta["encoder_prefix"]
    if which == "model" and averaged:
        weights = checkpoint["current_model_state"]
    elif which == "model_ema" and not averaged:
        if not meta.get("ema_prefix"):
            raise KeyError(
                f"which='model_ema': {source} holds no EMA weights (no ema_prefix in its {META_KEY!r} "
                "entry, no WeightAveraging state); use which='auto'"
            )
        prefix = meta["ema_prefix"]
    state_dict = _under(weights, prefix)
    if not state_dict:
        raise ValueError(
            f"no weights under the prefix {prefix!r} in {source} (its keys start: "
            f"{', '.join(list(weights)[:4]) or 'none'})"
        )
    if meta.get("feature_norm_prefix"):
        norm = _under(checkpoint["state_dict"], meta["feature_norm_prefix"])
        state_dict = fold_feature_norm(state_dict, norm)
    return state_dict


def _under(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def fold_feature_norm(
    state: dict[str, torch.Tensor], norm: dict[str, torch.Tensor], eps: float = 1e-6
) -> dict:
    """Fold an affine-free BatchNorm (running statistics) into the following linear head, so a
    linear probe exports as a plain Vim classifier: W' = W / s, b' = b - W' @ mean, s = sqrt(var + eps)."""
    scale = torch.rsqrt(norm["running_var"] + eps)  # (D,)
    weight = state["head.weight"] * scale  # (C, D)
    bias = state["head.bias"] - weight @ norm["running_mean"]
    return {**state, "head.weight": weight, "head.bias": bias}
