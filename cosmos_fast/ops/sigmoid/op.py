"""The sigmoid loss as a ``torch.library`` custom op with autograd.

``cosmos_fast::sigmoid_pairs`` scores rows [Vr, n, D] against columns [Vc, N, D] (plus extra columns [K, D]
without gradient) and returns the loss, mean over the rows and view pairs of each row's sum of pair terms, and,
when asked, its gradients: the loss is a sum of independent pair terms, so the pass that computes it yields
them too (:mod:`.triton_kernels`). The backward scales them by the loss's gradient; the loss is therefore
differentiable once (``gradcheck``, not ``gradgradcheck``). Registering it keeps ``torch.compile`` from breaking
the graph; the implementation is picked per call by :func:`cosmos_fast._dispatch.select_backend`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._dispatch import select_backend
from . import torch_impl


def _impl(x: Tensor):
    if select_backend(x) == "triton":
        from . import triton_kernels

        return triton_kernels
    return torch_impl


def loss_dtype(x: Tensor) -> torch.dtype:
    """fp64 losses for fp64 inputs (gradcheck-able), else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.custom_op("cosmos_fast::sigmoid_pairs", mutates_args=())
def sigmoid_pairs_op(
    rows: Tensor, cols: Tensor, extra_cols: Optional[Tensor], scale: Tensor, bias: Tensor, offset: int,
    t_rows: Optional[Tensor], t_cols: Optional[Tensor], t_scale: Optional[Tensor], t_bias: Optional[Tensor],
    alpha: float, soft_mask: Optional[Tensor], need_grads: bool, need_cols: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-d, d_rows, d_cols, d_scale, d_bias); without ``need_grads`` the gradients are empty, and so is
    d_cols without ``need_cols`` (detached columns: a teacher's, a queue's)."""
    loss, d_rows, d_cols, d_scale, d_bias = _impl(rows).sigmoid_pairs(
        rows, cols, extra_cols, scale, bias, offset, t_rows, t_cols, t_scale, t_bias, alpha, soft_mask, need_grads,
        need_cols)
    if not need_grads:
        d_rows = rows.new_empty(0)
    if not (need_grads and need_cols):
        d_cols = cols.new_empty(0)
    return loss, d_rows, d_cols, d_scale, d_bias


@sigmoid_pairs_op.register_fake
def _(rows, cols, extra_cols, scale, bias, offset, t_rows, t_cols, t_scale, t_bias, alpha, soft_mask, need_grads,
      need_cols):
    loss = rows.new_empty((), dtype=loss_dtype(rows))
    d_rows = torch.empty_like(rows) if need_grads else rows.new_empty(0)
    d_cols = torch.empty_like(cols) if need_grads and need_cols else cols.new_empty(0)
    return loss, d_rows, d_cols, torch.empty_like(scale), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    _, d_rows, d_cols, d_scale, d_bias = output
    ctx.save_for_backward(d_rows, d_cols, d_scale, d_bias)
    ctx.need_grads, ctx.need_cols = inputs[-2:]
    ctx.mark_non_differentiable(d_rows, d_cols, d_scale, d_bias)


def _backward(ctx, grad_loss, *_unused):
    if not ctx.need_grads:
        raise RuntimeError("sigmoid_pairs ran without its gradients (need_grads=False) but is being differentiated")
    d_rows, d_cols, d_scale, d_bias = ctx.saved_tensors
    need_rows, need_cols, _, need_scale, need_bias = ctx.needs_input_grad[:5]
    if need_cols and not ctx.need_cols:
        raise RuntimeError("sigmoid_pairs ran without the columns' gradient but is being differentiated by them")
    return ((d_rows * grad_loss.to(d_rows.dtype) if need_rows else None),
            (d_cols * grad_loss.to(d_cols.dtype) if need_cols else None), None,
            (d_scale * grad_loss.to(d_scale.dtype) if need_scale else None),
            (d_bias * grad_loss.to(d_bias.dtype) if need_bias else None),
            None, None, None, None, None, None, None, None, None)


sigmoid_pairs_op.register_autograd(_backward, setup_context=_setup_context)


def sigmoid_pairs(rows, cols, scale, bias, *, offset=0, extra_cols=None, teacher=None, alpha=0.0, soft_mask=None):
    """The loss of rows [Vr, n, D] against columns [Vc, N, D] (row i's positive at column ``offset + i``), extra
    columns [K, D] detached, ``teacher = (t_rows [n, Dt], t_cols [N, Dt], t_scale, t_bias)`` for soft labels
    (Vr = Vc = 1). No argument checks: the public functions do them. Returns the 0-d loss."""
    need_grads = torch.is_grad_enabled() and any(x.requires_grad for x in (rows, cols, scale, bias))
    t_rows, t_cols, t_scale, t_bias = (None,) * 4 if teacher is None else (t.detach() for t in teacher)
    loss, *_ = sigmoid_pairs_op(rows, cols, None if extra_cols is None else extra_cols.detach(), scale, bias,
                                int(offset), t_rows, t_cols, t_scale, t_bias, float(alpha), soft_mask, need_grads,
                                cols.requires_grad)
    return loss
