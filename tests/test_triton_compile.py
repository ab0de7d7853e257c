"""The cross-attention kernels compile for an H100 (sm_90) without one, and fit its shared memory.

The interpreter that runs the kernels on CPU accepts code the compiler rejects (it once passed a kernel whose
loop re-typed a variable), and it has no shared-memory limit; compiling ahead of time for the GPU target
(``triton_compile_worker.py``, in a process without TRITON_INTERPRET) catches both before a GPU session does.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile_worker.py"))], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bf16_kernels_fit_an_h100_with_their_first_config(compiled):
    for case in compiled:
        if case["dtype"] == str(torch.bfloat16):
            assert case["config"] == case["first"], f"{case}: the first config does not fit"


def test_largest_supported_fp32_tile_fits_an_h100(compiled):
    from cosmos_fast.ops.attention.triton_kernels import supports

    assert supports(32, 128, torch.float32) and not supports(64, 128, torch.float32)
    for case in compiled:
        if case["dtype"] == str(torch.float32):
            assert case["config"] is not None, f"{case}: no config of the fallback chain fits"
