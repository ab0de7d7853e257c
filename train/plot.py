"""Training curves of a run as one PNG: the loss and its parts, the learning rate and the throughput, per step,
from the run's ``metrics.jsonl`` (the trainer writes ``curves.png`` beside it at the end of every run).

Usage: python train/plot.py RUN_DIR [--out PNG]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

NOT_LOSSES = ("step", "lr", "samples_per_s")


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in step order, one per step. A resumed run appends to the file and logs
    again the steps after its checkpoint; the later record of a step is the one the run continued from. A line
    that is no record (torn by a kill mid-write, edited by hand) is left out with one warning naming it."""
    by_step, broken = {}, []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            broken.append(f"{path}:{number}: not a JSON record ({exc.msg})")
            continue
        if not isinstance(record, dict) or "step" not in record:
            broken.append(f"{path}:{number}: a record without 'step'")
            continue
        by_step[record["step"]] = record
    if broken:
        warnings.warn(f"{len(broken)} line(s) left out: {broken[0]}{' ...' if len(broken) > 1 else ''}",
                      stacklevel=2)
    return [by_step[step] for step in sorted(by_step)]


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Writes the curves of ``metrics_path`` to ``out_path``; None (and nothing written) without matplotlib or
    without records."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    if not records:
        return None
    steps = [r["step"] for r in records]
    losses = [k for k in records[-1] if k not in NOT_LOSSES]
    fig, (ax_loss, ax_lr, ax_speed) = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [2, 1, 1]})
    for name in losses:
        ax_loss.plot(steps, [r.get(name, float("nan")) for r in records], label=name,
                     linewidth=2 if name == "loss" else 1)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss and its parts")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records])
    ax_lr.set(xlabel="step", title="learning rate")
    ax_speed.plot(steps, [r.get("samples_per_s", float("nan")) for r in records])
    ax_speed.set(xlabel="step", title="samples/s (running mean)")
    for ax in (ax_loss, ax_lr, ax_speed):
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(metrics_path).parent))
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:  # a full disk must not leave a 0-byte PNG in place of the last good one
        fig.savefig(tmp, dpi=100, format="png")
        tmp.replace(out_path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return out_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("run_dir", type=Path, help="the run's out_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        parser.error(f"no metrics.jsonl in {args.run_dir}")
    written = plot_curves(metrics, args.out or args.run_dir / "curves.png")
    if written is None:
        print("nothing written: the plot needs matplotlib (pip install matplotlib) and at least one record",
              file=sys.stderr)
        return 1
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
