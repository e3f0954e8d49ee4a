"""Parameter groups (weight-decay exclusions, layer decay) and the warm-up + cosine schedule."""

import math

import pytest
import torch

from vimssl.models import create_model
from vimssl.optim import build_adamw, param_groups, warmup_cosine, warmup_cosine_scheduler


def test_no_decay_for_1d_params_and_named_ones():
    model = create_model("vim_test")
    groups = param_groups(model.named_parameters(), 0.05, model.no_weight_decay())
    by_name = {n: g["weight_decay"] for g in groups for n in g["names"]}
    assert by_name["pos_embed"] == by_name["cls_token"] == 0.0
    assert by_name["layers.0.mixer.A_log"] == by_name["layers.1.mixer.D_b"] == 0.0
    assert by_name["layers.0.norm.weight"] == by_name["head.bias"] == 0.0
    assert by_name["layers.0.mixer.in_proj.weight"] == by_name["head.weight"] == 0.05
    assert len(by_name) == len(list(model.parameters()))


def test_layer_decay_scales():
    model = create_model("vim_test", depth=3)
    groups = param_groups(
        model.named_parameters(), 0.05, model.no_weight_decay(), model.layer_id, model.num_layer_ids, 0.5
    )
    opt = build_adamw(groups, lr=1.0)
    lr = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert lr["head.weight"] == lr["norm_f.weight"] == 1.0  # layer id 4 = num_layers - 1
    assert lr["layers.2.mixer.in_proj.weight"] == 0.5
    assert lr["layers.0.mixer.in_proj.weight"] == 0.125
    assert lr["pos_embed"] == lr["patch_embed.proj.weight"] == 0.0625
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model.named_parameters(), 0.05, layer_decay=0.7)


def test_frozen_params_are_left_out():
    model = create_model("vim_test")
    model.patch_embed.requires_grad_(False)
    names = {n for g in param_groups(model.named_parameters(), 0.05) for n in g["names"]}
    assert not any(n.startswith("patch_embed") for n in names) and "head.weight" in names


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_scheduler_drives_optimizer_lr():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_adamw([{"params": [p], "weight_decay": 0.0, "lr_scale": 1.0}], lr=0.1)
    sched = warmup_cosine_scheduler(opt, warmup_steps=2, total_steps=6, min_lr=0.01)
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(0.05) and seen[1] == pytest.approx(0.1)
    assert seen[-1] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
