"""Every Triton kernel compiles for an H100 (sm_90) without one, and fits its shared memory.

The interpreter that runs the kernels on CPU accepts code the compiler rejects (it once passed a kernel whose
loop re-typed a variable), and it has no shared-memory limit; compiling ahead of time for the GPU target, in a
process without TRITON_INTERPRET, catches both before a GPU session does: ``triton_compile_worker.py`` for the
cross-attention kernels (whose runtime steps down to smaller configs), ``triton_launch_compile_worker.py`` for
every launch the other ops make with their GPU configs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")


def run_worker(name: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COSMOS_FAST_BACKEND")}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name(name))], env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    return run_worker("triton_compile_worker.py")


def test_every_launch_of_the_other_ops_compiles_and_fits_an_h100():
    """The contrastive, sigmoid, fused-linear and EMA kernels, each launch in bf16, fp16 and fp32 as the ops make
    it."""
    from triton_launch_compile_worker import H100_SHARED_BYTES

    launches = run_worker("triton_launch_compile_worker.py")
    failures = [f"{c['kernel']} {c['constexprs']} {c['options']}: {c['error']}" for c in launches if "error" in c]
    assert not failures, "\n".join(failures[:3])
    assert all(c["shared"] <= H100_SHARED_BYTES for c in launches)
    assert {c["kernel"] for c in launches} == {"_fwd_kernel", "_symmetric_grad_kernel", "_bwd_rows_kernel",
                                               "_bwd_cols_kernel", "_ce_fwd_kernel", "_ce_grad_kernel",
                                               "_bce_fwd_kernel", "_bce_grad_kernel", "_ema_kernel",
                                               "_sigmoid_tile_kernel"}
    assert {c["constexprs"].get("PRECISION") for c in launches} >= {"tf32", "tf32x3"}  # 16-bit and fp32 configs


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
