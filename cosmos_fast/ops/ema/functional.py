"""Public EMA update: argument checks, grouping by student dtype, and the backend call."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..._dispatch import select_backend
from ..._validation import check_unit_interval
from . import torch_impl

STUDENT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _impl(x: torch.Tensor):
    backend = select_backend(x, fast=("cuda", "triton"))
    if backend == "cuda":
        from . import cuda_impl

        return cuda_impl
    if backend == "triton":
        from . import triton_kernels

        return triton_kernels
    return torch_impl


def _check_list(name: str, tensors) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(tensors)


@torch.no_grad()
def ema_update_(teacher_tensors, student_tensors, momentum: float, *, bf16_copy=None) -> None:
    """In place, for every pair: ``teacher <- momentum * teacher + (1 - momentum) * student``.

    Args:
        teacher_tensors: list of fp32 tensors (the teacher is kept in fp32: bf16 would round small updates away).
        student_tensors: list of fp32, fp16 or bf16 tensors, the same shapes, in the same order.
        momentum: float in [0, 1] (1 keeps the teacher, 0 copies the student).
        bf16_copy: optional list of bf16 tensors of the same shapes that receive the updated teacher in the
            same pass (for a bf16 teacher forward without a separate cast).

    All tensors share one device. CUDA tensors take the CUDA extension (one launch per student dtype), or the
    Triton kernel where the extension is not available; CPU tensors ``torch._foreach_lerp_``.
    """
    teacher = _check_list("teacher_tensors", teacher_tensors)
    student = _check_list("student_tensors", student_tensors)
    copies = None if bf16_copy is None else _check_list("bf16_copy", bf16_copy)
    momentum = check_unit_interval("momentum", momentum)
    if len(teacher) != len(student):
        raise ValueError(f"teacher_tensors has {len(teacher)} tensors but student_tensors has {len(student)}")
    if copies is not None and len(copies) != len(teacher):
        raise ValueError(f"bf16_copy has {len(copies)} tensors but teacher_tensors has {len(teacher)}")
    if not teacher:
        return
    device = teacher[0].device
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.dtype != torch.float32:
            raise TypeError(f"teacher_tensors[{i}] must be float32 (an fp32 teacher), got {t.dtype}")
        if s.dtype not in STUDENT_DTYPES:
            raise TypeError(f"student_tensors[{i}] must be fp32, fp16 or bf16, got {s.dtype}")
        if t.shape != s.shape:
            raise ValueError(f"teacher_tensors[{i}] has shape {tuple(t.shape)} but student_tensors[{i}] has "
                             f"{tuple(s.shape)}")
        if t.device != device or s.device != device:
            raise ValueError(f"teacher_tensors[{i}] is on {t.device} and student_tensors[{i}] on {s.device}; "
                             f"all tensors must be on {device}")
        if copies is not None:
            c = copies[i]
            if c.dtype != torch.bfloat16 or c.shape != t.shape or c.device != device:
                raise ValueError(f"bf16_copy[{i}] must be a bf16 tensor of shape {tuple(t.shape)} on {device}, "
                                 f"got {c.dtype} {tuple(c.shape)} on {c.device}")
    # The kernels take contiguous, non-empty tensors, one student dtype per launch; other layouts (rare: views)
    # go through the PyTorch path, which takes any.
    groups: dict[tuple[torch.dtype, bool], list[int]] = {}
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.numel():
            contiguous = t.is_contiguous() and s.is_contiguous() and (copies is None or copies[i].is_contiguous())
            groups.setdefault((s.dtype, contiguous), []).append(i)
    fast_impl = _impl(teacher[0])
    for (_, contiguous), idx in groups.items():
        impl = fast_impl if contiguous else torch_impl
        impl.ema_update([teacher[i] for i in idx], [student[i] for i in idx], momentum,
                        None if copies is None else [copies[i] for i in idx])
