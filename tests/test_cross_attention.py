"""Cross-attention and the COSMOS pooler against float64 references built from plain PyTorch / nn.MultiheadAttention."""
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate
from torch import nn

import cosmos_fast
from cosmos_fast import _dispatch
from cosmos_fast.ops.attention import pooler as pooler_ops
from cosmos_fast.ops.attention.reference import cross_attention_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def qkv(B, Lq, Lk, H, Dh, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, L, H, Dh, generator=g, dtype=torch.float64) for L in (Lq, Lk, Lk)]


def padding_mask(B, Lk, seed):
    """Sample 0 keeps every key, sample 1 has none (fully masked), the others random padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Lk, generator=g) < 0.3
    mask[0] = False
    if B > 1:
        mask[1] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Dh", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("Lk", [1, 77, 196, 257])
@pytest.mark.parametrize("Lq", [1, 8, 25])
def test_matches_float64(backend, Lq, Lk, Dh, dtype):
    B, H = 3, 2
    mask = padding_mask(B, Lk, seed=Lq + Lk)
    assert_accurate(
        lambda q, k, v: cosmos_fast.cross_attention(q, k, v, mask),
        lambda q, k, v: cross_attention_reference(q, k, v, mask),
        qkv(B, Lq, Lk, H, Dh, seed=Dh), dtype, ["q", "k", "v"], fp32_tail=0,
    )


def test_fully_masked_queries_give_zeros_and_zero_gradients(backend):
    q, k, v = (x.float().requires_grad_() for x in qkv(3, 8, 77, 2, 32, seed=0))
    mask = padding_mask(3, 77, seed=1)
    out = cosmos_fast.cross_attention(q, k, v, mask)
    out.sum().backward()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))
    assert q.grad[0].abs().sum() > 0


def test_no_mask_and_custom_scale(backend):
    q, k, v = qkv(2, 8, 10, 2, 16, seed=3)
    torch.testing.assert_close(cosmos_fast.cross_attention(q.float(), k.float(), v.float(), scale=0.3),
                               cross_attention_reference(q, k, v, scale=0.3).float())


def test_long_query_sets_take_the_pytorch_path(monkeypatch):
    """Lq > 64 is SDPA's (the Triton kernel holds all queries of a pair in one tile); forcing Triton says so."""
    q, k, v = (x.float() for x in qkv(2, 65, 10, 2, 16, seed=4))
    torch.testing.assert_close(cosmos_fast.cross_attention(q, k, v), cross_attention_reference(q, k, v))
    monkeypatch.setenv("COSMOS_FAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="does not support these shapes"):
        cosmos_fast.cross_attention(q, k, v)


def test_opcheck(backend):
    if backend != "triton":
        pytest.skip("the custom ops wrap the Triton kernels")
    from cosmos_fast.ops.attention import op

    q, k, v = (x.float().requires_grad_() for x in qkv(3, 8, 20, 2, 16, seed=5))
    mask = padding_mask(3, 20, seed=6)
    torch.library.opcheck(op.cross_attention_fwd, (q, k, v, mask, 0.25))
    out, lse = op.cross_attention_fwd(q, k, v, mask, 0.25)
    torch.library.opcheck(op.cross_attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), mask,
                                                   out.detach(), lse, 0.25))


Q, K = torch.zeros(2, 8, 2, 16), torch.zeros(2, 20, 2, 16)
POOLER = cosmos_fast.nn.CrossAttentionPooler(32, 4)


@pytest.mark.parametrize("call,error,words", [
    (lambda: cosmos_fast.cross_attention(Q[0], K, K), ValueError, "q must have 4 dimensions"),
    (lambda: cosmos_fast.cross_attention(Q, K, K[:, :5]), ValueError, "k and v must have the same shape"),
    (lambda: cosmos_fast.cross_attention(Q, K[:, :, :1], K[:, :, :1]), ValueError, "k must have shape"),
    (lambda: cosmos_fast.cross_attention(Q, K.half(), K.half()), TypeError, "k has dtype"),
    (lambda: cosmos_fast.cross_attention(Q.long(), K, K), TypeError, "q must be a floating-point"),
    (lambda: cosmos_fast.cross_attention(Q, K, K, torch.zeros(2, 20)), TypeError, "key_padding_mask must be a bool"),
    (lambda: cosmos_fast.cross_attention(Q, K, K, torch.zeros(2, 19, dtype=torch.bool)), ValueError,
     "key_padding_mask must have shape [2, 20]"),
    (lambda: cosmos_fast.cross_attention(Q, K, K, scale=-1.0), ValueError, "scale must be a finite number > 0"),
    (lambda: cosmos_fast.cross_attention(Q, K, K, scale=float("nan")), ValueError, "scale must be a finite number"),
    (lambda: cosmos_fast.cross_attention(Q, K, K, scale=float("inf")), ValueError, "scale must be a finite number"),
    (lambda: cosmos_fast.cross_attention(Q, K, K, scale=torch.tensor(0.5)), TypeError,
     "scale must be a positive real number"),
    (lambda: cosmos_fast.cross_attention(Q, K, K, torch.zeros(2, 20, dtype=torch.bool).tolist()), TypeError,
     "key_padding_mask must be a torch.Tensor or None"),
    (lambda: cosmos_fast.nn.CrossAttentionPooler(60, 8), ValueError, "divisible by n_heads"),
    (lambda: cosmos_fast.nn.CrossAttentionPooler(64, 0), ValueError, "n_heads must be a positive int"),
    (lambda: cosmos_fast.nn.CrossAttentionPooler(64.0, 8), ValueError, "d_model must be a positive int"),
    (lambda: cosmos_fast.nn.CrossAttentionPooler(64, 8, kdim=0), ValueError, "kdim must be a positive int"),
    (lambda: POOLER(torch.zeros(2, 8, 32), torch.zeros(2, 20, 32, dtype=torch.bfloat16)), TypeError,
     "context has dtype torch.bfloat16 but query has torch.float32"),
    (lambda: POOLER(torch.zeros(2, 8, 32, dtype=torch.float64), torch.zeros(2, 20, 32, dtype=torch.float64)),
     TypeError, "the module's parameters are torch.float32"),
    (lambda: POOLER(torch.zeros(2, 8, 32), torch.zeros(2, 20, 32), torch.zeros(2, 20, dtype=torch.bool).tolist()),
     TypeError, "key_padding_mask must be a torch.Tensor or None"),
    (lambda: POOLER(torch.zeros(2, 8, 16), torch.zeros(2, 20, 32)), ValueError,
     "query must have shape [B, Lq, d_model=32]"),
    (lambda: POOLER(torch.zeros(2, 32), torch.zeros(2, 20, 32)), ValueError, "query must have 3 dimensions"),
    (lambda: POOLER(torch.zeros(2, 8, 32), torch.zeros(3, 20, 32)), ValueError, "context must have shape [B=2, Lk"),
    (lambda: POOLER(torch.zeros(2, 8, 32), torch.zeros(2, 20, 16)), ValueError, "kdim=32"),
    (lambda: POOLER(torch.zeros(2, 8, 32).long(), torch.zeros(2, 20, 32)), TypeError, "query must be a floating"),
    (lambda: POOLER(torch.zeros(2, 8, 32), torch.zeros(2, 20, 32), torch.zeros(2, 19, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape [2, 20]"),
    (lambda: POOLER(torch.zeros(2, 8, 32), torch.zeros(2, 20, 32), torch.zeros(2, 20)), TypeError,
     "key_padding_mask must be a bool"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


@pytest.fixture(params=["torch", "context_space", "projected_kv"])
def pooler_path(request, monkeypatch):
    """Runs a pooler test on each of its paths: the PyTorch composition, and each single-node form of the fast
    backend (which the Triton interpreter runs on CPU tensors)."""
    if request.param == "torch":
        monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
        return request.param
    if not (_dispatch.triton_available() and _dispatch.triton_interpreted()):
        pytest.skip("the fast backend on CPU tensors needs triton and TRITON_INTERPRET=1")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(pooler_ops, "pooler_form", lambda query, n_heads: request.param)
    return request.param


class MultiheadAttentionPooler(nn.Module):
    """The upstream-style pooler: nn.MultiheadAttention with LayerNorms; fully masked samples give zeros."""

    def __init__(self, d_model, n_heads, kdim=None):
        super().__init__()
        kdim = d_model if kdim is None else kdim
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(kdim)
        self.attn = nn.MultiheadAttention(d_model, n_heads, kdim=kdim, vdim=kdim, batch_first=True)

    def forward(self, query, context, key_padding_mask=None):
        kv = self.ln_k(context)
        if key_padding_mask is None:
            out, _ = self.attn(self.ln_q(query), kv, kv, need_weights=False)
        else:
            empty = key_padding_mask.all(dim=1)
            out, _ = self.attn(self.ln_q(query), kv, kv, key_padding_mask=key_padding_mask & ~empty[:, None],
                               need_weights=False)
            out = torch.where(empty[:, None, None], 0.0, out)
        return F.normalize(query + out, dim=-1)


@pytest.mark.parametrize("kdim", [None, 48], ids=["kdim=d", "kdim!=d"])
@pytest.mark.parametrize("masked", [False, True], ids=["upstream-unmasked", "padding-masked"])
def test_pooler_matches_multihead_attention(kdim, masked):
    torch.manual_seed(0)
    reference = MultiheadAttentionPooler(64, 8, kdim).double()
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = cosmos_fast.nn.CrossAttentionPooler(64, 8, kdim).double()
    ours.load_state_dict(reference.state_dict())  # strict: the parameter names are upstream's
    query = torch.randn(5, 8, 64, dtype=torch.float64, requires_grad=True)
    context = torch.randn(5, 30, kdim or 64, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(5, 30, seed=2) if masked else None
    out_ref = reference(query, context, mask)
    grads_ref = torch.autograd.grad(out_ref.sum(), [query, context, *reference.parameters()])
    out = ours(query, context, mask)
    grads = torch.autograd.grad(out.sum(), [query, context, *ours.parameters()])
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    names = ["query", "context"] + [n for n, _ in ours.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("Lq,Lk,Dh", [(1, 1, 8), (8, 77, 8), (25, 30, 8), (8, 77, 32), (8, 77, 80), (8, 77, 96),
                                      (8, 196, 128)])
@pytest.mark.parametrize("kdim", [None, 48], ids=["kdim=d", "kdim!=d"])
@pytest.mark.parametrize("masked", [False, True], ids=["upstream-unmasked", "padding-masked"])
def test_context_space_form_equals_multihead_attention_in_float64(Lq, Lk, Dh, kdim, masked):
    """The key and value projections moved around the attention give the same function: float64 output and every
    gradient equal upstream's nn.MultiheadAttention pooler to rounding (odd batch, a fully masked sample)."""
    torch.manual_seed(Lq)
    H = 8 if Dh == 8 else 2
    d = H * Dh
    reference = MultiheadAttentionPooler(d, H, kdim).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = cosmos_fast.nn.CrossAttentionPooler(d, H, kdim).double()
    ours.load_state_dict(reference.state_dict())
    query = torch.randn(5, Lq, d, dtype=torch.float64, requires_grad=True)
    context = torch.randn(5, Lk, kdim or d, dtype=torch.float64, requires_grad=True)
    mask = padding_mask(5, Lk, seed=Lk) if masked else None
    out_ref = reference(query, context, mask)
    grad = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad(out_ref, [query, context, *reference.parameters()], grad)
    out = pooler_ops.fused_pooler(query, context, mask, ours.ln_q, ours.ln_k, ours.attn, residual=True,
                                  normalize=True, form="context_space")
    grads = torch.autograd.grad(out, [query, context, *ours.parameters()], grad)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    names = ["query", "context"] + [n for n, _ in ours.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=name)


def test_context_space_key_bias_has_exactly_zero_gradient():
    """The key bias adds a constant to each query's scores, which the softmax removes: the context-space form
    gives its true gradient, exactly zero, and the output does not depend on it."""
    torch.manual_seed(4)
    pooler = cosmos_fast.nn.CrossAttentionPooler(32, 4).double()
    query, context = torch.randn(3, 8, 32, dtype=torch.float64), torch.randn(3, 20, 32, dtype=torch.float64)

    def run():
        return pooler_ops.fused_pooler(query, context, None, pooler.ln_q, pooler.ln_k, pooler.attn, residual=True,
                                       normalize=True, form="context_space")
    out = run()
    (grad_bias,) = torch.autograd.grad(out.square().sum(), [pooler.attn.in_proj_bias])
    assert torch.equal(grad_bias[32:64], torch.zeros(32, dtype=torch.float64))
    assert grad_bias[:32].abs().sum() > 0 and grad_bias[64:].abs().sum() > 0
    with torch.no_grad():
        pooler.attn.in_proj_bias[32:64] += 5.0
    torch.testing.assert_close(run(), out, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(1, 1), (8, 77), (8, 196), (25, 257)])
@pytest.mark.parametrize("form", ["context_space", "projected_kv"])
def test_pooler_forms_follow_the_accuracy_rule(form, Lq, Lk, dtype, monkeypatch):
    """Each single-node form, all inputs and parameters in ``dtype``, against the float64 nn.MultiheadAttention
    pooler: output and the gradients of query, context and every parameter within kernels.md's accuracy rule
    (the plain module in the same dtype sets the budget)."""
    if not (_dispatch.triton_available() and _dispatch.triton_interpreted()):
        pytest.skip("the fast backend on CPU tensors needs triton and TRITON_INTERPRET=1")
    torch.manual_seed(Lq + Lk)
    reference = MultiheadAttentionPooler(64, 4, 48)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = cosmos_fast.nn.CrossAttentionPooler(64, 4, 48)
    ours.load_state_dict(reference.state_dict())
    names = [n for n, _ in reference.named_parameters()]
    mask = padding_mask(3, Lk, seed=Lk)
    leaves = [torch.randn(3, Lq, 64, dtype=torch.float64), torch.randn(3, Lk, 48, dtype=torch.float64)]
    leaves += [p.detach().double() for p in reference.parameters()]

    def call(module):
        return lambda query, context, *params: torch.func.functional_call(module, dict(zip(names, params)),
                                                                          (query, context, mask))
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(pooler_ops, "pooler_form", lambda query, n_heads: form)
    assert_accurate(call(ours), call(reference), leaves, dtype, ["query", "context", *names], fp32_tail=0)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pooler_paths_return_the_same_dtype(pooler_path, dtype, residual):
    """Each path returns what the composition of LayerNorm, nn.Linear, attention and F.normalize returns: the
    inputs' dtype, and under autocast the residual's fp32 or the projection's bf16 without residual."""
    pooler = cosmos_fast.nn.CrossAttentionPooler(32, 4).to(dtype)
    query, context = torch.randn(2, 8, 32, dtype=dtype), torch.randn(2, 12, 32, dtype=dtype)
    assert pooler(query, context, residual=residual).dtype == dtype
    if dtype == torch.float32:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pooler(query, context, residual=residual)
        assert out.dtype == (torch.float32 if residual else torch.bfloat16)


@pytest.mark.parametrize("form", ["context_space", "projected_kv"])
def test_fused_pooler_normalizes_in_fp32_where_cuda_autocast_would(form, monkeypatch):
    """Under CUDA autocast F.normalize returns fp32 for bf16 input (the norm runs in fp32 and the division
    promotes), so the module's composition does; CPU autocast keeps bf16. The fused forms follow the composition
    on each device: forced here to CUDA's rule, a bf16 query gives an fp32 output equal to F.normalize in fp32 of
    the unnormalised pooler, gradients included (float64 reference of the same bf16 computation)."""
    if not (_dispatch.triton_available() and _dispatch.triton_interpreted()):
        pytest.skip("the fast backend on CPU tensors needs triton and TRITON_INTERPRET=1")
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    monkeypatch.setattr(pooler_ops, "pooler_form", lambda query, n_heads: form)
    torch.manual_seed(0)
    pooler = cosmos_fast.nn.CrossAttentionPooler(32, 4)
    query = torch.randn(3, 8, 32).bfloat16().requires_grad_()
    context = torch.randn(3, 12, 32).requires_grad_()
    grad = torch.randn(3, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = pooler(query, context)
        monkeypatch.setattr(pooler_ops, "_normalize_upcasts", lambda query: True)
        upcast = pooler(query, context)
        unnormalized = pooler(query, context, normalize=False)
    assert (kept.dtype, upcast.dtype, unnormalized.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    expected = F.normalize(unnormalized.double(), dim=-1)
    torch.testing.assert_close(upcast.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kept.double(), expected, rtol=1e-2, atol=1e-2)  # the same, rounded to bf16
    grads = torch.autograd.grad(upcast, [query, context], grad)
    expected_grads = torch.autograd.grad(expected, [query, context], grad.double())
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e.to(g.dtype).double(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("Lq,H,d,dtype,form", [
    (8, 8, 512, torch.bfloat16, "context_space"),  # COSMOS: 64 projected queries against d = 512
    (64, 8, 512, torch.float32, "context_space"),
    (25, 8, 64, torch.bfloat16, "projected_kv"),
    (33, 4, 128, torch.float32, "projected_kv"),
    (257, 8, 512, torch.bfloat16, None),  # too many queries for either: the composition (SDPA)
])
def test_pooler_form_follows_the_flop_rule(Lq, H, d, dtype, form):
    assert pooler_ops.pooler_form(torch.empty(2, Lq, d, dtype=dtype), H) == form


def test_pooler_forms_reject_an_unknown_form():
    pooler = cosmos_fast.nn.CrossAttentionPooler(32, 4)
    with pytest.raises(ValueError, match="form must be one of"):
        pooler_ops.fused_pooler(torch.randn(2, 3, 32), torch.randn(2, 5, 32), None, pooler.ln_q, pooler.ln_k,
                                pooler.attn, residual=True, normalize=True, form="kv")


def test_pooler_fp32_matches_float64(pooler_path):
    """The pooler on the fast path (fp32) against the float64 nn.MultiheadAttention pooler."""
    torch.manual_seed(1)
    reference = MultiheadAttentionPooler(64, 8, 48).double()
    ours = cosmos_fast.nn.CrossAttentionPooler(64, 8, 48)
    ours.load_state_dict(reference.state_dict())
    query, context = torch.randn(5, 8, 64, dtype=torch.float64), torch.randn(5, 77, 48, dtype=torch.float64)
    mask = padding_mask(5, 77, seed=3)
    leaves = [query.float().requires_grad_(), context.float().requires_grad_()]
    out = ours(*leaves, mask)
    grads = torch.autograd.grad(out.sum(), leaves + list(ours.parameters()))
    leaves64 = [query.requires_grad_(), context.requires_grad_()]
    out64 = reference(*leaves64, mask)
    grads64 = torch.autograd.grad(out64.sum(), leaves64 + list(reference.parameters()))
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    names = ["query", "context"] + [n for n, _ in ours.named_parameters()]
    for name, g, g64 in zip(names, grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5, msg=name)


def test_pooler_options_and_fp32():
    pooler = cosmos_fast.nn.CrossAttentionPooler(32, 4)
    query, context = torch.randn(2, 8, 32), torch.randn(2, 12, 32)
    plain = pooler(query, context, residual=False, normalize=False)
    torch.testing.assert_close(pooler(query, context, residual=True, normalize=False), query + plain)
    torch.testing.assert_close(pooler(query, context), F.normalize(query + plain, dim=-1))


@pytest.mark.parametrize("Lq", [8, 40], ids=["context-space", "composition"])
def test_pooler_compiles_without_graph_breaks(backend, Lq):
    """On the fast backend 8 queries x 4 heads <= d = 32 take the context-space form (traced through), 40 the
    composition around the attention custom op."""
    pooler = cosmos_fast.nn.CrossAttentionPooler(32, 4)
    query, context = torch.randn(3, Lq, 32, requires_grad=True), torch.randn(3, 20, 32)
    mask = padding_mask(3, 20, seed=7)
    compiled = torch.compile(pooler, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(query, context, mask), pooler(query, context, mask))
    compiled(query, context, mask).sum().backward()
    assert torch.isfinite(query.grad).all()


@pytest.mark.parametrize("residual,normalize", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("kdim", [None, 40], ids=["kdim=d", "kdim!=d"])
def test_pooler_options_match_float64(pooler_path, residual, normalize, kdim, monkeypatch):
    """Every forward option, on both paths (the Triton one is the fused single-node pooler), against float64."""
    torch.manual_seed(2)
    reference = cosmos_fast.nn.CrossAttentionPooler(64, 4, kdim).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = cosmos_fast.nn.CrossAttentionPooler(64, 4, kdim)
    ours.load_state_dict(reference.state_dict())
    query, context = torch.randn(3, 5, 64, dtype=torch.float64), torch.randn(3, 33, kdim or 64, dtype=torch.float64)
    mask = padding_mask(3, 33, seed=4)
    leaves = [query.float().requires_grad_(), context.float().requires_grad_()]
    out = ours(*leaves, mask, residual=residual, normalize=normalize)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + list(ours.parameters()), grad)
    monkeypatch.setenv("COSMOS_FAST_BACKEND", "torch")  # float64 runs on the PyTorch path only
    leaves64 = [query.requires_grad_(), context.requires_grad_()]
    out64 = reference(*leaves64, mask, residual=residual, normalize=normalize)
    grads64 = torch.autograd.grad(out64, leaves64 + list(reference.parameters()), grad.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)
    names = ["query", "context"] + [n for n, _ in ours.named_parameters()]
    for name, g, g64 in zip(names, grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-5, msg=name)


def _one_dtype_layer_norms(monkeypatch):
    """Makes CPU LayerNorms refuse mixed dtypes, as CUDA's kernels do (CPU's accept a bf16 input with fp32
    weights, so a mixed call would pass on CPU and fail on the GPU)."""
    forward, backward = torch.native_layer_norm, torch.ops.aten.native_layer_norm_backward

    def one_dtype(op, *tensors):
        dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
        if len(dtypes) > 1:
            raise RuntimeError(f"{op} got mixed dtypes {sorted(map(str, dtypes))}, which CUDA's kernels refuse")

    def strict_forward(x, shape, weight, bias, eps):
        one_dtype("native_layer_norm", x, weight, bias)
        return forward(x, shape, weight, bias, eps)

    def strict_backward(grad, x, shape, mean, rstd, weight, bias, mask):
        one_dtype("native_layer_norm_backward", grad, x, weight, bias)
        return backward(grad, x, shape, mean, rstd, weight, bias, mask)

    monkeypatch.setattr(torch, "native_layer_norm", strict_forward)
    monkeypatch.setattr(torch.ops.aten, "native_layer_norm_backward", strict_backward)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16], ids=["fp32-inputs", "bf16-inputs"])
def test_pooler_bf16_autocast_matches_float64(pooler_path, input_dtype, monkeypatch):
    """Under bf16 autocast (GEMMs and attention in bf16, LayerNorms and the normalisation in fp32) every path
    stays within bf16 rounding of the float64 pooler of the same inputs, and every parameter gradient comes back
    in the parameters' fp32. bf16 inputs are COSMOS's case (a bf16 tower's outputs): the LayerNorms, made as strict
    as CUDA's here, must not get them with their fp32 weights; input gradients come back in the inputs' dtype."""
    torch.manual_seed(3)
    ours = cosmos_fast.nn.CrossAttentionPooler(64, 4)
    reference = cosmos_fast.nn.CrossAttentionPooler(64, 4).double()
    reference.load_state_dict(ours.state_dict())
    query, context = torch.randn(3, 8, 64, dtype=input_dtype), torch.randn(3, 50, 64, dtype=input_dtype)
    mask = padding_mask(3, 50, seed=5)
    leaves = [query.clone().requires_grad_(), context.clone().requires_grad_()]
    _one_dtype_layer_norms(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(*leaves, mask)
    assert out.dtype == input_dtype  # CPU autocast: the residual's dtype
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + list(ours.parameters()), grad)
    assert [g.dtype for g in grads] == [input_dtype] * 2 + [torch.float32] * len(list(ours.parameters()))
    monkeypatch.setenv("COSMOS_FAST_BACKEND", "torch")
    leaves64 = [query.double().requires_grad_(), context.double().requires_grad_()]
    out64 = reference(*leaves64, mask)
    grads64 = torch.autograd.grad(out64, leaves64 + list(reference.parameters()), grad.double())
    names = ["out", "query", "context"] + [n for n, _ in ours.named_parameters()]
    for name, x, x64 in zip(names, [out, *grads], [out64, *grads64]):
        error = ((x.double() - x64).norm() / x64.norm()).item()
        assert error < 2e-2, f"{name}: relative error {error:.2e}"
