"""The triton path against the cuda path (and DeiT against the triton path) from side-by-side
throughput records: what ``docs/benchmarks.md`` and the README's Performance table report.

    python benchmarks/ratios.py benchmarks/results/h200_v22_1024_2026-11-29.json [more.json ...]

Records are compared only within one file (one side-by-side run, as ``benchmarks/throughput.py``
and ``benchmarks/gpu_plan.py`` write them) and only at the same GPU, model, image size, batch and
CUDA-graph setting. Each comparison prints one row: triton/cuda training and inference throughput,
triton/cuda training peak memory, DeiT/triton training throughput (where DeiT was measured), and
whether the row meets issue 6's targets (training and inference at least 3x, memory at most 0.5x).
Records with an ``error`` and files that are not lists of throughput records are skipped, and
said so on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TARGETS = {"train": 3.0, "infer": 3.0, "memory": 0.5}  # issue 6: at least, at least, at most
_FIELDS = ("model", "img_size", "batch", "path", "train_img_s", "infer_img_s", "train_peak_gib")


def _key(rec: dict) -> tuple:
    return (rec.get("gpu", "?"), rec["model"], rec["img_size"], rec["batch"], bool(rec.get("cuda_graphs")))


def ratios(records: list[dict], source: str = "") -> list[dict]:
    """One row per (GPU, model, image size, batch, graphs) of ``records`` (one run) that has both
    a ``cuda`` and a ``triton`` record, in the order the triton records come."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        if "error" in rec or not all(f in rec for f in _FIELDS):
            continue
        by_key.setdefault(_key(rec), {})[rec["path"]] = rec
    rows = []
    for key, paths in by_key.items():
        cuda, triton = paths.get("cuda"), paths.get("triton")
        if cuda is None or triton is None:
            continue
        row = {
            "source": source,
            "gpu": key[0],
            "date": triton.get("date", ""),
            "model": key[1],
            "img_size": key[2],
            "batch": key[3],
            "cuda_graphs": key[4],
            "train": triton["train_img_s"] / cuda["train_img_s"],
            "infer": triton["infer_img_s"] / cuda["infer_img_s"],
            "memory": triton["train_peak_gib"] / cuda["train_peak_gib"],
            "deit_train": paths["deit"]["train_img_s"] / triton["train_img_s"] if "deit" in paths else None,
        }
        row["meets"] = (
            row["train"] >= TARGETS["train"]
            and row["infer"] >= TARGETS["infer"]
            and row["memory"] <= TARGETS["memory"]
        )
        rows.append(row)
    return rows


def load(path: Path) -> list[dict]:
    """The records of one results file; ValueError naming the file when it holds none."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read it as JSON ({err})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: not a list of throughput records (a sweep or profile file?)")
    return data


def table(rows: list[dict]) -> str:
    lines = [
        "| run | GPU | date | model | px | batch | graphs | train triton/cuda | infer triton/cuda "
        "| memory triton/cuda | DeiT/triton train | meets 3x / 3x / 0.5x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        deit = "-" if r["deit_train"] is None else f"{r['deit_train']:.2f}x"
        lines.append(
            f"| {r['source']} | {r['gpu']} | {r['date']} | {r['model']} | {r['img_size']} | {r['batch']} "
            f"| {'yes' if r['cuda_graphs'] else 'no'} | {r['train']:.2f}x | {r['infer']:.2f}x "
            f"| {r['memory']:.2f}x | {deit} | {'yes' if r['meets'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, help="results files (JSON lists of records)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = ap.parse_args(argv)
    rows = []
    for path in args.files:
        try:
            records = load(path)
        except ValueError as err:
            print(f"skipped {err}", file=sys.stderr)
            continue
        found = ratios(records, source=path.name)
        if not found:
            print(f"skipped {path}: no cuda and triton records of the same run", file=sys.stderr)
        rows += found
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
