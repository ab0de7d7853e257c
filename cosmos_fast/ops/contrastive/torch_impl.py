"""PyTorch path of the row-direction InfoNCE (CPU, float64, and the debugging backend).

Memory-lean: rows are processed in chunks so that no buffer holds more than
``CHUNK_ELEMENTS`` logits; the N x N matrix never exists. The backward
recomputes each chunk's logits from the saved row log-sum-exp, as the Triton
kernels do. Shapes and semantics are those of :mod:`.op`.
"""
from __future__ import annotations

import torch

# Largest logit block (elements) one chunk may hold: 4 Mi fp32 = 16 MiB.
CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunks(n: int, per_row: int):
    step = max(1, min(n, CHUNK_ELEMENTS // max(per_row, 1)))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _dots(rows, cols, extra):
    """Unscaled dot products [Vr, Vc, c, N + K] of rows [Vr, c, D] with every column."""
    dots = torch.einsum("rcd,vnd->rvcn", rows, cols)
    if extra is not None:
        extra_dots = torch.einsum("rcd,kd->rck", rows, extra)[:, None].expand(-1, cols.shape[0], -1, -1)
        dots = torch.cat([dots, extra_dots], dim=-1)
    return dots


def _teacher_columns(t_cols, extra, dtype):
    """Teacher-side columns: the gathered teacher features, then the queue (teacher-space) features."""
    t_cols = t_cols.to(dtype)
    return t_cols if extra is None else torch.cat([t_cols, extra.to(dtype)])


def _row_alpha(alpha, soft_mask, start, stop, device, dtype):
    row_alpha = torch.full((stop - start,), alpha, dtype=dtype, device=device)
    if soft_mask is not None:
        row_alpha = row_alpha * soft_mask[start:stop].to(dtype)
    return row_alpha


def infonce_rows_fwd(rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask):
    Vr, n, _ = rows.shape
    Vc, N, _ = cols.shape
    M = N + (0 if extra is None else extra.shape[0])
    dtype = _compute_dtype(rows)
    s = scale.to(dtype)
    cols_c = cols.to(dtype)
    extra_c = None if extra is None else extra.to(dtype)
    teacher = t_rows is not None
    if teacher:
        t_cols_c = _teacher_columns(t_cols, extra, dtype)
        t_s = t_scale.to(dtype)
    row_loss = torch.empty(Vr, Vc, n, dtype=dtype, device=rows.device)  # fp64 losses for fp64 inputs
    lse = torch.empty_like(row_loss)
    tlse = torch.empty(n if teacher else 0, dtype=dtype, device=rows.device)
    for start, stop in _chunks(n, Vr * Vc * M):
        logits = s * _dots(rows[:, start:stop].to(dtype), cols_c, extra_c)
        chunk_lse = torch.logsumexp(logits, dim=-1)
        local = torch.arange(stop - start, device=rows.device)
        positive = logits[:, :, local, offset + start + local]
        loss = chunk_lse - positive
        if teacher:
            t_logits = t_s * t_rows[start:stop].to(dtype) @ t_cols_c.t()
            chunk_tlse = torch.logsumexp(t_logits, dim=-1)
            probs = torch.exp(t_logits - chunk_tlse[:, None])
            row_alpha = _row_alpha(alpha, soft_mask, start, stop, rows.device, dtype)
            soft = (probs * logits).sum(-1)
            loss = chunk_lse - (1 - row_alpha) * positive - row_alpha * soft
            tlse[start:stop] = chunk_tlse
        row_loss[:, :, start:stop] = loss
        lse[:, :, start:stop] = chunk_lse
    return row_loss, lse, tlse


def infonce_rows_bwd(grad, rows, cols, extra, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask,
                     lse, tlse, need_rows, need_cols):
    Vr, n, _ = rows.shape
    Vc, N, _ = cols.shape
    M = N + (0 if extra is None else extra.shape[0])
    dtype = _compute_dtype(rows)
    s = scale.to(dtype)
    cols_c = cols.to(dtype)
    extra_c = None if extra is None else extra.to(dtype)
    d_rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device) if need_rows else None
    d_cols = torch.zeros(cols.shape, dtype=dtype, device=rows.device) if need_cols else None
    d_scale = torch.zeros((), dtype=dtype, device=rows.device)
    if t_rows is not None:
        t_cols_c = _teacher_columns(t_cols, extra, dtype)
        t_s = t_scale.to(dtype)
    for start, stop in _chunks(n, Vr * Vc * M):
        rows_c = rows[:, start:stop].to(dtype)
        dots = _dots(rows_c, cols_c, extra_c)
        g = grad[:, :, start:stop].to(dtype)
        # dL/dlogits = g * (softmax - targets); targets = (1 - a) onehot + a teacher_probs
        dlogits = g[..., None] * torch.exp(s * dots - lse[:, :, start:stop, None].to(dtype))
        hard_weight = g
        if t_rows is not None:
            t_logits = t_s * t_rows[start:stop].to(dtype) @ t_cols_c.t()
            probs = torch.exp(t_logits - tlse[start:stop, None].to(dtype))
            row_alpha = _row_alpha(alpha, soft_mask, start, stop, rows.device, dtype)
            dlogits = dlogits - (g * row_alpha)[..., None] * probs
            hard_weight = g * (1 - row_alpha)
        local = torch.arange(stop - start, device=rows.device)
        dlogits[:, :, local, offset + start + local] -= hard_weight
        d_scale += (dlogits * dots).sum()
        dlogits = dlogits * s
        if need_rows:
            d_rows[:, start:stop] += torch.einsum("rvcn,vnd->rcd", dlogits[..., :N], cols_c)
            if extra_c is not None:
                d_rows[:, start:stop] += torch.einsum("rvck,kd->rcd", dlogits[..., N:], extra_c)
        if need_cols:
            d_cols += torch.einsum("rvcn,rcd->vnd", dlogits[..., :N], rows_c)
    return (
        d_rows.to(rows.dtype) if need_rows else None,
        d_cols.to(cols.dtype) if need_cols else None,
        d_scale.to(scale.dtype),
    )



def infonce_symmetric_fwd(a, b, scale, ta, tb, t_scale, alpha, soft_mask):
    """Both directions of a square problem, one after the other."""
    loss_ab, lse_ab, tlse_ab = infonce_rows_fwd(a, b, None, scale, 0, ta, tb, t_scale, alpha, soft_mask)
    loss_ba, lse_ba, tlse_ba = infonce_rows_fwd(b, a, None, scale, 0, tb, ta, t_scale, alpha, soft_mask)
    return loss_ab, loss_ba, lse_ab, lse_ba, tlse_ab, tlse_ba


def infonce_symmetric_bwd(grad_ab, grad_ba, a, b, scale, ta, tb, t_scale, alpha, soft_mask, lse_ab, lse_ba,
                          tlse_ab, tlse_ba, need_a, need_b):
    """Both directions of a square problem: the sum of the two directions' row and column gradients."""
    da_rows, db_cols, ds_ab = infonce_rows_bwd(grad_ab, a, b, None, scale, 0, ta, tb, t_scale, alpha, soft_mask,
                                               lse_ab, tlse_ab, need_a, need_b)
    db_rows, da_cols, ds_ba = infonce_rows_bwd(grad_ba, b, a, None, scale, 0, tb, ta, t_scale, alpha, soft_mask,
                                               lse_ba, tlse_ba, need_b, need_a)
    return (da_rows + da_cols if need_a else None), (db_rows + db_cols if need_b else None), ds_ab + ds_ba
