"""Triton kernels of cross-attention for short query sets (Lq <= 64) over long key sets.

One program owns one (sample, head) pair and all of its queries, so the backward needs neither atomics nor a
second kernel: walking the key blocks once, it writes each block's dK and dV (no other program touches those
keys) and accumulates dQ in registers. Keys masked as padding, and the tail of the last block, get -inf
logits; a sample whose keys are all masked stores lse = +inf, so its output and every gradient are zero.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._dispatch import triton_interpreted
from ..triton_utils import dot_precision, mma, pow2_at_least_16

MAX_QUERIES = 64  # one program holds all queries of a (sample, head) pair
MAX_HEAD_DIM = 128


@triton.jit
def _logits(q, K, MASK, b, offs_k, offs_d, Lk, row_stride, D, scale, HAS_MASK: tl.constexpr,
            PRECISION: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scaled logits [BLOCK_Q, BLOCK_K] of the queries against one block of keys, -inf where masked; and k."""
    key_ok = offs_k < Lk
    k = tl.load(K + offs_k[:, None].to(tl.int64) * row_stride + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    s = scale * mma(q, tl.trans(k), tl.zeros((BLOCK_Q, BLOCK_K), tl.float32), PRECISION)
    if HAS_MASK:
        key_ok = key_ok & (tl.load(MASK + b * Lk + offs_k, mask=key_ok, other=1) == 0)
    return tl.where(key_ok[None, :], s, float("-inf")), k


@triton.jit
def _fwd_kernel(Q, K, V, MASK, O, LSE, Lq, Lk, H, D, scale,
                HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    q_stride = H * D  # [B, L, H, D] contiguous: one token's row of all heads
    Q += (b.to(tl.int64) * Lq * H + h) * D
    K += (b.to(tl.int64) * Lk * H + h) * D
    V += (b.to(tl.int64) * Lk * H + h) * D
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_q[:, None] < Lq) & (offs_d[None, :] < D)
    q = tl.load(Q + offs_q[:, None] * q_stride + offs_d[None, :], mask=q_ok, other=0.0)
    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        s, _ = _logits(q, K, MASK, b, offs_k, offs_d, Lk, q_stride, D, scale, HAS_MASK, PRECISION, BLOCK_Q, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp() away from -inf - -inf
        p = tl.exp(s - m_safe[:, None])
        rescale = tl.exp(m_i - m_safe)
        v = tl.load(V + offs_k[:, None].to(tl.int64) * q_stride + offs_d[None, :],
                    mask=(offs_k[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
        acc = mma(p.to(v.dtype), v, acc * rescale[:, None], PRECISION)
        l_i = l_i * rescale + tl.sum(p, 1)
        m_i = m_new
    has_key = l_i > 0
    out = tl.where(has_key[:, None], acc / tl.where(has_key, l_i, 1.0)[:, None], 0.0)
    O += (b.to(tl.int64) * Lq * H + h) * D
    tl.store(O + offs_q[:, None] * q_stride + offs_d[None, :], out.to(O.dtype.element_ty), mask=q_ok)
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid * Lq + offs_q, lse, mask=offs_q < Lq)


@triton.jit
def _bwd_kernel(Q, K, V, MASK, O, DO, LSE, DQ, DK, DV, Lq, Lk, H, D, scale,
                HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    stride = H * D
    q_base = (b.to(tl.int64) * Lq * H + h) * D
    k_base = (b.to(tl.int64) * Lk * H + h) * D
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_q[:, None] < Lq) & (offs_d[None, :] < D)
    q_ptrs = offs_q[:, None] * stride + offs_d[None, :]
    q = tl.load(Q + q_base + q_ptrs, mask=q_ok, other=0.0)
    do = tl.load(DO + q_base + q_ptrs, mask=q_ok, other=0.0)
    o = tl.load(O + q_base + q_ptrs, mask=q_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O) = sum_j P_ij dP_ij
    lse = tl.load(LSE + pid * Lq + offs_q, mask=offs_q < Lq, other=float("inf"))
    dq = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for start in range(0, Lk, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        kv_ok = (offs_k[:, None] < Lk) & (offs_d[None, :] < D)
        kv_ptrs = offs_k[:, None].to(tl.int64) * stride + offs_d[None, :]
        s, k = _logits(q, K + k_base, MASK, b, offs_k, offs_d, Lk, stride, D, scale, HAS_MASK, PRECISION,
                       BLOCK_Q, BLOCK_K)
        p = tl.exp(s - lse[:, None])  # 0 for masked keys and for samples without keys (lse = inf)
        v = tl.load(V + k_base + kv_ptrs, mask=kv_ok, other=0.0)
        dv = mma(tl.trans(p).to(do.dtype), do, tl.zeros((BLOCK_K, BLOCK_D), tl.float32), PRECISION)
        tl.store(DV + k_base + kv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)
        dp = mma(do, tl.trans(v), tl.zeros((BLOCK_Q, BLOCK_K), tl.float32), PRECISION)
        ds = p * (dp - delta[:, None]) * scale
        dk = mma(tl.trans(ds).to(q.dtype), q, tl.zeros((BLOCK_K, BLOCK_D), tl.float32), PRECISION)
        tl.store(DK + k_base + kv_ptrs, dk.to(DK.dtype.element_ty), mask=kv_ok)
        dq = mma(ds.to(k.dtype), k, dq, PRECISION)
    tl.store(DQ + q_base + q_ptrs, dq.to(DQ.dtype.element_ty), mask=q_ok)


def _blocks(Lq: int, D: int) -> dict:
    block_d = pow2_at_least_16(D)
    # the interpreter pays per step: few, large key blocks
    block_k = 128 if triton_interpreted() or block_d <= 64 else 64
    return dict(BLOCK_Q=pow2_at_least_16(Lq), BLOCK_K=block_k, BLOCK_D=block_d)


def _mask_arg(key_padding_mask, like):
    # a byte per key (1 = padding); the slot needs a pointer even without a mask
    return like if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()


def cross_attention_fwd(q, k, v, key_padding_mask, scale):
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    blocks = _blocks(Lq, D)
    out = torch.empty_like(q)
    lse = torch.empty(B * H, Lq, dtype=torch.float32, device=q.device)
    _fwd_kernel[(B * H,)](q, k, v, _mask_arg(key_padding_mask, q), out, lse, Lq, Lk, H, D, float(scale),
                          HAS_MASK=key_padding_mask is not None, PRECISION=dot_precision(q.dtype), **blocks,
                          num_warps=4, num_stages=2)
    return out, lse


def cross_attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse, scale):
    q, k, v, out, grad_out = (x.contiguous() for x in (q, k, v, out, grad_out))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    blocks = _blocks(Lq, D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _bwd_kernel[(B * H,)](q, k, v, _mask_arg(key_padding_mask, q), out, grad_out, lse, dq, dk, dv, Lq, Lk, H, D,
                          float(scale), HAS_MASK=key_padding_mask is not None, PRECISION=dot_precision(q.dtype),
                          **blocks, num_warps=4, num_stages=2)
    return dq, dk, dv
