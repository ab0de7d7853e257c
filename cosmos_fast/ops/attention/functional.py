"""Public cross-attention: argument checks and the backend call."""
from __future__ import annotations

from ..._dispatch import select_backend
from ..._validation import (check_float_tensor, check_key_padding_mask, check_positive_number, check_same_device,
                           check_same_dtype)
from . import torch_impl


def cross_attention(q, k, v, key_padding_mask=None, scale=None):
    """Attention of short query sets over long key sets (COSMOS, SIMLA cross-attention).

    Args:
        q: [B, Lq, H, Dh] queries; k, v: [B, Lk, H, Dh] keys and values (the xformers/FlashAttention layout);
            fp32, bf16 or fp16 (fp64 on the PyTorch path), one dtype and device.
        key_padding_mask: optional bool [B, Lk], True = ignore (``nn.MultiheadAttention``'s convention).
        scale: softmax scale, a finite number > 0 (default Dh ** -0.5).

    Returns:
        [B, Lq, H, Dh] in q's dtype. A sample whose keys are all masked gets zeros (and zero gradients).

    CUDA tensors with Lq <= 64 and Dh <= 128 (fp32: at most 32 x 128 query elements per head) take the Triton
    kernel (registered as ``cosmos_fast::cross_attention_*``); other shapes and CPU tensors
    ``F.scaled_dot_product_attention``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, x, 4)
    check_same_device("q", q, k=k, v=v, key_padding_mask=key_padding_mask)
    check_same_dtype("q", q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, Lk, H, Dh], got {tuple(k.shape)} and {tuple(v.shape)}")
    B, _, H, Dh = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, Dh):
        raise ValueError(f"k must have shape [B={B}, Lk, H={H}, Dh={Dh}] to match q, got {tuple(k.shape)}")
    check_key_padding_mask(key_padding_mask, B, k.shape[1])
    # a number, not a tensor: the kernels take it as a launch argument (a tensor would cost a GPU sync)
    scale = Dh ** -0.5 if scale is None else check_positive_number("scale", scale)
    from .triton_kernels import supports

    # The Triton kernel holds a (sample, head) pair's queries in one tile; SDPA serves longer query sets.
    if select_backend(q, supported=supports(q.shape[1], Dh, q.dtype)) == "triton":
        from .op import cross_attention_triton

        return cross_attention_triton(q, k, v, key_padding_mask, scale)
    return torch_impl.cross_attention(q, k, v, key_padding_mask, scale)
