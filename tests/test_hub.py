"""Hub folders, model cards, push/pull and released-checkpoint loading (CPU, no network)."""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

import vimssl
from vimssl.checkpoint import NotAVimCheckpointError, UnsafeCheckpointError, convert_checkpoint, infer_config
from vimssl.hub import (
    HubDownloadError,
    HubUploadError,
    cached_repo_files,
    from_pretrained,
    push_to_hub,
    released_filename,
    safetensors_ready,
    save_pretrained,
)
from vimssl.layers.pos_embed import resample_pos_embed
from vimssl.models import VisionMamba

pytestmark = pytest.mark.usefixtures("one_thread")


def images(size=32, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def write_released(path: Path, model: torch.nn.Module, ema: torch.nn.Module | None, **extra) -> Path:
    """A training dictionary in the released hustvl/Vim layout, DDP-style ``module.`` prefixes."""

    def prefixed(m):
        return OrderedDict(("module." + k, v.clone()) for k, v in m.state_dict().items())

    torch.save(
        {
            "model": prefixed(model),
            "model_ema": prefixed(ema) if ema is not None else None,
            "optimizer": {
                "state": {},
                "param_groups": [{"lr": 1e-3, "weight_decay": 0.05, "params": [0, 1]}],
            },
            "lr_scheduler": {"last_epoch": 300},
            "epoch": 299,
            "scaler": {},
            "args": argparse.Namespace(model="vim_tiny", input_size=224, drop_path=0.0, lr=1e-3),
            **extra,
        },
        path,
    )
    return path


def populate_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str = "c0ffee" * 6 + "abcd"):
    """Lay files out as the Hub cache does: models--org--name/{refs/main, snapshots/<commit>/...}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    return snapshot


def folder_fingerprint(folder: Path) -> dict:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()
    }


# --------------------------------------------------------------------------------------- Hub folders
def test_round_trip_encoder(tmp_path):
    model = vimssl.create_model("vim_test", num_classes=0).eval()
    training = {"method": "mae", "dataset": "ILSVRC/imagenet-1k", "epochs": 100, "optimizer": {"lr": 1.5e-4}}
    out = save_pretrained(model, tmp_path / "enc", training=training, metrics={"knn_top1": 12.5})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vim_test" and config["model_args"] == model.config
    assert config["format_version"] == 1 and config["vimssl_version"] == vimssl.__version__
    assert config["image_size"] == [32, 32] and len(config["mean"]) == 3 and "class_names" not in config

    loaded = from_pretrained(out).eval()
    assert loaded.model_name == "vim_test" and loaded.num_classes == 0
    assert same_weights(model.state_dict(), loaded.state_dict())
    x = images()
    assert torch.equal(model(x), loaded(x))

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "vimssl" and front["license"] == "apache-2.0"
    assert front["tags"] == ["vision-mamba", "image-feature-extraction", "self-supervised"]
    assert front["datasets"] == ["ILSVRC/imagenet-1k"] and front["metrics"] == ["knn_top1"]
    for text in ("| method | mae |", "| epochs | 100 |", "lr: 0.00015", "| knn_top1 | 12.5 |", "## Licence"):
        assert text in card
    assert f'vimssl.from_pretrained("{out.as_posix()}")' in card


def test_round_trip_classifier_keeps_class_names(tmp_path):
    # a size outside the registry: architecture "VisionMamba", rebuilt from the saved arguments
    model = VisionMamba(img_size=32, patch_size=8, embed_dim=24, depth=2, d_state=8, num_classes=3).eval()
    names = ["cat", "dog", "fish"]
    training = "model:\n  method: simmim\ndata:\n  dataset: quickstart\ntrainer:\n  max_epochs: 5\n"
    out = save_pretrained(model, tmp_path / "clf", class_names=names, training=training, repo_id="me/vim-clf")
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "VisionMamba" and config["class_names"] == names

    loaded = from_pretrained(out).eval()
    assert type(loaded) is VisionMamba and loaded.config == model.config
    assert same_weights(model.state_dict(), loaded.state_dict())
    x = images()
    assert torch.equal(model(x), loaded(x))
    assert loaded.pretrained_cfg["class_names"] == names

    card = (out / "README.md").read_text()
    assert "image-classification" in card and "| method | simmim |" in card and "| epochs | 5 |" in card
    assert 'vimssl.from_pretrained("me/vim-clf")' in card and "max_epochs: 5" in card
    # saving the loaded model again keeps its class names; a new head drops them
    assert (
        json.loads((save_pretrained(loaded, tmp_path / "again") / "config.json").read_text())["class_names"]
        == names
    )
    assert from_pretrained(out, num_classes=4).pretrained_cfg["class_names"] is None
    with pytest.raises(ValueError, match="2 class_names for a head of 3"):
        save_pretrained(model, tmp_path / "bad", class_names=["a", "b"])


def test_safetensors_ready_handles_shared_and_strided_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    base = torch.arange(12.0).reshape(3, 4)
    sd = {"a": base, "tied": base, "view": base[1], "t": base.t()}
    save_file(safetensors_ready(sd), str(tmp_path / "w.safetensors"))
    back = load_file(str(tmp_path / "w.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_overrides_on_load(tmp_path):
    model = vimssl.create_model("vim_test")
    out = save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(out, img_size=48, num_classes=3, drop_path_rate=0.1, backend="torch")
    sd, ref = loaded.state_dict(), model.state_dict()
    assert loaded.grid == (12, 12) and loaded.num_classes == 3 and loaded.head.weight.shape == (3, 32)
    assert torch.equal(sd["pos_embed"], resample_pos_embed(ref["pos_embed"], (8, 8), (12, 12)))
    assert all(torch.equal(sd[k], ref[k]) for k in ref if k != "pos_embed" and not k.startswith("head."))
    assert loaded.layers[-1].drop_path.p == pytest.approx(0.1) and loaded.backend == "torch"
    assert loaded(images(48)).shape == (2, 3)
    assert isinstance(from_pretrained(out, num_classes=0).head, torch.nn.Identity)
    # the same helper, on a bare state dict
    assert convert_checkpoint(ref, 48)["pos_embed"].shape == (1, 145, 32)
    with pytest.raises(TypeError, match="img_sizes"):
        from_pretrained(out, img_sizes=48)


# --------------------------------------------------------------------------------- released files
def test_released_format_file_loads_like_a_download(tmp_path):
    model = VisionMamba(img_size=224, embed_dim=16, depth=2, d_state=8, num_classes=7)
    ema = VisionMamba(img_size=224, embed_dim=16, depth=2, d_state=8, num_classes=7)
    path = write_released(tmp_path / "vim_x_midclstok.pth", model, ema)

    loaded = from_pretrained(path)
    want = dict(
        img_size=[224, 224], patch_size=16, stride=16, embed_dim=16, depth=2, d_state=8, expand=2, d_conv=4
    )
    assert {k: loaded.config[k] for k in want} == want and loaded.num_classes == 7
    assert same_weights(loaded.state_dict(), model.state_dict())
    assert same_weights(from_pretrained(path, which="model_ema").state_dict(), ema.state_dict())
    assert loaded.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]
    # the folder form (a snapshot of a released repo) picks its single .pth
    assert same_weights(from_pretrained(tmp_path).state_dict(), model.state_dict())
    # overrides work on released files too
    small = from_pretrained(path, img_size=160, num_classes=2)
    assert small.pos_embed.shape == (1, 101, 16) and small.head.weight.shape == (2, 16)


def test_released_file_of_a_registered_size_gets_its_name(tmp_path):
    model = vimssl.create_model("vim_test")
    path = write_released(tmp_path / "ckpt.pth", model, None)
    loaded = from_pretrained(path)
    assert loaded.model_name == "vim_test" and same_weights(loaded.state_dict(), model.state_dict())
    with pytest.raises(KeyError, match="model_ema"):  # model_ema is None in this file
        from_pretrained(path, which="model_ema")


@pytest.mark.parametrize(("stride", "tokens"), [(16, 197), (8, 730)])
def test_infer_config_solves_the_stride(stride, tokens):
    model = VisionMamba(img_size=224, stride=stride, embed_dim=16, depth=3, expand=1, num_classes=0)
    config = infer_config(model.state_dict())
    assert model.pos_embed.shape[1] == tokens
    assert config == dict(img_size=224, patch_size=16, stride=stride, in_chans=3, embed_dim=16, depth=3,
                          num_classes=0, d_state=16, expand=1, d_conv=4)  # fmt: skip


def test_known_junk_keys_are_dropped_and_named(tmp_path):
    model = vimssl.create_model("vim_test")
    sd = {"module." + k: v for k, v in model.state_dict().items()} | {"module.n_averaged": torch.tensor(3)}
    torch.save(sd, tmp_path / "averaged.pth")
    with pytest.warns(UserWarning, match="n_averaged"):
        loaded = from_pretrained(tmp_path / "averaged.pth")
    assert same_weights(loaded.state_dict(), model.state_dict())


def _pwn(path):  # what a malicious checkpoint would run on load
    Path(path).write_text("pwned")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_pwn, (self.path,))


class _CustomState:
    pass


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned.txt"
    model = vimssl.create_model("vim_test")
    path = write_released(tmp_path / "evil.pth", model, model, payload=_Payload(str(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"_pwn.*refuses to execute code"):
        from_pretrained(path)
    assert not marker.exists()
    # the payload is live: an unsafe load would have run it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"

    path = write_released(tmp_path / "custom.pth", model, model, extra_state=_CustomState())
    with pytest.raises(UnsafeCheckpointError, match="_CustomState"):
        from_pretrained(path)


def test_other_architectures_are_rejected_clearly(tmp_path):
    vit = {
        "cls_token": torch.zeros(1, 1, 16), "pos_embed": torch.zeros(1, 197, 16),
        "patch_embed.proj.weight": torch.zeros(16, 3, 16, 16), "patch_embed.proj.bias": torch.zeros(16),
        "blocks.0.attn.qkv.weight": torch.zeros(48, 16), "blocks.0.mlp.fc1.weight": torch.zeros(64, 16),
        "norm.weight": torch.zeros(16), "head.weight": torch.zeros(10, 16),
    }  # fmt: skip
    torch.save({"model": vit, "epoch": 3}, tmp_path / "vit.pth")
    with pytest.raises(NotAVimCheckpointError, match=r"norm_f\.weight.*blocks\.0\.attn\.qkv\.weight.*ViT"):
        from_pretrained(tmp_path / "vit.pth")
    # a Vim state dict with a tensor missing: strict load names it
    sd = vimssl.create_model("vim_test").state_dict()
    del sd["layers.1.mixer.D_b"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(NotAVimCheckpointError, match=r"1 missing keys: layers\.1\.mixer\.D_b"):
        from_pretrained(tmp_path / "partial.pth")
    with pytest.warns(UserWarning, match="layers.1.mixer.D_b"):
        from_pretrained(tmp_path / "partial.pth", strict=False)


def test_local_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        from_pretrained(tmp_path / "missing.pth")
    out = save_pretrained(vimssl.create_model("vim_test"), tmp_path / "m")
    with pytest.raises(ValueError, match="revision"):
        from_pretrained(out, revision="v1")
    with pytest.raises(ValueError, match="one set of weights"):
        from_pretrained(out, which="model_ema")


# ---------------------------------------------------------------------------------------- Hub repos
def test_hub_repo_loads_offline_from_the_cache(tmp_path, offline):
    model = vimssl.create_model("vim_test").eval()
    out = save_pretrained(model, tmp_path / "m", class_names=[str(i) for i in range(10)])
    cache = tmp_path / "cache"
    populate_cache(cache, "someone/vim-test", {n: out / n for n in ("config.json", "model.safetensors")})
    loaded = from_pretrained("someone/vim-test", cache_dir=cache).eval()
    assert same_weights(loaded.state_dict(), model.state_dict())
    assert torch.equal(loaded(images()), model(images()))
    assert (
        loaded.pretrained_cfg["class_names"][3] == "3"
        and loaded.pretrained_cfg["source"] == "someone/vim-test"
    )
    with pytest.raises(HubDownloadError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\).*Hub cache"):
        from_pretrained("someone/not-cached", cache_dir=cache)


def test_released_repo_ids_resolve_and_load_from_the_cache(tmp_path, offline):
    model = vimssl.create_model("vim_test")
    path = write_released(tmp_path / "fake.pth", model, model)
    cache = tmp_path / "cache"
    populate_cache(cache, "hustvl/Vim-tiny-midclstok", {"vim_t_midclstok_76p1acc.pth": path})
    # base: the file name is not in the table; offline, the cached snapshot is listed instead of the repo
    populate_cache(
        cache, "hustvl/Vim-base-midclstok", {"vim_b_midclstok_81p9acc.pth": path, "README.md": path}
    )
    assert cached_repo_files("hustvl/Vim-base-midclstok", cache_dir=cache) == [
        "README.md",
        "vim_b_midclstok_81p9acc.pth",
    ]
    for repo in ("hustvl/Vim-tiny-midclstok", "hustvl/Vim-base-midclstok"):
        loaded = from_pretrained(repo, cache_dir=cache)
        assert same_weights(loaded.state_dict(), model.state_dict())
    assert loaded.pretrained_cfg["source"] == "hustvl/Vim-base-midclstok/vim_b_midclstok_81p9acc.pth"
    with pytest.raises(HubDownloadError, match="offline mode"):
        from_pretrained("hustvl/Vim-small-midclstok", cache_dir=cache)


def test_released_filename_resolution():
    assert released_filename("hustvl/Vim-tiny-midclstok") == "vim_t_midclstok_76p1acc.pth"
    assert released_filename("hustvl/Vim-small-midclstok") == "vim_s_midclstok_80p5acc.pth"
    assert released_filename("hustvl/Vim-base-midclstok", ["README.md", ".gitattributes", "b.pth"]) == "b.pth"
    with pytest.raises(HubDownloadError, match="2 .pth files"):
        released_filename("hustvl/Vim-base-midclstok", ["a.pth", "b.pth"])


def test_push_to_hub_offline_fails_clearly_and_touches_nothing(tmp_path, offline):
    model = vimssl.create_model("vim_test")
    out = save_pretrained(model, tmp_path / "m")
    before, weights = folder_fingerprint(out), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        HubUploadError, match=r"creating the repository.*HF_HUB_OFFLINE=1.*Nothing was changed"
    ):
        push_to_hub(model, "me/vim-test", metrics={"top1": 1.0})
    with pytest.raises(HubUploadError, match="OfflineModeIsEnabled"):
        push_to_hub(out, "me/vim-test")
    assert folder_fingerprint(out) == before and same_weights(model.state_dict(), weights)


def test_import_vimssl_does_not_import_the_hub_client():
    code = "import sys, vimssl, vimssl.hub, vimssl.checkpoint; print('huggingface_hub' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
