"""Test set-up: without CUDA the Triton kernels run in the Triton interpreter on CPU tensors.

TRITON_INTERPRET is read when a kernel is defined, so it is set here, before cosmos_fast is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cosmos_fast import _dispatch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a CPU test once per backend: the PyTorch path and the Triton kernels (interpreted)."""
    if request.param == "triton" and not (_dispatch.triton_available() and _dispatch.triton_interpreted()):
        pytest.skip("Triton kernels on CPU tensors need triton and TRITON_INTERPRET=1")
    monkeypatch.setenv(_dispatch.ENV_VAR, request.param)
    return request.param
