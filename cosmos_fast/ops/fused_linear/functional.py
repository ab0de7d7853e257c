"""Public fused linear losses: argument checks, the reduction, and the custom ops underneath."""
from __future__ import annotations

import torch

from ..._validation import check_float_tensor, check_same_device, check_same_dtype, check_unit_interval
from .op import fused_linear_bce_rows, fused_linear_ce_rows

REDUCTIONS = ("mean", "sum", "none")


def _check_linear(hidden, weight, bias, allow_no_rows=False):
    check_float_tensor("hidden", hidden, 2, allow_no_rows=allow_no_rows)
    check_float_tensor("weight", weight, 2)
    check_same_device("hidden", hidden, weight=weight)
    check_same_dtype("hidden", hidden, weight=weight)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[1]}] (the hidden size H of hidden), "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias, 1)
        check_same_device("hidden", hidden, bias=bias)
        check_same_dtype("hidden", hidden, bias=bias)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape [{weight.shape[0]}] (V, the rows of weight), got {tuple(bias.shape)}")


def check_cross_entropy_settings(ignore_index, reduction) -> None:
    """ignore_index an int (not a bool), reduction one of ``REDUCTIONS`` (shared with the module wrapper)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_soft(soft_logits, alpha, hidden, weight, rows_word):
    """alpha in [0, 1]; soft_logits [rows, V] of any float dtype (teacher logits, no gradient), or None. At
    alpha = 0 soft_logits are ignored, unchecked (returned as None), as the docstrings say."""
    alpha = check_unit_interval("alpha", alpha)
    if alpha == 0.0:
        return None, alpha
    if soft_logits is None:
        if alpha != 0.0:
            raise ValueError("alpha > 0 needs soft targets: pass soft_logits (the teacher's logits)")
        return None, alpha
    # zero rows are fine (none active); their count is checked against the rows where it is known
    check_float_tensor("soft_logits", soft_logits, 2, allow_no_rows=True)
    check_same_device("hidden", hidden, soft_logits=soft_logits)
    if soft_logits.shape[1] != weight.shape[0]:
        raise ValueError(f"soft_logits must have shape [{rows_word}, {weight.shape[0]}] (V, the rows of weight), "
                         f"got {tuple(soft_logits.shape)}")
    return soft_logits.detach(), alpha


def fused_linear_cross_entropy(hidden, weight, target, *, bias=None, soft_logits=None, alpha=0.0, ignore_index=-100,
                               reduction="mean"):
    """Cross-entropy of a linear head without the N x V logits (SIMLA's masked-token heads, ``psd_simla.md``).

    ``logits = hidden @ weight^T (+ bias)``; per row ``(1 - alpha) CE(logits, target) + alpha CE(logits,
    softmax(soft_logits))``. Rows whose target is ``ignore_index`` contribute nothing and cost nothing: the
    active rows are selected first. Logits exist only in bounded blocks (Triton: in on-chip tiles in the
    forward; the backward holds at most a [16 Mi / V, V] block of dL/dlogits).

    Args:
        hidden: [N, H] fp32, bf16, fp16 (or fp64 on the PyTorch path); N may be 0 (the loss is then 0).
        weight: [V, H], the dtype and device of ``hidden``.
        target: [N] int64 class indexes in [0, V), or ``ignore_index``.
        bias: optional [V], the dtype of ``hidden``.
        soft_logits: optional teacher logits, [N, V] (one row per hidden row) or [n, V] (one row per active row,
            in order: the teacher's head evaluated at the masked positions only); any float dtype; detached.
            Ignored when ``alpha`` is 0 (so the alpha ramp of SIMLA can start at 0).
        alpha: weight of the soft targets in [0, 1]; > 0 needs ``soft_logits``.
        ignore_index: target value of the rows to skip.
        reduction: "mean" over the active rows (0, with zero gradients, when there are none; never NaN), "sum",
            or "none" ([N], 0 at ignored rows).

    Returns:
        fp32 loss (fp64 for fp64 inputs): 0-d, or [N] for ``reduction="none"``. Gradients flow to ``hidden``,
        ``weight`` and ``bias``.
    """
    _check_linear(hidden, weight, bias, allow_no_rows=True)
    N = hidden.shape[0]
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must be an int64 tensor of class indexes, got {target.dtype}")
    if target.shape != (N,):
        raise ValueError(f"target must have shape [{N}] (one per row of hidden), got {tuple(target.shape)}")
    check_same_device("hidden", hidden, target=target)
    check_cross_entropy_settings(ignore_index, reduction)
    soft_logits, alpha = _check_soft(soft_logits, alpha, hidden, weight, "N or active rows")
    if N == 0:
        return _no_rows_loss(hidden, weight, bias, reduction)
    row_loss = fused_linear_ce_rows(hidden, weight, bias, target, soft_logits, alpha, ignore_index)
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    return row_loss.sum() / (target != ignore_index).sum().clamp_min(1)


def _no_rows_loss(hidden, weight, bias, reduction):
    """The loss of zero rows (say, a SIMLA batch in which no caption token was chosen for masking): 0, or [0] for
    ``reduction="none"``, still connected to ``hidden``, ``weight`` and ``bias`` so that every parameter gets its
    (zero) gradient, as DDP expects."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if reduction == "none":
        return hidden.sum(1).to(dtype) * 0
    zero = hidden.sum() * 0 + weight.sum() * 0 + (0 if bias is None else bias.sum() * 0)
    return zero.to(dtype)


def fused_linear_bce(hidden, weight, target, *, bias=None, soft_logits=None, alpha=0.0):
    """Multi-label BCE of a linear head without the N x V logits (SIMLA's PSL keyword loss, ``psd_simla.md``).

    ``logits = hidden @ weight^T (+ bias)``; per element ``(1 - alpha) BCE-with-logits(logits, target) + alpha
    BCE-with-logits(logits, sigmoid(soft_logits))``, **summed over the vocabulary and averaged over the rows**
    (``psd_simla.md`` gives no reduction; the sum over V keeps the loss of a 5-keyword target from shrinking
    with the vocabulary size, as a mean over N x V elements would).

    Args:
        hidden: [N, H] fp32, bf16, fp16 (or fp64 on the PyTorch path); N may be 0 (the loss is then 0).
        weight: [V, H], the dtype and device of ``hidden``.
        target: [N, V] multi-hot, bool or float (values in [0, 1]).
        bias: optional [V], the dtype of ``hidden``.
        soft_logits: optional [N, V] teacher logits, any float dtype; detached. Ignored when ``alpha`` is 0.
        alpha: weight of the soft targets in [0, 1]; > 0 needs ``soft_logits``.

    Returns:
        0-d fp32 loss (fp64 for fp64 inputs). Gradients flow to ``hidden``, ``weight`` and ``bias``.
    """
    _check_linear(hidden, weight, bias, allow_no_rows=True)
    N, V = hidden.shape[0], weight.shape[0]
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.bool and not target.is_floating_point():
        raise TypeError(f"target must be a bool or floating-point multi-hot tensor, got {target.dtype}")
    if target.shape != (N, V):
        raise ValueError(f"target must have shape [{N}, {V}] (rows of hidden, rows of weight), got {tuple(target.shape)}")
    check_same_device("hidden", hidden, target=target)
    soft_logits, alpha = _check_soft(soft_logits, alpha, hidden, weight, N)
    if soft_logits is not None and soft_logits.shape[0] != N:
        raise ValueError(f"soft_logits must have shape [{N}, {V}] (like target), got {tuple(soft_logits.shape)}")
    if N == 0:
        return _no_rows_loss(hidden, weight, bias, "mean")
    return fused_linear_bce_rows(hidden, weight, bias, target.detach(), soft_logits, alpha).mean()
