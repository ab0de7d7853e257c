"""The EMA update's CUDA extension and Triton kernel on a real GPU against float64 (run by run_gpu.sh)."""
import pytest
import torch

import cosmos_fast
from cosmos_fast import _extension

pytestmark = pytest.mark.gpu
SIZES = [1, 3, 1000003, 4099, 65536 + 7, 2 * 768 * 3072]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.bfloat16]


def test_cuda_extension_builds_and_is_the_default():
    assert _extension.load() is not None, _extension.status()
    assert cosmos_fast._dispatch.select_backend(torch.zeros(1, device="cuda"), fast=("cuda", "triton")) == "cuda"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_update_and_bf16_copy_match_float64(backend, offset, monkeypatch):
    """offset 1 starts every tensor one element into its storage: the kernels' unaligned path."""
    monkeypatch.setenv("COSMOS_FAST_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    teacher = [torch.randn(n + offset, device="cuda", generator=g)[offset:] for n in SIZES]
    student = [torch.randn(n + offset, device="cuda", generator=g).to(d)[offset:] for n, d in zip(SIZES, DTYPES)]
    copies = [torch.full((n + offset,), float("nan"), device="cuda", dtype=torch.bfloat16)[offset:] for n in SIZES]
    expected = [0.996 * t.double() + 0.004 * s.double() for t, s in zip(teacher, student)]
    cosmos_fast.ema_update_(teacher, student, 0.996, bf16_copy=copies)
    for t, e, c in zip(teacher, expected, copies):
        torch.testing.assert_close(t.double(), e, rtol=0, atol=4e-7 * max(1.0, e.abs().max().item()))
        assert torch.equal(c, t.to(torch.bfloat16))
