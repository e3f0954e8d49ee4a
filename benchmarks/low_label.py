"""Does this project's masked-image pretraining help when labels are scarce?

On the built-in digits (scikit-learn, 1,500 train / 297 test images, 32 px), with 10 % of the
training labels:
  1. pretrain ``vim_quickstart`` with MAE on all training images, labels unused;
  2. fine-tune it, and the same architecture from scratch, with the same budget;
  3. linear-probe it, and a randomly initialised encoder, with the same budget.
Prints both comparisons side by side and, last, one JSON line with the four test accuracies.
Runs on a 2-core CPU in about 8 minutes:

    python benchmarks/low_label.py [--seed 0] [--label-fraction 0.1] [--pretrain-epochs 40]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch

from vimssl.classify import ImageClassifier
from vimssl.data import ImageDataModule
from vimssl.pretrain import MaskedPretraining

MODEL = "vim_quickstart"


def data(fraction: float, seed: int, batch: int) -> ImageDataModule:
    return ImageDataModule(
        dataset="quickstart", image_size=32, crop_scale=(0.6, 1.0), hflip_prob=0.0, crop_pct=1.0,
        batch_size=batch, num_workers=0, train_fraction=fraction, seed=seed, val_split="test",
    )  # fmt: skip


def trainer(root: Path, epochs: int, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, default_root_dir=root, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw,
    )  # fmt: skip


def pretrain(root: Path, epochs: int, seed: int, mask_ratio: float, norm_pix: bool) -> Path:
    L.seed_everything(seed, verbose=False)
    module = MaskedPretraining(
        model_name=MODEL, img_size=32, method="mae", mask_ratio=mask_ratio, decoder_dim=64, decoder_depth=2,
        lr=2e-3, warmup_epochs=1, norm_pix_loss=norm_pix,
    )  # fmt: skip
    t = trainer(root / "pretrain", epochs, limit_val_batches=0, enable_checkpointing=False)
    t.fit(module, datamodule=data(1.0, seed, 64))
    path = root / "pretrain.ckpt"
    t.save_checkpoint(path)
    return path


def transfer(
    encoder: str, mode: str, root: Path, epochs: int, fraction: float, seed: int, lr: float
) -> float:
    L.seed_everything(seed, verbose=False)
    kw = (
        dict(lr=lr, layer_decay=0.75, drop_path_rate=0.1, mixup_alpha=0.2, label_smoothing=0.1)
        if mode == "finetune"
        else dict(optimizer="sgd", lr=0.1, weight_decay=0.0, label_smoothing=0.0)
    )
    module = ImageClassifier(encoder=encoder, num_classes=10, img_size=32, mode=mode, warmup_epochs=1, **kw)
    dm = data(fraction, seed, 32)
    t = trainer(
        root / f"{mode}_{Path(encoder).stem}",
        epochs,
        enable_checkpointing=False,
        check_val_every_n_epoch=epochs,
    )
    t.fit(module, datamodule=dm)
    return float(t.test(module, datamodule=dm, verbose=False)[0]["test/acc1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label-fraction", type=float, default=0.1)
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--finetune-epochs", type=int, default=30)
    ap.add_argument("--linear-epochs", type=int, default=30)
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument(
        "--norm-pix-loss",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="per-patch normalised targets (off: a 4 px patch of an upscaled 8 px digit is nearly flat)",
    )
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = pretrain(root, args.pretrain_epochs, args.seed, args.mask_ratio, args.norm_pix_loss)
        t_pre = time.time() - start
        f, s, lr = args.label_fraction, args.seed, args.finetune_lr
        res = {
            "finetune_pretrained": transfer(str(ckpt), "finetune", root, args.finetune_epochs, f, s, lr),
            "finetune_scratch": transfer(MODEL, "finetune", root, args.finetune_epochs, f, s, lr),
            "linear_pretrained": transfer(str(ckpt), "linear", root, args.linear_epochs, f, s, 0.1),
            "linear_random": transfer(MODEL, "linear", root, args.linear_epochs, f, s, 0.1),
        }
    total = time.time() - start
    n_labels = round(1500 * f)
    print(f"\nDigits, {n_labels} labelled training images ({f:.0%}), test accuracy on 297 images, seed {s}")
    print(
        f"pretraining: MAE, {args.pretrain_epochs} epochs on 1,500 unlabelled images, mask ratio {args.mask_ratio}, "
        f"{'normalised' if args.norm_pix_loss else 'raw'} pixel targets ({t_pre:.0f} s)"
    )
    print("| protocol | pretrained (MAE) | baseline | baseline is |")
    print("|---|---|---|---|")
    print(
        f"| fine-tune, {args.finetune_epochs} epochs | {res['finetune_pretrained']:.3f} | {res['finetune_scratch']:.3f} | same model from scratch |"
    )
    print(
        f"| linear probe, {args.linear_epochs} epochs | {res['linear_pretrained']:.3f} | {res['linear_random']:.3f} | randomly initialised encoder |"
    )
    print(f"total {total:.0f} s")
    print(json.dumps({k: round(v, 4) for k, v in res.items()} | {"seed": s, "label_fraction": f}))


if __name__ == "__main__":
    main()
