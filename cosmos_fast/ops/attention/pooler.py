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
    """Inputs are the modules' own parameters, whole: ``w_in`` is ``in_proj_weight`` [3d, d] (or None, with
    ``w_q``/``w_k``/``w_v`` when kdim != d), ``b_in`` is ``in_proj_bias`` [3d]. Each is cast to the compute
    dtype once and sliced (slicing inside autograd would cost a zero-filled gradient per slice), the casts are
    kept for the backward, and each parameter's gradient comes back as one tensor."""

    @staticmethod
    def forward(ctx, query, context, key_padding_mask, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, w_in, w_q, w_k,
                w_v, b_in, w_o, b_o, eps_q, eps_k, n_heads, compute_dtype, residual, normalize):
        B, Lq, d = query.shape
        Lk, kdim = context.shape[1], context.shape[2]
        head_dim = d // n_heads
        dt = compute_dtype
        if w_in is not None:
            w_in_dt = w_in.to(dt)
            w_q_dt, w_kv_dt = w_in_dt[:d], w_in_dt[d:]
        else:
            w_q_dt, w_kv_dt = w_q.to(dt), torch.cat([w_k, w_v]).to(dt)
        b_in_dt = b_in.to(dt)
        w_o_dt = w_o.to(dt)
        ln_q, mean_q, rstd_q = torch.native_layer_norm(query, (d,), ln_q_weight, ln_q_bias, eps_q)
        ln_k, mean_k, rstd_k = torch.native_layer_norm(context, (kdim,), ln_k_weight, ln_k_bias, eps_k)
        x_q, x_kv = ln_q.to(dt).view(B * Lq, d), ln_k.to(dt).view(B * Lk, kdim)
        q = torch.addmm(b_in_dt[:d], x_q, w_q_dt.t()).view(B, Lq, n_heads, head_dim)
        kv = torch.addmm(b_in_dt[d:], x_kv, w_kv_dt.t()).view(B, Lk, 2, n_heads, head_dim)
        scale = head_dim ** -0.5
        mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8)  # the kernels' form, once
        attn, lse = triton_kernels.cross_attention_fwd(q, kv[:, :, 0], kv[:, :, 1], mask, scale)
        out = torch.addmm(b_o.to(dt), attn.view(B * Lq, d), w_o_dt.t()).view(B, Lq, d)
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
        ctx.save_for_backward(query, context, mask, empty, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, mean_q,
                              rstd_q, mean_k, rstd_k, x_q, x_kv, q, kv, attn, lse, w_q_dt, w_kv_dt, w_o_dt,
                              y if normalize else None, norm)
        ctx.config = (n_heads, residual, normalize, scale, w_in is not None, (w_q if w_in is None else w_in).dtype,
                      b_in.dtype, w_o.dtype, b_o.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        (query, context, mask, empty, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, mean_q, rstd_q, mean_k, rstd_k,
         x_q, x_kv, q, kv, attn, lse, w_q_dt, w_kv_dt, w_o_dt, y, norm) = ctx.saved_tensors
        n_heads, residual, normalize, scale, packed, w_in_dtype, b_in_dtype, w_o_dtype, b_o_dtype = ctx.config
        dt = w_o_dt.dtype
        B, Lq, d = query.shape
        Lk, kdim = context.shape[1], context.shape[2]
        if normalize:  # y = x / max(|x|, eps): dx = (g - y <g, y>) / |x|, or g / eps where the clamp held
            grad = (grad - y * ((grad * y).sum(-1, keepdim=True) * (norm > NORM_EPS))) / norm
        grad_query = grad.to(query.dtype) if residual else None
        if empty is not None:
            grad = grad.masked_fill(empty, 0.0)
        g_out = grad.reshape(B * Lq, d).to(dt)
        grad_w_o = _mm(g_out.t(), attn.view(B * Lq, d), w_o_dtype)
        grad_b_o = g_out.sum(0, dtype=torch.float32).to(b_o_dtype)
        grad_attn = (g_out @ w_o_dt).view(B, Lq, n_heads, d // n_heads)
        grad_kv = torch.empty_like(kv)
        grad_q, _, _ = triton_kernels.cross_attention_bwd(grad_attn, q, kv[:, :, 0], kv[:, :, 1], mask, attn, lse,
                                                          scale, grad_k=grad_kv[:, :, 0], grad_v=grad_kv[:, :, 1])
        grad_q, grad_kv = grad_q.view(B * Lq, d), grad_kv.view(B * Lk, 2 * d)
        grad_b_in = torch.empty(3 * d, dtype=torch.float32, device=query.device)
        torch.sum(grad_q, 0, dtype=torch.float32, out=grad_b_in[:d])
        torch.sum(grad_kv, 0, dtype=torch.float32, out=grad_b_in[d:])
        grad_b_in = grad_b_in.to(b_in_dtype)
        grad_w_q = _mm(grad_q.t(), x_q, w_in_dtype)
        grad_w_kv = _mm(grad_kv.t(), x_kv, w_in_dtype)
        grad_ln_q = _mm(grad_q, w_q_dt, query.dtype).view(B, Lq, d)
        grad_ln_k = _mm(grad_kv, w_kv_dt, context.dtype).view(B, Lk, kdim)
        needs = ctx.needs_input_grad
        g_query, g_ln_q_w, g_ln_q_b = torch.ops.aten.native_layer_norm_backward(
            grad_ln_q, query, (d,), mean_q, rstd_q, ln_q_weight, ln_q_bias, [needs[0], needs[3], needs[4]])
        g_context, g_ln_k_w, g_ln_k_b = torch.ops.aten.native_layer_norm_backward(
            grad_ln_k, context, (kdim,), mean_k, rstd_k, ln_k_weight, ln_k_bias, [needs[1], needs[5], needs[6]])
        if grad_query is not None and g_query is not None:
            g_query = g_query + grad_query
        if packed:
            grad_w_in, grad_w_q, grad_w_k, grad_w_v = torch.cat([grad_w_q, grad_w_kv]), None, None, None
        else:
            grad_w_in, (grad_w_k, grad_w_v) = None, grad_w_kv.split(d)
        return (g_query, g_context, None, g_ln_q_w, g_ln_q_b, g_ln_k_w, g_ln_k_b, grad_w_in, grad_w_q, grad_w_k,
                grad_w_v, grad_b_in, grad_w_o, grad_b_o, None, None, None, None, None, None)


def _compute_dtype(query) -> torch.dtype:
    """The dtype the GEMMs and the attention run in: autocast's where it is on, else the query's."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def fused_pooler_supported(query, n_heads: int) -> bool:
    """Inputs the fused path covers: the Triton kernel's (see ``triton_kernels.supports``) in the dtype the
    attention will run in."""
    return triton_kernels.supports(query.shape[1], query.shape[-1] // n_heads, _compute_dtype(query))


def fused_pooler(query, context, key_padding_mask, ln_q, ln_k, attn, *, residual: bool, normalize: bool):
    """The pooler's forward (see ``cosmos_fast.nn.CrossAttentionPooler``) as one autograd node.

    query [B, Lq, d] and context [B, Lk, kdim]; ``ln_q``/``ln_k`` LayerNorms with affine parameters and
    ``attn`` an ``nn.MultiheadAttention`` with biases whose parameters are used (not its forward).
    """
    if attn._qkv_same_embed_dim:
        w_in, w_q, w_k, w_v = attn.in_proj_weight, None, None, None
    else:
        w_in, w_q, w_k, w_v = None, attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    compute_dtype = _compute_dtype(query)
    with torch.autocast(query.device.type, enabled=False):
        return _FusedPooler.apply(query, context, key_padding_mask, ln_q.weight, ln_q.bias, ln_k.weight, ln_k.bias,
                                  w_in, w_q, w_k, w_v, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                                  ln_q.eps, ln_k.eps, attn.num_heads, compute_dtype, residual, normalize)

