"""Triton path of the multi-tensor EMA update: one launch for a whole tensor list.

The tensors are cut into fixed-size chunks; program c reads which tensor and offset it owns from a small
table, and the tensors' addresses from pointer tables (int64 -> pointer casts), so no tensor is copied or
concatenated. The tables are cached per tensor list (addresses and sizes), so steady-state calls upload nothing.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..._dispatch import triton_interpreted

CHUNK = 1 << 16  # elements per program
BLOCK = 2048

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _ema_kernel(TEACHER_PTRS, STUDENT_PTRS, COPY_PTRS, NUMELS, CHUNK_TENSOR, CHUNK_START, momentum,
                STUDENT_DTYPE: tl.constexpr, HAS_COPY: tl.constexpr, ALIGNED: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    i = tl.load(CHUNK_TENSOR + c)
    start = tl.load(CHUNK_START + c)
    n = tl.load(NUMELS + i)
    teacher = tl.load(TEACHER_PTRS + i).to(tl.pointer_type(tl.float32))
    student = tl.load(STUDENT_PTRS + i).to(tl.pointer_type(STUDENT_DTYPE))
    copy = tl.load(COPY_PTRS + i).to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:  # every base address is 16-byte aligned and chunks start on multiples of CHUNK: vector loads
        teacher = tl.multiple_of(teacher, 16)
        student = tl.multiple_of(student, 16)
        copy = tl.multiple_of(copy, 16)
        start = tl.multiple_of(start, CHUNK)
    for offset in tl.static_range(0, CHUNK, BLOCK):
        idx = start + offset + tl.arange(0, BLOCK)
        mask = idx < n
        t = tl.load(teacher + idx, mask=mask)
        s = tl.load(student + idx, mask=mask).to(tl.float32)
        t = momentum * t + (1.0 - momentum) * s
        tl.store(teacher + idx, t, mask=mask)
        if HAS_COPY:
            tl.store(copy + idx, t.to(tl.bfloat16, fp_downcast_rounding="rtne"), mask=mask)


@functools.lru_cache(maxsize=16)
def _plan(key, device):
    """Device tables for one tensor list: key = ((teacher ptr, student ptr, copy ptr, numel), ...)."""
    teacher_ptrs, student_ptrs, copy_ptrs, numels = (list(column) for column in zip(*key))
    counts = [triton.cdiv(n, CHUNK) for n in numels]
    chunk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(counts))
    first = torch.tensor([0] + counts[:-1]).cumsum(0)
    chunk_start = (torch.arange(len(chunk_tensor)) - first[chunk_tensor.long()]) * CHUNK
    tables = [torch.tensor(teacher_ptrs), torch.tensor(student_ptrs), torch.tensor(copy_ptrs), torch.tensor(numels),
              chunk_tensor, chunk_start]
    aligned = all(p % 16 == 0 for p in teacher_ptrs + student_ptrs + copy_ptrs)
    return [t.to(device) for t in tables], aligned


def ema_update(teacher, student, momentum, bf16_copy):
    """One launch over the list; all students share a dtype; every tensor non-empty and contiguous."""
    copies = bf16_copy or teacher  # unused pointers when there is no copy
    key = tuple((t.data_ptr(), s.data_ptr(), c.data_ptr(), t.numel()) for t, s, c in zip(teacher, student, copies))
    # The interpreter needs the tables on the host; on GPU they live on the device.
    device = torch.device("cpu") if triton_interpreted() else teacher[0].device
    tables, aligned = _plan(key, device)
    _ema_kernel[(len(tables[4]),)](
        *tables, float(momentum),
        STUDENT_DTYPE=_TL_DTYPES[student[0].dtype], HAS_COPY=bool(bf16_copy), ALIGNED=aligned,
        CHUNK=CHUNK, BLOCK=BLOCK, num_warps=8,
    )
