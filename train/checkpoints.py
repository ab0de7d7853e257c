"""Checkpoints that are never lost: a health check before each write, atomic writes that keep the previous
checkpoint beside the new one, and the one-command rollback.

- ``DivergenceGuard`` watches each step's loss and the parameters' norm. A step whose parameter norm changes by
  ``norm_jump``x or more ends the run (it diverged) before anything is written; a loss ``loss_spike``x over the
  median of the recent steps' losses only holds back that step's checkpoint (a spike may pass).
- ``save_checkpoint`` writes ``checkpoint.tmp``, flushes it to disk, keeps the current ``checkpoint.pt`` as
  ``checkpoint-prev.pt``, then renames the new one into place; a failed write (a full disk) removes its partial
  file and leaves both checkpoints as they were.
- ``rollback`` (``train.py --rollback``) puts ``checkpoint-prev.pt`` back in place of ``checkpoint.pt``.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
from collections import deque
from pathlib import Path

import torch

CHECKPOINT, PREVIOUS, ROLLED_BACK = "checkpoint.pt", "checkpoint-prev.pt", "checkpoint-rolled-back.pt"


class RunError(RuntimeError):
    """A failure during training that the command line reports in one line (rc 1): what happened and what was
    kept."""


class DivergenceGuard:
    """Is this step's state fit to checkpoint? ``observe(step, loss, param_norm)`` after each optimizer step.

    Why the rules are safe for healthy runs: AdamW moves each parameter by about the learning rate per step at
    most (its update m / sqrt(v) is bounded near 1), so at the learning rates of these recipes (1e-3 and below)
    a step changes the parameter norm by a few percent at most; in the tiny main job the norm changes by under
    0.06% over any 10 steps. Doubling or halving it in one step takes an update as large as the parameters
    themselves, which only a divergence makes. Losses of healthy runs fall or drift (the main job's logged loss
    never exceeds the median of the 5 records before it); a loss 3x the median of the last 50 steps is a spike,
    and its checkpoint is held back (the next one is written if the loss returns), not the run ended.
    """

    def __init__(self, norm_jump: float = 2.0, loss_spike: float = 3.0, window: int = 50, min_history: int = 20):
        self.norm_jump, self.loss_spike, self.min_history = norm_jump, loss_spike, min_history
        self.losses: deque[float] = deque(maxlen=window)
        self.previous_norm: float | None = None

    def start(self, param_norm: float) -> None:
        """The norm of the parameters the first step starts from (fresh or resumed)."""
        self.previous_norm = param_norm

    def diverged(self, param_norm: float) -> str | None:
        """Why the parameters after this step show a divergence (the run must stop), or None."""
        if not math.isfinite(param_norm):
            return "the parameters are no longer finite"
        previous, self.previous_norm = self.previous_norm, param_norm
        if previous and not previous / self.norm_jump < param_norm < previous * self.norm_jump:
            return (f"the parameters' norm went from {previous:.4g} to {param_norm:.4g} in one step (the run "
                    "diverged: is optim.lr too high?)")
        return None

    def loss_spike_reason(self, loss: float) -> str | None:
        """Why this step's loss holds back its checkpoint (a spike against the recent median), or None; records
        the loss."""
        reason = None
        if len(self.losses) >= self.min_history:
            median = statistics.median(self.losses)
            if loss > self.loss_spike * median:
                reason = f"its loss {loss:.4g} is over {self.loss_spike:g}x the median {median:.4g} of recent steps"
        self.losses.append(loss)
        return reason


def parameter_norm(tensors: list[torch.Tensor], sharded: bool = False) -> float:
    """The L2 norm of all ``tensors`` (this rank's shards, all-reduced with ``sharded``) as a Python float."""
    squares = torch.nn.utils.get_total_norm(tensors, error_if_nonfinite=False).float() ** 2
    if sharded:
        torch.distributed.all_reduce(squares)
    return math.sqrt(squares.item())


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: Path, state: dict, kept_step: int | None, keep_previous: bool = True) -> None:
    """Write ``state`` to ``path`` atomically, keeping the checkpoint it replaces as ``checkpoint-prev.pt``.

    The new file is written to ``<path>.tmp`` and flushed to disk first; a failure there (a full disk) removes it
    and raises RunError saying which checkpoint (``kept_step``) is kept. The current checkpoint becomes the
    previous one through a hard link (or a copy), so at every moment ``path`` holds a whole checkpoint.
    ``keep_previous=False`` (a run's first checkpoint, over an overwritten run's) keeps no previous one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        kept = f"the checkpoint of step {kept_step} is kept" if kept_step else "no checkpoint was written yet"
        raise RunError(f"could not write {path}: {exc.strerror or exc} ({kept})") from exc
    if not keep_previous:
        path.with_name(PREVIOUS).unlink(missing_ok=True)
    elif path.exists():
        previous, link = path.with_name(PREVIOUS), path.with_name(PREVIOUS + ".tmp")
        link.unlink(missing_ok=True)
        try:
            try:
                os.link(path, link)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(path, link)
            os.replace(link, previous)
        except OSError as exc:
            link.unlink(missing_ok=True)
            print(f"warning: could not keep {path.name} as {PREVIOUS}: {exc}", flush=True)
    os.replace(tmp, path)
    _fsync_directory(path.parent)


def rollback(out_dir: Path) -> str:
    """Put ``checkpoint-prev.pt`` back as ``checkpoint.pt`` (the replaced one is kept as
    ``checkpoint-rolled-back.pt``); returns what was done. RunError when there is nothing to roll back to."""
    out_dir = Path(out_dir)
    current, previous = out_dir / CHECKPOINT, out_dir / PREVIOUS
    if not previous.is_file():
        raise RunError(f"--rollback: no {PREVIOUS} in {out_dir} to roll back to")

    def step_of(path: Path) -> str:
        try:
            return str(torch.load(path, map_location="cpu", weights_only=False).get("step", "?"))
        except Exception:  # an unreadable checkpoint is exactly what one rolls back from
            return "unreadable"

    replaced = step_of(current) if current.exists() else None
    if current.exists():
        os.replace(current, out_dir / ROLLED_BACK)
    os.replace(previous, current)
    _fsync_directory(out_dir)
    was = f"; the step-{replaced} checkpoint is kept as {ROLLED_BACK}" if replaced else ""
    return f"{CHECKPOINT} is now the step-{step_of(current)} checkpoint{was}. Continue with --resume."
