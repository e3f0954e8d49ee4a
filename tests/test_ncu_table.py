"""benchmarks/ncu_table.py: Nsight Compute details pages summarised per kernel."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ncu_table", ROOT / "benchmarks" / "ncu_table.py")
ncu_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ncu_table)

HEADER = ["ID", "Kernel Name", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]


def page(rows: list[tuple]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=csv.QUOTE_ALL)
    writer.writerow(HEADER)
    writer.writerows(rows)
    return "==PROF== Connected to process\n" + buf.getvalue()


ROWS = [
    # two calls of the scan backward, durations in different units, one with spills
    ("0", "scan_bwd_kernel", "GPU Speed Of Light Throughput", "Duration", "ms", "4.98"),
    ("0", "scan_bwd_kernel", "Launch Statistics", "Grid Size", "", "6,144"),
    ("0", "scan_bwd_kernel", "Launch Statistics", "Local Memory Spilling Requests", "", "18,000,000"),
    ("0", "scan_bwd_kernel", "Scheduler Statistics", "Issue Slots Busy", "%", "45.0"),
    ("0", "scan_bwd_kernel", "Source Counters", "Branch Instructions", "inst", "123"),
    ("1", "part_sum_kernel", "GPU Speed Of Light Throughput", "Duration", "us", "69.4"),
    ("2", "scan_bwd_kernel", "GPU Speed Of Light Throughput", "Duration", "us", "4,960.0"),
    ("2", "scan_bwd_kernel", "Launch Statistics", "Grid Size", "", "6,144"),
    ("2", "scan_bwd_kernel", "Launch Statistics", "Local Memory Spilling Requests", "", "19,000,000"),
    ("2", "scan_bwd_kernel", "Scheduler Statistics", "Issue Slots Busy", "%", "46.0"),
    ("2", "scan_bwd_kernel", "Scheduler Statistics", "Eligible Warps Per Scheduler", "warp", "n/a"),
]


def test_counters_are_averaged_per_kernel_with_times_in_microseconds():
    means = ncu_table.kernel_means(ncu_table.parse_page(page(ROWS)))
    assert list(means) == ["scan_bwd_kernel", "part_sum_kernel"]  # the order they first ran
    bwd = means["scan_bwd_kernel"]
    assert bwd["calls"] == 2
    assert bwd["Duration"] == pytest.approx((4980.0 + 4960.0) / 2)
    assert bwd["Grid Size"] == 6144 and bwd["Issue Slots Busy"] == pytest.approx(45.5)
    assert bwd["Local Memory Spilling Requests"] == pytest.approx(18.5e6)
    assert "Eligible Warps Per Scheduler" not in bwd  # "n/a" is not a number
    assert "Branch Instructions" not in bwd  # not a column
    assert means["part_sum_kernel"] == {"calls": 1, "Duration": pytest.approx(69.4)}


def test_the_table_has_a_row_per_kernel_and_dashes_for_missing_counters(tmp_path, capsys):
    path = tmp_path / "ncu_vim_base_patch16_224_1024.csv.gz"
    path.write_bytes(gzip.compress(page(ROWS).encode()))
    ncu_table.main([str(path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| kernel | calls | time (us) |")
    bwd = lines[2].split(" | ")
    assert bwd[0] == "| `scan_bwd_kernel`" and bwd[1] == "2" and bwd[2] == "4,970.0" and bwd[3] == "6,144"
    part = lines[3].split(" | ")
    assert part[2] == "69.4" and part[3] == "-"


def test_a_file_that_is_not_a_details_page_is_named(tmp_path):
    bad = tmp_path / "raw.csv"
    bad.write_text('"ID","Kernel Name","Metric Value"\n"0","k","1"\n')
    with pytest.raises(SystemExit, match=r"raw\.csv: not an ncu details page .*'Metric Name'"):
        ncu_table.main([str(bad)])
    with pytest.raises(SystemExit, match="missing.csv: no such file"):
        ncu_table.main([str(tmp_path / "missing.csv")])


def test_an_unknown_time_unit_is_refused():
    rows = [("0", "k", "s", "Duration", "fortnight", "1")]
    with pytest.raises(ValueError, match="Duration in unknown unit 'fortnight'"):
        ncu_table.kernel_means(ncu_table.parse_page(page(rows)))


def test_the_committed_h100_page_reads():
    path = ROOT / "benchmarks" / "results" / "h100_ncu_scan_b1024_2026-12-06.csv.gz"
    means = ncu_table.kernel_means(ncu_table.read_page(path))
    assert set(means) == {"scan_fwd_kernel", "scan_bwd_kernel", "part_sum_kernel"}
    assert all(m["calls"] == 2 for m in means.values())


def test_a_kernel_line_has_the_counters_the_page_has():
    means = ncu_table.kernel_means(ncu_table.parse_page(page(ROWS)))
    assert ncu_table.kernel_line("scan_bwd_kernel", means["scan_bwd_kernel"]) == (
        "scan_bwd_kernel x2, 4,970.0 us, issue 45.5%, spills 18,500,000"
    )
    assert ncu_table.kernel_line("part_sum_kernel", means["part_sum_kernel"]) == "part_sum_kernel x1, 69.4 us"
