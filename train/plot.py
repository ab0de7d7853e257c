"""Training curves of a run as one PNG: the loss and its parts (and the validation loss), the learning rate, the
throughput, and the held-out evaluation's R@1 / top-1 where the run logged one, per step, from the run's
``metrics.jsonl`` (the trainer writes ``curves.png`` beside it at the end of every run).

Usage: python train/plot.py RUN_DIR [--out PNG]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

NOT_LOSSES = ("step", "lr", "samples_per_s", "param_norm")
EVAL_PREFIX = "eval/"  # held-out metrics: eval/<model>/<set>/<metric>
PLOTTED_EVAL = ("i2t_R@1", "t2i_R@1", "top1")


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl`` in step order, one per step: a step's records merged (the training record
    and an evaluation's), a later value of a key replacing an earlier one (a resumed run logs again the steps after
    its checkpoint: the later record is the one the run continued from). A line that is no record (torn by a kill
    mid-write, edited by hand) is left out with one warning naming it."""
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
        by_step[record["step"]] = {**by_step.get(record["step"], {}), **record}
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
    keys = list(dict.fromkeys(k for r in records for k in r))
    losses = [k for k in keys if k not in NOT_LOSSES and not k.startswith(EVAL_PREFIX)]
    evals = [k for k in keys if k.startswith(EVAL_PREFIX) and k.rsplit("/", 1)[-1] in PLOTTED_EVAL]
    panels = 4 if evals else 3
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), gridspec_kw={"width_ratios": [2] + [1] * (panels - 1)})
    ax_loss, ax_lr, ax_speed = axes[:3]
    for name in losses:  # the validation loss is logged at evaluations only: markers join its points
        points = [(s, r[name]) for s, r in zip(steps, records) if name in r]
        ax_loss.plot(*zip(*points), label=name, linewidth=2 if name == "loss" else 1,
                     marker="o" if name == "val_loss" else None)
    ax_loss.set(xlabel="step", ylabel="loss", title="loss and its parts")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in records])
    ax_lr.set(xlabel="step", title="learning rate")
    ax_speed.plot(steps, [r.get("samples_per_s", float("nan")) for r in records])
    ax_speed.set(xlabel="step", title="samples/s (running mean)")
    if evals:
        for name in evals:
            points = [(s, r[name]) for s, r in zip(steps, records) if name in r]
            axes[3].plot(*zip(*points), marker="o", label=name[len(EVAL_PREFIX):])
        axes[3].set(xlabel="step", ylabel="%", title="held-out evaluation")
        axes[3].legend(fontsize=7)
    for ax in axes:
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
