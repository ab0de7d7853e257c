"""The COSMOS pooler's whole forward and backward as one autograd node, in one of two forms.

``normalize(query + out_proj(attention(ln_q(query) W_q, ln_k(context) W_kv)))`` in eager mode costs, op by op,
far more in dispatch (autograd nodes, autocast casts, the K/V split and head reshapes) than the GPU spends at
COSMOS's sizes. Both forms run it as one ``autograd.Function`` with as few launches as the math allows:

- **context space** (``_ContextSpacePooler``): the key projection moves onto the queries and the value projection
  after the weighted sum, so attention runs in the context's own feature space and K and V are never formed.
  Per head h, ``q_h . (W_k,h x + b_k,h) = (q_h W_k,h) . x + const`` (the constant cancels in the softmax) and
  ``sum_j p_j (W_v,h x_j + b_v,h) = W_v,h (sum_j p_j x_j) + b_v,h`` (the weights sum to one). A sample's
  H * Lq projected queries attend over its Lk context rows as one batched GEMM each way, which costs
  ``4 H Lq Lk kdim`` flops against the K/V projection's ``4 d Lk kdim``: 8x fewer for COSMOS (8 crops x 8 heads
  against d = 512), and the [B, Lk, 2d] K/V tensor (411 MB at B = 1024, Lk = 196) is never written or read.
  The key bias gets an exactly zero gradient, which is its true gradient (it cannot change the output).
- **projected K/V** (``_ProjectedKVPooler``): the textbook order on the Triton attention kernel. K and V come from
  one GEMM and reach the kernel as strided views of its output, the kernel writes dK and dV straight into one
  buffer for the one weight-gradient GEMM. For query sets too large for the context-space form to pay off.

In both, the input gradients of the projections come out of the GEMM in fp32 (``out_dtype``) for the LayerNorm
backward, never as a separate cast of a large tensor. Under autocast the GEMMs and the attention products run
in the autocast dtype and the LayerNorms, the softmax, the residual and the normalisation in fp32, as the eager
``nn.MultiheadAttention`` pooler does, and the output has the composition's dtype (after the normalisation fp32
under CUDA autocast, the input's under CPU autocast); parameter gradients come back in the parameters' dtype.
"""
from __future__ import annotations

import torch

from . import triton_kernels

NORM_EPS = 1e-12  # F.normalize's


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b (2-d or batched 3-d) in a's dtype, accumulated and returned in ``out_dtype`` (without a rounded
    intermediate on CUDA)."""
    if a.dtype == out_dtype:
        return a @ b
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and out_dtype == torch.float32:
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


def _projection_weights(w_in, w_q, w_k, w_v, b_in, w_o, b_o, d, dt):
    """The projection parameters in the compute dtype, each cast once: (W_q, W_kv [2d, kdim], b_in, W_o, b_o).

    Casting whole parameters and slicing the casts (slicing inside autograd would cost a zero-filled gradient per
    slice); the casts are kept for the backward."""
    if w_in is not None:
        w_in_dt = w_in.to(dt)
        w_q_dt, w_kv_dt = w_in_dt[:d], w_in_dt[d:]
    else:
        w_q_dt, w_kv_dt = w_q.to(dt), torch.cat([w_k, w_v]).to(dt)
    return w_q_dt, w_kv_dt, b_in.to(dt), w_o.to(dt), b_o.to(dt)


def _empty_samples(key_padding_mask):
    """[B, 1, 1] bool: samples whose context tokens are all padding (None without a mask)."""
    return None if key_padding_mask is None else key_padding_mask.all(dim=1)[:, None, None]


def _epilogue(query, out, empty, residual, normalize, upcast_norm):
    """out [B, Lq, d] -> (y, norm): zeros for samples without context, residual add, L2 normalisation (returned in
    fp32 with ``upcast_norm``, see ``_normalize_upcasts``)."""
    if empty is not None:  # a sample without any context token gets no contribution (not the projections' biases)
        out = out.masked_fill(empty, 0.0)
    y = query + out if residual else out
    norm = None
    if normalize:
        norm_dtype = torch.promote_types(y.dtype, torch.float32)
        norm = torch.linalg.vector_norm(y, dim=-1, keepdim=True, dtype=norm_dtype).clamp_min(NORM_EPS)
        y = (y / norm).to(norm.dtype if upcast_norm else y.dtype)  # F.normalize's dtype (``_normalize_upcasts``)
    return y, norm


def _epilogue_backward(grad, y, norm, empty, query_dtype, residual, normalize, dt):
    """The gradient reaching the out-projection ([B * Lq, d] in the compute dtype) and the residual's."""
    B, Lq, d = grad.shape
    if normalize:  # y = x / max(|x|, eps): dx = (g - y <g, y>) / |x|, or g / eps where the clamp held
        grad = (grad - y * ((grad * y).sum(-1, keepdim=True) * (norm > NORM_EPS))) / norm
    grad_query = grad.to(query_dtype) if residual else None
    if empty is not None:
        grad = grad.masked_fill(empty, 0.0)
    return grad.reshape(B * Lq, d).to(dt), grad_query


def _ln_dtype(x, ln_weight) -> torch.dtype:
    """The dtype a LayerNorm of x runs in: the wider of x's and its weight's. CUDA's LayerNorm kernels take input
    and affine parameters of one dtype, so 16-bit activations (a bf16 tower's output under autocast) are widened
    (exactly) to fp32 parameters, as autocast's fp32 rule for ``layer_norm`` does in the module's composition."""
    return torch.promote_types(x.dtype, ln_weight.dtype)


def _layer_norms(query, context, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, eps_q, eps_k, dt):
    """LayerNorm of both inputs in ``_ln_dtype``, cast to the compute dtype: (x_q [B * Lq, d], x_kv [B, Lk, kdim],
    stats), where stats = (mean_q, rstd_q, mean_k, rstd_k) are what ``_layer_norm_backward`` needs."""
    d, kdim = query.shape[-1], context.shape[-1]
    query, context = query.to(_ln_dtype(query, ln_q_weight)), context.to(_ln_dtype(context, ln_k_weight))
    ln_q, mean_q, rstd_q = torch.native_layer_norm(query, (d,), ln_q_weight, ln_q_bias, eps_q)
    ln_k, mean_k, rstd_k = torch.native_layer_norm(context, (kdim,), ln_k_weight, ln_k_bias, eps_k)
    return ln_q.to(dt).reshape(-1, d), ln_k.to(dt), (mean_q, rstd_q, mean_k, rstd_k)


def _prologue(query, context, ln_params, w_in, w_q, w_k, w_v, b_in, w_o, b_o, eps_q, eps_k, dt):
    """Both forms' first step: the projection weights in the compute dtype (``_projection_weights``) and both
    LayerNorms (``_layer_norms``): (weights, x_q, x_kv, stats)."""
    weights = _projection_weights(w_in, w_q, w_k, w_v, b_in, w_o, b_o, query.shape[-1], dt)
    return (weights, *_layer_norms(query, context, *ln_params, eps_q, eps_k, dt))


def _layer_norm_backward(needs, grad_ln_q, grad_ln_k, grad_query, query, context, ln_params, stats):
    """(d query, d context, d ln_q.weight, d ln_q.bias, d ln_k.weight, d ln_k.bias) through both LayerNorms;
    ``needs`` is ctx.needs_input_grad, grad_ln_q and grad_ln_k come in ``_ln_dtype``."""
    ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias = ln_params
    mean_q, rstd_q, mean_k, rstd_k = stats
    g_query, g_ln_q_w, g_ln_q_b = torch.ops.aten.native_layer_norm_backward(
        grad_ln_q, query.to(grad_ln_q.dtype), query.shape[-1:], mean_q, rstd_q, ln_q_weight, ln_q_bias,
        [needs[0], needs[3], needs[4]])
    g_context, g_ln_k_w, g_ln_k_b = torch.ops.aten.native_layer_norm_backward(
        grad_ln_k, context.to(grad_ln_k.dtype), context.shape[-1:], mean_k, rstd_k, ln_k_weight, ln_k_bias,
        [needs[1], needs[5], needs[6]])
    if grad_query is not None and g_query is not None:
        g_query = g_query + grad_query
    return (None if g_query is None else g_query.to(query.dtype),
            None if g_context is None else g_context.to(context.dtype), g_ln_q_w, g_ln_q_b, g_ln_k_w, g_ln_k_b)


def _parameter_grads(packed, d, grad_w_q, grad_w_kv, grad_b_in, b_in_dtype):
    """(in_proj_weight, q_proj_weight, k_proj_weight, v_proj_weight, in_proj_bias) gradients as the module has
    them: one packed [3d, d] weight, or three when kdim != d."""
    grad_b_in = grad_b_in.to(b_in_dtype)
    if packed:
        return torch.cat([grad_w_q, grad_w_kv]), None, None, None, grad_b_in
    grad_w_k, grad_w_v = grad_w_kv.split(d)
    return None, grad_w_q, grad_w_k, grad_w_v, grad_b_in


# Both Functions take the modules' own parameters, whole: ``w_in`` is ``in_proj_weight`` [3d, d] (or None, with
# ``w_q``/``w_k``/``w_v`` when kdim != d), ``b_in`` is ``in_proj_bias`` [3d]; each parameter's gradient comes back
# as one tensor. ctx keeps the inputs and LayerNorm statistics as the first 10 saved tensors and ctx.config.

def _save(ctx, query, context, ln_params, stats, w_in, w_q, b_in, w_o, b_o, n_heads, residual, normalize, *tensors):
    ctx.save_for_backward(query, context, *ln_params, *stats, *tensors)
    ctx.config = (n_heads, residual, normalize, w_in is not None, (w_q if w_in is None else w_in).dtype, b_in.dtype,
                  w_o.dtype, b_o.dtype)


def _backward_grads(ctx, params, grad_ln_q, grad_ln_k, grad_query, grad_w_o, grad_b_o):
    """The Functions' return tuple, after both LayerNorm backwards."""
    query, context, *rest = ctx.saved_tensors[:10]
    g_query, g_context, *ln_grads = _layer_norm_backward(ctx.needs_input_grad, grad_ln_q, grad_ln_k, grad_query,
                                                         query, context, rest[:4], rest[4:])
    return (g_query, g_context, None, *ln_grads, *params, grad_w_o, grad_b_o, None, None, None, None, None, None, None)


class _ProjectedKVPooler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, context, key_padding_mask, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, w_in, w_q, w_k,
                w_v, b_in, w_o, b_o, eps_q, eps_k, n_heads, compute_dtype, residual, normalize, upcast_norm):
        B, Lq, d = query.shape
        Lk = context.shape[1]
        head_dim = d // n_heads
        ln_params = (ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias)
        (w_q_dt, w_kv_dt, b_in_dt, w_o_dt, b_o_dt), x_q, x_kv, stats = _prologue(
            query, context, ln_params, w_in, w_q, w_k, w_v, b_in, w_o, b_o, eps_q, eps_k, compute_dtype)
        x_kv = x_kv.reshape(B * Lk, -1)
        q = torch.addmm(b_in_dt[:d], x_q, w_q_dt.t()).view(B, Lq, n_heads, head_dim)
        kv = torch.addmm(b_in_dt[d:], x_kv, w_kv_dt.t()).view(B, Lk, 2, n_heads, head_dim)
        ctx.scale = head_dim ** -0.5
        mask = None if key_padding_mask is None else key_padding_mask.to(torch.uint8)  # the kernels' form, once
        attn, lse = triton_kernels.cross_attention_fwd(q, kv[:, :, 0], kv[:, :, 1], mask, ctx.scale)
        out = torch.addmm(b_o_dt, attn.view(B * Lq, d), w_o_dt.t()).view(B, Lq, d)
        empty = _empty_samples(key_padding_mask)
        y, norm = _epilogue(query, out, empty, residual, normalize, upcast_norm)
        _save(ctx, query, context, ln_params, stats, w_in, w_q, b_in, w_o, b_o, n_heads, residual, normalize,
              mask, empty, x_q, x_kv, q, kv, attn, lse, w_q_dt, w_kv_dt, w_o_dt, y if normalize else None, norm)
        return y

    @staticmethod
    def backward(ctx, grad):
        query, context, ln_q_weight, _, ln_k_weight = ctx.saved_tensors[:5]
        mask, empty, x_q, x_kv, q, kv, attn, lse, w_q_dt, w_kv_dt, w_o_dt, y, norm = ctx.saved_tensors[10:]
        n_heads, residual, normalize, packed, w_dtype, b_in_dtype, w_o_dtype, b_o_dtype = ctx.config
        B, Lq, d = query.shape
        Lk, kdim = context.shape[1], context.shape[2]
        g_out, grad_query = _epilogue_backward(grad, y, norm, empty, query.dtype, residual, normalize, w_o_dt.dtype)
        grad_w_o = _mm(g_out.t(), attn.view(B * Lq, d), w_o_dtype)
        grad_b_o = g_out.sum(0, dtype=torch.float32).to(b_o_dtype)
        grad_attn = (g_out @ w_o_dt).view(B, Lq, n_heads, d // n_heads)
        grad_kv = torch.empty_like(kv)
        grad_q, _, _ = triton_kernels.cross_attention_bwd(grad_attn, q, kv[:, :, 0], kv[:, :, 1], mask, attn, lse,
                                                          ctx.scale, grad_k=grad_kv[:, :, 0], grad_v=grad_kv[:, :, 1])
        grad_q, grad_kv = grad_q.view(B * Lq, d), grad_kv.view(B * Lk, 2 * d)
        grad_b_in = torch.empty(3 * d, dtype=torch.float32, device=query.device)
        torch.sum(grad_q, 0, dtype=torch.float32, out=grad_b_in[:d])
        torch.sum(grad_kv, 0, dtype=torch.float32, out=grad_b_in[d:])
        grad_ln_q = _mm(grad_q, w_q_dt, _ln_dtype(query, ln_q_weight)).view(B, Lq, d)
        grad_ln_k = _mm(grad_kv, w_kv_dt, _ln_dtype(context, ln_k_weight)).view(B, Lk, kdim)
        params = _parameter_grads(packed, d, _mm(grad_q.t(), x_q, w_dtype), _mm(grad_kv.t(), x_kv, w_dtype),
                                  grad_b_in, b_in_dtype)
        return _backward_grads(ctx, params, grad_ln_q, grad_ln_k, grad_query, grad_w_o, grad_b_o)


def _heads_to_samples(x, B, n_heads, Lq):
    """[H, B * Lq, c] (per-head GEMM layout) -> [B, H * Lq, c] (per-sample layout: rows ordered head, query)."""
    return x.view(n_heads, B, Lq, -1).transpose(0, 1).reshape(B, n_heads * Lq, -1)


def _samples_to_heads(x, B, n_heads, Lq):
    """The inverse of ``_heads_to_samples``."""
    return x.view(B, n_heads, Lq, -1).transpose(0, 1).reshape(n_heads, B * Lq, -1)


class _ContextSpacePooler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, context, key_padding_mask, ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias, w_in, w_q, w_k,
                w_v, b_in, w_o, b_o, eps_q, eps_k, n_heads, compute_dtype, residual, normalize, upcast_norm):
        B, Lq, d = query.shape
        kdim = context.shape[2]
        H, head_dim = n_heads, d // n_heads
        ln_params = (ln_q_weight, ln_q_bias, ln_k_weight, ln_k_bias)
        (w_q_dt, w_kv_dt, b_in_dt, w_o_dt, b_o_dt), x_q, x_kv, stats = _prologue(
            query, context, ln_params, w_in, w_q, w_k, w_v, b_in, w_o, b_o, eps_q, eps_k, compute_dtype)
        w_k_heads, w_v_heads = w_kv_dt[:d].view(H, head_dim, kdim), w_kv_dt[d:].view(H, head_dim, kdim)
        scale = head_dim ** -0.5
        # the queries with the score scale folded into the GEMM's epilogue: [B * Lq, d]
        q = torch.addmm(b_in_dt[:d], x_q, w_q_dt.t(), beta=scale, alpha=scale)
        q_heads = q.view(B * Lq, H, head_dim).transpose(0, 1)  # [H, B * Lq, Dh]
        # each head's query taken into the context space: scores against x equal those against W_k x + b_k
        q_ctx = _heads_to_samples(torch.bmm(q_heads, w_k_heads), B, H, Lq)  # [B, H * Lq, kdim]
        # [B, H * Lq, Lk] scores and their softmax in fp32 (or fp64) at least, as in flash attention
        scores = _mm(q_ctx, x_kv.transpose(1, 2), torch.promote_types(compute_dtype, torch.float32))
        empty = _empty_samples(key_padding_mask)
        if key_padding_mask is not None:
            scores.masked_fill_(key_padding_mask[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if empty is not None:
            probs = probs.masked_fill(empty, 0.0)  # all keys masked: the softmax's NaN rows become zeros
        # the attention-weighted context, then each head's value projection (its bias passes through: sum p = 1)
        probs_dt = probs.to(compute_dtype)
        x_mean = _samples_to_heads(torch.bmm(probs_dt, x_kv), B, H, Lq)  # [H, B * Lq, kdim]
        attn = torch.baddbmm(b_in_dt[2 * d:].view(H, 1, head_dim), x_mean, w_v_heads.transpose(1, 2))
        attn = attn.transpose(0, 1).reshape(B * Lq, d)
        out = torch.addmm(b_o_dt, attn, w_o_dt.t()).view(B, Lq, d)
        y, norm = _epilogue(query, out, empty, residual, normalize, upcast_norm)
        _save(ctx, query, context, ln_params, stats, w_in, w_q, b_in, w_o, b_o, n_heads, residual, normalize,
              empty, x_q, x_kv, q, q_ctx, probs, probs_dt, x_mean, attn, w_q_dt, w_kv_dt, w_o_dt,
              y if normalize else None, norm)
        return y

    @staticmethod
    def backward(ctx, grad):
        query, context, ln_q_weight, _, ln_k_weight = ctx.saved_tensors[:5]
        (empty, x_q, x_kv, q, q_ctx, probs, probs_dt, x_mean, attn, w_q_dt, w_kv_dt, w_o_dt, y,
         norm) = ctx.saved_tensors[10:]
        H, residual, normalize, packed, w_dtype, b_in_dtype, w_o_dtype, b_o_dtype = ctx.config
        B, Lq, d = query.shape
        kdim = context.shape[2]
        head_dim = d // H
        dt = w_o_dt.dtype
        acc = probs.dtype  # fp32, or fp64 for fp64 inputs
        w_k_heads, w_v_heads = w_kv_dt[:d].view(H, head_dim, kdim), w_kv_dt[d:].view(H, head_dim, kdim)
        g_out, grad_query = _epilogue_backward(grad, y, norm, empty, query.dtype, residual, normalize, dt)
        grad_w_o = _mm(g_out.t(), attn, w_o_dtype)
        grad_b_o = g_out.sum(0, dtype=acc).to(b_o_dtype)
        g_attn = g_out @ w_o_dt  # [B * Lq, d]
        g_heads = g_attn.view(B * Lq, H, head_dim).transpose(0, 1)  # [H, B * Lq, Dh]
        grad_w_v = _mm(g_heads.transpose(1, 2), x_mean, w_dtype).view(d, kdim)
        g_mean = _heads_to_samples(torch.bmm(g_heads, w_v_heads), B, H, Lq)  # [B, H * Lq, kdim]
        g_probs = _mm(g_mean, x_kv.transpose(1, 2), probs.dtype)
        # softmax backward (masked keys and empty samples have p = 0, so they get 0)
        g_scores = (probs * (g_probs - (probs * g_probs).sum(-1, keepdim=True))).to(dt)
        g_q_ctx = _samples_to_heads(torch.bmm(g_scores, x_kv), B, H, Lq)  # [H, B * Lq, kdim]
        # d x_kv = g_scores^T q_ctx + probs^T g_mean: one GEMM over the stacked H * Lq rows of both terms
        grad_ln_k = _mm(torch.cat([g_scores, probs_dt], 1).transpose(1, 2), torch.cat([q_ctx, g_mean], 1),
                        _ln_dtype(context, ln_k_weight))
        q_heads = q.view(B * Lq, H, head_dim).transpose(0, 1)
        grad_w_k = _mm(q_heads.transpose(1, 2), g_q_ctx, w_dtype).view(d, kdim)
        # the gradient of the unscaled queries, in the per-row layout of the Q projection
        g_q = torch.bmm(g_q_ctx, w_k_heads.transpose(1, 2)).mul_(head_dim ** -0.5).transpose(0, 1).reshape(B * Lq, d)
        grad_b_in = torch.empty(3 * d, dtype=acc, device=q.device)
        torch.sum(g_q, 0, dtype=acc, out=grad_b_in[:d])
        grad_b_in[d:2 * d].zero_()  # the key bias changes no output: its gradient is exactly zero
        torch.sum(g_attn, 0, dtype=acc, out=grad_b_in[2 * d:])
        grad_ln_q = _mm(g_q, w_q_dt, _ln_dtype(query, ln_q_weight)).view(B, Lq, d)
        params = _parameter_grads(packed, d, _mm(g_q.t(), x_q, w_dtype), torch.cat([grad_w_k, grad_w_v]), grad_b_in,
                                  b_in_dtype)
        return _backward_grads(ctx, params, grad_ln_q, grad_ln_k, grad_query, grad_w_o, grad_b_o)


FORMS = {"context_space": _ContextSpacePooler, "projected_kv": _ProjectedKVPooler}


def _compute_dtype(query) -> torch.dtype:
    """The dtype the GEMMs and the attention run in: autocast's where it is on, else the query's."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def _normalize_upcasts(query) -> bool:
    """Whether F.normalize, as the module's composition calls it here, returns fp32 for 16-bit input: under CUDA
    autocast it does (``linalg_vector_norm`` is on CUDA autocast's fp32 list, and dividing by the fp32 norm
    promotes); CPU autocast keeps the input's dtype. The fused forms return what the composition returns."""
    device = query.device.type
    return device != "cpu" and torch.is_autocast_enabled(device)


def pooler_form(query, n_heads: int) -> str | None:
    """The single-node form for this call, or None where neither covers it (the module's composition runs).

    The context-space form does ``H * Lq / d`` of the K/V form's attention flops and never writes K or V, so it
    runs wherever the projected queries are no more than the model width; the projected-K/V form takes larger
    query sets that the Triton kernel covers (see ``triton_kernels.supports``)."""
    Lq, d = query.shape[1], query.shape[-1]
    if n_heads * Lq <= d:
        return "context_space"
    if triton_kernels.supports(Lq, d // n_heads, _compute_dtype(query)):
        return "projected_kv"
    return None


def fused_pooler(query, context, key_padding_mask, ln_q, ln_k, attn, *, residual: bool, normalize: bool,
                 form: str = "context_space"):
    """The pooler's forward (see ``cosmos_fast.nn.CrossAttentionPooler``) as one autograd node in ``form``
    (a key of ``FORMS``).

    query [B, Lq, d] and context [B, Lk, kdim]; ``ln_q``/``ln_k`` LayerNorms with affine parameters and
    ``attn`` an ``nn.MultiheadAttention`` with biases whose parameters are used (not its forward).
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {sorted(FORMS)}, got {form!r}")
    if attn._qkv_same_embed_dim:
        w_in, w_q, w_k, w_v = attn.in_proj_weight, None, None, None
    else:
        w_in, w_q, w_k, w_v = None, attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
    compute_dtype, upcast_norm = _compute_dtype(query), _normalize_upcasts(query)  # read while autocast is on
    with torch.autocast(query.device.type, enabled=False):
        return FORMS[form].apply(query, context, key_padding_mask, ln_q.weight, ln_q.bias, ln_k.weight, ln_k.bias,
                                 w_in, w_q, w_k, w_v, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias,
                                 ln_q.eps, ln_k.eps, attn.num_heads, compute_dtype, residual, normalize, upcast_norm)
