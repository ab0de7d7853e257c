"""``nn.Module`` wrappers of the fused linear losses: a linear head's loss without its N x V logits."""
from __future__ import annotations

from torch import nn

from ..ops.fused_linear import fused_linear_bce, fused_linear_cross_entropy
from ..ops.fused_linear.functional import check_cross_entropy_settings


class FusedLinearCrossEntropyLoss(nn.Module):
    """``nn.CrossEntropyLoss`` of ``nn.Linear``'s output, computed without the logits (as Liger-Kernel's
    ``LigerFusedLinearCrossEntropyLoss``): ``loss(hidden, head.weight, target, bias=head.bias)`` equals
    ``nn.CrossEntropyLoss(ignore_index=..., reduction=...)(head(hidden), target)``, plus SIMLA's soft targets.

    Args:
        ignore_index: target value of the rows to skip (they cost nothing).
        reduction: "mean" over the active rows (0 when there are none, never NaN), "sum", or "none".

    ``forward(hidden, weight, target, bias=None, soft_logits=None, alpha=0.0)``: hidden [N, H] fp32/bf16/fp16,
    weight [V, H] and bias [V] in its dtype, target [N] int64; ``soft_logits`` (teacher logits, [N, V] or one row
    per active row) mixed in with weight ``alpha``. Returns an fp32 loss, 0-d or [N] (fp64 for fp64 inputs);
    see :func:`cosmos_fast.fused_linear_cross_entropy`.
    """

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        check_cross_entropy_settings(ignore_index, reduction)
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, hidden, weight, target, bias=None, soft_logits=None, alpha=0.0):
        return fused_linear_cross_entropy(hidden, weight, target, bias=bias, soft_logits=soft_logits, alpha=alpha,
                                          ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class FusedLinearBCELoss(nn.Module):
    """Multi-label BCE-with-logits of ``nn.Linear``'s output, computed without the logits: summed over the V
    labels, averaged over the N rows (SIMLA's keyword loss, ``psd_simla.md``), so ``loss(hidden, head.weight,
    target, bias=head.bias)`` equals ``V * nn.BCEWithLogitsLoss()(head(hidden), target)``.

    ``forward(hidden, weight, target, bias=None, soft_logits=None, alpha=0.0)``: hidden [N, H] fp32/bf16/fp16,
    weight [V, H] and bias [V] in its dtype, target [N, V] multi-hot (bool or float in [0, 1]); ``soft_logits``
    [N, V] (teacher logits) mixed in with weight ``alpha``. Returns a 0-d fp32 loss (fp64 for fp64 inputs); see
    :func:`cosmos_fast.fused_linear_bce`.
    """

    def forward(self, hidden, weight, target, bias=None, soft_logits=None, alpha=0.0):
        return fused_linear_bce(hidden, weight, target, bias=bias, soft_logits=soft_logits, alpha=alpha)
