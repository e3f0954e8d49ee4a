"""benchmarks/chunk_picks.py: the chunk-length picks at a grid of shapes, and which of them a
setting moves, on the CPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("chunk_picks", ROOT / "benchmarks" / "chunk_picks.py")
chunk_picks = importlib.util.module_from_spec(_spec)
sys.modules["chunk_picks"] = chunk_picks
_spec.loader.exec_module(chunk_picks)


def test_picks_are_the_launchers_at_the_measured_shapes():
    got = chunk_picks.picks(132, {"Vim-T": 384, "Vim-B": 1536}, batches=(8, 128))
    assert got[("Vim-T", 4097, 8)] == (128, 384)  # 1024 px, batch 8 (docs/benchmarks.md)
    assert got[("Vim-B", 4097, 8)] == (188, 376)
    assert got[("Vim-T", 197, 128)] == (197, 197)  # 224 px: not chunked
    assert {t for _, t, _ in got} == set(chunk_picks.token_counts())
    assert 50 in chunk_picks.token_counts()  # a quarter of 224 px's patches and the class token
    # the SM count given, not this machine's: an H100 PCIe (114 SMs) gets other picks
    assert chunk_picks.picks(114, {"Vim-B": 1536}, batches=(8,))[("Vim-B", 4097, 8)] == (296, 592)


def test_a_setting_lists_the_shapes_it_moves_and_is_put_back(capsys):
    from vimssl.ssm import triton_core as tc

    before = tc.SEQ_JOINT
    assert chunk_picks.main(["--models", "Vim-B", "--set", "SEQ_JOINT=False"]) == 0
    out = capsys.readouterr().out
    assert tc.SEQ_JOINT == before
    assert "| Vim-B | 4097 | 8 | (188, 376) | (260, 520) |" in out  # the twenty-fourth session's A/B
    assert "| Vim-B | 197 |" not in out
    n_changed = sum(line.startswith("| Vim-B |") for line in out.splitlines())
    assert out.rstrip().endswith(
        f"{n_changed} of {len(chunk_picks.token_counts()) * 8} shapes pick other chunk lengths"
    )
    # the default value moves nothing
    assert chunk_picks.main(["--models", "Vim-T", "--set", f"SEQ_JOINT={before}"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(
        f"\n0 of {len(chunk_picks.token_counts()) * 8} shapes pick other chunk lengths"
    )


def test_an_unknown_setting_is_refused_by_name():
    with pytest.raises(SystemExit, match="no setting 'SEQ_NOPE'"):
        chunk_picks.main(["--set", "SEQ_NOPE=1"])
