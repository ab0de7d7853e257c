"""PyTorch path of the sigmoid loss (CPU, float64, and the debugging backend), with its gradients in the same
pass: the loss is a sum of independent pair terms, so each chunk of rows yields its loss and its dL/dlogits at
once, and the gradients need no second look at the logits. Memory-lean: no buffer holds more than
``CHUNK_ELEMENTS`` logits (4 MiB in fp32); the N x N matrix never exists. Shapes and semantics are those of
:mod:`.op`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 20


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sigmoid_pairs(rows, cols, extra, scale, bias, offset, t_rows, t_cols, t_scale, t_bias, alpha, soft_mask,
                  need_grads, need_cols):
    Vr, n, D = rows.shape
    Vc, N, _ = cols.shape
    dtype = _compute_dtype(rows)
    s, t = scale.to(dtype), bias.to(dtype)
    teacher = t_rows is not None
    if teacher:
        t_cols_all = t_cols.to(dtype) if extra is None else torch.cat([t_cols.to(dtype), extra.to(dtype)])
        ts, tb = t_scale.to(dtype), t_bias.to(dtype)
    total = torch.zeros((), dtype=dtype, device=rows.device)
    d_rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device) if need_grads else None
    d_cols = torch.zeros(cols.shape, dtype=dtype, device=rows.device) if need_grads and need_cols else None
    d_scale = torch.zeros((), dtype=dtype, device=rows.device)
    d_bias = torch.zeros((), dtype=dtype, device=rows.device)
    M = N + (0 if extra is None else extra.shape[0])
    step = max(1, CHUNK_ELEMENTS // M)
    for vc in range(Vc):
        cols_all = cols[vc].to(dtype) if extra is None else torch.cat([cols[vc].to(dtype), extra.to(dtype)])
        for vr in range(Vr):
            for start in range(0, n, step):
                stop = min(n, start + step)
                rows_c = rows[vr, start:stop].to(dtype)
                dots = rows_c @ cols_all.t()
                logits = s * dots + t
                labels = torch.zeros_like(logits)
                local = torch.arange(stop - start, device=rows.device)
                labels[local, offset + start + local] = 1.0
                if teacher:
                    row_alpha = torch.full((stop - start, 1), float(alpha), dtype=dtype, device=rows.device)
                    if soft_mask is not None:
                        row_alpha = row_alpha * soft_mask[start:stop, None].to(dtype)
                    soft = torch.sigmoid(ts * t_rows[start:stop].to(dtype) @ t_cols_all.t() + tb)
                    labels = (1 - row_alpha) * labels + row_alpha * soft
                total += (F.softplus(logits) - labels * logits).sum()
                if not need_grads:
                    continue
                g = torch.sigmoid(logits) - labels  # dL/dlogits of each pair
                d_scale += (g * dots).sum()
                d_bias += g.sum()
                g = g * s
                d_rows[vr, start:stop] += g @ cols_all
                if need_cols:
                    d_cols[vc] += g[:, :N].t() @ rows_c
    norm = n * Vr * Vc
    d_rows = (d_rows / norm).to(rows.dtype) if need_grads else None
    d_cols = (d_cols / norm).to(cols.dtype) if d_cols is not None else None
    return total / norm, d_rows, d_cols, (d_scale / norm).to(scale.dtype), (d_bias / norm).to(bias.dtype)
