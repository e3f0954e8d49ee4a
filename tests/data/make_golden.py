"""Writes tests/data/golden_vim.safetensors: a small Vim's state dict, an input and the output of
the reference path. Run only when the model's arithmetic is meant to change:
    python tests/data/make_golden.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

import vimssl


def main() -> None:
    torch.manual_seed(1234)
    model = vimssl.create_model("vim_test", embed_dim=16, depth=2, num_classes=4, backend="torch").eval()
    with torch.no_grad():
        for p in model.parameters():  # move away from init so every parameter matters
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
    tensors = {f"state.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update(input=x, features=feats, logits=logits)
    save_file(tensors, Path(__file__).with_name("golden_vim.safetensors"))


if __name__ == "__main__":
    main()
