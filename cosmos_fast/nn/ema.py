"""``EMATeacher``: a frozen copy of a student, updated by one fused EMA pass per step."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..ops.ema import ema_update_
from ..ops.ema.functional import STUDENT_DTYPES

SCHEDULES = ("fixed", "cosine")


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP/FSDP-style ``.module`` wrappers and ``torch.compile``'s ``_orig_mod``."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel) or type(module).__name__ == "DataParallel":
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


class EMATeacher(nn.Module):
    """Teacher ``t <- m t + (1 - m) s`` over all of a student's parameters (``cosmos.md``, Teacher).

    Args:
        student: the student module (may be DDP-wrapped or ``torch.compile``d; the underlying module is copied).
        momentum: m, or the starting m of the cosine schedule.
        schedule: "fixed", or "cosine" (DINO): ``m_t = final - (final - m) (1 + cos(pi t / T)) / 2``.
        final_momentum: the cosine schedule's end value.
        total_steps: T, required by the cosine schedule.
        bf16_copy: also keep ``module_bf16``, a bf16 replica written in the same pass as the update.

    ``.module`` is a frozen fp32 deep copy; ``forward`` runs it. Persistent float buffers (running statistics)
    are averaged like parameters; other buffers (counters, non-persistent masks) copied. ``state_dict()`` carries the teacher and the update count, so a resumed
    run continues exactly.
    """

    def __init__(self, student: nn.Module, momentum: float = 0.999, schedule: str = "fixed",
                 final_momentum: float = 1.0, total_steps: int | None = None, bf16_copy: bool = False):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        for name, value in (("momentum", momentum), ("final_momentum", final_momentum)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "cosine" and (not isinstance(total_steps, int) or isinstance(total_steps, bool)
                                     or total_steps <= 0):
            raise ValueError(f"schedule='cosine' needs total_steps, a positive int, got {total_steps!r}")
        averaged = [*unwrap(student).named_parameters(),
                    *((n, b) for n, b in unwrap(student).named_buffers() if b.is_floating_point())]
        for name, tensor in averaged:
            if tensor.dtype not in STUDENT_DTYPES:
                raise TypeError(f"the student's {name!r} is {tensor.dtype}: the EMA update averages fp32, bf16 or fp16 "
                                "students into an fp32 teacher")
        self.base_momentum, self.final_momentum = float(momentum), float(final_momentum)
        self.schedule, self.total_steps = schedule, total_steps
        self.module = copy.deepcopy(unwrap(student)).float().requires_grad_(False)
        self.module_bf16 = copy.deepcopy(self.module).to(torch.bfloat16) if bf16_copy else None
        self._student = [student]  # a plain list: not a submodule, so not in state_dict() or .parameters()
        self.num_updates = 0

    def momentum_at(self, step: int) -> float:
        if self.schedule == "fixed":
            return self.base_momentum
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        return self.final_momentum - (self.final_momentum - self.base_momentum) * (1 + math.cos(math.pi * progress)) / 2

    @torch.no_grad()
    def update(self, step: int | None = None) -> float:
        """One EMA step at ``step`` (default: the number of updates so far); returns the momentum used."""
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)):
            raise TypeError(f"step must be an int or None, got {type(step).__name__}")
        momentum = self.momentum_at(self.num_updates if step is None else step)
        student = unwrap(self._student[0])
        teacher_params = dict(self.module.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            raise ValueError("the student's parameters no longer match the teacher's (names differ)")
        names = list(teacher_params)
        copies = None if self.module_bf16 is None else list(dict(self.module_bf16.named_parameters()).values())
        ema_update_([teacher_params[n] for n in names], [student_params[n] for n in names], momentum,
                    bf16_copy=copies)
        self._update_buffers(student, momentum)
        self.num_updates += 1
        return momentum

    def _update_buffers(self, student: nn.Module, momentum: float) -> None:
        student_buffers = dict(student.named_buffers())
        if student_buffers.keys() != dict(self.module.named_buffers()).keys():
            raise ValueError("the student's buffers no longer match the teacher's (names differ)")
        # Non-persistent buffers are derived constants (attention masks, which may hold -inf: an average would
        # turn them into NaN): copied, like integer counters. Persistent float buffers (running statistics)
        # are averaged.
        persistent = set(self.module.state_dict())
        float_pairs = []
        for name, buf in self.module.named_buffers():
            source = student_buffers[name]
            if buf.is_floating_point() and name in persistent:
                float_pairs.append((buf, source))
            else:
                buf.copy_(source)
        if float_pairs:
            ema_update_([b for b, _ in float_pairs], [s for _, s in float_pairs], momentum)
        if self.module_bf16 is not None:
            for replica, buf in zip(self.module_bf16.buffers(), self.module.buffers()):
                replica.copy_(buf)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def get_extra_state(self):
        return {"num_updates": self.num_updates}

    def set_extra_state(self, state):
        self.num_updates = int(state["num_updates"])
