"""Cross-attention's Triton kernel and the pooler on a real GPU against float64 (run by run_gpu.sh)."""
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate

import cosmos_fast
from cosmos_fast.ops.attention.reference import cross_attention_reference

pytestmark = pytest.mark.gpu


def qkv(B, Lq, Lk, H, Dh):
    return [torch.randn(B, L, H, Dh, device="cuda", dtype=torch.float64) for L in (Lq, Lk, Lk)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("Lq,Lk,Dh", [(1, 1, 32), (8, 77, 64), (8, 196, 64), (25, 257, 96), (64, 1024, 128),
                                      (8, 33, 80)])
def test_triton_matches_float64(Lq, Lk, Dh, dtype):
    B, H = 5, 8
    mask = torch.rand(B, Lk, device="cuda") < 0.3
    mask[1] = True
    assert_accurate(lambda q, k, v: cosmos_fast.cross_attention(q, k, v, mask),
                    lambda q, k, v: cross_attention_reference(q, k, v, mask), qkv(B, Lq, Lk, H, Dh), dtype,
                    ["q", "k", "v"], fp32_tail=0)


def test_pooler_compiles_fullgraph_inductor():
    pooler = cosmos_fast.nn.CrossAttentionPooler(512, 8).cuda()
    query = torch.randn(16, 8, 512, device="cuda", requires_grad=True)
    context = torch.randn(16, 77, 512, device="cuda")
    mask = torch.rand(16, 77, device="cuda") < 0.3
    compiled = torch.compile(pooler, fullgraph=True)
    torch.testing.assert_close(compiled(query, context, mask), pooler(query, context, mask), rtol=1e-4, atol=1e-5)
    F.mse_loss(compiled(query, context, mask), torch.zeros_like(query)).backward()
    assert torch.isfinite(query.grad).all()
