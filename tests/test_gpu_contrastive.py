"""The Triton kernels on a real GPU against the float64 reference (run by benchmarks/run_gpu.sh)."""
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate

import cosmos_fast
from cosmos_fast import _dispatch
from cosmos_fast.ops.contrastive.reference import contrastive_loss_reference, multiview_contrastive_loss_reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def features(*shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64), dim=-1)


def scale64(value=1 / 0.07):
    return torch.tensor(value, dtype=torch.float64, device="cuda")


def test_cuda_tensors_take_the_triton_path():
    assert _dispatch.select_backend(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 96, 512])
@pytest.mark.parametrize("N", [1, 7, 129, 1000, 4099])
def test_hard_targets(N, D, dtype):
    leaves = [features(N, D, seed=1), features(N, D, seed=2), scale64()]
    assert_accurate(cosmos_fast.contrastive_loss, contrastive_loss_reference, leaves, dtype, ["a", "b", "scale"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,K", [(129, 96, 0), (1000, 512, 300)])
def test_soft_targets_mask_and_queue(N, D, K, dtype):
    teacher = (features(N, D, seed=3).to(dtype), features(N, D, seed=4).to(dtype), torch.tensor(20.0, device="cuda"))
    kwargs = dict(teacher=teacher, alpha=0.4, soft_mask=torch.arange(N, device="cuda") % 3 == 0)
    if K:
        kwargs.update(extra_a=features(K, D, seed=5).to(dtype), extra_b=features(K + 1, D, seed=6).to(dtype))
    assert_accurate(
        lambda a, b, s: cosmos_fast.contrastive_loss(a, b, s, **kwargs),
        lambda a, b, s: contrastive_loss_reference(a, b, s, **kwargs),
        [features(N, D, seed=1), features(N, D, seed=2), scale64()], dtype, ["a", "b", "scale"],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Va,Vb,N,D", [(2, 8, 1000, 512), (16, 4, 257, 512)])
def test_multiview(Va, Vb, N, D, dtype):
    leaves = [features(Va, N, D, seed=1), features(Vb, N, D, seed=2), scale64()]
    assert_accurate(cosmos_fast.multiview_contrastive_loss, multiview_contrastive_loss_reference, leaves, dtype,
                    ["a_views", "b_views", "scale"])


def test_peak_memory_is_linear_in_n():
    N, D = 16384, 512
    a = features(N, D, seed=1).bfloat16().requires_grad_()
    b = features(N, D, seed=2).bfloat16().requires_grad_()
    scale = torch.tensor(14.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    cosmos_fast.contrastive_loss(a, b, scale).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 8 * N * D * 2, f"peak {peak / 2**20:.1f} MiB over the inputs"


def test_compile_fullgraph_inductor():
    a = features(256, 64, seed=1).float().requires_grad_()
    b = features(256, 64, seed=2).float().requires_grad_()
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)
    loss_fn = cosmos_fast.nn.CosmosLoss()

    def step(a, b, scale):
        views = torch.stack([F.normalize(a, dim=-1), F.normalize(b, dim=-1)])
        return loss_fn(views, views, views, views, views, views, scale, scale).total

    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(a, b, scale), step(a, b, scale), rtol=1e-4, atol=1e-5)
    compiled(a, b, scale).backward()
    assert torch.isfinite(a.grad).all()
