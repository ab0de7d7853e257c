"""Triton path of the sigmoid (SigLIP) loss: the loss and all its gradients in one pass over the pair tiles.

The loss is a sum of independent pair terms ``softplus(x) - y x`` with ``x = s a_i . b_j + t``; their gradient
``sigmoid(x) - y`` needs no row statistic, so the forward does everything: for each block of rows, one kernel
computes the logit tiles (the only time they are computed), sums the loss and dL/ds, dL/dt per tile, and
writes the block of dL/dx (s folded in, input dtype); two cuBLAS products turn it into dA and dB. About three
matrix-product passes in all, against four for InfoNCE (whose softmax needs a statistic before any gradient).
The block is bounded (``G_BLOCK_*``), so the extra memory is O(block x (N + K) + (N + K) D). The backward only
scales the stored gradients by the loss's gradient. Without gradients (eval) the kernel sums the loss alone.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..._dispatch import triton_interpreted
from ..fp32_matmul import accumulate_mm, mm_fp32
from ..triton_utils import dot_precision as _precision
from ..triton_utils import dot_tile as _dot_tile
from ..triton_utils import pow2_at_least_16 as _pow2_at_least_16
from ..triton_utils import sigmoid as _sigmoid
from ..triton_utils import softplus as _softplus


@triton.jit
def _sigmoid_tile_kernel(R, C, TR, TC, MASK, SCALES, G, DIAG, LOSS_PART, DS_PART, DT_PART,
                         row_start, row_stop, M, D, DT, offset, alpha,
                         HAS_TEACHER: tl.constexpr, HAS_MASK: tl.constexpr, STORE_G: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of rows row_start + [pid_m * BLOCK_M, ...) (below row_stop) against columns [pid_n * BLOCK_N, ...)
    (below M): its loss, dL/ds and dL/dt sums at [pid_m, pid_n] of the partial buffers, and (STORE_G) dL/dx times
    g_scale (s over the loss's normaliser) into G[row - row_start, column], except at the positives, whose dL/dx
    go to DIAG[row] in fp32 (the largest gradients, kept out of G's rounding to the inputs' dtype). SCALES holds
    s, t, s_T, t_T, g_scale. Row i's positive is column offset + i."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < row_stop
    col_ok = offs_n < M
    s = tl.load(SCALES)
    t = tl.load(SCALES + 1)
    dots = _dot_tile(R, C, offs_m, offs_n, row_stop, M, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    x = s * dots + t
    is_pos = offs_n[None, :] == (offset + offs_m)[:, None]
    y = tl.where(is_pos, 1.0, 0.0)
    if HAS_TEACHER:
        tx = tl.load(SCALES + 2) * _dot_tile(TR, TC, offs_m, offs_n, row_stop, M, DT, BLOCK_M, BLOCK_N, BLOCK_K,
                                             PRECISION) + tl.load(SCALES + 3)
        a = tl.zeros((BLOCK_M,), tl.float32) + alpha
        if HAS_MASK:
            a = a * tl.load(MASK + offs_m, mask=row_ok, other=0.0)
        y = (1.0 - a)[:, None] * y + a[:, None] * _sigmoid(tx)
    ok = row_ok[:, None] & col_ok[None, :]
    n_cols = tl.num_programs(1)
    tl.store(LOSS_PART + pid_m * n_cols + pid_n, tl.sum(tl.sum(tl.where(ok, _softplus(x) - y * x, 0.0), 1), 0))
    if STORE_G:
        g = tl.where(ok, _sigmoid(x) - y, 0.0)
        tl.store(DS_PART + pid_m * n_cols + pid_n, tl.sum(tl.sum(g * dots, 1), 0))
        tl.store(DT_PART + pid_m * n_cols + pid_n, tl.sum(tl.sum(g, 1), 0))
        local = (offs_m - row_start).to(tl.int64)
        tl.store(G + local[:, None] * M + offs_n[None, :],
                 (tl.load(SCALES + 4) * tl.where(is_pos, 0.0, g)).to(G.dtype.element_ty), mask=ok)
        positive = offset + offs_m
        in_tile = row_ok & (positive >= pid_n * BLOCK_N) & (positive < pid_n * BLOCK_N + BLOCK_N)
        tl.store(DIAG + local, tl.sum(tl.where(is_pos, g, 0.0), 1), mask=in_tile)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per operand width in bytes: the contrastive forward's tiles
# (tuned on an H100), fp32 halved for shared memory.
DEFAULT_CONFIGS = {2: (128, 128, 64, 8, 3), 4: (64, 64, 32, 4, 2)}
INTERPRETER_CONFIG = (64, 128, 512, 4, 1)  # the interpreter pays per tile step, not per flop
CONFIG_ENV_VAR = "COSMOS_FAST_SIGMOID_CONFIG"

# Rows of dL/dx one pass materialises: at least 1024 (so that the products stay efficient), else as many as fit
# in 16 Mi elements (32 MiB in bf16).
G_BLOCK_ELEMENTS = 1 << 24
G_BLOCK_MIN_ROWS = 1024


def _config(D: int, dtype: torch.dtype) -> dict:
    """Tile sizes and warps. ``COSMOS_FAST_SIGMOID_CONFIG="BM,BN,BK,WARPS,STAGES"`` overrides (tests, tuning)."""
    override = os.environ.get(CONFIG_ENV_VAR)
    if override:
        bm, bn, bk, warps, stages = (int(v) for v in override.split(","))
    elif triton_interpreted():
        bm, bn, bk, warps, stages = INTERPRETER_CONFIG
    else:
        bm, bn, bk, warps, stages = DEFAULT_CONFIGS[4 if dtype == torch.float32 else 2]
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, _pow2_at_least_16(D)), num_warps=warps, num_stages=stages)


def sigmoid_pairs(rows, cols, extra, scale, bias, offset, t_rows, t_cols, t_scale, t_bias, alpha, soft_mask,
                  need_grads, need_cols):
    rows, cols = rows.contiguous(), cols.contiguous()
    Vr, n, D = rows.shape
    Vc, N, _ = cols.shape
    K = 0 if extra is None else extra.shape[0]
    M = N + K
    teacher = t_rows is not None
    DT = t_rows.shape[1] if teacher else D
    cfg = _config(max(D, DT), rows.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    device = rows.device
    norm = n * Vr * Vc  # the loss is the mean over rows (and view pairs) of each row's sum over columns
    s32 = scale.detach().float().reshape(())
    # s, t, s_T, t_T, g_scale in fp32 (the teacher slots unused without one)
    scalars = torch.stack([s32, bias.detach().float().reshape(()),
                           *((t_scale.detach().float().reshape(()), t_bias.detach().float().reshape(())) if teacher
                             else (s32, s32)), s32 / norm])
    mask = None if soft_mask is None else soft_mask.float().contiguous()
    t_rows_c = t_rows.contiguous() if teacher else rows
    t_cols_all = (t_cols if extra is None else torch.cat([t_cols, extra.to(t_cols.dtype)])).contiguous() if teacher \
        else rows
    rows_per_block = min(n, max(G_BLOCK_MIN_ROWS, G_BLOCK_ELEMENTS // M))
    rows_per_block = triton.cdiv(rows_per_block, bm) * bm
    block_rows = min(rows_per_block, n)
    g_block = torch.empty(block_rows, M, dtype=rows.dtype, device=device) if need_grads else None
    diag = torch.empty(block_rows, dtype=torch.float32, device=device) if need_grads else None
    n_row_tiles, n_col_tiles = triton.cdiv(block_rows, bm), triton.cdiv(M, bn)
    loss_part = torch.empty(n_row_tiles, n_col_tiles, dtype=torch.float32, device=device)
    ds_part, dt_part = (torch.empty_like(loss_part) for _ in range(2)) if need_grads else (loss_part, loss_part)
    total = torch.zeros((), dtype=torch.float32, device=device)
    d_scale = torch.zeros((), dtype=torch.float32, device=device)
    d_bias = torch.zeros((), dtype=torch.float32, device=device)
    # Products never rounded to the inputs' dtype before the final one: dA rows are written once per row block
    # from an fp32 product (summed over view pairs in fp32 only when there are several), dB sums in fp32
    d_rows = d_cols = None
    if need_grads:
        d_rows = (torch.empty_like(rows) if Vc == 1 else torch.zeros(rows.shape, dtype=torch.float32, device=device))
        d_cols = torch.zeros(cols.shape, dtype=torch.float32, device=device) if need_cols else None
    for vc in range(Vc):
        cols_all = cols[vc] if extra is None else torch.cat([cols[vc], extra.to(cols.dtype)])
        for vr in range(Vr):
            for start in range(0, n, rows_per_block):
                stop = min(n, start + rows_per_block)
                grid = (triton.cdiv(stop - start, bm), n_col_tiles)
                _sigmoid_tile_kernel[grid](
                    rows[vr], cols_all, t_rows_c, t_cols_all, mask if mask is not None else scalars, scalars,
                    g_block if need_grads else scalars, diag if need_grads else scalars, loss_part, ds_part, dt_part,
                    start, stop, M, D, DT, offset, float(alpha),
                    HAS_TEACHER=teacher, HAS_MASK=mask is not None, STORE_G=need_grads,
                    BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], PRECISION=_precision(rows.dtype),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                )
                total += loss_part[: grid[0]].sum()
                if not need_grads:
                    continue
                d_scale += ds_part[: grid[0]].sum()
                d_bias += dt_part[: grid[0]].sum()
                block = g_block[: stop - start]
                positives = diag[: stop - start, None] * scalars[4]  # their gradients, in fp32
                part = mm_fp32(block, cols_all) + positives * cols_all[offset + start:offset + stop].float()
                if Vc == 1:
                    d_rows[vr, start:stop] = part
                else:
                    d_rows[vr, start:stop] += part
                if need_cols:
                    accumulate_mm(d_cols[vc], block[:, :N].t(), rows[vr, start:stop])
                    d_cols[vc, offset + start:offset + stop] += positives * rows[vr, start:stop].float()
    d_rows = d_rows.to(rows.dtype) if need_grads else None
    d_cols = d_cols.to(cols.dtype) if d_cols is not None else None
    return total / norm, d_rows, d_cols, (d_scale / norm).to(scale.dtype), (d_bias / norm).to(bias.dtype)
