"""Dense reference of cross-attention with a key padding mask: the definition in plain PyTorch.

q [B, Lq, H, Dh], k and v [B, Lk, H, Dh], key_padding_mask [B, Lk] bool (True = ignore). A query whose keys
are all masked outputs zeros (and so gets zero gradients), never NaN.
"""
from __future__ import annotations

import torch


def cross_attention_reference(q, k, v, key_padding_mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_padding_mask is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        keep = ~key_padding_mask[:, None, None, :]
        logits = logits.masked_fill(~keep, float("-inf"))
        any_key = keep.any(dim=-1, keepdim=True)
        # rows without a key: softmax over nothing, defined as zeros
        probs = torch.where(any_key, torch.softmax(logits.masked_fill(~any_key, 0.0), dim=-1), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)
