"""The fused linear Triton kernels on a real GPU against the float64 references, at SIMLA's shapes (run by
benchmarks/run_gpu.sh)."""
import pytest
import torch
from accuracy import assert_accurate

import cosmos_fast
from cosmos_fast import _dispatch
from cosmos_fast.ops.fused_linear.reference import fused_linear_bce_reference, fused_linear_cross_entropy_reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def randn(*shape, seed, scale=1.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64)


def linear_leaves(N, H, V):
    return [randn(N, H, seed=1), randn(V, H, seed=2, scale=2 / H ** 0.5), randn(V, seed=3, scale=0.5)]


def masked_targets(N, V, active=0.15, seed=4):
    """Class targets with ``1 - active`` of the rows ignored, as SIMLA's masked-token positions."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    target = torch.randint(0, V, (N,), generator=g, device="cuda")
    ignored = torch.rand(N, generator=g, device="cuda") >= active
    return torch.where(ignored, torch.full_like(target, IGNORE), target)


def test_cuda_tensors_take_the_triton_path():
    assert _dispatch.select_backend(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("N,H,V", [(2048, 768, 30522), (2048, 768, 8192), (4099, 96, 1000)])
def test_cross_entropy(N, H, V, alpha, dtype):
    target = masked_targets(N, V)
    soft = randn(N, V, seed=5, scale=2.0).to(dtype) if alpha else None
    kwargs = dict(soft_logits=soft, alpha=alpha)

    def ours(h, w, b):
        return cosmos_fast.fused_linear_cross_entropy(h, w, target, bias=b, **kwargs)

    def reference(h, w, b):
        return fused_linear_cross_entropy_reference(h, w, target, bias=b, **kwargs)

    assert_accurate(ours, reference, linear_leaves(N, H, V), dtype, ["hidden", "weight", "bias"], fp32_tail=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_bce_keyword_head(alpha, dtype):
    """PSL: 256 -> 30522 over 512 image embeddings, 5 keywords per row."""
    N, H, V = 512, 256, 30522
    g = torch.Generator(device="cuda").manual_seed(6)
    keywords = torch.randint(0, V, (N, 5), generator=g, device="cuda")
    target = torch.zeros(N, V, dtype=torch.bool, device="cuda").scatter_(1, keywords, True)
    kwargs = dict(soft_logits=randn(N, V, seed=5, scale=3.0).to(dtype), alpha=alpha) if alpha else {}

    def ours(h, w, b):
        return cosmos_fast.fused_linear_bce(h, w, target, bias=b, **kwargs)

    def reference(h, w, b):
        return fused_linear_bce_reference(h, w, target, bias=b, **kwargs)

    assert_accurate(ours, reference, linear_leaves(N, H, V), dtype, ["hidden", "weight", "bias"], fp32_tail=0)


def test_peak_memory_stays_far_below_the_logits():
    """SIMLA's text head: 15% of 512 x 25 tokens, 768 -> 30522, bf16. The full logits alone would be 0.73 GiB."""
    N, H, V = 512 * 25, 768, 30522
    hidden = randn(N, H, seed=1).bfloat16().requires_grad_()
    weight = randn(V, H, seed=2, scale=H ** -0.5).bfloat16().requires_grad_()
    bias = torch.zeros(V, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = masked_targets(N, V)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cosmos_fast.fused_linear_cross_entropy(hidden, weight, target, bias=bias).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # gradients (bf16 dW, dX, db) + one dL/dlogits block (1920 x 30522 bf16 here) + 64 MiB of small buffers
    allowed = (hidden.numel() + weight.numel()) * 2 + 1920 * V * 2 + (64 << 20)
    assert peak < allowed, f"peak {peak / 2**20:.1f} MiB over the inputs, allowed {allowed / 2**20:.1f} MiB"
    assert torch.isfinite(weight.grad.float()).all()


def test_compile_fullgraph_inductor():
    N, H, V = 300, 64, 1000
    hidden = randn(N, H, seed=1).float().requires_grad_()
    weight = randn(V, H, seed=2, scale=H ** -0.5).float().requires_grad_()
    target = masked_targets(N, V)
    soft = randn(N, V, seed=3).float()
    keywords = torch.rand(N, V, device="cuda") < 0.01

    def step(hidden, weight):
        return cosmos_fast.fused_linear_cross_entropy(hidden, weight, target, soft_logits=soft, alpha=0.4) + \
            cosmos_fast.fused_linear_bce(torch.tanh(hidden), weight, keywords, soft_logits=soft, alpha=0.4)

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(hidden, weight), step(hidden, weight), rtol=1e-4, atol=1e-5)
    compiled(hidden, weight).backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
