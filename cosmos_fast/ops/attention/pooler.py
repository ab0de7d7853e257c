"""The COSMOS pooler's whole forward and backward as one autograd node on the Triton attention kernels.

``normalize(query + out_proj(attention(ln_q(query) W_q, ln_k(context) W_kv)))`` in eager mode costs, op by op,
far more in dispatch (autograd nodes, autocast casts, the K/V split and head reshapes) than the GPU spends at
COSMOS's sizes. Here one ``autograd.Function`` runs it with as few launches as the math allows: K and V come
from one GEMM and reach the kernel as strided views of its output, the kernel writes dK and dV straight into
one buffer for the one weight-gradient GEMM, and the input gradients of the projections are produced in fp32
by the GEMM itself (``out_dtype``) for the LayerNorm backward, never as a separate cast of a large tensor.

Under autocast the GEMMs and the attention run in the autocast dtype and the LayerNorms, the residual and the
normalisation in fp32, exactly as the eager ``nn.MultiheadAttention`` pooler does; parameter gradients come
back in the parameters' dtype.
"""
from __future__ import annotations

import torch

from . import triton_kernels

NORM_EPS = 1e-12  # F.normalize's


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b in a's dtype, accumulated and returned in ``out_dtype`` (without a rounded intermediate)."""
    if a.dtype == out_dtype:
        return a @ b
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and out_dtype == torch.float32:
        return torch.mm(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


class _FusedPooler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, context, key_padding_mask, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, w_q, b_q,
                w_kv, b_kv, w_o, b_o, eps_q, eps_k, n_heads, compute_dtype, residual, normalize):
        B, Lq, d = query.shape
        Lk, kdim = context.shape[1], context.shape[2]
        head_dim = d // n_heads
        dt = compute_dtype
        ln_q, mean_q, rstd_q = torch.native_layer_norm(query, (d,), ln_q_weight, ln_q_bias, eps_q)
        ln_k, mean_k, rstd_k = torch.native_layer_norm(context, (kdim,), ln_k_weight, ln_k_bias, eps_k)
        x_q, x_kv = ln_q.to(dt).view(B * Lq, d), ln_k.to(dt).view(B * Lk, kdim)
        q = torch.addmm(b_q.to(dt), x_q, w_q.to(dt).t()).view(B, Lq, n_heads, head_dim)
        kv = torch.addmm(b_kv.to(dt), x_kv, w_kv.to(dt).t()).view(B, Lk, 2, n_heads, head_dim)
        scale = head_dim ** -0.5
        attn, lse = triton_kernels.cross_attention_fwd(q, kv[:, :, 0], kv[:, :, 1], key_padding_mask, scale)
        out = torch.addmm(b_o.to(dt), attn.view(B * Lq, d), w_o.to(dt).t()).view(B, Lq, d)
        empty = None
        if key_padding_mask is not None:
            # a sample without any context token gets no contribution at all (not the projection's bias)
            empty = key_padding_mask.all(dim=1)[:, None, None]
            out = out.masked_fill(empty, 0.0)
        y = query + out if residual else out
        norm = None
        if normalize:
            norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(NORM_EPS)
            y = y / norm
        ctx.save_for_backward(query, context, key_padding_mask, empty, ln_q_weight, ln_q_bias, ln_k_weight,
                              ln_k_bias, mean_q, rstd_q, mean_k, rstd_k, x_q, x_kv, q, kv, attn, lse, w_q, w_kv,
                              w_o, y if normalize else None, norm)
        ctx.config = (n_heads, dt, residual, normalize, scale)
        return y

    @staticmethod
    def backward(ctx, grad):
        (query, context, key_padding_mask, empty, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, mean_q, rstd_q,
         mean_k, rstd_k, x_q, x_kv, q, kv, attn, lse, w_q, w_kv, w_o, y, norm) = ctx.saved_tensors
        n_heads, dt, residual, normalize, scale = ctx.config
        B, Lq, d = query.shape
        Lk, kdim = context.shape[1], context.shape[2]
        if normalize:  # y = x / max(|x|, eps): dx = (g - y <g, y>) / |x|, or g / eps where the clamp held
            grad = (grad - y * ((grad * y).sum(-1, keepdim=True) * (norm > NORM_EPS))) / norm
        grad_query = grad.to(query.dtype) if residual else None
        if empty is not None:
            grad = grad.masked_fill(empty, 0.0)
        g_out = grad.reshape(B * Lq, d).to(dt)
        grad_w_o = _mm(g_out.t(), attn.view(B * Lq, d), w_o.dtype)
        grad_b_o = g_out.sum(0, dtype=torch.float32).to(w_o.dtype)
        grad_attn = (g_out @ w_o.to(dt)).view(B, Lq, n_heads, d // n_heads)
        grad_kv = torch.empty_like(kv)
        grad_q, _, _ = triton_kernels.cross_attention_bwd(grad_attn, q, kv[:, :, 0], kv[:, :, 1], key_padding_mask,
                                                          attn, lse, scale, grad_k=grad_kv[:, :, 0],
                                                          grad_v=grad_kv[:, :, 1])
        grad_q, grad_kv = grad_q.view(B * Lq, d), grad_kv.view(B * Lk, 2 * d)
        grad_w_q = _mm(grad_q.t(), x_q, w_q.dtype)
        grad_w_kv = _mm(grad_kv.t(), x_kv, w_kv.dtype)
        grad_b_q = grad_q.sum(0, dtype=torch.float32).to(w_q.dtype)
        grad_b_kv = grad_kv.sum(0, dtype=torch.float32).to(w_kv.dtype)
        grad_ln_q = _mm(grad_q, w_q.to(dt), query.dtype).view(B, Lq, d)
        grad_ln_k = _mm(grad_kv, w_kv.to(dt), context.dtype).view(B, Lk, kdim)
        needs = ctx.needs_input_grad
        g_query, g_ln_q_w, g_ln_q_b = torch.ops.aten.native_layer_norm_backward(
            grad_ln_q, query, (d,), mean_q, rstd_q, ln_q_weight, ln_q_bias, [needs[0], needs[3], needs[4]])
        g_context, g_ln_k_w, g_ln_k_b = torch.ops.aten.native_layer_norm_backward(
            grad_ln_k, context, (kdim,), mean_k, rstd_k, ln_k_weight, ln_k_bias, [needs[1], needs[5], needs[6]])
        if grad_query is not None and g_query is not None:
            g_query = g_query + grad_query
        return (g_query, g_context, None, g_ln_q_w, g_ln_q_b, g_ln_k_w, g_ln_k_b, grad_w_q, grad_b_q, grad_w_kv,
                grad_b_kv, grad_w_o, grad_b_o, None, None, None, None, None, None)


def fused_pooler_supported(query, n_heads: int) -> bool:
    """Inputs the fused path covers: the Triton kernel's (see ``triton_kernels.supports``) in the dtype the
    attention will run in."""
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    return triton_kernels.supports(query.shape[1], query.shape[-1] // n_heads, dtype)


def fused_pooler(query, context, key_padding_mask, ln_q, ln_k, attn, *, residual: bool, normalize: bool):
    """The pooler's forward (see ``cosmos_fast.nn.CrossAttentionPooler``) as one autograd node.

    query [B, Lq, d] and context [B, Lk, kdim]; ``ln_q``/``ln_k`` LayerNorms with affine parameters and
    ``attn`` an ``nn.MultiheadAttention`` with biases whose parameters are used (not its forward).
    """
    d = attn.embed_dim
    if attn._qkv_same_embed_dim:
        w_q, w_kv = attn.in_proj_weight[:d], attn.in_proj_weight[d:]
    else:
        w_q, w_kv = attn.q_proj_weight, torch.cat([attn.k_proj_weight, attn.v_proj_weight])
    b_q, b_kv = attn.in_proj_bias[:d], attn.in_proj_bias[d:]
    device = query.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    with torch.autocast(device, enabled=False):
        return _FusedPooler.apply(query, context, key_padding_mask, ln_q.weight, ln_q.bias, ln_k.weight, ln_k.bias,
                                  w_q, b_q, w_kv, b_kv, attn.out_proj.weight, attn.out_proj.bias, ln_q.eps, ln_k.eps,
                                  attn.num_heads, compute_dtype, residual, normalize)

