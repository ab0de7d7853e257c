"""Helpers shared by the benchmark scripts: timing, environment, results, plots and tables.

Conventions every ``bench_*.py`` follows (``kernels.md``, "Numbers to beat"):
- time with CUDA events after warm-up and report the median over many runs, on fresh random inputs;
- report peak memory as ``max_memory_allocated`` above what the inputs hold, in GiB;
- an out-of-memory run is a result (status "oom"), not a crash;
- ``--quick`` runs few sizes and few repetitions;
- ``--smoke`` runs every code path of the script at toy sizes on ``DEVICE`` (the CPU where there is no GPU), so
  a script is known to run before GPU time is spent on it; it measures nothing and writes its results to
  ``benchmarks/results/smoke`` (``tests/test_benchmarks.py`` runs each script so);
- otherwise, on a machine without CUDA a script prints why and exits with status 0.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ENV_VAR = "COSMOS_FAST_RESULTS_DIR"
GIB = 1024 ** 3
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only serves --smoke runs
SMOKE_RESULTS = REPO_ROOT / "benchmarks" / "results" / "smoke"
# A benchmark compiles the same forward for every shape, mode and variant it times; past dynamo's default of 8
# recompilations of one function it would run the rest eager, silently, under a "compile" label.
torch._dynamo.config.recompile_limit = 64


def bench_args(description: str) -> argparse.ArgumentParser:
    """An argument parser that already has ``--quick`` and ``--smoke``; scripts add their own options to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="few sizes and few repetitions")
    parser.add_argument("--smoke", action="store_true",
                        help="every code path at toy sizes, on the CPU where there is no GPU: checks that the script "
                             f"runs, measures nothing; results go to {SMOKE_RESULTS.relative_to(REPO_ROOT)}")
    return parser


def require_device(script: str, args: argparse.Namespace) -> None:
    """Exit with status 0 and a message when there is no GPU and this is no ``--smoke`` run (benchmarks have
    nothing to measure on CPU). A smoke run writes its results apart from real ones (``SMOKE_RESULTS``, unless
    $COSMOS_FAST_RESULTS_DIR names a folder)."""
    if args.smoke:
        os.environ.setdefault(RESULTS_ENV_VAR, str(SMOKE_RESULTS))
        print(f"{script}: smoke run on {DEVICE} at toy sizes; results in {results_dir()}")
    elif DEVICE != "cuda":
        print(f"{script}: CUDA is not available on this machine; nothing to benchmark (run it on a GPU, "
              "or --smoke to check that it runs).")
        sys.exit(0)


# measure()'s settings for --quick and --smoke runs: few repetitions, about a second per implementation
FEW_REPETITIONS = dict(warmup=2, reps=5, min_reps=3, max_seconds=1.0)


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"


class _HostEvent:
    """``torch.cuda.Event``'s timing interface on the host clock, for smoke runs on the CPU."""

    def record(self) -> None:
        self.seconds = time.perf_counter()

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.seconds - self.seconds) * 1000


def timing_event():
    """A timing event on ``DEVICE``: ``record()`` it, ``synchronize()``, then ``start.elapsed_time(end)`` in ms."""
    return torch.cuda.Event(enable_timing=True) if DEVICE == "cuda" else _HostEvent()


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak_memory() -> int:
    """Start a peak-memory window; returns the bytes allocated now (the baseline of ``peak_gib``)."""
    if DEVICE != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak_gib(baseline: int = 0) -> float | None:
    """The peak allocation since ``reset_peak_memory()`` above ``baseline``, in GiB (None on the CPU)."""
    return (torch.cuda.max_memory_allocated() - baseline) / GIB if DEVICE == "cuda" else None


def _is_oom(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception it wraps (torch.compile wraps errors raised while compiling) is an OOM."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def failure_status(exc: BaseException) -> str:
    """A results row's status for a failed run: "oom", or "error: <type>: <first line>" with the traceback
    printed (call it inside the ``except`` block)."""
    if _is_oom(exc):
        return "oom"
    traceback.print_exc()
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"error: {type(exc).__name__}: {first_line}"


def free_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def measure(
    fn: Callable[..., Any],
    make_inputs: Callable[[], Sequence[Any]],
    *,
    warmup: int = 3,
    reps: int = 50,
    min_reps: int = 5,
    max_seconds: float = 3.0,
    pool: int = 3,
) -> dict[str, Any]:
    """Median time (CUDA events; the host clock in a smoke run on the CPU) and peak memory of ``fn(*inputs)``.

    ``make_inputs()`` builds one set of fresh random inputs (a tuple); ``pool`` sets are built before timing and
    the calls rotate through them, so no run reuses the previous run's data and nothing is timed on zeros.
    ``fn`` must not keep state between calls (return gradients, e.g. with ``torch.autograd.grad``, rather than
    accumulating ``.grad``): its return value is dropped at once.

    The number of timed calls is ``reps``, cut down to fit about ``max_seconds`` (judged from the last warm-up
    call) but never below ``min_reps``, so slow peers do not eat a short GPU session.

    Returns ``{"ms", "peak_gib", "reps", "status"}``: median milliseconds per call, the peak of
    ``max_memory_allocated`` during the timed calls above what was allocated before them (the inputs; None on
    the CPU), and status "ok"; or ``ms``/``peak_gib`` None with status "oom" when the GPU ran out of memory, or
    "error: <message>" (traceback printed) when ``fn`` raised anything else.
    """
    inputs = None
    status = "ok"
    try:
        inputs = [tuple(make_inputs()) for _ in range(pool)]
        for i in range(max(warmup, 1)):
            start, end = timing_event(), timing_event()
            start.record()
            fn(*inputs[i % pool])
            end.record()
        synchronize()
        estimate_ms = max(start.elapsed_time(end), 1e-3)
        n = max(min_reps, min(reps, int(max_seconds * 1000 / estimate_ms)))

        gc.collect()
        baseline = reset_peak_memory()
        events = [(timing_event(), timing_event()) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(*inputs[i % pool])
            end.record()
        synchronize()
        ms = statistics.median([s.elapsed_time(e) for s, e in events])
        peak = peak_gib(baseline)
    except Exception as exc:  # one failing implementation must not end the whole benchmark
        status = failure_status(exc)
    # Freed outside the except block: the traceback held the frames (and tensors) of the failed call.
    inputs = None
    free_memory()
    if status != "ok":
        return {"ms": None, "peak_gib": None, "reps": 0, "status": status}
    return {"ms": ms, "peak_gib": peak, "reps": n, "status": status}


def mark_goal(row: dict[str, Any], goal: tuple[float, float] | None) -> dict[str, Any]:
    """``row`` with "goal" and "met" (yes / no) added for a (ms, GiB) goal; as it was without one."""
    if goal is not None:
        ms, gib = goal
        row["goal"] = f"<= {ms:g} ms / {gib:g} GiB"
        row["met"] = "yes" if row["status"] == "ok" and row["ms"] <= ms and row["peak_gib"] <= gib else "no"
    return row


def _git_commit() -> str | None:
    """HEAD of the checkout, or $COSMOS_FAST_COMMIT where the tree travelled without .git (the GPU runner)."""
    if os.environ.get("COSMOS_FAST_COMMIT"):
        return os.environ["COSMOS_FAST_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Where and with what a benchmark ran: device, date, commit, versions and ``cosmos_fast.backends()``."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import cosmos_fast

        backends = cosmos_fast.backends()
    except Exception as exc:  # the record should still be written when the package is broken
        backends = f"unavailable: {type(exc).__name__}: {exc}"
    gpu_memory_gib = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1) if DEVICE == "cuda" else None
    return {
        "device": device_name(),
        "gpu_memory_gib": gpu_memory_gib,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cosmos_fast_backends": backends,
    }


def results_dir() -> Path:
    """``benchmarks/results``, or the folder named by ``COSMOS_FAST_RESULTS_DIR``."""
    override = os.environ.get(RESULTS_ENV_VAR)
    return Path(override) if override else REPO_ROOT / "benchmarks" / "results"


def save_results(name: str, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Path:
    """Write ``<results dir>/<name>.json``: the environment, the ``meta`` entries (top level) and the rows.

    Returns the path. Scripts may call it after every row so that a run cut short still leaves its results.
    """
    path = results_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "environment": environment(), **(meta or {}), "rows": rows}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)  # readers never see half a file
    return path


def _label(row: dict[str, Any], series: str | Sequence[str]) -> str:
    keys = [series] if isinstance(series, str) else series
    return " ".join(str(row.get(k)) for k in keys)


def _measured(keys: Sequence[str], rows: list[dict[str, Any]]) -> list[str]:
    """The keys that some row has a number for (memory is not measured on the CPU, say); the first if none."""
    present = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)]
    return present or list(keys[:1])


def _pyplot(name: str):
    """matplotlib's pyplot on the Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"plot {name}: matplotlib is not installed; no figure written")
        return None
    return plt


def _save_figure(plt, fig, name: str, title: str | None) -> Path:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = results_dir() / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(
    name: str,
    rows: Iterable[dict[str, Any]],
    x: str,
    y: str | Sequence[str],
    series: str | Sequence[str],
    *,
    title: str | None = None,
    logx: bool = True,
    logy: bool = True,
) -> Path | None:
    """Save ``<results dir>/<name>.png``: one subplot per key in ``y`` against ``x``, one line per series.

    ``series`` is the row key (or keys) that name a line, e.g. ``("impl", "dtype")``. Rows whose ``y`` value is
    missing (out of memory, skipped) leave a gap; a key no row has is left out. Returns the path, or None when
    matplotlib is not installed.
    """
    plt = _pyplot(name)
    if plt is None:
        return None
    rows = list(rows)
    ys = _measured([y] if isinstance(y, str) else list(y), rows)
    labels = list(dict.fromkeys(_label(r, series) for r in rows))
    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], ys):
        for label in labels:
            points = sorted(
                (r[x], r[key]) for r in rows
                if _label(r, series) == label and isinstance(r.get(key), (int, float)) and r[key] > 0
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(key)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return _save_figure(plt, fig, name, title or name)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 1 or magnitude == 0:
            return f"{value:.2f}"
        if magnitude >= 1e-3:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def bar_plot(name: str, rows: Iterable[dict[str, Any]], label: str | Sequence[str], values: Sequence[str], *,
             title: str | None = None) -> Path | None:
    """Save ``<results dir>/<name>.png``: horizontal bars, one subplot per key in ``values``, one bar per row
    (named by the ``label`` keys; a key no row has is left out). For benchmarks of one size, where a line plot
    has no axis to draw along."""
    plt = _pyplot(name)
    if plt is None:
        return None
    rows = list(rows)
    values = _measured(values, rows)
    rows = [r for r in rows if all(r.get(v) is not None for v in values)]
    names = [_label(r, label) for r in rows]
    label_inches = 0.075 * max(map(len, names), default=0)  # room for the bar names left of the first subplot
    fig, axes = plt.subplots(1, len(values), figsize=(label_inches + 5 * len(values), 0.45 * len(rows) + 1.5),
                             squeeze=False)
    for ax, key in zip(axes[0], values):
        bars = ax.barh(names, [r[key] for r in rows])
        ax.bar_label(bars, fmt="%.3g", padding=2, fontsize=8)
        ax.margins(x=0.15)  # room for the value labels
        ax.invert_yaxis()
        ax.set_xlabel(key)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    return _save_figure(plt, fig, name, title)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[str | tuple[str, str]]) -> None:
    """Print rows as an aligned text table; a column is a key or ``(key, header)``; missing values print "-"."""
    cols = [(c, c) if isinstance(c, str) else c for c in columns]
    rows = list(rows)
    cells = [[_fmt(r.get(key)) for key, _ in cols] for r in rows]
    numeric = [
        any(isinstance(r.get(key), (int, float)) for r in rows)
        and all(isinstance(r.get(key), (int, float)) or r.get(key) is None for r in rows)
        for key, _ in cols
    ]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, (_, h) in enumerate(cols)]

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    print(line([h for _, h in cols]))
    print("  ".join("-" * w for w in widths))
    for values in cells:
        print(line(values))


def exit_status(script: str, rows: Iterable[dict[str, Any]], failed_checks: Sequence[str] = ()) -> int:
    """Report implementations that raised and accuracy checks that failed (named in ``failed_checks``); the
    script's exit status: 1 if there were any, else 0."""
    errors = [r for r in rows if str(r.get("status", "")).startswith("error")]
    if errors:
        print(f"{script}: {len(errors)} implementation(s) raised errors (see the tracebacks above)")
    if failed_checks:
        print(f"{script}: ACCURACY CHECK FAILED for cosmos_fast ({', '.join(failed_checks)}); "
              "those rows were not timed")
    return 1 if errors or failed_checks else 0
