"""PyTorch path of the EMA update (CPU, and the debugging backend): ``torch._foreach_lerp_``."""
from __future__ import annotations

import torch


def ema_update(teacher, student, momentum, bf16_copy):
    """teacher <- lerp(teacher, student, 1 - momentum) = m teacher + (1 - m) student; all students share a dtype."""
    if student[0].dtype != torch.float32:
        student = [s.float() for s in student]  # lerp needs one dtype
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)
    if bf16_copy:
        torch._foreach_copy_(bf16_copy, teacher)
