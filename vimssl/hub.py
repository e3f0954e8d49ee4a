"""Save, share and load Vim encoders and classifiers: Hub folders, model cards, and the one loading
entry point :func:`from_pretrained`.

A vimssl Hub folder (a local folder or a Hub model repo) holds

* ``config.json``: ``format_version``, ``vimssl_version``, ``architecture`` (registry name or
  ``"VisionMamba"``), ``model_args`` (the constructor arguments, ``model.config``),
  ``image_size``, normalisation ``mean`` / ``std``, ``num_classes`` and, for classifiers,
  ``class_names``;
* ``model.safetensors``: the state dict (keys as in the released hustvl/Vim checkpoints);
* ``README.md``: a model card with YAML front matter (``library_name: vimssl``).

:func:`from_pretrained` also reads the released hustvl/Vim ``.pth`` files, local or from their Hub
repos (:data:`RELEASED_CHECKPOINTS`), through :mod:`vimssl.checkpoint` (never executing code).
``huggingface_hub`` is imported inside the functions that use it; this module holds no network
code of its own (downloads and uploads go through ``huggingface_hub``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vimssl.checkpoint import build_model, load_released_checkpoint
from vimssl.model_card import model_card
from vimssl.models.registry import MODEL_SIZES
from vimssl.models.vim import VisionMamba

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# NOTE: the values of vimssl.data.IMAGENET_MEAN / _STD, repeated: vimssl.data imports Lightning
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class ReleasedCheckpoint:
    """A released hustvl/Vim file: repo, file name (None: the repo's single ``.pth``, found by
    listing the repo), registry name and reported ImageNet-1k top-1 (224 px)."""

    repo_id: str
    filename: str | None
    architecture: str
    top1: float


# the first row of a repo is what ``from_pretrained(repo_id)`` loads; ``filename=`` picks another
RELEASED_CHECKPOINTS: tuple[ReleasedCheckpoint, ...] = (
    ReleasedCheckpoint(
        "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth", "vim_tiny_patch16_224", 76.1
    ),
    ReleasedCheckpoint(
        "hustvl/Vim-tiny-midclstok", "vim_t_midclstok_ft_78p3acc.pth", "vim_tiny_patch16_stride8_224", 78.3
    ),
    ReleasedCheckpoint(
        "hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth", "vim_small_patch16_224", 80.5
    ),
    ReleasedCheckpoint(
        "hustvl/Vim-small-midclstok", "vim_s_midclstok_ft_81p6acc.pth", "vim_small_patch16_stride8_224", 81.6
    ),
    ReleasedCheckpoint("hustvl/Vim-base-midclstok", None, "vim_base_patch16_224", 81.9),
)


class HubError(OSError):
    """A Hub download or upload failed (the message says which step and why)."""


class HubDownloadError(HubError):
    pass


class HubUploadError(HubError):
    pass


# --------------------------------------------------------------------------------------------- save
def save_pretrained(
    model: VisionMamba,
    save_dir: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    training: Mapping | str | None = None,
    metrics: Mapping[str, float | str] | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    tags: Sequence[str] = ("self-supervised",),
) -> Path:
    """Write ``model`` as a vimssl Hub folder (``config.json``, ``model.safetensors``, ``README.md``).

    class_names / mean / std default to the model's ``pretrained_cfg`` (set by
    :func:`from_pretrained`), else none / ImageNet's. training: a dict (``method``, ``dataset``,
    ``epochs``, anything else) or the training config's YAML text, shown on the model card;
    metrics: name -> measured value. repo_id: the id used in the card's loading snippet (default:
    the folder). tags: added to ``vision-mamba`` and the task tag.
    """
    from safetensors.torch import save_file

    import vimssl

    previous = getattr(model, "pretrained_cfg", None) or {}
    if class_names is None and previous.get("num_classes") == model.num_classes:
        class_names = previous.get("class_names")
    mean = list(mean if mean is not None else previous.get("mean", IMAGENET_MEAN))
    std = list(std if std is not None else previous.get("std", IMAGENET_STD))
    in_chans = model.config["in_chans"]
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(f"mean and std need {in_chans} values (one per input channel), got {mean} and {std}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != model.num_classes:
            raise ValueError(f"{len(class_names)} class_names for a head of {model.num_classes} classes")
    name = getattr(model, "model_name", None)
    config = {
        "format_version": FORMAT_VERSION,
        "vimssl_version": vimssl.__version__,
        "architecture": name if name in MODEL_SIZES else "VisionMamba",
        "model_args": dict(model.config),
        "image_size": list(model.config["img_size"]),
        "mean": mean,
        "std": std,
        "num_classes": model.num_classes,
    }
    if class_names is not None:
        config["class_names"] = class_names
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(safetensors_ready(model.state_dict()), str(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    card = model_card(model, config, training=training, metrics=metrics, license=license,
                      repo_id=repo_id or save_dir.as_posix(), tags=tags)  # fmt: skip
    card.save(save_dir / CARD_NAME)
    return save_dir


def safetensors_ready(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors, contiguous, none sharing memory (safetensors refuses shared or
    non-contiguous tensors): later tensors on an already seen storage are copied."""
    out, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().cpu()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------- card
def push_to_hub(
    model: VisionMamba | str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload vimssl model",
    **card_kwargs,
) -> str:
    """Upload a model (saved into a temporary folder with :func:`save_pretrained`; ``card_kwargs``
    go there) or an existing vimssl Hub folder (uploaded as it is) to the Hub model repo
    ``repo_id``, created if needed. Returns the repo URL.

    Raises :class:`HubUploadError` saying which step failed (offline mode, no token, ...). Local
    files are only read.
    """
    from huggingface_hub import HfApi, constants

    with tempfile.TemporaryDirectory(prefix="vimssl-push-") as tmp:
        if isinstance(model, VisionMamba):
            folder = save_pretrained(model, Path(tmp) / "model", repo_id=repo_id, **card_kwargs)
        else:
            folder = Path(model)
            if card_kwargs:
                raise TypeError(
                    f"{', '.join(card_kwargs)}: card arguments apply to a model, not a saved folder"
                )
            absent = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
            if absent:
                raise FileNotFoundError(f"{folder} is not a vimssl Hub folder: no {' or '.join(absent)}")
        api = HfApi(token=token)
        step = "creating the repository"
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                step = f"creating the branch {revision!r}"
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            step = "uploading the files"
            api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message
            )
        except Exception as err:  # huggingface_hub raises OSError, ValueError and HTTP client errors
            hint = ""
            if constants.is_offline_mode():
                hint = " Offline mode is on (HF_HUB_OFFLINE=1): unset it to upload."
            elif "token" in str(err).lower() or "401" in str(err):
                hint = " Log in (`hf auth login`) or pass token=."
            raise HubUploadError(
                f"push_to_hub to {repo_id!r} failed while {step}: {type(err).__name__}: {err}.{hint} "
                "Nothing was changed locally."
            ) from err
    return str(url)


# -------------------------------------------------------------------------------------------- load
def from_pretrained(
    repo_id_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    which: str = "auto",
    filename: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | None = None,
    strict: bool = True,
    **overrides,
) -> VisionMamba:
    """Load a Vim model from any of:

    * a Hub repo id in the vimssl format (``config.json`` + ``model.safetensors``; works offline
      from the cache with ``HF_HUB_OFFLINE=1``), or a local vimssl Hub folder;
    * a released hustvl/Vim repo id (:data:`RELEASED_CHECKPOINTS`; ``filename=`` picks another file
      of the repo, e.g. the stride-8 fine-tunes), or a local ``.pth`` in that format, or a bare
      state dict (``.pth`` / ``.safetensors``; the architecture is inferred from the shapes).

    which: ``"model"`` / ``"model_ema"`` weights of a training checkpoint (``"auto"``: ``model``,
    the weights the reported numbers were measured with). Overrides: any ``VisionMamba`` argument,
    e.g. ``img_size`` (position embedding resampled), ``num_classes`` (fresh head), ``backend``,
    ``drop_path_rate``. The model's ``pretrained_cfg`` holds the source, mean / std and class names.
    """
    source = os.fspath(repo_id_or_path)
    path = Path(source).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {source} is a local path")
        return _load_local(path, which=which, filename=filename, strict=strict, overrides=overrides)
    if (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith(_CHECKPOINT_SUFFIXES)
    ):
        raise FileNotFoundError(f"no such file or folder: {source}")
    return _load_repo(source, revision, which, filename, cache_dir, token, strict, overrides)


def _load_local(
    path: Path, *, which: str, filename: str | None, strict: bool, overrides: dict
) -> VisionMamba:
    if path.is_dir():
        if filename is not None:
            return _load_checkpoint_file(path / filename, which, strict, overrides)
        if (path / CONFIG_NAME).is_file():
            return _load_folder(path / CONFIG_NAME, path / WEIGHTS_NAME, which, strict, overrides, str(path))
        pths = sorted(p.name for p in path.iterdir() if p.suffix in (".pth", ".pt"))
        if len(pths) != 1:
            raise FileNotFoundError(
                f"{path} is not a vimssl Hub folder (no {CONFIG_NAME}) and holds {len(pths)} .pth files "
                f"({', '.join(pths) or 'none'}); pass the file itself or filename="
            )
        path = path / pths[0]
    return _load_checkpoint_file(path, which, strict, overrides)


def _load_checkpoint_file(path: Path, which: str, strict: bool, overrides: dict) -> VisionMamba:
    """A released-format ``.pth`` or a bare state dict (``.pth`` / ``.safetensors``): architecture
    inferred from the shapes."""
    state_dict = load_released_checkpoint(path, which)
    model = build_model(state_dict, strict=strict, **overrides)
    _attach_cfg(model, str(path), IMAGENET_MEAN, IMAGENET_STD, None, state_dict)
    return model


def _load_folder(
    config_file: Path, weights_file: Path, which: str, strict: bool, overrides: dict, source: str
) -> VisionMamba:
    from safetensors.torch import load_file

    config = json.loads(Path(config_file).read_text())
    version = config.get("format_version")
    if not isinstance(version, int) or "model_args" not in config:
        raise ValueError(f"{config_file} is not a vimssl config (no format_version / model_args)")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version {version}; this vimssl reads up to {FORMAT_VERSION}: upgrade"
        )
    if which not in ("auto", "model"):
        raise ValueError(
            f"which={which!r}: a vimssl Hub folder holds one set of weights (use 'auto' or 'model')"
        )
    if not Path(weights_file).is_file():
        raise FileNotFoundError(f"{source} has a {CONFIG_NAME} but no {WEIGHTS_NAME}")
    state_dict = load_file(str(weights_file))
    model = build_model(
        state_dict, config["model_args"], architecture=config.get("architecture"), strict=strict, **overrides
    )
    _attach_cfg(model, source, config.get("mean"), config.get("std"), config.get("class_names"), state_dict)
    return model


def _attach_cfg(model, source, mean, std, class_names, state_dict) -> None:
    loaded_classes = state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0
    keep_names = class_names is not None and model.num_classes == loaded_classes
    model.pretrained_cfg = {
        "source": source,
        "image_size": list(model.config["img_size"]),
        "mean": list(mean or IMAGENET_MEAN),
        "std": list(std or IMAGENET_STD),
        "num_classes": model.num_classes,
        "class_names": list(class_names) if keep_names else None,
    }


# ------------------------------------------------------------------------------------- Hub repos
def released_filename(repo_id: str, repo_files: Sequence[str] | None = None) -> str:
    """File to load from a released repo: the table's first file for ``repo_id``, else the single
    ``.pth`` among ``repo_files`` (the repo's listing)."""
    rows = [r for r in RELEASED_CHECKPOINTS if r.repo_id == repo_id]
    if rows and rows[0].filename is not None:
        return rows[0].filename
    pths = sorted(f for f in repo_files or () if f.endswith((".pth", ".pt")))
    if len(pths) != 1:
        raise HubDownloadError(
            f"{repo_id} holds {len(pths)} .pth files ({', '.join(pths) or 'none'}); pass filename="
        )
    return pths[0]


def cached_repo_files(repo_id: str, revision: str | None = None, cache_dir: str | os.PathLike | None = None):
    """Files of ``repo_id`` at ``revision`` in the local Hub cache, or None if it is not cached."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = revision or "main"
    commit = revision if re.fullmatch(r"[0-9a-f]{40}", revision) else None
    if commit is None and (root / "refs" / revision).is_file():
        commit = (root / "refs" / revision).read_text().strip()
    snapshot = root / "snapshots" / (commit or "")
    if commit is None or not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _list_repo_files(repo_id, revision, cache_dir, token) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except RepositoryNotFoundError as err:
        raise HubDownloadError(f"Hub repo {repo_id!r} not found (or private: pass token=)") from err
    except Exception as err:  # offline or unreachable: fall back on the cache
        cached = cached_repo_files(repo_id, revision, cache_dir)
        if cached is None:
            raise HubDownloadError(
                f"could not list the files of {repo_id!r}{_offline_hint(cache_dir)}"
            ) from err
        return cached


def _offline_hint(cache_dir) -> str:
    from huggingface_hub import constants

    where = Path(cache_dir or constants.HF_HUB_CACHE)
    if constants.is_offline_mode():
        return (f": offline mode is on (HF_HUB_OFFLINE=1) and it is not in the Hub cache at {where}. "
                "Load it once online, or pass a local folder / file")  # fmt: skip
    return f": the Hub could not be reached and it is not in the Hub cache at {where}"


def _download(repo_id, filename, revision, cache_dir, token, missing_ok: bool = False) -> str | None:
    """``hf_hub_download`` with clear errors; None if the repo has no such file and ``missing_ok``."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    import vimssl

    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir, token=token,
                               library_name="vimssl", library_version=vimssl.__version__)  # fmt: skip
    except LocalEntryNotFoundError as err:
        raise HubDownloadError(f"could not get {filename} of {repo_id!r}{_offline_hint(cache_dir)}") from err
    except EntryNotFoundError as err:
        if missing_ok:
            return None
        raise HubDownloadError(f"Hub repo {repo_id!r} has no file {filename!r}") from err
    except RevisionNotFoundError as err:
        raise HubDownloadError(f"Hub repo {repo_id!r} has no revision {revision!r}") from err
    except RepositoryNotFoundError as err:
        raise HubDownloadError(f"Hub repo {repo_id!r} not found (or private / gated: pass token=)") from err
    except Exception as err:
        raise HubDownloadError(
            f"could not download {filename} of {repo_id!r}: {type(err).__name__}: {err}"
        ) from err


def _load_repo(repo_id, revision, which, filename, cache_dir, token, strict, overrides) -> VisionMamba:
    source = repo_id if revision is None else f"{repo_id}@{revision}"
    released = any(r.repo_id == repo_id for r in RELEASED_CHECKPOINTS)
    if not released and filename is None:
        config_file = _download(repo_id, CONFIG_NAME, revision, cache_dir, token, missing_ok=True)
        if config_file is not None:
            weights = _download(repo_id, WEIGHTS_NAME, revision, cache_dir, token)
            return _load_folder(Path(config_file), Path(weights), which, strict, overrides, source)
    # a repo of .pth files (released format)
    if filename is None:
        rows = [r for r in RELEASED_CHECKPOINTS if r.repo_id == repo_id and r.filename]
        files = None if rows else _list_repo_files(repo_id, revision, cache_dir, token)
        filename = released_filename(repo_id, files)
    path = Path(_download(repo_id, filename, revision, cache_dir, token))
    model = _load_checkpoint_file(path, which, strict, overrides)
    model.pretrained_cfg["source"] = f"{source}/{filename}"
    return model


__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RELEASED_CHECKPOINTS",
    "WEIGHTS_NAME",
    "HubDownloadError",
    "HubError",
    "HubUploadError",
    "ReleasedCheckpoint",
    "cached_repo_files",
    "from_pretrained",
    "model_card",
    "push_to_hub",
    "released_filename",
    "safetensors_ready",
    "save_pretrained",
]
