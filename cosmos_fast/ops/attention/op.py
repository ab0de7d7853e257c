"""Cross-attention's Triton path as ``torch.library`` custom ops with autograd (compile-friendly)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_kernels


@torch.library.custom_op("cosmos_fast::cross_attention_fwd", mutates_args=())
def cross_attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                        scale: float) -> tuple[Tensor, Tensor]:
    """(out [B, Lq, H, Dh], lse [B * H, Lq] fp32; +inf for samples without keys)."""
    return triton_kernels.cross_attention_fwd(q, k, v, key_padding_mask, scale)


@cross_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, scale):
    B, Lq, H, _ = q.shape
    return torch.empty_like(q), q.new_empty((B * H, Lq), dtype=torch.float32)


@torch.library.custom_op("cosmos_fast::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                        out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return triton_kernels.cross_attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse, scale)


@cross_attention_bwd.register_fake
def _(grad_out, q, k, v, key_padding_mask, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = cross_attention_bwd(grad_out.contiguous(), q, k, v, key_padding_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)
