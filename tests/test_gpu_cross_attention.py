"""Cross-attention's Triton kernel and the pooler on a real GPU against float64 (run by run_gpu.sh)."""
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate

import cosmos_fast
from cosmos_fast.ops.attention import pooler as pooler_ops
from cosmos_fast.ops.attention.reference import cross_attention_reference

pytestmark = pytest.mark.gpu


def qkv(B, Lq, Lk, H, Dh):
    return [torch.randn(B, L, H, Dh, device="cuda", dtype=torch.float64) for L in (Lq, Lk, Lk)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq,Lk,Dh", [(1, 1, 32), (8, 77, 64), (8, 196, 64), (25, 257, 96), (64, 1024, 128),
                                      (8, 33, 80), (257, 25, 64)])
def test_matches_float64(Lq, Lk, Dh, dtype):
    """The Triton kernel, and SDPA in our backend order for Lq = 257 (SIMLA's image over text)."""
    B, H = 5, 8
    mask = torch.rand(B, Lk, device="cuda") < 0.3
    mask[1] = True
    assert_accurate(lambda q, k, v: cosmos_fast.cross_attention(q, k, v, mask),
                    lambda q, k, v: cross_attention_reference(q, k, v, mask), qkv(B, Lq, Lk, H, Dh), dtype,
                    ["q", "k", "v"], fp32_tail=0)


@pytest.mark.parametrize("form", ["context_space", "projected_kv"])
def test_pooler_compiles_fullgraph_inductor(form, monkeypatch):
    monkeypatch.setattr(pooler_ops, "pooler_form", lambda query, n_heads: form)
    pooler = cosmos_fast.nn.CrossAttentionPooler(512, 8).cuda()
    query = torch.randn(16, 8, 512, device="cuda", requires_grad=True)
    context = torch.randn(16, 77, 512, device="cuda")
    mask = torch.rand(16, 77, device="cuda") < 0.3
    compiled = torch.compile(pooler, fullgraph=True)
    torch.testing.assert_close(compiled(query, context, mask), pooler(query, context, mask), rtol=1e-4, atol=1e-5)
    F.mse_loss(compiled(query, context, mask), torch.zeros_like(query)).backward()
    assert torch.isfinite(query.grad).all()


def test_sdpa_path_compiles_fullgraph():
    """Lq > 64 runs SDPA under sdpa_kernel(set_priority=True): dynamo must trace the context manager."""
    q, k, v = (torch.randn(4, L, 8, 64, device="cuda", dtype=torch.bfloat16) for L in (257, 25, 25))
    mask = torch.rand(4, 25, device="cuda") < 0.3
    compiled = torch.compile(cosmos_fast.cross_attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), cosmos_fast.cross_attention(q, k, v, mask))


@pytest.mark.parametrize("form", ["context_space", "projected_kv"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("B,Lk,kdim", [(33, 77, 512), (16, 196, 768)])
def test_fused_pooler_matches_float64(B, Lk, kdim, autocast, form, monkeypatch):
    """Each single-node form of the pooler (eager, CUDA) against the float64 pooler: output and every gradient."""
    monkeypatch.setattr(pooler_ops, "pooler_form", lambda query, n_heads: form)
    torch.manual_seed(0)
    ours = cosmos_fast.nn.CrossAttentionPooler(512, 8, kdim).cuda()
    reference = cosmos_fast.nn.CrossAttentionPooler(512, 8, kdim).cuda().double()
    reference.load_state_dict(ours.state_dict())
    query, context = torch.randn(B, 8, 512, device="cuda"), torch.randn(B, Lk, kdim, device="cuda")
    mask = torch.rand(B, Lk, device="cuda") < 0.3
    mask[1] = True
    leaves = [query.clone().requires_grad_(), context.clone().requires_grad_()]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = ours(*leaves, mask)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + list(ours.parameters()), grad)
    leaves64 = [query.double().requires_grad_(), context.double().requires_grad_()]
    out64 = reference(*leaves64, mask)
    grads64 = torch.autograd.grad(out64, leaves64 + list(reference.parameters()), grad.double())
    tolerance = 2e-2 if autocast else 1e-4  # relative error of the whole tensor
    names = ["out", "query", "context"] + [n for n, _ in ours.named_parameters()]
    for name, x, x64 in zip(names, [out, *grads], [out64, *grads64]):
        assert x.dtype == torch.float32, name
        error = ((x.double() - x64).norm() / x64.norm()).item()
        assert error < tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_pooler_returns_the_compositions_dtype_under_autocast(query_dtype, normalize, monkeypatch):
    """Under CUDA autocast F.normalize returns fp32 for bf16 input: the fused forms must return what the
    composition returns, or the COSMOS loss would get bf16 students against fp32 teachers."""
    pooler = cosmos_fast.nn.CrossAttentionPooler(512, 8).cuda()
    query = torch.randn(4, 8, 512, device="cuda", dtype=query_dtype)
    context = torch.randn(4, 77, 512, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = pooler(query, context, normalize=normalize)
        monkeypatch.setenv(cosmos_fast._dispatch.ENV_VAR, "torch")
        composition = pooler(query, context, normalize=normalize)
    assert fused.dtype == composition.dtype
    torch.testing.assert_close(fused.float(), composition.float(), rtol=2e-2, atol=2e-2)


def test_cosmos_pooler_takes_the_context_space_form():
    pooler = cosmos_fast.nn.CrossAttentionPooler(512, 8).cuda()
    assert pooler._fused_form(torch.randn(4, 8, 512, device="cuda")) == "context_space"
