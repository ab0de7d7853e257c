"""The fused linear losses with autograd: ``torch.library`` custom ops for traced calls, and plain
``autograd.Function``s over the same implementations for eager calls.

``cosmos_fast::fused_linear_ce_fwd`` returns per-row losses [N] (0 at ignored rows) and the row statistics the
backward needs; ``cosmos_fast::fused_linear_bce_fwd`` per-row losses [N]. Under ``torch.compile`` the custom
ops keep the graph whole (the data-dependent selection of the active rows happens inside), and
``torch.library.opcheck`` tests their registrations. Eager calls skip the custom-op dispatcher, whose autograd
wrapper cost ~250 us of CPU per forward call on an H100 host (torch 2.11), more than the kernels of the
smaller heads. The implementation behind both is picked per call by
:func:`cosmos_fast._dispatch.select_backend`; both paths work on the active rows only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._dispatch import select_backend
from . import torch_impl
from .blocks import active_rows, soft_row_index


def _impl(x: Tensor):
    if select_backend(x) == "triton":
        from . import triton_kernels

        return triton_kernels
    return torch_impl


def _loss_dtype(hidden: Tensor) -> torch.dtype:
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _grad_or_empty(x: Tensor, needed: bool, grad: Optional[Tensor] = None) -> Tensor:
    """A gradient output of a custom op: ``grad`` cast to ``x``'s dtype (for fake tensors its shape) when needed,
    else an empty tensor."""
    if not needed:
        return x.new_empty(0)
    return torch.empty_like(x) if grad is None else grad.to(x.dtype)


def _bias_or_empty(bias: Optional[Tensor], hidden: Tensor) -> Tensor:
    """What a bias gradient is shaped after: the bias, or an empty tensor when there is none (never needed)."""
    return hidden.new_empty(0) if bias is None else bias


def _active_problem(hidden, target, soft_logits, alpha, ignore_index, V, rows=None):
    """(rows [n], their targets [n], their hidden rows [n, H], soft logits or None, soft row per active row);
    ``rows`` when the forward found them already."""
    if rows is None:
        rows = active_rows(target, ignore_index, V)
    targets = target.index_select(0, rows)
    hidden_active = hidden if rows.numel() == hidden.shape[0] else hidden.index_select(0, rows)
    if soft_logits is None:
        return rows, targets, hidden_active, None, None
    soft_rows = soft_row_index(soft_logits, rows, hidden.shape[0])  # checked at alpha = 0 too: the ramp starts there
    if alpha == 0.0:
        return rows, targets, hidden_active, None, None
    return rows, targets, hidden_active, soft_logits, soft_rows


def _scatter_rows(values: Tensor, rows: Tensor, N: int) -> Tensor:
    """[N, ...] with ``values`` at ``rows`` and zeros elsewhere."""
    if rows.numel() == N:
        return values
    out = values.new_zeros((N, *values.shape[1:]))
    return out.index_copy_(0, rows, values)


def _ce_forward(hidden, weight, bias, target, soft_logits, alpha, ignore_index):
    """(row loss [N], row log-sum-exp [N], soft log-sum-exp [N] or [0] without soft targets; fp32, fp64 for fp64
    inputs; zeros at rows whose target is ``ignore_index``) and the active rows [n]."""
    N, V = hidden.shape[0], weight.shape[0]
    rows, targets, hidden_a, soft, soft_rows = _active_problem(hidden, target, soft_logits, alpha, ignore_index, V)
    dtype = _loss_dtype(hidden)
    if rows.numel() == 0:
        zeros = hidden.new_zeros(N, dtype=dtype)
        return (zeros, zeros.clone(), zeros.new_zeros(N if soft is not None else 0)), rows
    loss, lse, soft_lse = _impl(hidden).ce_fwd(hidden_a, weight, bias, targets, soft, soft_rows, alpha)
    soft_lse = _scatter_rows(soft_lse.to(dtype), rows, N) if soft is not None else soft_lse.to(dtype)
    return (_scatter_rows(loss.to(dtype), rows, N), _scatter_rows(lse.to(dtype), rows, N), soft_lse), rows


@torch.library.custom_op("cosmos_fast::fused_linear_ce_fwd", mutates_args=())
def fused_linear_ce_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                        soft_logits: Optional[Tensor], alpha: float, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row loss [N], row log-sum-exp [N], soft log-sum-exp [N] or [0]); see ``_ce_forward``."""
    return _ce_forward(hidden, weight, bias, target, soft_logits, alpha, ignore_index)[0]


@fused_linear_ce_fwd.register_fake
def _(hidden, weight, bias, target, soft_logits, alpha, ignore_index):
    N = hidden.shape[0]
    loss = hidden.new_empty(N, dtype=_loss_dtype(hidden))
    has_soft = soft_logits is not None and alpha != 0.0
    return loss, torch.empty_like(loss), hidden.new_empty(N if has_soft else 0, dtype=loss.dtype)


def _ce_backward(grad, hidden, weight, bias, target, soft_logits, alpha, ignore_index, lse, soft_lse,
                 need_hidden, need_weight, need_bias, rows=None):
    """(d_hidden, d_weight, d_bias); a gradient not asked for (or of a missing bias) comes back empty.
    ``rows``: the forward's active rows (found again when not given)."""
    N, V = hidden.shape[0], weight.shape[0]
    need_bias = need_bias and bias is not None
    rows, targets, hidden_a, soft, soft_rows = _active_problem(hidden, target, soft_logits, alpha, ignore_index, V,
                                                               rows)
    if rows.numel() == 0:  # nothing contributes: zero gradients
        return (_grad_or_empty(hidden, need_hidden, torch.zeros_like(hidden)),
                _grad_or_empty(weight, need_weight, torch.zeros_like(weight)),
                _grad_or_empty(_bias_or_empty(bias, hidden), need_bias, None if bias is None else torch.zeros_like(bias)))
    d_h, d_w, d_b = _impl(hidden).ce_bwd(
        grad.index_select(0, rows), hidden_a, weight, bias, targets, soft, soft_rows, alpha,
        lse.index_select(0, rows), soft_lse.index_select(0, rows) if soft is not None else soft_lse,
        need_hidden, need_weight, need_bias,
    )
    return (_grad_or_empty(hidden, need_hidden, None if d_h is None else _scatter_rows(d_h, rows, N)),
            _grad_or_empty(weight, need_weight, d_w), _grad_or_empty(_bias_or_empty(bias, hidden), need_bias, d_b))


@torch.library.custom_op("cosmos_fast::fused_linear_ce_bwd", mutates_args=())
def fused_linear_ce_bwd(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                        soft_logits: Optional[Tensor], alpha: float, ignore_index: int, lse: Tensor, soft_lse: Tensor,
                        need_hidden: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _ce_backward(grad, hidden, weight, bias, target, soft_logits, alpha, ignore_index, lse, soft_lse,
                        need_hidden, need_weight, need_bias)


@fused_linear_ce_bwd.register_fake
def _(grad, hidden, weight, bias, target, soft_logits, alpha, ignore_index, lse, soft_lse,
      need_hidden, need_weight, need_bias):
    return (_grad_or_empty(hidden, need_hidden), _grad_or_empty(weight, need_weight),
            _grad_or_empty(_bias_or_empty(bias, hidden), need_bias and bias is not None))


def _setup_ce_context(ctx, inputs, output):
    hidden, weight, bias, target, soft_logits, alpha, ignore_index = inputs
    _, lse, soft_lse = output
    ctx.save_for_backward(hidden, weight, bias, target, soft_logits, lse, soft_lse)
    ctx.alpha, ctx.ignore_index = alpha, ignore_index
    ctx.mark_non_differentiable(lse, soft_lse)


def _ce_autograd_backward(ctx, grad_loss, _grad_lse, _grad_soft_lse):
    hidden, weight, bias, target, soft_logits, lse, soft_lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_hidden, d_weight, d_bias = fused_linear_ce_bwd(
        grad_loss.contiguous(), hidden, weight, bias, target, soft_logits, ctx.alpha, ctx.ignore_index, lse,
        soft_lse, need_hidden, need_weight, need_bias,
    )
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
            None, None, None, None)


fused_linear_ce_fwd.register_autograd(_ce_autograd_backward, setup_context=_setup_ce_context)


def _bce_soft(soft_logits, alpha):
    return None if soft_logits is None or alpha == 0.0 else soft_logits


def _bce_forward(hidden, weight, bias, target, soft_logits, alpha):
    """Row loss [N] fp32 (fp64 for fp64 inputs): the BCE of each row summed over the vocabulary."""
    loss = _impl(hidden).bce_fwd(hidden, weight, bias, target, _bce_soft(soft_logits, alpha), alpha)
    return loss.to(_loss_dtype(hidden))


@torch.library.custom_op("cosmos_fast::fused_linear_bce_fwd", mutates_args=())
def fused_linear_bce_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         soft_logits: Optional[Tensor], alpha: float) -> Tensor:
    return _bce_forward(hidden, weight, bias, target, soft_logits, alpha)


@fused_linear_bce_fwd.register_fake
def _(hidden, weight, bias, target, soft_logits, alpha):
    return hidden.new_empty(hidden.shape[0], dtype=_loss_dtype(hidden))


def _bce_backward(grad, hidden, weight, bias, target, soft_logits, alpha, need_hidden, need_weight, need_bias):
    """(d_hidden, d_weight, d_bias); a gradient not asked for (or of a missing bias) comes back empty."""
    need_bias = need_bias and bias is not None
    d_h, d_w, d_b = _impl(hidden).bce_bwd(grad, hidden, weight, bias, target, _bce_soft(soft_logits, alpha), alpha,
                                          need_hidden, need_weight, need_bias)
    return _grad_or_empty(hidden, need_hidden, d_h), _grad_or_empty(weight, need_weight, d_w), \
        _grad_or_empty(_bias_or_empty(bias, hidden), need_bias, d_b)


@torch.library.custom_op("cosmos_fast::fused_linear_bce_bwd", mutates_args=())
def fused_linear_bce_bwd(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                         soft_logits: Optional[Tensor], alpha: float, need_hidden: bool, need_weight: bool,
                         need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bce_backward(grad, hidden, weight, bias, target, soft_logits, alpha, need_hidden, need_weight,
                         need_bias)


@fused_linear_bce_bwd.register_fake
def _(grad, hidden, weight, bias, target, soft_logits, alpha, need_hidden, need_weight, need_bias):
    return (_grad_or_empty(hidden, need_hidden), _grad_or_empty(weight, need_weight),
            _grad_or_empty(_bias_or_empty(bias, hidden), need_bias and bias is not None))


def _setup_bce_context(ctx, inputs, output):
    hidden, weight, bias, target, soft_logits, alpha = inputs
    ctx.save_for_backward(hidden, weight, bias, target, soft_logits)
    ctx.alpha = alpha


def _bce_autograd_backward(ctx, grad_loss):
    hidden, weight, bias, target, soft_logits = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_hidden, d_weight, d_bias = fused_linear_bce_bwd(grad_loss.contiguous(), hidden, weight, bias, target,
                                                      soft_logits, ctx.alpha, need_hidden, need_weight, need_bias)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
            None, None, None)


fused_linear_bce_fwd.register_autograd(_bce_autograd_backward, setup_context=_setup_bce_context)


class _EagerFusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, soft_logits, alpha, ignore_index):
        (row_loss, lse, soft_lse), rows = _ce_forward(hidden, weight, bias, target, soft_logits, alpha, ignore_index)
        # The active rows travel to the backward: no second host synchronisation to find them.
        ctx.save_for_backward(hidden, weight, bias, target, soft_logits, lse, soft_lse, rows)
        ctx.alpha, ctx.ignore_index = alpha, ignore_index
        return row_loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, soft_logits, lse, soft_lse, rows = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_hidden, d_weight, d_bias = _ce_backward(
            grad_loss.contiguous(), hidden, weight, bias, target, soft_logits, ctx.alpha, ctx.ignore_index, lse,
            soft_lse, need_hidden, need_weight, need_bias, rows,
        )
        return (d_hidden if need_hidden else None, d_weight if need_weight else None,
                d_bias if need_bias else None, None, None, None, None)


class _EagerFusedLinearBCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, soft_logits, alpha):
        ctx.save_for_backward(hidden, weight, bias, target, soft_logits)
        ctx.alpha = alpha
        return _bce_forward(hidden, weight, bias, target, soft_logits, alpha)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, target, soft_logits = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_hidden, d_weight, d_bias = _bce_backward(grad_loss.contiguous(), hidden, weight, bias, target, soft_logits,
                                                   ctx.alpha, need_hidden, need_weight, need_bias)
        return (d_hidden if need_hidden else None, d_weight if need_weight else None,
                d_bias if need_bias else None, None, None, None)


def fused_linear_ce_rows(hidden, weight, bias, target, soft_logits, alpha, ignore_index) -> Tensor:
    """Per-row losses [N] with autograd: the custom op under torch.compile, the lean Function in eager mode.
    No argument checks: the public function does them."""
    if torch.compiler.is_compiling():
        return fused_linear_ce_fwd(hidden, weight, bias, target, soft_logits, alpha, ignore_index)[0]
    return _EagerFusedLinearCE.apply(hidden, weight, bias, target, soft_logits, alpha, ignore_index)


def fused_linear_bce_rows(hidden, weight, bias, target, soft_logits, alpha) -> Tensor:
    """Per-row losses [N] with autograd, dispatched like :func:`fused_linear_ce_rows`."""
    if torch.compiler.is_compiling():
        return fused_linear_bce_fwd(hidden, weight, bias, target, soft_logits, alpha)
    return _EagerFusedLinearBCE.apply(hidden, weight, bias, target, soft_logits, alpha)
