"""Cross-attention's Triton path with autograd: ``torch.library`` custom ops for traced calls (torch.compile
sees one node), and a plain ``autograd.Function`` over the same kernels for eager calls, which skips the
custom-op dispatcher's Python overhead (a large share of a call at COSMOS's sizes)."""
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
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B * H, Lq), dtype=torch.float32)


@torch.library.custom_op("cosmos_fast::cross_attention_bwd", mutates_args=())
def cross_attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                        out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return triton_kernels.cross_attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse, scale)


@cross_attention_bwd.register_fake
def _(grad_out, q, k, v, key_padding_mask, out, lse, scale):
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


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


class _EagerCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale):
        out, lse = triton_kernels.cross_attention_fwd(q, k, v, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
        dq, dk, dv = triton_kernels.cross_attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse, ctx.scale)
        return dq, dk, dv, None, None


def cross_attention_triton(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                           scale: float) -> Tensor:
    """The Triton kernels with autograd: the custom op under torch.compile, the lean Function in eager mode."""
    if torch.compiler.is_compiling():
        return cross_attention_fwd(q, k, v, key_padding_mask, scale)[0]
    return _EagerCrossAttention.apply(q, k, v, key_padding_mask, scale)
