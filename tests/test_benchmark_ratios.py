"""benchmarks/ratios.py: the triton/cuda ratios that docs/benchmarks.md and the README report,
computed from side-by-side records; and the committed records carry the fields issue 6 names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ratios", ROOT / "benchmarks" / "ratios.py")
ratios = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ratios)

FIELDS = {"model", "img_size", "batch", "path", "train_img_s", "infer_img_s", "train_peak_gib", "gpu", "date"}


def rec(
    path, train, infer, gib, model="vim_small_patch16_224", px=1024, batch=8, gpu="NVIDIA H100", graphs=True
):
    return dict(model=model, img_size=px, batch=batch, path=path, train_img_s=train, infer_img_s=infer,
                train_peak_gib=gib, gpu=gpu, date="2026-12-06", cuda_graphs=graphs)  # fmt: skip


def test_ratios_of_one_run():
    rows = ratios.ratios(
        [
            rec("cuda", 100.0, 400.0, 10.0),
            rec("triton", 300.0, 1300.0, 5.0),
            rec("deit", 660.0, 5000.0, 4.0),
            rec("cuda", 50.0, 100.0, 8.0, model="vim_tiny_patch16_224"),
            rec("triton", 149.0, 400.0, 3.0, model="vim_tiny_patch16_224"),
        ],
        source="run.json",
    )
    assert [(r["model"], r["source"]) for r in rows] == [
        ("vim_small_patch16_224", "run.json"),
        ("vim_tiny_patch16_224", "run.json"),
    ]
    small, tiny = rows
    assert small["train"] == pytest.approx(3.0) and small["infer"] == pytest.approx(3.25)
    assert small["memory"] == pytest.approx(0.5) and small["deit_train"] == pytest.approx(2.2)
    assert small["meets"]  # the targets' bounds count as met
    assert tiny["train"] == pytest.approx(2.98) and tiny["deit_train"] is None and not tiny["meets"]


def test_only_records_of_the_same_setting_are_compared():
    records = [
        rec("cuda", 100.0, 400.0, 10.0),
        rec("triton", 300.0, 1300.0, 5.0, batch=16),  # another batch
        rec("triton", 300.0, 1300.0, 5.0, gpu="NVIDIA H200"),  # another GPU
        rec("triton", 300.0, 1300.0, 5.0, graphs=False),  # eager
    ]
    assert ratios.ratios(records) == []
    failed = [rec("cuda", 100.0, 400.0, 10.0), dict(rec("triton", 0, 0, 0), error="CUDA out of memory")]
    assert ratios.ratios(failed) == []


def test_files_that_are_not_records_are_named(tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"gpu": "x", "sweep": []}))
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="sweep.json: not a list of throughput records"):
        ratios.load(sweep)
    with pytest.raises(ValueError, match="broken.json: cannot read it as JSON"):
        ratios.load(broken)
    good = tmp_path / "run.json"
    good.write_text(json.dumps([rec("cuda", 100.0, 400.0, 10.0), rec("triton", 310.0, 1300.0, 4.0)]))
    assert ratios.main([str(sweep), str(good)]) == 0
    out, err = capsys.readouterr()
    assert "skipped" in err and "sweep.json" in err
    assert (
        "| run.json | NVIDIA H100 | 2026-12-06 | vim_small_patch16_224 | 1024 | 8 | yes | 3.10x | 3.25x"
        in out
    )
    assert ratios.main([str(sweep)]) == 1  # nothing to compare


def test_committed_side_by_side_records_carry_the_issues_fields():
    # issue 6: one record per model, image size, batch and path with these fields; every results
    # file that is a list of records (not a sweep or profile) and compares paths has them
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    compared = 0
    for path in files:
        try:
            records = ratios.load(path)
        except ValueError:
            continue
        if not ratios.ratios(records):
            continue
        compared += 1
        for r in records:
            assert FIELDS <= set(r) or "error" in r, (path.name, sorted(FIELDS - set(r)))
            assert r["path"] in {"torch", "cuda", "triton", "deit"}, (path.name, r["path"])
    assert compared >= 10
