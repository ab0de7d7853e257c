"""PyTorch path of the fused linear losses (CPU, float64, and the debugging backend).

It works on the active rows only (:mod:`.op` selects them) and in bounded row blocks (:mod:`.blocks`): each
block's logits are computed in fp32 (fp64 for fp64 inputs), reduced, and dropped; the backward recomputes
them from the saved log-sum-exp, as the Triton path does. Shapes and semantics are those of :mod:`.op`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import linear_backward, row_blocks


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _operands(hidden, weight, bias):
    dtype = _compute_dtype(hidden)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _logits(hidden, weight, bias):
    return torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()


def ce_fwd(hidden, weight, bias, target, soft_logits, soft_rows, alpha):
    """Per active row: (loss [n], lse [n], soft lse [n] or [0]); ``soft_logits`` None means alpha = 0."""
    hidden, weight, bias = _operands(hidden, weight, bias)
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=hidden.dtype, device=hidden.device)
    lse = torch.empty_like(loss)
    soft_lse = torch.empty(n if soft_logits is not None else 0, dtype=hidden.dtype, device=hidden.device)
    for start, stop in row_blocks(n, weight.shape[0]):
        logits = _logits(hidden[start:stop], weight, bias)
        block_lse = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(1, target[start:stop, None]).squeeze(1)
        block_loss = block_lse - target_logit
        if soft_logits is not None:
            t = soft_logits.index_select(0, soft_rows[start:stop]).to(hidden.dtype)
            block_soft_lse = torch.logsumexp(t, dim=-1)
            # soft CE = lse - sum_j p_j z_j with p = softmax(t)
            soft_dot = (torch.exp(t - block_soft_lse[:, None]) * logits).sum(-1)
            block_loss = block_lse - (1 - alpha) * target_logit - alpha * soft_dot
            soft_lse[start:stop] = block_soft_lse
        loss[start:stop] = block_loss
        lse[start:stop] = block_lse
    return loss, lse, soft_lse


def ce_bwd(grad, hidden, weight, bias, target, soft_logits, soft_rows, alpha, lse, soft_lse,
           need_hidden, need_weight, need_bias):
    """(d_hidden [n, H], d_weight [V, H], d_bias [V]) of the active rows, None where not needed."""
    hidden, weight, bias = _operands(hidden, weight, bias)
    grad = grad.to(hidden.dtype)
    hard_weight = grad * (1 - alpha) if soft_logits is not None else grad

    def grad_block(start, stop):
        # dL/dz = g softmax(z) - g (1 - alpha) onehot - g alpha softmax(t)
        logits = _logits(hidden[start:stop], weight, bias)
        g = grad[start:stop, None]
        d_logits = g * torch.exp(logits - lse[start:stop, None].to(hidden.dtype))
        if soft_logits is not None:
            t = soft_logits.index_select(0, soft_rows[start:stop]).to(hidden.dtype)
            d_logits -= alpha * g * torch.exp(t - soft_lse[start:stop, None].to(hidden.dtype))
        local = torch.arange(stop - start, device=hidden.device)
        d_logits[local, target[start:stop]] -= hard_weight[start:stop]
        return d_logits

    return linear_backward(hidden, weight, need_hidden, need_weight, need_bias, grad_block)


def _bce_targets(target, soft_logits, alpha, start, stop, dtype):
    """Rows start..stop of (1 - alpha) target + alpha sigmoid(soft_logits): BCE is linear in its target."""
    y = target[start:stop].to(dtype)
    if soft_logits is None:
        return y
    return (1 - alpha) * y + alpha * torch.sigmoid(soft_logits[start:stop].to(dtype))


def bce_fwd(hidden, weight, bias, target, soft_logits, alpha):
    """Per row: loss [N], the BCE summed over the vocabulary."""
    hidden, weight, bias = _operands(hidden, weight, bias)
    N = hidden.shape[0]
    loss = torch.empty(N, dtype=hidden.dtype, device=hidden.device)
    for start, stop in row_blocks(N, weight.shape[0]):
        logits = _logits(hidden[start:stop], weight, bias)
        y = _bce_targets(target, soft_logits, alpha, start, stop, hidden.dtype)
        loss[start:stop] = (F.softplus(logits) - y * logits).sum(-1)
    return loss


def bce_bwd(grad, hidden, weight, bias, target, soft_logits, alpha, need_hidden, need_weight, need_bias):
    hidden, weight, bias = _operands(hidden, weight, bias)
    grad = grad.to(hidden.dtype)

    def grad_block(start, stop):
        logits = _logits(hidden[start:stop], weight, bias)
        y = _bce_targets(target, soft_logits, alpha, start, stop, hidden.dtype)
        return grad[start:stop, None] * (torch.sigmoid(logits) - y)

    return linear_backward(hidden, weight, need_hidden, need_weight, need_bias, grad_block)
