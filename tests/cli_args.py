"""Command-line arguments shared by the tests that drive ``cli.py fit`` in-process on the
built-in digits with a tiny Vim (fast on a 2-core CPU)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fit_args(tmp_path, *extra: str, steps: int = 2, epochs: int = 1) -> list[str]:
    """Arguments for ``epochs`` epochs of ``steps`` batches of 16 on the quickstart digits."""
    return [
        "fit",
        "--config", str(ROOT / "configs/quickstart.yaml"),
        "--model.init_args.embed_dim", "32",
        "--model.init_args.depth", "2",
        "--model.init_args.decoder_dim", "32",
        "--model.init_args.decoder_depth", "1",
        "--data.init_args.batch_size", "16",
        "--data.init_args.num_workers", "0",
        "--data.init_args.persistent_workers", "false",
        "--trainer.max_epochs", str(epochs),
        "--trainer.limit_train_batches", str(steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        *extra,
    ]  # fmt: skip
