"""Triton kernels of the fused linear losses (forward and the backward's dL/dlogits blocks).

Forward: logits z = X W^T (+ b) exist only tile by tile in SRAM. Program (row block, vocabulary split) walks
the vocabulary blocks of its split and keeps per row an online log-sum-exp (CE; with soft targets also the
teacher-weighted logit sum, from the teacher's log-sum-exp found by a memory-bound pass before) or the
running BCE sum. Splitting the vocabulary over programs fills the GPU when the active rows are few (1920
masked tokens are 15 row blocks); the per-split statistics [stat, split, n] are combined in PyTorch.

Backward: for each bounded block of rows (:mod:`.blocks`), one kernel recomputes the logits tile by tile and
writes dL/dlogits for the block in the input dtype; cuBLAS turns the block into dX and dW (summed in fp32 when
there are several blocks), so memory stays O(block x V) and the products run at matrix-multiply speed.

Measured (H100, torch 2.11, triton 3.6, bf16 fwd+bwd, ``bench_fused_linear.py`` at commit 80cc7aa): 768 ->
30522 over 1942 of 12800 rows 2.99 ms / 0.16 GiB (naive 10.5 ms / 2.19 GiB, torch.compile 6.98 ms / 2.91 GiB);
the kernels take ~0.43 ms (forward) and ~0.4 ms (dL/dlogits), the two products ~0.8 ms. Not yet tuned: the
tiles are the contrastive forward's; with soft targets the forward kernel takes 1.0 ms. The small heads
(768 -> 8192, 256 -> 30522) were bound by host work, where the dense peers were faster (1.0-1.6 ms against
1.3-2.7 ms): three host synchronisations per call and torch.library's autograd wrapper (~250 us of CPU per
forward). Since then eager calls skip that wrapper and synchronise once (:mod:`.op`); not yet re-measured.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._dispatch import triton_interpreted
from ..triton_utils import dot_precision as _precision
from ..triton_utils import mma as _mma
from ..triton_utils import pow2_at_least_16 as _pow2_at_least_16
from ..triton_utils import softplus as _softplus
from .blocks import linear_backward, soft_log_sum_exp


@triton.jit
def _logits_tile(X, W, BIAS, offs_m, offs_v, n, V, H, HAS_BIAS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_V] logits of rows X[offs_m] against vocabulary rows W[offs_v] (row length H)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m[:, None] < n
    col_ok = offs_v[:, None] < V
    x_ptrs = X + offs_m[:, None].to(tl.int64) * H + offs_k[None, :]
    w_ptrs = W + offs_v[:, None].to(tl.int64) * H + offs_k[None, :]
    for k in range(0, H, BLOCK_K):
        k_ok = (k + offs_k)[None, :] < H
        x = tl.load(x_ptrs, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=col_ok & k_ok, other=0.0)
        acc = _mma(x, tl.trans(w), acc, PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _ce_fwd_kernel(X, W, BIAS, TGT, SOFT, SOFT_ROWS, SOFT_LSE, STATS, n, V, H, cols_per_split,
                   HAS_BIAS: tl.constexpr, HAS_SOFT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Statistics of one row block over one vocabulary split, at STATS[k, split, row]: k = 0 running max,
    1 sum of exp, 2 the target's logit (0 outside its split); with soft targets 3 the teacher-weighted logit
    sum sum_j softmax(t)_j z_j, from the teacher's log-sum-exp computed before (SOFT_LSE). Every split holds at
    least one column (see _splits)."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n
    tgt = tl.load(TGT + offs_m, mask=row_ok, other=-1)
    soft_rows = tl.zeros((BLOCK_M,), tl.int64)
    soft_lse = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_SOFT:
        soft_rows = tl.load(SOFT_ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
        soft_lse = tl.load(SOFT_LSE + offs_m, mask=row_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    z_target = tl.zeros((BLOCK_M,), tl.float32)
    w_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, cols_per_split, BLOCK_V):
        offs_v = split * cols_per_split + start + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z = _logits_tile(X, W, BIAS, offs_m, offs_v, n, V, H, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
        z_target += tl.sum(tl.where(col_ok[None, :] & (offs_v[None, :] == tgt[:, None]), z, 0.0), 1)
        z_masked = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z_masked, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z_masked - m_new[:, None]), 1)
        m_i = m_new
        if HAS_SOFT:
            t = tl.load(SOFT + soft_rows[:, None] * V + offs_v[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=float("-inf")).to(tl.float32)
            w_i += tl.sum(tl.exp(t - soft_lse[:, None]) * tl.where(col_ok[None, :], z, 0.0), 1)
    stat = STATS + split * n + offs_m
    plane = n_splits * n
    tl.store(stat, m_i, mask=row_ok)
    tl.store(stat + plane, l_i, mask=row_ok)
    tl.store(stat + 2 * plane, z_target, mask=row_ok)
    if HAS_SOFT:
        tl.store(stat + 3 * plane, w_i, mask=row_ok)


@triton.jit
def _ce_grad_kernel(X, W, BIAS, TGT, SOFT, SOFT_ROWS, LSE, SOFT_LSE, GRAD, G, row_start, row_stop, V, H, alpha,
                    HAS_BIAS: tl.constexpr, HAS_SOFT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """G[row - row_start, v] = dL/dz = g softmax(z) - g (1 - alpha) onehot(target) - g alpha softmax(t)."""
    offs_m = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_m < row_stop
    col_ok = offs_v < V
    z = _logits_tile(X, W, BIAS, offs_m, offs_v, row_stop, V, H, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    g = tl.load(GRAD + offs_m, mask=row_ok, other=0.0)
    tgt = tl.load(TGT + offs_m, mask=row_ok, other=-1)
    hard_w = g
    if HAS_SOFT:
        hard_w = g * (1.0 - alpha)
    grad = g[:, None] * tl.exp(z - lse[:, None]) - tl.where(offs_v[None, :] == tgt[:, None], hard_w[:, None], 0.0)
    if HAS_SOFT:
        soft_rows = tl.load(SOFT_ROWS + offs_m, mask=row_ok, other=0).to(tl.int64)
        t = tl.load(SOFT + soft_rows[:, None] * V + offs_v[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        soft_lse = tl.load(SOFT_LSE + offs_m, mask=row_ok, other=0.0)
        grad -= (g * alpha)[:, None] * tl.exp(t - soft_lse[:, None])
    local = (offs_m - row_start).to(tl.int64)
    tl.store(G + local[:, None] * V + offs_v[None, :], grad.to(G.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _bce_targets(Y, SOFT, offs_m, offs_v, ok, V, alpha, HAS_SOFT: tl.constexpr):
    """(1 - alpha) y + alpha sigmoid(t) of one tile: BCE is linear in its target."""
    offs = offs_m[:, None].to(tl.int64) * V + offs_v[None, :]
    y = tl.load(Y + offs, mask=ok, other=0).to(tl.float32)
    if HAS_SOFT:
        t = tl.load(SOFT + offs, mask=ok, other=0.0).to(tl.float32)
        y = (1.0 - alpha) * y + alpha * tl.sigmoid(t)
    return y


@triton.jit
def _bce_fwd_kernel(X, W, BIAS, Y, SOFT, PARTIAL, n, V, H, cols_per_split, alpha,
                    HAS_BIAS: tl.constexpr, HAS_SOFT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """PARTIAL[split, row] = sum over the split's columns of softplus(z) - y z."""
    split = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, cols_per_split, BLOCK_V):
        offs_v = split * cols_per_split + start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (offs_v < V)[None, :]
        z = _logits_tile(X, W, BIAS, offs_m, offs_v, n, V, H, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
        y = _bce_targets(Y, SOFT, offs_m, offs_v, ok, V, alpha, HAS_SOFT)
        elem = _softplus(z) - y * z
        acc += tl.sum(tl.where(ok, elem, 0.0), 1)
    tl.store(PARTIAL + split * n + offs_m, acc, mask=row_ok)


@triton.jit
def _bce_grad_kernel(X, W, BIAS, Y, SOFT, GRAD, G, row_start, row_stop, V, H, alpha,
                     HAS_BIAS: tl.constexpr, HAS_SOFT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """G[row - row_start, v] = dL/dz = g (sigmoid(z) - y)."""
    offs_m = row_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_m < row_stop
    ok = row_ok[:, None] & (offs_v < V)[None, :]
    z = _logits_tile(X, W, BIAS, offs_m, offs_v, row_stop, V, H, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K, PRECISION)
    y = _bce_targets(Y, SOFT, offs_m, offs_v, ok, V, alpha, HAS_SOFT)
    g = tl.load(GRAD + offs_m, mask=row_ok, other=0.0)
    local = (offs_m - row_start).to(tl.int64)
    tl.store(G + local[:, None] * V + offs_v[None, :], (g[:, None] * (tl.sigmoid(z) - y)).to(G.dtype.element_ty),
             mask=ok)


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration

# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) per operand width in bytes; the 16-bit tiles are those the
# contrastive forward was tuned to on an H100, fp32 tiles halved for shared memory.
DEFAULT_CONFIGS = {2: (128, 128, 64, 8, 3), 4: (64, 64, 32, 4, 2)}
INTERPRETER_CONFIG = (64, 128, 128, 4, 1)  # the interpreter pays per tile step, not per flop
CONFIG_ENV_VAR = "COSMOS_FAST_FUSED_LINEAR_CONFIG"


def _config(H: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps. ``COSMOS_FAST_FUSED_LINEAR_CONFIG="BM,BV,BK,WARPS,STAGES"`` overrides (tests, tuning)."""
    override = os.environ.get(CONFIG_ENV_VAR)
    if override:
        bm, bv, bk, warps, stages = (int(v) for v in override.split(","))
    elif triton_interpreted():
        bm, bv, bk, warps, stages = INTERPRETER_CONFIG
    else:
        bm, bv, bk, warps, stages = DEFAULT_CONFIGS[4 if dtype == torch.float32 else 2]
    return dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=min(bk, _pow2_at_least_16(H)), num_warps=warps, num_stages=stages)


def _splits(n_row_blocks: int, V: int, block_v: int, device: torch.device) -> tuple[int, int]:
    """(number of vocabulary splits, columns per split): enough programs to fill the GPU about twice, each
    split a whole number of vocabulary blocks and none empty."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    v_blocks = triton.cdiv(V, block_v)
    wanted = max(1, min(v_blocks, triton.cdiv(2 * sms, n_row_blocks)))
    cols_per_split = triton.cdiv(v_blocks, wanted) * block_v
    return triton.cdiv(V, cols_per_split), cols_per_split


def _optional(x: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    # Triton wants a pointer in every slot; unused slots get a tensor that is never read.
    return fallback if x is None else x.contiguous()


def _launch_args(cfg):
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_V=cfg["BLOCK_V"], BLOCK_K=cfg["BLOCK_K"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def ce_fwd(hidden, weight, bias, target, soft_logits, soft_rows, alpha):
    """Per active row: (loss [n], lse [n], soft lse [n] or [0]), fp32; ``soft_logits`` None means alpha = 0."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    (n, H), V = hidden.shape, weight.shape[0]
    cfg = _config(H, hidden.dtype)
    row_blocks = triton.cdiv(n, cfg["BLOCK_M"])
    n_splits, cols_per_split = _splits(row_blocks, V, cfg["BLOCK_V"], hidden.device)
    has_soft = soft_logits is not None
    soft_lse = soft_log_sum_exp(soft_logits, soft_rows) if has_soft else None
    stats = torch.empty(4 if has_soft else 3, n_splits, n, dtype=torch.float32, device=hidden.device)
    _ce_fwd_kernel[(row_blocks, n_splits)](
        hidden, weight, _optional(bias, weight), target.contiguous(), _optional(soft_logits, hidden),
        _optional(soft_rows, target), _optional(soft_lse, hidden), stats, n, V, H, cols_per_split,
        HAS_BIAS=bias is not None, HAS_SOFT=has_soft, PRECISION=_precision(hidden.dtype), **_launch_args(cfg),
    )
    lse = torch.logsumexp(stats[0] + torch.log(stats[1]), dim=0)
    target_logit = stats[2].sum(0)
    if not has_soft:
        return lse - target_logit, lse, lse.new_empty(0)
    soft_dot = stats[3].sum(0)  # sum_j softmax(t)_j z_j
    return lse - (1 - alpha) * target_logit - alpha * soft_dot, lse, soft_lse


def ce_bwd(grad, hidden, weight, bias, target, soft_logits, soft_rows, alpha, lse, soft_lse,
           need_hidden, need_weight, need_bias):
    """(d_hidden [n, H], d_weight [V, H] fp32, d_bias [V] fp32) of the active rows, None where not needed."""
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), target.contiguous()
    grad = grad.float().contiguous()
    (_, H), V = hidden.shape, weight.shape[0]
    cfg = _config(H, hidden.dtype)
    has_soft = soft_logits is not None

    def grad_block(start, stop):
        block = torch.empty(stop - start, V, dtype=hidden.dtype, device=hidden.device)
        _ce_grad_kernel[(triton.cdiv(stop - start, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))](
            hidden, weight, _optional(bias, weight), target, _optional(soft_logits, hidden),
            _optional(soft_rows, target), lse, _optional(soft_lse if has_soft else None, lse), grad, block,
            start, stop, V, H, float(alpha),
            HAS_BIAS=bias is not None, HAS_SOFT=has_soft, PRECISION=_precision(hidden.dtype), **_launch_args(cfg),
        )
        return block

    return linear_backward(hidden, weight, need_hidden, need_weight, need_bias, grad_block)


def _target_bytes(target: torch.Tensor) -> torch.Tensor:
    # bool targets are read as bytes (0 or 1), without a copy
    return target.view(torch.uint8) if target.dtype == torch.bool else target


def bce_fwd(hidden, weight, bias, target, soft_logits, alpha):
    """Per row: loss [N] fp32, the BCE summed over the vocabulary."""
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), _target_bytes(target.contiguous())
    (N, H), V = hidden.shape, weight.shape[0]
    cfg = _config(H, hidden.dtype)
    row_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    n_splits, cols_per_split = _splits(row_blocks, V, cfg["BLOCK_V"], hidden.device)
    partial = torch.empty(n_splits, N, dtype=torch.float32, device=hidden.device)
    _bce_fwd_kernel[(row_blocks, n_splits)](
        hidden, weight, _optional(bias, weight), target, _optional(soft_logits, hidden), partial,
        N, V, H, cols_per_split, float(alpha),
        HAS_BIAS=bias is not None, HAS_SOFT=soft_logits is not None, PRECISION=_precision(hidden.dtype),
        **_launch_args(cfg),
    )
    return partial.sum(0)


def bce_bwd(grad, hidden, weight, bias, target, soft_logits, alpha, need_hidden, need_weight, need_bias):
    hidden, weight, target = hidden.contiguous(), weight.contiguous(), _target_bytes(target.contiguous())
    grad = grad.float().contiguous()
    (_, H), V = hidden.shape, weight.shape[0]
    cfg = _config(H, hidden.dtype)

    def grad_block(start, stop):
        block = torch.empty(stop - start, V, dtype=hidden.dtype, device=hidden.device)
        _bce_grad_kernel[(triton.cdiv(stop - start, cfg["BLOCK_M"]), triton.cdiv(V, cfg["BLOCK_V"]))](
            hidden, weight, _optional(bias, weight), target, _optional(soft_logits, hidden), grad, block,
            start, stop, V, H, float(alpha),
            HAS_BIAS=bias is not None, HAS_SOFT=soft_logits is not None, PRECISION=_precision(hidden.dtype),
            **_launch_args(cfg),
        )
        return block

    return linear_backward(hidden, weight, need_hidden, need_weight, need_bias, grad_block)
