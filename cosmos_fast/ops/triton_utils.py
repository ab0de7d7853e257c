"""Helpers shared by the Triton kernels of every op."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import triton_interpreted


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. Under the Triton interpreter, whose bf16 dot is wrong, the (exact) fp32 upcast
    of the operands is multiplied instead: the same products, the same fp32 accumulation."""
    if PRECISION == "interpreter":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """The PRECISION argument of :func:`mma` for operands of ``dtype``."""
    if triton_interpreted():
        return "interpreter"
    # fp32 inputs keep fp32 accuracy through three TF32 products; bf16/fp16 ignore it.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def pow2_at_least_16(x: int) -> int:
    return max(16, triton.next_power_of_2(x))
