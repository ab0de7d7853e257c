"""The sigmoid loss's Triton path on a real GPU against the float64 reference (run by benchmarks/run_gpu.sh),
by the accuracy rule, and its memory."""
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate

import cosmos_fast
from cosmos_fast import _dispatch
from cosmos_fast.ops.sigmoid.reference import multiview_sigmoid_loss_reference, sigmoid_loss_reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def features(*shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, device="cuda", dtype=torch.float64), dim=-1)


def paired(*shape, seed):
    return F.normalize(features(*shape, seed=1) + 0.6 * features(*shape, seed=seed), dim=-1)


def scalars():
    return [torch.tensor(10.0, dtype=torch.float64, device="cuda"),
            torch.tensor(-10.0, dtype=torch.float64, device="cuda")]


def test_cuda_tensors_take_the_triton_path():
    assert _dispatch.select_backend(torch.zeros(1, device="cuda", dtype=torch.bfloat16)) == "triton"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,K", [(1, 32, 0), (129, 96, 0), (1000, 512, 0), (4099, 512, 300)])
def test_hard_and_queue(N, D, K, dtype):
    kwargs = {"extra_b": features(K, D, seed=6).to(dtype)} if K else {}
    assert_accurate(lambda a, b, s, t: cosmos_fast.sigmoid_loss(a, b, s, t, **kwargs),
                    lambda a, b, s, t: sigmoid_loss_reference(a, b, s, t, **kwargs),
                    [features(N, D, seed=1), paired(N, D, seed=2), *scalars()], dtype, ["a", "b", "scale", "bias"],
                    fp32_tail=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_soft_labels_mask_and_queue(dtype):
    N, D = 1000, 512
    teacher = (features(N, D, seed=3).to(dtype), features(N, D, seed=4).to(dtype),
               torch.tensor(20.0, device="cuda"), torch.tensor(-5.0, device="cuda"))
    kwargs = dict(teacher=teacher, alpha=0.4, soft_mask=torch.arange(N, device="cuda") % 3 == 0,
                  extra_b=features(300, D, seed=6).to(dtype))
    assert_accurate(lambda a, b, s, t: cosmos_fast.sigmoid_loss(a, b, s, t, **kwargs),
                    lambda a, b, s, t: sigmoid_loss_reference(a, b, s, t, **kwargs),
                    [features(N, D, seed=1), paired(N, D, seed=2), *scalars()], dtype, ["a", "b", "scale", "bias"],
                    fp32_tail=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multiview(dtype):
    leaves = [features(2, 1000, 512, seed=1), paired(8, 1000, 512, seed=2), *scalars()]
    assert_accurate(cosmos_fast.multiview_sigmoid_loss, multiview_sigmoid_loss_reference, leaves, dtype,
                    ["a_views", "b_views", "scale", "bias"], fp32_tail=2)


def test_peak_memory_is_linear_in_n():
    """N = 65536, D = 512, bf16, forward and backward: goal 0.5 GiB above the inputs (open_clip's dense loss needs
    about 32 GiB)."""
    N, D = 65536, 512
    a = features(N, D, seed=1).bfloat16().requires_grad_()
    b = features(N, D, seed=2).bfloat16().requires_grad_()
    scale = torch.tensor(10.0, device="cuda", requires_grad=True)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(cosmos_fast.sigmoid_loss(a, b, scale, bias), [a, b, scale, bias])
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.cuda.max_memory_allocated() - base < 0.75 * 2**30
