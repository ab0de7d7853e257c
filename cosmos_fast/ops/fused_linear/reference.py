"""Dense references of the fused linear losses: the definitions, stated in plain PyTorch.

They build the full N x V logits, as upstream SIMLA/ALBEF heads do. Two uses: run on float64 copies they are
the oracle of the tests; run in the input dtype they are the "naive PyTorch" peer of the benchmarks and of
the accuracy rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(hidden, weight, bias):
    logits = hidden @ weight.t()
    return logits if bias is None else logits + bias


def fused_linear_cross_entropy_reference(hidden, weight, target, *, bias=None, soft_logits=None, alpha=0.0,
                                         ignore_index=-100, reduction="mean"):
    """(1 - alpha) CE(logits, target) + alpha CE(logits, softmax(soft_logits)) per row, over active rows.

    ``soft_logits`` [N, V] (one row per hidden row). Mean over the rows whose target is not ``ignore_index``;
    0 when there are none."""
    logits = _logits(hidden, weight, bias)
    active = target != ignore_index
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    if soft_logits is not None and alpha > 0:
        soft_targets = torch.softmax(soft_logits.detach().to(logits.dtype), dim=-1)
        soft = -(soft_targets * torch.log_softmax(logits, dim=-1)).sum(-1)
        loss = (1 - alpha) * loss + alpha * torch.where(active, soft, torch.zeros_like(soft))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / active.sum().clamp_min(1)


def fused_linear_bce_reference(hidden, weight, target, *, bias=None, soft_logits=None, alpha=0.0):
    """(1 - alpha) BCE(logits, target) + alpha BCE(logits, sigmoid(soft_logits)): sum over V, mean over rows."""
    logits = _logits(hidden, weight, bias)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    if soft_logits is not None and alpha > 0:
        soft_targets = torch.sigmoid(soft_logits.detach().to(logits.dtype))
        soft = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
        loss = (1 - alpha) * loss + alpha * soft
    return loss.sum(-1).mean()
