"""``vimssl`` / ``python cli.py``: LightningCLI with OmegaConf-interpolated, composable configs.

    python cli.py fit --config configs/quickstart.yaml
    python cli.py fit --config configs/trainer/gpu.yaml --config configs/data/cifar10.yaml \
        --config configs/pretrain/mae_vim_small.yaml
    python cli.py export checkpoints/.../last.ckpt exported/ [--push-to-hub user/repo]

Runs write to ``checkpoints/`` by default (``trainer.default_root_dir``): checkpoints, metrics and
the resolved ``config.yaml`` of each run side by side in ``checkpoints/<logger>/version_N``.
"""

from __future__ import annotations

import logging
import sys

from lightning.pytorch.cli import LightningCLI


class VimsslCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data's image size is the model's: typed once
        parser.link_arguments("data.init_args.image_size", "model.init_args.img_size")
        parser.link_arguments(
            "data", "model.init_args.num_classes", compute_fn=_num_classes, apply_on="instantiate"
        )


def _num_classes(data) -> int:
    return data.num_classes


class _RankZeroInfo(logging.Filter):
    """Warnings from every process; information from the first only (as Lightning's own), so that a
    run on N GPUs says each thing once."""

    def filter(self, record: logging.LogRecord) -> bool:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return record.levelno >= logging.WARNING or getattr(rank_zero_only, "rank", 0) == 0


def show_info_logs() -> None:
    """Print vimssl's INFO messages (the backend ``auto`` chose, what an encoder checkpoint loaded
    and left unused, hints) on stderr, as Lightning prints its own: unless the program has set up
    logging itself (the root logger has handlers), in which case its set-up decides. Idempotent."""
    logger = logging.getLogger("vimssl")
    if logging.getLogger().hasHandlers() or any(getattr(h, "_vimssl", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(_RankZeroInfo())
    handler._vimssl = True
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(args: list[str] | None = None, run: bool = True) -> VimsslCLI | int:
    """Run the CLI on ``args`` (default: the command line) and return the LightningCLI object;
    ``export`` turns a training checkpoint into the Hub format (:mod:`vimssl.export`) and returns
    its exit status."""
    given = None if args is None else list(args)
    args = sys.argv[1:] if given is None else given
    show_info_logs()
    if args and args[0] == "export":
        from vimssl import export

        return export.main(args[1:])
    import vimssl.callbacks  # noqa: F401  (importable by short class_path names)
    import vimssl.classify  # noqa: F401
    import vimssl.data  # noqa: F401
    import vimssl.pretrain  # noqa: F401

    return VimsslCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf", "default_config_files": []},
        trainer_defaults={"default_root_dir": "checkpoints"},
        # the command line is LightningCLI's own default (given it again, it warns of both)
        args=given or None,
        run=run,
        auto_configure_optimizers=False,
    )


def console() -> None:
    """The ``vimssl`` console command."""
    status = main()
    sys.exit(status if isinstance(status, int) else 0)


if __name__ == "__main__":
    console()
