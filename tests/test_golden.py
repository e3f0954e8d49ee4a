"""The reference path's output for a stored small model and input must not drift."""

from pathlib import Path

import torch
from safetensors.torch import load_file

import vimssl

GOLDEN = Path(__file__).parent / "data" / "golden_vim.safetensors"


def test_reference_output_matches_stored_golden_tensor():
    tensors = load_file(GOLDEN)
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    model = vimssl.create_model("vim_test", embed_dim=16, depth=2, num_classes=4, backend="torch").eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        feats = model.forward_features(tensors["input"])
        logits = model.forward_head(feats)
    torch.testing.assert_close(feats, tensors["features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits, tensors["logits"], atol=1e-5, rtol=1e-5)
