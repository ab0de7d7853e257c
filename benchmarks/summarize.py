"""One compact table from benchmark results files (the JSON that ``common.save_results`` writes).

Usage: python benchmarks/summarize.py [--combine OUT.json] [RESULTS.json ...]
With no files it reads every ``*.json`` in the results folder. ``--combine`` also writes all the records into
one JSON file keyed by benchmark name (``run_gpu.sh`` uses it to hand back few files).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import print_table, results_dir

COLUMNS = ["bench", "case", "alpha", "impl", "dtype", "N", "ms", ("samples_per_s", "samples/s"), ("peak_gib", "GiB"),
           "goal", "met", "status"]


def load(paths: list[Path]) -> dict[str, dict]:
    records = {}
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"{path}: unreadable ({exc})")
            continue
        records[record.get("name", path.stem)] = record
    return records


def check_line(check: dict) -> str:
    """One accuracy check of a record (the scripts' check dicts differ in their keys): what, verdict, error."""
    what = " ".join(f"{key}={check[key]}" if key in ("N", "alpha", "rows") else str(check[key])
                    for key in ("case", "impl", "dtype", "N", "alpha", "rows") if check.get(key) is not None)
    errors, error = check.get("errors") or {}, check.get("error")
    if errors:
        detail = f"largest relative error {max(errors.values()):.2e}"
    elif isinstance(error, (int, float)):
        detail = f"relative error {error:.2e}"
    else:
        detail = error or "no errors recorded"
    if check.get("tolerance") is not None:
        detail += f"; tolerance {check['tolerance']:g}"
    return f"{what}: {'ok' if check.get('passed') else 'FAILED'} ({detail})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("files", nargs="*", type=Path, help="results JSON files (default: all in the results folder)")
    parser.add_argument("--combine", type=Path, help="also write every record into this one JSON file")
    args = parser.parse_args()
    records = load(args.files or sorted(results_dir().glob("*.json")))
    if not records:
        print("no benchmark results")
        return 0
    if args.combine:
        args.combine.write_text(json.dumps(records, indent=2) + "\n")

    env = next(iter(records.values())).get("environment", {})
    print(f"{env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  commit {env.get('git_commit')}")
    for name, record in records.items():
        for check in record.get("checks", []):
            print(f"check {name} {check_line(check)}")
        agreement = record.get("agreement")
        if agreement:  # bench_train_step: reference vs fused losses, step by step
            print(f"agreement {name}: {'ok' if agreement.get('passed') else 'FAILED'} (worst relative difference "
                  f"{agreement['worst_relative_difference']:.2e} over {len(agreement['fused'])} steps)")
        for note in record.get("notes", []):
            print(f"note {name}: {note}")
    # a whole training step reports step_ms: the table's ms column
    rows = [{"bench": name, "ms": row.get("step_ms"), **row} for name, record in records.items()
            for row in record.get("rows", [])]
    print()
    print_table(rows, COLUMNS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
