"""Nsight Compute's details pages (``ncu --import REPORT --page details --csv``, plain or gzipped,
as ``gpu_plan.py``'s ``ncu`` step brings them back) as one markdown table: a row per kernel name,
each counter averaged over that kernel's calls.

    python benchmarks/ncu_table.py benchmarks/results/h100_ncu_scan_b1024_2026-12-06.csv.gz

The columns are the counters the kernel notes reason with: time per call, programs and
registers, waves, how busy the issue slots are, the warps each scheduler holds and how many of
them can issue, DRAM and L1/TEX throughput, and local-memory (spill) requests.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import sys
from pathlib import Path

# (column heading, ncu metric name, digits after the point)
COLUMNS = (
    ("time (us)", "Duration", 1),
    ("programs", "Grid Size", 0),
    ("registers", "Registers Per Thread", 0),
    ("waves", "Waves Per SM", 2),
    ("issue busy %", "Issue Slots Busy", 1),
    ("warps / scheduler", "Active Warps Per Scheduler", 2),
    ("eligible", "Eligible Warps Per Scheduler", 2),
    ("DRAM %", "DRAM Throughput", 1),
    ("L1/TEX %", "L1/TEX Cache Throughput", 1),
    ("spill requests", "Local Memory Spilling Requests", 0),
    ("instructions", "Executed Instructions", 0),
)
_TIME_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6}
_NEEDED = ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")


def read_page(path: Path) -> list[dict]:
    """The rows of one details page (``.csv`` or ``.csv.gz``) as dicts of its columns."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as fh:
        try:
            return parse_page(fh.read())
        except ValueError as err:
            raise SystemExit(f"{path}: {err}") from None


def parse_page(text: str) -> list[dict]:
    """The rows of a details page's text; ValueError if it is not one."""
    # ncu may print its own lines ("==PROF== ...") before the table: start at the header
    start = text.find('"ID"')
    reader = csv.DictReader(io.StringIO(text[start:] if start >= 0 else text))
    missing = [c for c in _NEEDED if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"not an ncu details page (--page details --csv): no column {missing[0]!r}")
    return list(reader)


def _number(value: str, unit: str, metric: str) -> float | None:
    try:
        x = float(value.replace(",", ""))
    except ValueError:
        return None
    if metric == "Duration":
        if unit not in _TIME_US:
            raise ValueError(f"Duration in unknown unit {unit!r}")
        x *= _TIME_US[unit]
    return x


def kernel_means(rows: list[dict]) -> dict[str, dict]:
    """{kernel name: {"calls": n, metric: mean over the calls}} for the metrics of COLUMNS, in the
    order the kernels first ran."""
    wanted = {metric for _, metric, _ in COLUMNS}
    per_call: dict[tuple[str, str], dict[str, float]] = {}
    for row in rows:
        metric = row["Metric Name"]
        if metric not in wanted:
            continue
        value = _number(row["Metric Value"], row["Metric Unit"], metric)
        if value is not None:
            per_call.setdefault((row["Kernel Name"], row["ID"]), {})[metric] = value
    out: dict[str, dict] = {}
    for (name, _), metrics in per_call.items():
        entry = out.setdefault(name, {"calls": 0, "sums": {}, "counts": {}})
        entry["calls"] += 1
        for metric, value in metrics.items():
            entry["sums"][metric] = entry["sums"].get(metric, 0.0) + value
            entry["counts"][metric] = entry["counts"].get(metric, 0) + 1
    return {
        name: {"calls": e["calls"], **{m: e["sums"][m] / e["counts"][m] for m in e["sums"]}}
        for name, e in out.items()
    }


def table(means: dict[str, dict]) -> list[str]:
    """Markdown lines: a header and a row per kernel (``-`` where the page lacks a counter)."""
    lines = [
        "| kernel | calls | " + " | ".join(head for head, _, _ in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for name, m in means.items():
        cells = [f"{m[metric]:,.{digits}f}" if metric in m else "-" for _, metric, digits in COLUMNS]
        lines.append(f"| `{name}` | {m['calls']} | " + " | ".join(cells) + " |")
    return lines


# the few counters of a one-line summary (gpu_plan.py's log): (label, ncu metric name, format)
LINE = (
    ("", "Duration", "{:,.1f} us"),
    ("waves", "Waves Per SM", "{:.2f}"),
    ("issue", "Issue Slots Busy", "{:.1f}%"),
    ("eligible", "Eligible Warps Per Scheduler", "{:.2f}"),
    ("DRAM", "DRAM Throughput", "{:.1f}%"),
    ("spills", "Local Memory Spilling Requests", "{:,.0f}"),
)


def kernel_line(kernel: str, m: dict) -> str:
    """One kernel's averaged counters (:func:`kernel_means`) as one line: its calls, time, waves,
    issue-slot use, eligible warps, DRAM throughput and spills (those the page has)."""
    parts = [f"{kernel} x{m['calls']}"]
    parts += [f"{label} {fmt.format(m[metric])}".strip() for label, metric, fmt in LINE if metric in m]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="+", type=Path, help="details pages, .csv or .csv.gz")
    args = ap.parse_args(argv)
    for path in args.pages:
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
        if len(args.pages) > 1:
            print(f"\n{path.name}:\n")
        try:
            means = kernel_means(read_page(path))
        except ValueError as err:
            raise SystemExit(f"{path}: {err}") from None
        print("\n".join(table(means)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
