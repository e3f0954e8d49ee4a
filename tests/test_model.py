"""The Vim encoder: released-checkpoint compatibility, shapes, hooks and numerics (CPU)."""

import subprocess
import sys

import pytest
import torch

import vimssl
from vimssl.layers.pos_embed import resample_pos_embed, split_pos_embed
from vimssl.models import MODEL_SIZES, create_model

# name -> (parameters with 1000 classes at 224 px, pos_embed length): the released models' numbers
RELEASED = {
    "vim_tiny_patch16_224": (7_148_008, 197),
    "vim_small_patch16_224": (25_796_584, 197),
    "vim_base_patch16_224": (97_598_440, 197),
    "vim_tiny_patch16_stride8_224": (7_250_344, 730),
    "vim_small_patch16_stride8_224": (26_001_256, 730),
}


def released_keys(depth: int, dim: int, n_tokens: int, classes: int = 1000) -> dict[str, tuple]:
    """Key -> shape of a released Vim state dict, written out from the published layout."""
    e, r, n = 2 * dim, -(-dim // 16), 16
    keys = {
        "patch_embed.proj.weight": (dim, 3, 16, 16),
        "patch_embed.proj.bias": (dim,),
        "cls_token": (1, 1, dim),
        "pos_embed": (1, n_tokens, dim),
        "norm_f.weight": (dim,),
        "head.weight": (classes, dim),
        "head.bias": (classes,),
    }
    for i in range(depth):
        p = f"layers.{i}."
        keys[p + "norm.weight"] = (dim,)
        keys[p + "mixer.in_proj.weight"] = (2 * e, dim)
        keys[p + "mixer.out_proj.weight"] = (dim, e)
        for s, a in (("", "A_log"), ("_b", "A_b_log")):
            keys[p + f"mixer.{a}"] = (e, n)
            keys[p + f"mixer.D{s}"] = (e,)
            keys[p + f"mixer.conv1d{s}.weight"] = (e, 1, 4)
            keys[p + f"mixer.conv1d{s}.bias"] = (e,)
            keys[p + f"mixer.x_proj{s}.weight"] = (r + 2 * n, e)
            keys[p + f"mixer.dt_proj{s}.weight"] = (e, r)
            keys[p + f"mixer.dt_proj{s}.bias"] = (e,)
    return keys


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_parameter_count_and_keys_match_release(name):
    model = create_model(name)
    count, n_tokens = RELEASED[name]
    assert sum(p.numel() for p in model.parameters()) == count
    sd = model.state_dict()
    expected = released_keys(24, model.embed_dim, n_tokens)
    assert set(sd) == set(expected)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_released_format_state_dict_loads_strictly():
    model = create_model("vim_tiny_patch16_224")
    # a "released" state dict: every key with the published shape, fresh values
    released = {k: torch.randn(s) for k, s in released_keys(24, 192, 197).items()}
    result = model.load_state_dict(released, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.layers[3].mixer.A_b_log, released["layers.3.mixer.A_b_log"])


def test_registry_lists_all_sizes_and_rejects_unknown():
    names = vimssl.list_models()
    for name in [*RELEASED, "vim_large_patch16_224", "vim_test", "vim_quickstart"]:
        assert name in names
    assert names == sorted(MODEL_SIZES)
    with pytest.raises(KeyError, match="vim_tiny_patch16_224"):
        create_model("vim_tiny_patch16")
    with pytest.raises(TypeError, match="embed_dims"):
        create_model("vim_test", embed_dims=8)


def test_large_size_shape():
    model = create_model("vim_large_patch16_224", depth=2)  # full depth 48 is slow to build on CPU
    assert model.embed_dim == 1024
    assert MODEL_SIZES["vim_large_patch16_224"]["depth"] == 48


def test_overrides_use_timm_spellings():
    model = create_model("vim_test", img_size=48, num_classes=3, depth=3, embed_dim=24, drop_path_rate=0.1)
    assert model.grid == (12, 12) and model.depth == 3 and model.embed_dim == 24
    assert model.pos_embed.shape == (1, 145, 24)
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)
    assert model.layers[-1].drop_path.p == pytest.approx(0.1)
    assert model.layers[0].drop_path.p == 0.0


def test_forward_shapes_and_no_nan():
    model = create_model("vim_test")
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    feats = model.forward_features(x)
    assert feats.shape == (3, 65, 32)
    cls, patches = model.split_features(feats)
    assert cls.shape == (3, 32) and patches.shape == (3, 64, 32)
    assert torch.equal(model.forward_head(feats, pre_logits=True), cls)


def test_non_square_and_other_resolutions():
    model = create_model("vim_test").eval()
    for h, w in [(32, 48), (40, 24), (16, 16), (64, 64)]:
        out = model.forward_features(torch.randn(2, 3, h, w))
        assert out.shape == (2, (h // 4) * (w // 4) + 1, 32)
        assert torch.isfinite(out).all()


def test_cls_token_sits_in_the_middle():
    model = create_model("vim_test", depth=0).eval()  # no blocks: features = norm(embeddings)
    x = torch.randn(2, 3, 32, 32)
    tokens, cls = model.embed(x)
    feats = model.forward_features(x)
    mid = 64 // 2
    assert VisionMambaIndex(feats) == mid
    torch.testing.assert_close(feats[:, mid], model.norm_f(cls[:, 0]))
    torch.testing.assert_close(feats[:, mid + 1], model.norm_f(tokens[:, mid]))
    # the cls slot of pos_embed is the middle one
    cls_pos, _ = split_pos_embed(model.pos_embed)
    torch.testing.assert_close(cls[0], (model.cls_token + model.pos_embed[:, mid : mid + 1])[0])
    assert torch.equal(cls_pos, model.pos_embed[:, mid : mid + 1])


def VisionMambaIndex(feats):
    return vimssl.VisionMamba.cls_index(feats.shape[1])


def test_ids_keep_encodes_only_the_given_patches_in_order():
    model = create_model("vim_test").eval()
    x = torch.randn(2, 3, 32, 32)
    ids = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    out = model.forward_features(x, ids_keep=ids)
    assert out.shape == (2, 17, 32)
    # same as running the blocks on the gathered tokens by hand
    tokens, cls = model.embed(x)
    gathered = torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(out, model.forward_tokens(gathered, cls))
    with pytest.raises(ValueError, match="ids_keep"):
        model.forward_features(x, ids_keep=ids[0])


def test_mask_token_replaces_masked_patches():
    model = create_model("vim_test").eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, :10] = True
    token = torch.randn(1, 1, 32)
    tokens, _ = model.embed(x, mask=mask, mask_token=token)
    _, patch_pos = split_pos_embed(model.pos_embed)
    torch.testing.assert_close(tokens[:, :10], (token + patch_pos[:, :10]).expand(2, -1, -1))
    plain, _ = model.embed(x)
    torch.testing.assert_close(tokens[:, 10:], plain[:, 10:])


def test_backward_direction_parameters_matter():
    model = create_model("vim_test").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    for name in [
        "A_b_log",
        "D_b",
        "x_proj_b.weight",
        "dt_proj_b.weight",
        "dt_proj_b.bias",
        "conv1d_b.weight",
    ]:
        with torch.no_grad():
            param = model.layers[0].mixer.get_parameter(name)
            saved = param.clone()
            param.add_(0.5 * torch.randn_like(param))
            changed = not torch.allclose(model(x), ref, atol=1e-5)
            param.copy_(saved)
        assert changed, f"perturbing {name} did not change the output"


def test_backward_branch_sees_the_future():
    """The last patch reaches the first token only through the backward scan: the gradient of the
    first token's features with respect to the last patch's pixels is non-zero, and exactly zero
    once the backward branch's input is silenced."""
    model = create_model("vim_test", depth=1).eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)

    def reach() -> torch.Tensor:
        (grad,) = torch.autograd.grad(model.forward_features(x)[:, 0].sum(), x)
        return grad[..., -4:, -4:].abs().sum()  # the last patch in raster order

    assert reach() > 0
    with torch.no_grad():
        for blk in model.layers:
            blk.mixer.x_proj_b.weight.zero_()  # B_b = 0: no state is written
            blk.mixer.D_b.zero_()  # no skip either
    assert reach() == 0


def test_every_parameter_gets_a_gradient():
    model = create_model("vim_test", drop_path_rate=0.1).train()
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_bf16_autocast_is_finite_and_close():
    model = create_model("vim_test").eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bf16_weights_forward():
    model = create_model("vim_test").to(torch.bfloat16).eval()
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_no_weight_decay_names():
    model = create_model("vim_test")
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {"pos_embed", "cls_token"} <= names
    for i in range(model.depth):
        for p in ("A_log", "A_b_log", "D", "D_b"):
            assert f"layers.{i}.mixer.{p}" in names
    assert names <= set(params)
    assert not any("in_proj" in n or "x_proj" in n for n in names)


def test_layer_ids_for_layer_decay():
    model = create_model("vim_test", depth=3)
    ids = {n: model.layer_id(n) for n, _ in model.named_parameters()}
    assert ids["patch_embed.proj.weight"] == ids["pos_embed"] == ids["cls_token"] == 0
    assert ids["layers.0.mixer.in_proj.weight"] == 1 and ids["layers.2.norm.weight"] == 3
    assert ids["norm_f.weight"] == ids["head.weight"] == 4 == model.num_layer_ids - 1


def test_reset_classifier():
    model = create_model("vim_test")
    model.reset_classifier(5)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert model.config["num_classes"] == 5
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_gradient_checkpointing_gives_same_gradients():
    model = create_model("vim_test").train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_pos_embed_resampling_keeps_cls_slot_and_is_identity_on_same_grid():
    pos = torch.randn(1, 65, 8)
    assert resample_pos_embed(pos, (8, 8), (8, 8)) is pos
    new = resample_pos_embed(pos, (8, 8), (6, 10))
    assert new.shape == (1, 61, 8)
    torch.testing.assert_close(new[:, 30], pos[:, 32])  # cls slot moves to the new middle
    back = resample_pos_embed(resample_pos_embed(pos, (8, 8), (16, 16)), (16, 16), (8, 8))
    assert (back - pos).abs().mean() < 0.5 * pos.abs().mean()  # smooth round trip
    with pytest.raises(ValueError, match="grid 7x7"):
        resample_pos_embed(pos, (7, 7), (8, 8))


def test_constant_pos_embed_resamples_to_constant():
    pos = torch.ones(1, 197, 4)
    pos[:, 98] = 5.0  # cls slot
    new = resample_pos_embed(pos, (14, 14), (24, 24))
    assert new[:, 288].eq(5.0).all()
    torch.testing.assert_close(torch.cat([new[:, :288], new[:, 289:]], 1), torch.ones(1, 576, 4))


def test_bad_inputs_give_clear_errors():
    model = create_model("vim_test")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than the patch size"):
        model(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        create_model("vim_test", backend="jax")
    with pytest.raises(RuntimeError, match="CUDA device"):
        create_model("vim_test", backend="cuda")(torch.randn(1, 3, 32, 32))


def test_import_is_light():
    code = (
        "import sys, vimssl; vimssl.create_model('vim_test');"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'datasets', 'mamba_ssm', 'causal_conv1d', 'huggingface_hub')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("size,stride", [((48, 40), 16), ((50, 37), 16), ((48, 40), 8)])
def test_patch_embed_equals_its_conv(size, stride):
    # the non-overlapping case runs as a matmul over unfolded patches: the same numbers as the
    # strided conv, including sizes that leave a remainder (cropped) and the overlapping case
    from vimssl.layers.patch_embed import PatchEmbed

    pe = PatchEmbed(patch_size=16, stride=stride, embed_dim=24)
    x = torch.randn(2, 3, *size)
    tokens, grid = pe(x)
    ref = pe.proj(x)
    assert grid == tuple(ref.shape[2:])
    torch.testing.assert_close(tokens, ref.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
