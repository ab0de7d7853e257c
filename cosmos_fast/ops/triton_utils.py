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


@triton.jit
def dot_tile(A, B, offs_a, offs_b, n_a, n_b, D,
             BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_A, BLOCK_B] dot products of rows A[offs_a] with rows B[offs_b] (row length D)."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    mask_a = offs_a[:, None] < n_a
    mask_b = offs_b[:, None] < n_b
    a_ptrs = A + offs_a[:, None].to(tl.int64) * D + offs_k[None, :]
    b_ptrs = B + offs_b[:, None].to(tl.int64) * D + offs_k[None, :]
    for k in range(0, D, BLOCK_K):
        mask_k = (k + offs_k)[None, :] < D
        a = tl.load(a_ptrs, mask=mask_a & mask_k, other=0.0)
        b = tl.load(b_ptrs, mask=mask_b & mask_k, other=0.0)
        acc = mma(a, tl.trans(b), acc, PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def softplus(x):
    """log(1 + exp(x)) in fp32 without overflow, and accurate where exp(x) is far below 1 (SigLIP's negatives sit
    at x = -10, where log(1 + u) would keep 3 digits of u): log1p by Goldberg's formula."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    return tl.maximum(x, 0.0) + tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def sigmoid(x):
    """1 / (1 + exp(-x)) from exp(-|x|), which never overflows (tl.sigmoid's exp does for x below -88)."""
    u = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + u), u / (1.0 + u))


def dot_precision(dtype: torch.dtype) -> str:
    """The PRECISION argument of :func:`mma` for operands of ``dtype``."""
    if triton_interpreted():
        return "interpreter"
    # fp32 inputs keep fp32 accuracy through three TF32 products; bf16/fp16 ignore it.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def pow2_at_least_16(x: int) -> int:
    return max(16, triton.next_power_of_2(x))
