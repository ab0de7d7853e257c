"""Triton kernels of the InfoNCE loss (forward and backward).

The unit of work is one *direction*: rows R [Vr, n, D] scored against columns
C [Vc, N, D] (plus K extra queue columns X [K, D] without gradient) with the
scale s. Row i of view pair (vr, vc) has logits z_ij = s R_i . C_j, its positive
at column ``offset + i``, and soft targets from a teacher (t_ij = st TR_i . TC_j)
mixed in with weight alpha on masked rows. The symmetric loss is two directions.

Logit tiles live only in SRAM: the forward keeps an online log-sum-exp per row
(and one for the teacher, with the teacher-weighted logit sum); the backward
recomputes each tile from the saved log-sum-exp. Generic path (distributed, queues):
``_bwd_rows_kernel`` walks the columns of a row block to build dR, ``_bwd_cols_kernel``
the rows of a column block to build dC, so neither needs atomics.

Square problems (one process, no queue) share every tile between the two directions:
the forward gathers the column direction's statistics as per-program partials in the
same pass, and the backward writes bounded blocks of dL/dz for both directions at once,
which cuBLAS multiplies into dA and dB. Accumulation is fp32 throughout.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._dispatch import triton_interpreted
from ..fp32_matmul import accumulate_mm
from ..triton_utils import dot_precision as _precision
from ..triton_utils import dot_tile as _dot_tile
from ..triton_utils import mma as _mma
from ..triton_utils import pow2_at_least_16 as _pow2_at_least_16


@triton.jit
def _online_update(z, t, col_ok, m_i, l_i, tm_i, tl_i, w_i, HAS_TEACHER: tl.constexpr):
    """Fold one tile into the running row log-sum-exp (and the teacher's, with its weighted logit sum)."""
    z_masked = tl.where(col_ok[None, :], z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z_masked, 1))
    l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z_masked - m_new[:, None]), 1)
    if HAS_TEACHER:
        t_masked = tl.where(col_ok[None, :], t, float("-inf"))
        tm_new = tl.maximum(tm_i, tl.max(t_masked, 1))
        rescale = tl.exp(tm_i - tm_new)
        p = tl.exp(t_masked - tm_new[:, None])
        tl_i = tl_i * rescale + tl.sum(p, 1)
        w_i = w_i * rescale + tl.sum(p * tl.where(col_ok[None, :], z, 0.0), 1)
        tm_i = tm_new
    return m_new, l_i, tm_i, tl_i, w_i


@triton.jit
def _row_weights(GRAD, MASK, pair, offs_m, row_ok, n, alpha, HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr):
    """Upstream gradient g of each row, and its split into a one-hot part and a teacher part."""
    g = tl.load(GRAD + pair * n + offs_m, mask=row_ok, other=0.0)
    if HAS_TEACHER:
        a = tl.zeros_like(g) + alpha
        if HAS_MASK:
            a = a * tl.load(MASK + offs_m, mask=row_ok, other=0.0)
        return g, g * (1.0 - a), g * a
    return g, g, g * 0.0


@triton.jit
def _grad_tile(z, t, is_pos, lse, tlse, g, hard_w, soft_w, HAS_TEACHER: tl.constexpr):
    """dL/dz of one tile: g softmax(z) - hard_w onehot - soft_w softmax(t).

    The per-row vectors arrive broadcast to the tile: [:, None] for this direction's rows, [None, :] for the
    partner direction, whose rows are this tile's columns."""
    grad = g * tl.exp(z - lse) - tl.where(is_pos, hard_w, 0.0)
    if HAS_TEACHER:
        grad -= soft_w * tl.exp(t - tlse)
    return grad


@triton.jit
def _column_update(z, t, row_ok, COL, stat_stride, offs_n, col_ok, HAS_TEACHER: tl.constexpr):
    """Fold one tile into running per-column statistics kept in memory (max, sum of exp; with a teacher also
    its max, sum of exp and teacher-weighted logit sum), at COL + k * stat_stride for statistic k."""
    z_masked = tl.where(row_ok[:, None], z, float("-inf"))
    tile_max = tl.max(z_masked, 0)
    tile_sum = tl.sum(tl.exp(z_masked - tile_max[None, :]), 0)
    m_old = tl.load(COL + offs_n, mask=col_ok, other=float("-inf"))
    l_old = tl.load(COL + stat_stride + offs_n, mask=col_ok, other=0.0)
    m_new = tl.maximum(m_old, tile_max)
    tl.store(COL + offs_n, m_new, mask=col_ok)
    tl.store(COL + stat_stride + offs_n, l_old * tl.exp(m_old - m_new) + tile_sum * tl.exp(tile_max - m_new),
             mask=col_ok)
    if HAS_TEACHER:
        t_masked = tl.where(row_ok[:, None], t, float("-inf"))
        t_max = tl.max(t_masked, 0)
        p = tl.exp(t_masked - t_max[None, :])
        t_sum = tl.sum(p, 0)
        w_sum = tl.sum(p * tl.where(row_ok[:, None], z, 0.0), 0)
        tm_old = tl.load(COL + 2 * stat_stride + offs_n, mask=col_ok, other=float("-inf"))
        tl_old = tl.load(COL + 3 * stat_stride + offs_n, mask=col_ok, other=0.0)
        w_old = tl.load(COL + 4 * stat_stride + offs_n, mask=col_ok, other=0.0)
        tm_new = tl.maximum(tm_old, t_max)
        r_old = tl.exp(tm_old - tm_new)
        r_tile = tl.exp(t_max - tm_new)
        tl.store(COL + 2 * stat_stride + offs_n, tm_new, mask=col_ok)
        tl.store(COL + 3 * stat_stride + offs_n, tl_old * r_old + t_sum * r_tile, mask=col_ok)
        tl.store(COL + 4 * stat_stride + offs_n, w_old * r_old + w_sum * r_tile, mask=col_ok)


@triton.jit
def _fwd_kernel(R, C, X, TR, TC, MASK, SCALE, TSCALE, LOSS, LSE, TLSE, DIAG, COL,
                n, N, K, D, DT, Vc, offset, alpha,
                HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr, COLUMN_STATS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Row losses of one direction. Program (g, pair) takes row blocks g, g + G, ... (G programs on axis 0).

    COLUMN_STATS (square problems, no queue): the same tiles also yield the other direction's statistics,
    per column, as partials of this program's rows at COL[stat, pair, g, :]; DIAG receives z_ii."""
    group = tl.program_id(0)
    n_groups = tl.num_programs(0)
    pair = tl.program_id(1)
    R += (pair // Vc).to(tl.int64) * n * D
    C += (pair % Vc).to(tl.int64) * N * D
    stat_stride = tl.num_programs(1) * n_groups * N
    COL += (pair * n_groups + group).to(tl.int64) * N
    s = tl.load(SCALE).to(tl.float32)
    ts = tl.load(TSCALE).to(tl.float32)
    for row_block in range(group, tl.cdiv(n, BLOCK_M), n_groups):
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < n
        pos = offset + offs_m
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        tm_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        tl_i = tl.zeros((BLOCK_M,), tl.float32)
        w_i = tl.zeros((BLOCK_M,), tl.float32)
        z_pos = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            z = s * _dot_tile(R, C, offs_m, offs_n, n, N, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            t = z
            if HAS_TEACHER:
                t = ts * _dot_tile(TR, TC, offs_m, offs_n, n, N, DT, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            z_pos += tl.sum(tl.where(offs_n[None, :] == pos[:, None], z, 0.0), 1)
            m_i, l_i, tm_i, tl_i, w_i = _online_update(z, t, offs_n < N, m_i, l_i, tm_i, tl_i, w_i, HAS_TEACHER)
            if COLUMN_STATS:
                _column_update(z, t, row_ok, COL, stat_stride, offs_n, offs_n < N, HAS_TEACHER)
        for start in range(0, K, BLOCK_N):  # queue columns; the teacher scores them as they are
            offs_n = start + tl.arange(0, BLOCK_N)
            z = s * _dot_tile(R, X, offs_m, offs_n, n, K, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            t = z
            if HAS_TEACHER:
                t = ts * _dot_tile(TR, X, offs_m, offs_n, n, K, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            m_i, l_i, tm_i, tl_i, w_i = _online_update(z, t, offs_n < K, m_i, l_i, tm_i, tl_i, w_i, HAS_TEACHER)
        lse = m_i + tl.log(l_i)
        loss = lse - z_pos
        if HAS_TEACHER:
            a = tl.zeros_like(lse) + alpha
            if HAS_MASK:
                a = a * tl.load(MASK + offs_m, mask=row_ok, other=0.0)
            loss = lse - (1.0 - a) * z_pos - a * (w_i / tl_i)
            if pair == 0:
                tl.store(TLSE + offs_m, tm_i + tl.log(tl_i), mask=row_ok)
        tl.store(LOSS + pair * n + offs_m, loss, mask=row_ok)
        tl.store(LSE + pair * n + offs_m, lse, mask=row_ok)
        if COLUMN_STATS:
            tl.store(DIAG + pair * n + offs_m, z_pos, mask=row_ok)


@triton.jit
def _bwd_rows_kernel(R, C, X, TR, TC, MASK, SCALE, TSCALE, GRAD, LSE, TLSE, DR, DSCALE,
                     n, N, K, D, DT, Vc, offset, alpha,
                     HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_DR: tl.constexpr):
    """dR of one direction (skipped unless COMPUTE_DR) and per-row partials of dL/ds."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    vr = tl.program_id(2)
    R += vr.to(tl.int64) * n * D
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n
    pos = offset + offs_m
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    s = tl.load(SCALE).to(tl.float32)
    ts = tl.load(TSCALE).to(tl.float32)
    tlse = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_TEACHER:
        tlse = tl.load(TLSE + offs_m, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    ds = tl.zeros((BLOCK_M,), tl.float32)
    for vc in range(0, Vc):
        pair = vr * Vc + vc
        Cv = C + tl.cast(vc, tl.int64) * N * D
        lse = tl.load(LSE + pair * n + offs_m, mask=row_ok, other=0.0)
        g, hard_w, soft_w = _row_weights(GRAD, MASK, pair, offs_m, row_ok, n, alpha, HAS_TEACHER, HAS_MASK)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < N
            dots = _dot_tile(R, Cv, offs_m, offs_n, n, N, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            t = dots
            if HAS_TEACHER:
                t = ts * _dot_tile(TR, TC, offs_m, offs_n, n, N, DT, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            grad = _grad_tile(s * dots, t, offs_n[None, :] == pos[:, None], lse[:, None], tlse[:, None], g[:, None],
                              hard_w[:, None], soft_w[:, None], HAS_TEACHER)
            grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)
            ds += tl.sum(grad * dots, 1)
            if COMPUTE_DR:
                c = tl.load(Cv + offs_n[:, None].to(tl.int64) * D + offs_do[None, :],
                            mask=col_ok[:, None] & do_ok[None, :], other=0.0)
                acc = _mma(grad.to(c.dtype), c, acc, PRECISION)
        for start in range(0, K, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            col_ok = offs_n < K
            dots = _dot_tile(R, X, offs_m, offs_n, n, K, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            t = dots
            if HAS_TEACHER:
                t = ts * _dot_tile(TR, X, offs_m, offs_n, n, K, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            # queue columns hold no positive
            grad = _grad_tile(s * dots, t, offs_n[None, :] < 0, lse[:, None], tlse[:, None], g[:, None],
                              hard_w[:, None], soft_w[:, None], HAS_TEACHER)
            grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)
            ds += tl.sum(grad * dots, 1)
            if COMPUTE_DR:
                x = tl.load(X + offs_n[:, None].to(tl.int64) * D + offs_do[None, :],
                            mask=col_ok[:, None] & do_ok[None, :], other=0.0)
                acc = _mma(grad.to(x.dtype), x, acc, PRECISION)
    if COMPUTE_DR:
        DR += vr.to(tl.int64) * n * D
        tl.store(DR + offs_m[:, None].to(tl.int64) * D + offs_do[None, :], (s * acc).to(DR.dtype.element_ty),
                 mask=row_ok[:, None] & do_ok[None, :])
    if pid_d == 0:
        tl.store(DSCALE + vr * n + offs_m, ds, mask=row_ok)


@triton.jit
def _bwd_cols_kernel(R, C, TR, TC, MASK, SCALE, TSCALE, GRAD, LSE, TLSE, DC,
                     n, N, D, DT, Vr, Vc, offset, alpha,
                     HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    vc = tl.program_id(2)
    C += tl.cast(vc, tl.int64) * N * D
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = offs_n < N
    offs_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = offs_do < D
    s = tl.load(SCALE).to(tl.float32)
    ts = tl.load(TSCALE).to(tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    for vr in range(0, Vr):
        pair = vr * Vc + vc
        Rv = R + tl.cast(vr, tl.int64) * n * D
        for start in range(0, n, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            row_ok = offs_m < n
            lse = tl.load(LSE + pair * n + offs_m, mask=row_ok, other=0.0)
            g, hard_w, soft_w = _row_weights(GRAD, MASK, pair, offs_m, row_ok, n, alpha, HAS_TEACHER, HAS_MASK)
            dots = _dot_tile(Rv, C, offs_m, offs_n, n, N, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            t = dots
            tlse = lse
            if HAS_TEACHER:
                t = ts * _dot_tile(TR, TC, offs_m, offs_n, n, N, DT, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
                tlse = tl.load(TLSE + offs_m, mask=row_ok, other=0.0)
            is_pos = offs_n[None, :] == (offset + offs_m)[:, None]
            grad = _grad_tile(s * dots, t, is_pos, lse[:, None], tlse[:, None], g[:, None], hard_w[:, None],
                              soft_w[:, None], HAS_TEACHER)
            grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)
            r = tl.load(Rv + offs_m[:, None].to(tl.int64) * D + offs_do[None, :],
                        mask=row_ok[:, None] & do_ok[None, :], other=0.0)
            acc = _mma(tl.trans(grad).to(r.dtype), r, acc, PRECISION)
    DC += tl.cast(vc, tl.int64) * N * D
    tl.store(DC + offs_n[:, None].to(tl.int64) * D + offs_do[None, :], (s * acc).to(DC.dtype.element_ty),
             mask=col_ok[:, None] & do_ok[None, :])


@triton.jit
def _symmetric_grad_kernel(A, B, TA, TB, MASK, SCALE, TSCALE, GRAD_AB, LSE_AB, TLSE_AB, GRAD_BA, LSE_BA, TLSE_BA,
                           G, DSCALE, row_start, row_stop, n, D, DT, Va, Vb, va, vb, alpha,
                           HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
    """s dL/dz of the square problem for rows row_start:row_stop of view pair (va, vb), into G [rows, n]
    (the scale folded in, so that G @ b is dA).

    z = s a b^T serves both directions: a -> b reads it by rows (stats indexed by i), b -> a by columns (stats
    indexed by j), so each tile holds the sum of both directions' gradients. Also writes sum(G * a b^T) per tile
    (dL/ds) at DSCALE[row block, column block]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < row_stop
    col_ok = offs_n < n
    A += tl.cast(va, tl.int64) * n * D
    B += tl.cast(vb, tl.int64) * n * D
    s = tl.load(SCALE).to(tl.float32)
    dots = _dot_tile(A, B, offs_m, offs_n, row_stop, n, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    z = s * dots
    t = z
    tlse = tl.zeros((BLOCK_M,), tl.float32)
    ptlse = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_TEACHER:
        t = tl.load(TSCALE).to(tl.float32) * _dot_tile(TA, TB, offs_m, offs_n, row_stop, n, DT,
                                                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        tlse = tl.load(TLSE_AB + offs_m, mask=row_ok, other=0.0)
        ptlse = tl.load(TLSE_BA + offs_n, mask=col_ok, other=0.0)
    pair_ab = va * Vb + vb
    pair_ba = vb * Va + va
    g, hard_w, soft_w = _row_weights(GRAD_AB, MASK, pair_ab, offs_m, row_ok, n, alpha, HAS_TEACHER, HAS_MASK)
    pg, phard_w, psoft_w = _row_weights(GRAD_BA, MASK, pair_ba, offs_n, col_ok, n, alpha, HAS_TEACHER, HAS_MASK)
    lse = tl.load(LSE_AB + pair_ab * n + offs_m, mask=row_ok, other=0.0)
    plse = tl.load(LSE_BA + pair_ba * n + offs_n, mask=col_ok, other=0.0)
    is_pos = offs_n[None, :] == offs_m[:, None]
    grad = _grad_tile(z, t, is_pos, lse[:, None], tlse[:, None], g[:, None], hard_w[:, None], soft_w[:, None],
                      HAS_TEACHER)
    grad += _grad_tile(z, t, is_pos, plse[None, :], ptlse[None, :], pg[None, :], phard_w[None, :],
                       psoft_w[None, :], HAS_TEACHER)
    grad = tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)
    local = offs_m - row_start
    tl.store(G + local[:, None].to(tl.int64) * n + offs_n[None, :], (s * grad).to(G.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    tl.store(DSCALE + (row_start // BLOCK_M + pid_m) * tl.num_programs(1) + pid_n, tl.sum(tl.sum(grad * dots, 1), 0))


# ----------------------------------------------------------------------------------------------------------------
# Launch configuration

# (BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DO, num_warps, num_stages) per kernel and operand width in bytes.
# fp32 tiles are halved: at the 16-bit sizes the backward needs more shared memory than an H100 has.
DEFAULT_CONFIGS = {
    ("fwd", 2): (128, 128, 64, 0, 8, 4),
    ("bwd", 2): (128, 64, 64, 256, 8, 3),
    ("fwd", 4): (64, 64, 32, 0, 4, 2),
    ("bwd", 4): (64, 64, 32, 128, 4, 2),
}
INTERPRETER_CONFIG = (128, 128, 512, 512, 4, 1)  # the interpreter pays per tile step, not per flop


def _config(kind: str, D: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps for kernel ``kind`` ("fwd" or "bwd").

    ``COSMOS_FAST_CONTRASTIVE_CONFIG="BM,BN,BK,BDO,WARPS,STAGES"`` overrides every kernel (tests, tuning)."""
    override = os.environ.get("COSMOS_FAST_CONTRASTIVE_CONFIG")
    if override:
        bm, bn, bk, bdo, warps, stages = (int(v) for v in override.split(","))
    elif triton_interpreted():
        bm, bn, bk, bdo, warps, stages = INTERPRETER_CONFIG
    else:
        bm, bn, bk, bdo, warps, stages = DEFAULT_CONFIGS[kind, 4 if dtype == torch.float32 else 2]
    d_pow2 = _pow2_at_least_16(D)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, d_pow2), BLOCK_DO=min(bdo or d_pow2, d_pow2),
                num_warps=warps, num_stages=stages)


def _scalars(scale: torch.Tensor, t_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and the teacher scale as fp32 one-element tensors (the teacher's is the scale when absent)."""
    scale32 = scale.detach().float().reshape(1)
    return scale32, (scale32 if t_scale is None else t_scale.detach().float().reshape(1))


def _optional(x: torch.Tensor | None, fallback: torch.Tensor) -> torch.Tensor:
    # Triton wants a pointer in every slot; unused slots get a tensor that is never read.
    return fallback if x is None else x.contiguous()


def _launch_fwd(rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask, groups=None):
    """Run _fwd_kernel. ``groups`` programs per view pair share the row blocks and, when given, return the
    other direction's per-column partial statistics [stat, pair, group, N] and the diagonal logits."""
    rows, cols = rows.contiguous(), cols.contiguous()
    Vr, n, D = rows.shape
    Vc, N, _ = cols.shape
    K = 0 if extra is None else extra.shape[0]
    teacher = t_rows is not None
    DT = t_rows.shape[1] if teacher else D
    cfg = _config("fwd", max(D, DT), rows.dtype)
    row_loss = torch.empty(Vr, Vc, n, dtype=torch.float32, device=rows.device)
    lse = torch.empty_like(row_loss)
    tlse = torch.empty(n if teacher else 0, dtype=torch.float32, device=rows.device)
    scale32, tscale32 = _scalars(scale, t_scale)
    mask = None if soft_mask is None else soft_mask.float()
    column_stats = groups is not None
    diag = col = None
    if column_stats:
        diag = torch.empty_like(row_loss)
        col = torch.empty(5 if teacher else 2, Vr * Vc, groups, N, dtype=torch.float32, device=rows.device)
        col.zero_()  # running sums (statistics 1, 3, 4)
        col[0].fill_(float("-inf"))  # running maxima (statistics 0, 2)
        if teacher:
            col[2].fill_(float("-inf"))
    grid = (groups if column_stats else triton.cdiv(n, cfg["BLOCK_M"]), Vr * Vc)
    _fwd_kernel[grid](
        rows, cols, _optional(extra, cols), _optional(t_rows, rows), _optional(t_cols, cols), _optional(mask, scale32),
        scale32, tscale32, row_loss, lse, _optional(tlse if teacher else None, lse), _optional(diag, lse), _optional(col, lse),
        n, N, K, D, DT, Vc, offset, float(alpha),
        HAS_TEACHER=teacher, HAS_MASK=mask is not None, COLUMN_STATS=column_stats,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(rows.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return row_loss, lse, tlse, diag, col


def infonce_rows_fwd(rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask):
    row_loss, lse, tlse, _, _ = _launch_fwd(rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha,
                                            soft_mask)
    return row_loss, lse, tlse


def _column_groups(n_row_blocks: int, pairs: int, device: torch.device) -> int:
    """Programs per view pair for the one-pass symmetric forward: enough to fill the GPU about twice; each adds
    one row of column partials (memory), so no more."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_row_blocks, (2 * sms) // pairs))


def infonce_symmetric_fwd(a, b, scale, ta, tb, t_scale, alpha, soft_mask):
    """Both directions of the square problem in one pass over the logits: rows of a -> b online, the columns
    (rows of b -> a) as partial statistics per program, combined here."""
    Va, n, _ = a.shape
    Vb = b.shape[0]
    bm = _config("fwd", a.shape[-1], a.dtype)["BLOCK_M"]
    groups = _column_groups(triton.cdiv(n, bm), Va * Vb, a.device)
    loss_ab, lse_ab, tlse_ab, diag, col = _launch_fwd(a, b, None, scale, 0, ta, tb, t_scale, alpha, soft_mask,
                                                      groups)
    # b -> a, indexed [vb, va, j] like every row-direction tensor
    to_ba = lambda x: x.reshape(Va, Vb, n).transpose(0, 1).contiguous()  # noqa: E731
    lse_ba = to_ba(torch.logsumexp(col[0] + torch.log(col[1]), dim=1))
    loss_ba = lse_ba - to_ba(diag)
    tlse_ba = tlse_ab.new_empty(0)
    if ta is not None:
        t_lse_parts = col[2] + torch.log(col[3])
        tlse_ba = torch.logsumexp(t_lse_parts, dim=1)  # [pairs = 1, n]
        soft = (col[4] * torch.exp(col[2] - tlse_ba[:, None])).sum(1)
        row_alpha = torch.full_like(soft, alpha)
        if soft_mask is not None:
            row_alpha = row_alpha * soft_mask.float()
        loss_ba = lse_ba - to_ba((1 - row_alpha) * diag.reshape(Va * Vb, n) + row_alpha * soft)
        tlse_ba = tlse_ba.reshape(n)
    return loss_ab, loss_ba, lse_ab, lse_ba, tlse_ab, tlse_ba


def _rows_bwd(rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha, mask, grad, lse, tlse, compute_dr):
    """Launch the rows kernel: (d_rows or None, per-row dL/ds partials)."""
    Vr, n, D = rows.shape
    Vc, N, _ = cols.shape
    teacher = t_rows is not None
    DT = t_rows.shape[1] if teacher else D
    cfg = _config("bwd", max(D, DT), rows.dtype)
    scale32, tscale32 = _scalars(scale, t_scale)
    d_rows = torch.empty_like(rows) if compute_dr else None
    ds_part = torch.empty(Vr, n, dtype=torch.float32, device=rows.device)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_DO"]) if compute_dr else 1, Vr)
    _bwd_rows_kernel[grid](
        rows, cols, _optional(extra, cols), _optional(t_rows, rows), _optional(t_cols, cols), _optional(mask, scale32),
        scale32, tscale32, grad, lse, _optional(tlse if teacher else None, lse), _optional(d_rows, rows), ds_part,
        n, N, 0 if extra is None else extra.shape[0], D, DT, Vc, offset, float(alpha),
        HAS_TEACHER=teacher, HAS_MASK=mask is not None,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=cfg["BLOCK_DO"],
        PRECISION=_precision(rows.dtype), COMPUTE_DR=compute_dr,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return d_rows, ds_part


def infonce_rows_bwd(grad, rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask,
                     lse, tlse, need_rows, need_cols):
    rows, cols, grad = rows.contiguous(), cols.contiguous(), grad.float().contiguous()
    mask = None if soft_mask is None else soft_mask.float()
    # The rows kernel also yields dL/ds, so it runs even when the rows need no gradient.
    d_rows, ds_part = _rows_bwd(rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha, mask, grad, lse,
                                tlse, need_rows)
    d_cols = torch.empty_like(cols) if need_cols else None
    if need_cols:
        (Vr, n, D), (Vc, N, _) = rows.shape, cols.shape
        DT = D if t_rows is None else t_rows.shape[1]
        cfg = _config("bwd", max(D, DT), rows.dtype)
        scale32, tscale32 = _scalars(scale, t_scale)
        teacher = t_rows is not None
        _bwd_cols_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(D, cfg["BLOCK_DO"]), Vc)](
            rows, cols, _optional(t_rows, rows), _optional(t_cols, cols), _optional(mask, scale32), scale32, tscale32,
            grad, lse, _optional(tlse if teacher else None, lse), d_cols,
            n, N, D, DT, Vr, Vc, offset, float(alpha),
            HAS_TEACHER=teacher, HAS_MASK=mask is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_K=cfg["BLOCK_K"], BLOCK_DO=cfg["BLOCK_DO"], PRECISION=_precision(rows.dtype),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    return d_rows, d_cols, ds_part.sum().to(scale.dtype)


# Rows of the gradient block that one pass of the symmetric backward materialises: at least 1024 (so that
# the matrix products stay efficient), else as many as fit in 16 Mi elements (32 MiB in bf16).
G_BLOCK_ELEMENTS = 1 << 24
G_BLOCK_MIN_ROWS = 1024


def infonce_symmetric_bwd(grad_ab, grad_ba, a, b, scale, ta, tb, t_scale, alpha, soft_mask, lse_ab, lse_ba,
                          tlse_ab, tlse_ba, need_a, need_b):
    """Both directions of the square problem (one process, no queues), three matrix passes per view pair.

    For each view pair and block of rows, one kernel recomputes the logits and writes the block of dL/dz
    (both directions summed, in the input dtype); two cuBLAS products turn it into dA and dB. The block is
    bounded (``G_BLOCK_*``), so memory stays O(block x n + n D)."""
    a, b = a.contiguous(), b.contiguous()
    grad_ab, grad_ba = grad_ab.float().contiguous(), grad_ba.float().contiguous()
    mask = None if soft_mask is None else soft_mask.float()
    Va, n, D = a.shape
    Vb = b.shape[0]
    teacher = ta is not None
    DT = ta.shape[1] if teacher else D
    cfg = _config("fwd", max(D, DT), a.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    rows_per_block = min(n, max(G_BLOCK_MIN_ROWS, G_BLOCK_ELEMENTS // n))
    rows_per_block = triton.cdiv(rows_per_block, bm) * bm  # blocks start on tile rows (dL/ds partial indexing)
    g_block = torch.empty(min(rows_per_block, n), n, dtype=a.dtype, device=a.device)
    ds_part = torch.zeros(Va * Vb, triton.cdiv(n, bm), triton.cdiv(n, bn), dtype=torch.float32, device=a.device)
    d_a = torch.empty_like(a) if need_a else None
    # dA rows of one block collect Vb products: summed in fp32 here, then written once.
    acc_a = torch.empty(min(rows_per_block, n), D, dtype=torch.float32, device=a.device) if Vb > 1 else None
    d_b = torch.zeros(b.shape, dtype=torch.float32, device=a.device) if need_b else None
    scale32, tscale32 = _scalars(scale, t_scale)
    for va in range(Va):
        for start in range(0, n, rows_per_block):
            stop = min(n, start + rows_per_block)
            block = g_block[: stop - start]
            if acc_a is not None:
                acc_a.zero_()
            for vb in range(Vb):
                grid = (triton.cdiv(stop - start, bm), triton.cdiv(n, bn))
                _symmetric_grad_kernel[grid](
                    a, b, _optional(ta, a), _optional(tb, b), _optional(mask, scale32), scale32, tscale32,
                    grad_ab, lse_ab, _optional(tlse_ab if teacher else None, lse_ab),
                    grad_ba, lse_ba, _optional(tlse_ba if teacher else None, lse_ba),
                    block, ds_part[va * Vb + vb], start, stop, n, D, DT, Va, Vb, va, vb, float(alpha),
                    HAS_TEACHER=teacher, HAS_MASK=mask is not None, BLOCK_M=bm, BLOCK_N=bn,
                    BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(a.dtype),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                )
                if need_a and acc_a is None:
                    torch.mm(block, b[vb], out=d_a[va, start:stop])
                elif need_a:
                    accumulate_mm(acc_a[: stop - start], block, b[vb])
                if need_b:
                    accumulate_mm(d_b[vb], block.t(), a[va, start:stop])
            if need_a and acc_a is not None:
                d_a[va, start:stop] = acc_a[: stop - start]
    return d_a, (d_b.to(b.dtype) if need_b else None), ds_part.sum().to(scale.dtype)
