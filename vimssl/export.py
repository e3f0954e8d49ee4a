"""From a Lightning checkpoint to a vimssl Hub folder (and the Hub): ``vimssl export``.

    vimssl export runs/mae/lightning_logs/version_0/checkpoints/last.ckpt runs/mae/export \
        --push-to-hub me/vim-t-mae-digits

:func:`export_checkpoint` reads a ``.ckpt`` written by a vimssl LightningModule (never executing
code: ``torch.load(weights_only=True)``, see :func:`vimssl.checkpoint.read_checkpoint`), finds the
model through the checkpoint's ``vimssl`` entry (``kind``, ``model_name``, ``encoder_config``,
``encoder_prefix`` and, for classifiers, ``class_names``), rebuilds it, loads it strictly and
writes it with :func:`vimssl.hub.save_pretrained`: the model card records the method, dataset,
epochs and the run's ``config.yaml``, the normalisation comes from the data module's
hyper-parameters. With ``push_to_hub`` the folder is then uploaded.

Safety: the checkpoint is only read; a folder is written only if it is new, empty or a previous
export (``overwrite=True``); the files are written into a temporary sibling folder first and moved
in at the end; a failed upload leaves the export in place and says so.

This module imports neither Lightning nor the Hub client at import time; the Lightning side
(the ``PushToHub`` callback) lives in :mod:`vimssl.callbacks`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from vimssl.checkpoint import (
    META_KEY,
    build_model,
    check_meta,
    match_registry,
    read_lightning_checkpoint,
    select_weights,
)
from vimssl.hub import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, HubUploadError, push_to_hub, save_pretrained
from vimssl.models.vim import VisionMamba

log = logging.getLogger("vimssl")

_WHICH = ("auto", "model", "model_ema")
_SECRET = re.compile(r"token|password|passwd|secret|api_?key|credential", re.IGNORECASE)
_EXPORT_FILES = (WEIGHTS_NAME, CARD_NAME, CONFIG_NAME)  # config.json last: it marks a complete export

__all__ = [
    "export_checkpoint",
    "is_export",
    "main",
    "model_from_checkpoint",
    "push_export",
    "read_lightning_checkpoint",
    "training_info",
    "write_export",
]


def model_from_checkpoint(
    checkpoint: Mapping, which: str = "auto", source: str = "the checkpoint"
) -> VisionMamba:
    """The model described by the checkpoint's ``vimssl`` entry, its weights loaded strictly."""
    meta = check_meta(checkpoint, source)
    pool = meta.get("pool", (checkpoint.get("hyper_parameters") or {}).get("pool"))
    if meta.get("kind") == "classifier" and pool not in (None, "cls"):
        raise ValueError(
            f"{source} is a classifier on pool={pool!r} features, but a Hub folder holds a plain "
            "VisionMamba, whose head reads the cls token: it would predict differently. Export the "
            "encoder of a cls-pooled classifier, or train the probe with pool='cls'."
        )
    last_k = meta.get("last_k_layers", (checkpoint.get("hyper_parameters") or {}).get("last_k_layers", 1))
    if meta.get("kind") == "classifier" and (last_k or 1) > 1:
        raise ValueError(
            f"{source} is a linear probe on the last {last_k} blocks' features concatenated; a Hub "
            "folder holds a plain VisionMamba, whose head reads the last block's cls token only. "
            "Train the probe with last_k_layers=1 to export it."
        )
    state_dict = select_weights(checkpoint, which, source)
    config = dict(meta["encoder_config"])
    name = meta.get("model_name")
    # the registry name only when the checkpoint's architecture is that size (not a resized one)
    architecture = name if name and match_registry(config) == name else None
    return build_model(state_dict, config, architecture=architecture, strict=True)


# ------------------------------------------------------------------------------ what the card says
def _plain(value: object) -> object:
    """Hyper-parameters as YAML-safe plain values (Namespace -> dict, tuple -> list)."""
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if key == "_instantiator":  # LightningCLI's bookkeeping
                continue
            out["class_path" if key == "_class_path" else str(key)] = _plain(item)
        return out
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def find_run_config(ckpt_path: str | os.PathLike) -> str | None:
    """The ``config.yaml`` LightningCLI wrote for the run of ``ckpt_path``: in the run's log dir
    (the parent of ``checkpoints/``) or beside the checkpoint; None if there is none."""
    ckpt = Path(ckpt_path).resolve()
    places = [ckpt.parent / "config.yaml"]
    if ckpt.parent.name == "checkpoints":
        places.insert(0, ckpt.parent.parent / "config.yaml")
    return next((p.read_text() for p in places if p.is_file()), None)


def training_info(checkpoint: Mapping, config_text: str | None = None) -> dict:
    """Method, dataset, epochs, steps and the run's configuration (``config_text`` parsed, else
    the model's and data module's hyper-parameters), for the model card."""
    import yaml

    meta = checkpoint[META_KEY]
    hparams = _plain(checkpoint.get("hyper_parameters") or {})
    data = _plain(checkpoint.get("datamodule_hyper_parameters") or {})
    # pretraining: mae / simmim; classifiers: "finetune classifier" / "linear classifier"
    mode = meta.get("mode") or hparams.get("mode")
    method = hparams.get("method") or " ".join(str(x) for x in (mode, meta.get("kind")) if x)
    info: dict = {"method": method or None}
    if data.get("dataset"):
        info["dataset"] = data["dataset"]
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    epochs = progress.get("total", {}).get("processed")  # epochs whose training part finished
    if epochs is None and "epoch" in checkpoint:
        epochs = int(checkpoint["epoch"]) + 1
    if epochs is not None:
        info["epochs"] = int(epochs)
    if "global_step" in checkpoint:
        info["steps"] = int(checkpoint["global_step"])
    info = {k: v for k, v in info.items() if v is not None}
    config = None
    if config_text:
        try:
            config = yaml.safe_load(config_text)
        except yaml.YAMLError as err:
            log.warning(
                "the run's config.yaml is not valid YAML (%s); the card shows the hyper-parameters", err
            )
    if not isinstance(config, Mapping):
        config = {k: v for k, v in (("model", hparams), ("data", data)) if v}
    if config:
        info["config"] = _redact(_plain(config))
    return info


def _redact(tree: object) -> object:
    """The tree with string values of secret-looking keys (``token``, ``password``, ...) replaced:
    LightningCLI writes e.g. ``PushToHub``'s ``token`` into ``config.yaml``, which goes on the card."""
    if isinstance(tree, dict):
        return {
            k: "<redacted>" if isinstance(v, str) and _SECRET.search(k) else _redact(v)
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [_redact(v) for v in tree]
    return tree


def normalisation(checkpoint: Mapping) -> tuple[list[float] | None, list[float] | None]:
    """Mean / std the model was trained with: the ``vimssl`` entry's, else the data module's
    hyper-parameters (the data module's defaults filled in), else None (ImageNet's)."""
    meta = checkpoint[META_KEY]
    if meta.get("mean") is not None and meta.get("std") is not None:
        return list(meta["mean"]), list(meta["std"])
    data = _plain(checkpoint.get("datamodule_hyper_parameters") or {})
    if not data:
        log.info("no data module hyper-parameters in the checkpoint: ImageNet's mean / std recorded")
        return None, None
    mean, std = data.get("mean"), data.get("std")
    if (mean is None or std is None) and str(data.get("dataset", "")).strip().lower() == "quickstart":
        from vimssl.data.quickstart import QUICKSTART_MEAN, QUICKSTART_STD  # ImageDataModule's default

        mean = QUICKSTART_MEAN if mean is None else mean
        std = QUICKSTART_STD if std is None else std
    return (list(mean) if mean is not None else None), (list(std) if std is not None else None)


# ------------------------------------------------------------------------------------------ writing
def is_export(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a vimssl Hub folder (a ``config.json`` with ``format_version`` and
    ``model_args``)."""
    try:
        config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "format_version" in config and "model_args" in config


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse to write where user data could be lost."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not is_export(out_dir):
        raise FileExistsError(
            f"{out_dir} is not empty and is not a vimssl export (no vimssl {CONFIG_NAME}); refusing "
            "to write into it so that nothing of yours is lost: pick a new or empty folder"
        )
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} holds a previous vimssl export; pass overwrite=True (--overwrite) to replace "
            f"its {', '.join(_EXPORT_FILES)} (other files in it are left alone)"
        )


def write_export(
    checkpoint: Mapping,
    out_dir: str | os.PathLike,
    *,
    which: str = "auto",
    config_text: str | None = None,
    metrics: Mapping[str, float | str] | None = None,
    license: str = "apache-2.0",
    repo_id: str | None = None,
    overwrite: bool = False,
    source: str = "the checkpoint",
) -> Path:
    """Write the model of an in-memory checkpoint dictionary as a vimssl Hub folder ``out_dir``.

    repo_id: the id shown in the card's loading snippet (default: ``out_dir``). The files are
    written to a temporary sibling folder, then moved into ``out_dir``.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    model = model_from_checkpoint(checkpoint, which, source)
    meta = checkpoint[META_KEY]
    mean, std = normalisation(checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_pretrained(
            model, tmp, class_names=meta.get("class_names"), mean=mean, std=std,
            training=training_info(checkpoint, config_text), metrics=metrics, license=license,
            repo_id=repo_id or out_dir.as_posix(),
        )  # fmt: skip
        check_out_dir(out_dir, overwrite)  # nothing appeared meanwhile
        out_dir.mkdir(exist_ok=True)
        for name in _EXPORT_FILES:
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def push_export(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload an export folder as it is (:func:`vimssl.hub.push_to_hub`); returns the repo URL.
    A failure raises :class:`HubUploadError` that says the export is still there."""
    try:
        return push_to_hub(
            out_dir, repo_id, private=private, token=token, revision=revision,
            commit_message="Upload vimssl export",
        )  # fmt: skip
    except HubUploadError as err:
        raise HubUploadError(
            f"{err} The export at {out_dir} is complete and unchanged; upload it later with "
            f"vimssl.push_to_hub({os.fspath(out_dir)!r}, {repo_id!r})."
        ) from err


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    which: str = "auto",
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    metrics: Mapping[str, float | str] | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> Path:
    """Export the model of a vimssl Lightning checkpoint as a Hub folder; upload it to the Hub
    model repo ``push_to_hub`` if given. Returns ``out_dir``.

    which: ``"auto"`` / ``"model"`` / ``"model_ema"`` (see :func:`select_weights`). overwrite:
    replace a previous export in ``out_dir`` (a non-empty folder that is not an export is always
    refused). The card records the run's ``config.yaml`` when it sits in the run's log dir.
    Upload failures raise :class:`vimssl.hub.HubUploadError` after the export was written.
    """
    source = os.fspath(ckpt_path)
    checkpoint = read_lightning_checkpoint(source)
    out = write_export(
        checkpoint, out_dir, which=which, config_text=find_run_config(source), metrics=metrics,
        license=license, repo_id=push_to_hub, overwrite=overwrite, source=source,
    )  # fmt: skip
    if push_to_hub:
        url = push_export(out, push_to_hub, private=private, token=token, revision=revision)
        log.info("uploaded %s to %s", out, url)
    return out


# ---------------------------------------------------------------------------------------------- CLI
def _metric(text: str) -> tuple[str, float | str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, float(value)
    except ValueError:
        return name, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vimssl export",
        description="Export the model of a vimssl Lightning checkpoint as a Hub folder "
        "(config.json, model.safetensors, README.md) and optionally upload it.",
    )
    p.add_argument("ckpt", help="a .ckpt written by vimssl (e.g. .../checkpoints/last.ckpt)")
    p.add_argument("out_dir", help="the folder to write: new, empty, or a previous export (--overwrite)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--revision", help="branch to upload to (created if needed)")
    p.add_argument("--which", choices=_WHICH, default="auto", help="weights to export (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous export in OUT_DIR")
    p.add_argument("--metric", type=_metric, action="append", default=[], metavar="NAME=VALUE",
                   help="a measured result for the model card (repeatable)")  # fmt: skip
    p.add_argument("--license", default="apache-2.0", help="licence of the weights (default: apache-2.0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``vimssl export CKPT OUT_DIR [--push-to-hub REPO] ...``; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        checkpoint = read_lightning_checkpoint(args.ckpt)
        out = write_export(
            checkpoint, args.out_dir, which=args.which, config_text=find_run_config(args.ckpt),
            metrics=dict(args.metric) or None, license=args.license, repo_id=args.push_to_hub,
            overwrite=args.overwrite, source=args.ckpt,
        )  # fmt: skip
    except (OSError, ValueError, KeyError, pickle.UnpicklingError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"vimssl export: error: {message}", file=sys.stderr)
        return 1
    config = json.loads((out / CONFIG_NAME).read_text())
    meta = checkpoint[META_KEY]
    print(
        f"wrote {out}: {', '.join(_EXPORT_FILES[::-1])} ({meta.get('kind', 'model')} checkpoint "
        f"{Path(args.ckpt).name}, weights {args.which}; {config['architecture']}, "
        f"{config['num_classes']} classes, image size {config['image_size']})"
    )
    if args.push_to_hub:
        try:
            url = push_export(
                out, args.push_to_hub, private=args.private, token=args.token, revision=args.revision
            )
        except HubUploadError as err:
            print(f"vimssl export: upload failed: {err}", file=sys.stderr)
            return 1
        print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
