"""``CrossAttentionPooler``: COSMOS's cross-attention module, state-dict compatible with upstream."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import select_backend
from .._validation import check_float_tensor, check_key_padding_mask, check_same_device, check_same_dtype
from ..ops.attention import cross_attention


class CrossAttentionPooler(nn.Module):
    """LayerNorm(query) and LayerNorm(context), multi-head attention, then optional residual and L2 norm.

    ``x = normalize(query + Attn(ln_q(query), ln_k(context)))`` as in ``cosmos.md`` (Cross-attention module).
    Parameters carry upstream's names (``ln_q``, ``ln_k``, and ``attn`` with ``nn.MultiheadAttention``'s own:
    ``in_proj_weight``/``in_proj_bias``, or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
    ``kdim != d_model``, and ``out_proj``), so a checkpoint of an ``nn.MultiheadAttention``-based pooler loads
    unchanged. ``attn`` holds the parameters, not the computation. On the fast backend (CUDA tensors) the whole
    forward runs as one autograd node: in the context's feature space where ``n_heads * Lq <= d_model`` (the key
    projection moved onto the queries and the value projection after the weighted sum, so K and V are never
    formed; eager and under torch.compile), else, in eager mode, on the Triton attention kernel. Elsewhere the
    attention runs :func:`cosmos_fast.cross_attention` between the module's projections.

    forward(query [B, Lq, d_model], context [B, Lk, kdim], key_padding_mask [B, Lk] bool or None (True =
    padding; None reproduces upstream COSMOS, which attends to padding), residual=True, normalize=True,
    reference=False) -> [B, Lq, d_model]. Without autocast query, context and the parameters share one float dtype,
    which the output has; under autocast the output has the eager composition's dtype (the residual sum's, and
    fp32 after the normalisation under CUDA autocast). A sample whose context is all padding gets no attention
    contribution (zeros). ``reference=True`` runs ``nn.MultiheadAttention``'s forward instead (as upstream; for
    comparisons).
    """

    def __init__(self, d_model: int, n_heads: int, kdim: int | None = None):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("kdim", kdim)):
            if value is None and name == "kdim":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        kdim = d_model if kdim is None else kdim
        self.n_heads = n_heads
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(kdim)
        self.attn = nn.MultiheadAttention(d_model, n_heads, kdim=kdim, vdim=kdim, batch_first=True)

    def _fused_form(self, query) -> str | None:
        """The single-autograd-node form the whole forward runs in on the fast backend
        (``ops.attention.pooler.pooler_form``), or None for the composition below (the PyTorch path). Under
        torch.compile only the context-space form, which is plain PyTorch that dynamo traces; the projected-K/V
        form launches Triton kernels itself, and there the composition, whose attention is one custom op, serves."""
        from ..ops.attention.pooler import pooler_form

        if self.attn.in_proj_bias is None:
            return None
        form = pooler_form(query, self.n_heads)
        if form == "projected_kv" and torch.compiler.is_compiling():
            return None
        return form if select_backend(query, supported=form is not None) == "triton" else None

    def _check_inputs(self, query, context, key_padding_mask):
        check_float_tensor("query", query, 3)
        check_float_tensor("context", context, 3)
        check_same_device("query", query, context=context, key_padding_mask=key_padding_mask)
        if not torch.is_autocast_enabled(query.device.type):  # autocast casts mixed inputs; eager ops would refuse
            check_same_dtype("query", query, context=context)
            weight = self.ln_q.weight
            if weight.dtype != query.dtype:
                raise TypeError(f"query has dtype {query.dtype} but the module's parameters are {weight.dtype}; "
                                f"convert one (module.to(dtype)) or run under torch.autocast")
        d, kdim = self.attn.embed_dim, self.attn.kdim
        if query.shape[-1] != d:
            raise ValueError(f"query must have shape [B, Lq, d_model={d}], got {tuple(query.shape)}")
        if context.shape[0] != query.shape[0] or context.shape[-1] != kdim:
            raise ValueError(f"context must have shape [B={query.shape[0]}, Lk, kdim={kdim}], got "
                             f"{tuple(context.shape)}")
        check_key_padding_mask(key_padding_mask, query.shape[0], context.shape[1])

    def _projections(self):
        attn = self.attn
        d = attn.embed_dim
        bias_q, bias_k, bias_v = (None, None, None) if attn.in_proj_bias is None else attn.in_proj_bias.split(d)
        if attn._qkv_same_embed_dim:
            w_q, w_k, w_v = attn.in_proj_weight.split(d)
        else:
            w_q, w_k, w_v = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
        return (w_q, bias_q), (w_k, bias_k), (w_v, bias_v)

    def forward(self, query, context, key_padding_mask=None, residual: bool = True, normalize: bool = True,
                reference: bool = False):
        self._check_inputs(query, context, key_padding_mask)
        form = None if reference else self._fused_form(query)
        if form is not None:
            from ..ops.attention.pooler import fused_pooler

            return fused_pooler(query, context, key_padding_mask, self.ln_q, self.ln_k, self.attn,
                                residual=residual, normalize=normalize, form=form)
        q_in, kv_in = self.ln_q(query), self.ln_k(context)
        if reference:  # upstream's module: nn.MultiheadAttention's own forward over the same parameters
            out = self.attn(q_in, kv_in, kv_in, key_padding_mask=key_padding_mask, need_weights=False)[0]
        else:
            B, Lq, d = query.shape
            Lk = context.shape[1]
            h = self.n_heads
            (w_q, b_q), (w_k, b_k), (w_v, b_v) = self._projections()
            q = F.linear(q_in, w_q, b_q).view(B, Lq, h, d // h)
            k = F.linear(kv_in, w_k, b_k).view(B, Lk, h, d // h)
            v = F.linear(kv_in, w_v, b_v).view(B, Lk, h, d // h)
            out = self.attn.out_proj(cross_attention(q, k, v, key_padding_mask).reshape(B, Lq, d))
        if key_padding_mask is not None:
            # a sample without any context token gets no contribution at all (not the projection's bias)
            out = out.masked_fill(key_padding_mask.all(dim=1)[:, None, None], 0.0)
        if residual:
            out = query + out
        return F.normalize(out, dim=-1) if normalize else out
