"""What both paths share: active-row selection, the bounded row blocks, and the backward's matrix products.

Memory bound: no step holds more than ``BLOCK_ELEMENTS`` logits (or dL/dlogits) at once, i.e. a block of
``BLOCK_ELEMENTS // V`` rows; beyond the inputs and the gradients, the backward adds that block and, only when
there is more than one block, an fp32 accumulator for dL/dweight [V, H].
"""
from __future__ import annotations

import torch

from ..fp32_matmul import accumulate_mm

# Largest [rows, V] block of logits or of dL/dlogits one step holds: 64 Mi elements (128 MiB in bf16). SIMLA's
# masked tokens (1920 rows x 30522) fit in one block, so the backward is two large products with no fp32
# accumulator for dW; on an H100, 549-row blocks (16 Mi) ran those products at 160-230 TFLOP/s.
BLOCK_ELEMENTS = 1 << 26


# Blocks of the memory-bound passes, whose speed does not grow with the block: 4 Mi elements.
PASS_ELEMENTS = 1 << 22


def row_blocks(n: int, V: int, elements: int | None = None):
    """(start, stop) of consecutive row blocks of at most ``elements // V`` rows (at least one);
    ``elements`` defaults to ``BLOCK_ELEMENTS``."""
    step = max(1, (elements or BLOCK_ELEMENTS) // max(V, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def active_rows(target: torch.Tensor, ignore_index: int, V: int) -> torch.Tensor:
    """Indexes [n], in order, of the rows whose target is not ``ignore_index``.

    Raises ValueError when an active target lies outside [0, V). One host synchronisation (reading the two
    counts); a stable sort then puts the active rows first without a second one, as ``nonzero`` would need."""
    active = target != ignore_index
    out_of_range = active & ((target < 0) | (target >= V))
    n_active, n_bad = torch.stack([active.sum(), out_of_range.sum()]).tolist()
    if n_bad:
        bad = target[out_of_range][0].item()
        raise ValueError(f"target values must be in [0, {V}) or equal ignore_index ({ignore_index}), got {bad}")
    return torch.sort(active.logical_not().to(torch.uint8), stable=True).indices[:n_active]


def soft_row_index(soft_logits: torch.Tensor, rows: torch.Tensor, N: int) -> torch.Tensor:
    """Row of ``soft_logits`` for each active row: it holds one row per input row [N, V] or one per active
    row [n, V] (teacher logits computed at the masked positions only); the two agree when every row is active."""
    if soft_logits.shape[0] == N:
        return rows
    if soft_logits.shape[0] == rows.numel():
        return torch.arange(rows.numel(), device=rows.device)
    raise ValueError(f"soft_logits must have N = {N} rows (one per hidden row) or {rows.numel()} (one per row whose "
                     f"target is not ignore_index), got {soft_logits.shape[0]}")


def soft_log_sum_exp(soft_logits: torch.Tensor, soft_rows: torch.Tensor) -> torch.Tensor:
    """fp32 (fp64 for fp64 logits) log-sum-exp [n] of the soft-logit rows ``soft_rows``, in bounded row blocks.

    A memory-bound pass of its own, so that the kernels that multiply need only the finished value."""
    dtype = torch.float64 if soft_logits.dtype == torch.float64 else torch.float32
    n, V = soft_rows.numel(), soft_logits.shape[1]
    out = torch.empty(n, dtype=dtype, device=soft_logits.device)
    for start, stop in row_blocks(n, V, PASS_ELEMENTS):
        out[start:stop] = torch.logsumexp(soft_logits.index_select(0, soft_rows[start:stop]).to(dtype), dim=-1)
    return out


def linear_backward(hidden, weight, need_hidden, need_weight, need_bias, grad_block):
    """Gradients of ``logits = hidden @ weight^T + bias`` from bounded blocks of dL/dlogits.

    ``grad_block(start, stop)`` returns dL/dlogits [stop - start, V] of rows start..stop, in the dtype of
    ``hidden`` and ``weight`` (the operands of the products). Returns (d_hidden [n, H], d_weight [V, H],
    d_bias [V]), each None when not needed: d_weight in the operands' dtype from a single block (cuBLAS
    accumulates in fp32 inside the product), else summed over the blocks in fp32 (fp64 for fp64 operands);
    d_bias in fp32 (fp64)."""
    n, V = hidden.shape[0], weight.shape[0]
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if n <= max(1, BLOCK_ELEMENTS // max(V, 1)):  # one block: the products write the gradients directly
        grad = grad_block(0, n)
        return (grad @ weight if need_hidden else None, grad.t() @ hidden if need_weight else None,
                grad.sum(0, dtype=acc_dtype) if need_bias else None)
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    d_bias = torch.zeros(V, dtype=acc_dtype, device=weight.device) if need_bias else None
    for start, stop in row_blocks(n, V):
        grad = grad_block(start, stop)
        if need_hidden:
            torch.mm(grad, weight, out=d_hidden[start:stop])
        if need_weight:
            accumulate_mm(d_weight, grad.t(), hidden[start:stop])
        if need_bias:
            d_bias += grad.sum(0, dtype=acc_dtype)
    return d_hidden, d_weight, d_bias
