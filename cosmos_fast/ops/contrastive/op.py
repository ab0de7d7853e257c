"""The row-direction InfoNCE as ``torch.library`` custom ops with autograd.

``cosmos_fast::infonce_rows`` scores rows [Vr, n, D] against columns [Vc, N, D]
(plus optional queue columns [K, D]) and returns, for every view pair and row,
the cross-entropy against its targets, [Vr, Vc, n] fp32 (fp64 for fp64 inputs, which
the PyTorch path computes in fp64 throughout). Registering it as a
custom op keeps ``torch.compile`` from breaking the graph at the kernel, and
``torch.library.opcheck`` tests the registration. The implementation behind it
is picked per call by :func:`cosmos_fast._dispatch.select_backend`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._dispatch import select_backend
from . import torch_impl


def _grad_or_empty(x: Tensor, needed: bool, grad: Optional[Tensor] = None) -> Tensor:
    """A gradient output of a custom op: ``grad`` (or, for fake tensors, its shape) when needed, else empty."""
    if not needed:
        return x.new_empty(0)
    return torch.empty_like(x) if grad is None else grad


def loss_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the losses and statistics for inputs like ``x``: fp64 for fp64 (gradcheck-able), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _impl(x: Tensor):
    if select_backend(x) == "triton":
        from . import triton_kernels

        return triton_kernels
    return torch_impl


@torch.library.custom_op("cosmos_fast::infonce_rows_fwd", mutates_args=())
def infonce_rows_fwd(
    rows: Tensor, cols: Tensor, extra_cols: Optional[Tensor], scale: Tensor, offset: int,
    t_rows: Optional[Tensor], t_cols: Optional[Tensor], t_scale: Optional[Tensor], alpha: float,
    soft_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (row_loss [Vr, Vc, n] fp32, row log-sum-exp [Vr, Vc, n] fp32, teacher log-sum-exp [n] or [0])."""
    return _impl(rows).infonce_rows_fwd(rows, cols, extra_cols, scale, offset, t_rows, t_cols, t_scale, alpha,
                                        soft_mask)


@infonce_rows_fwd.register_fake
def _(rows, cols, extra_cols, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask):
    Vr, n, _ = rows.shape
    Vc = cols.shape[0]
    row_loss = rows.new_empty((Vr, Vc, n), dtype=loss_dtype(rows))
    return row_loss, torch.empty_like(row_loss), rows.new_empty((n if t_rows is not None else 0,), dtype=row_loss.dtype)


@torch.library.custom_op("cosmos_fast::infonce_rows_bwd", mutates_args=())
def infonce_rows_bwd(
    grad: Tensor, rows: Tensor, cols: Tensor, extra_cols: Optional[Tensor], scale: Tensor, offset: int,
    t_rows: Optional[Tensor], t_cols: Optional[Tensor], t_scale: Optional[Tensor], alpha: float,
    soft_mask: Optional[Tensor], lse: Tensor, tlse: Tensor, need_rows: bool, need_cols: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (d_rows, d_cols, d_scale); a gradient not asked for comes back as an empty tensor."""
    d_rows, d_cols, d_scale = _impl(rows).infonce_rows_bwd(
        grad, rows, cols, extra_cols, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask, lse, tlse,
        need_rows, need_cols,
    )
    return _grad_or_empty(rows, need_rows, d_rows), _grad_or_empty(cols, need_cols, d_cols), d_scale


@infonce_rows_bwd.register_fake
def _(grad, rows, cols, extra_cols, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask, lse, tlse,
      need_rows, need_cols):
    return _grad_or_empty(rows, need_rows), _grad_or_empty(cols, need_cols), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    rows, cols, extra_cols, scale, offset, t_rows, t_cols, t_scale, alpha, soft_mask = inputs
    _, lse, tlse = output
    ctx.save_for_backward(rows, cols, extra_cols, scale, t_rows, t_cols, t_scale, soft_mask, lse, tlse)
    ctx.offset, ctx.alpha = offset, alpha
    ctx.mark_non_differentiable(lse, tlse)


def _backward(ctx, grad_row_loss, _grad_lse, _grad_tlse):
    rows, cols, extra_cols, scale, t_rows, t_cols, t_scale, soft_mask, lse, tlse = ctx.saved_tensors
    need_rows, need_cols, _, need_scale = ctx.needs_input_grad[:4]
    d_rows, d_cols, d_scale = infonce_rows_bwd(
        grad_row_loss.contiguous(), rows, cols, extra_cols, scale, ctx.offset, t_rows, t_cols, t_scale, ctx.alpha,
        soft_mask, lse, tlse, need_rows, need_cols,
    )
    return (
        d_rows if need_rows else None,
        d_cols if need_cols else None,
        None,
        d_scale if need_scale else None,
        None, None, None, None, None, None,
    )


infonce_rows_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("cosmos_fast::infonce_symmetric_fwd", mutates_args=())
def infonce_symmetric_fwd(
    a: Tensor, b: Tensor, scale: Tensor, t_a: Optional[Tensor], t_b: Optional[Tensor], t_scale: Optional[Tensor],
    alpha: float, soft_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Both directions of the square problem a [Va, n, D] vs b [Vb, n, D]: (loss_ab [Va, Vb, n], loss_ba
    [Vb, Va, n], lse_ab, lse_ba, tlse_ab, tlse_ba). Its backward takes both directions in one pass each."""
    return _impl(a).infonce_symmetric_fwd(a, b, scale, t_a, t_b, t_scale, alpha, soft_mask)


@infonce_symmetric_fwd.register_fake
def _(a, b, scale, t_a, t_b, t_scale, alpha, soft_mask):
    Va, n, _ = a.shape
    Vb = b.shape[0]
    loss_ab = a.new_empty((Va, Vb, n), dtype=loss_dtype(a))
    loss_ba = a.new_empty((Vb, Va, n), dtype=loss_dtype(a))
    tlse = a.new_empty((n if t_a is not None else 0,), dtype=loss_dtype(a))
    return loss_ab, loss_ba, torch.empty_like(loss_ab), torch.empty_like(loss_ba), tlse, torch.empty_like(tlse)


@torch.library.custom_op("cosmos_fast::infonce_symmetric_bwd", mutates_args=())
def infonce_symmetric_bwd(
    grad_ab: Tensor, grad_ba: Tensor, a: Tensor, b: Tensor, scale: Tensor, t_a: Optional[Tensor],
    t_b: Optional[Tensor], t_scale: Optional[Tensor], alpha: float, soft_mask: Optional[Tensor], lse_ab: Tensor,
    lse_ba: Tensor, tlse_ab: Tensor, tlse_ba: Tensor, need_a: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (d_a, d_b, d_scale); a gradient not asked for comes back as an empty tensor."""
    d_a, d_b, d_scale = _impl(a).infonce_symmetric_bwd(
        grad_ab, grad_ba, a, b, scale, t_a, t_b, t_scale, alpha, soft_mask, lse_ab, lse_ba, tlse_ab, tlse_ba,
        need_a, need_b,
    )
    return _grad_or_empty(a, need_a, d_a), _grad_or_empty(b, need_b, d_b), d_scale


@infonce_symmetric_bwd.register_fake
def _(grad_ab, grad_ba, a, b, scale, t_a, t_b, t_scale, alpha, soft_mask, lse_ab, lse_ba, tlse_ab, tlse_ba,
      need_a, need_b):
    return _grad_or_empty(a, need_a), _grad_or_empty(b, need_b), torch.empty_like(scale)


def _setup_symmetric_context(ctx, inputs, output):
    a, b, scale, t_a, t_b, t_scale, alpha, soft_mask = inputs
    _, _, lse_ab, lse_ba, tlse_ab, tlse_ba = output
    ctx.save_for_backward(a, b, scale, t_a, t_b, t_scale, soft_mask, lse_ab, lse_ba, tlse_ab, tlse_ba)
    ctx.alpha = alpha
    ctx.mark_non_differentiable(lse_ab, lse_ba, tlse_ab, tlse_ba)


def _symmetric_backward(ctx, grad_ab, grad_ba, *_stats_grads):
    a, b, scale, t_a, t_b, t_scale, soft_mask, lse_ab, lse_ba, tlse_ab, tlse_ba = ctx.saved_tensors
    need_a, need_b, need_scale = ctx.needs_input_grad[:3]
    d_a, d_b, d_scale = infonce_symmetric_bwd(
        grad_ab.contiguous(), grad_ba.contiguous(), a, b, scale, t_a, t_b, t_scale, ctx.alpha, soft_mask,
        lse_ab, lse_ba, tlse_ab, tlse_ba, need_a, need_b,
    )
    return (d_a if need_a else None), (d_b if need_b else None), (d_scale if need_scale else None), \
        None, None, None, None, None


infonce_symmetric_fwd.register_autograd(_symmetric_backward, setup_context=_setup_symmetric_context)


def _detached_teacher(teacher):
    return (None, None, None) if teacher is None else tuple(t.detach() for t in teacher)


def infonce_symmetric(a, b, scale, *, teacher=None, alpha=0.0, soft_mask=None) -> tuple[Tensor, Tensor]:
    """Per-row InfoNCE of both directions of a square problem (one process, no queues). No argument checks.

    a [Va, n, D], b [Vb, n, D]; row i's positive is row i of the other side. ``teacher = (t_a [n, Dt],
    t_b [n, Dt], t_scale)`` adds soft targets (Va = Vb = 1). Returns (loss_ab [Va, Vb, n], loss_ba [Vb, Va, n]).
    """
    t_a, t_b, t_scale = _detached_teacher(teacher)
    loss_ab, loss_ba, *_ = infonce_symmetric_fwd(a, b, scale, t_a, t_b, t_scale, float(alpha), soft_mask)
    return loss_ab, loss_ba


def infonce_rows(rows, cols, scale, *, offset=0, extra_cols=None, teacher=None, alpha=0.0, soft_mask=None) -> Tensor:
    """Per-row InfoNCE of one direction. No argument checks: the public functions do them.

    rows [Vr, n, D], cols [Vc, N, D] (same dtype), scale 0-d; row i's positive is column ``offset + i``.
    ``extra_cols`` [K, D] are extra negatives (detached). ``teacher = (t_rows [n, Dt], t_cols [N, Dt], t_scale)``
    adds soft targets (Vr = Vc = 1). Returns [Vr, Vc, n] fp32 (fp64 for fp64 inputs).
    """
    t_rows, t_cols, t_scale = _detached_teacher(teacher)
    row_loss, _, _ = infonce_rows_fwd(
        rows, cols, None if extra_cols is None else extra_cols.detach(), scale, int(offset),
        t_rows, t_cols, t_scale, float(alpha), soft_mask,
    )
    return row_loss
