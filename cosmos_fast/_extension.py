"""The optional CUDA extension (csrc/): prebuilt by setup.py, else JIT-compiled with ninja on first use."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("bindings.cpp", "ema.cu")
# torch's own headers need relaxed constexpr in device code; -O3 for the kernels.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]

_status = "not loaded"


@functools.lru_cache(maxsize=None)
def load():
    """The extension module, or None (``status()`` says why). Compiles at most once per process."""
    global _status
    try:
        from . import _C  # built by setup.py

        _status = "prebuilt"
        return _C
    except ImportError:
        pass
    if not torch.cuda.is_available():
        _status = "unavailable: no CUDA device"
        return None
    if not all((CSRC / name).exists() for name in SOURCES):
        _status = f"unavailable: sources not found under {CSRC} (install from a source checkout)"
        return None
    try:
        from torch.utils.cpp_extension import load as jit_load

        module = jit_load(name="cosmos_fast_C", sources=[str(CSRC / name) for name in SOURCES],
                          extra_cuda_cflags=NVCC_FLAGS, verbose=False)
    except Exception as exc:  # a missing nvcc/ninja or a compiler error: the Triton path still works
        _status = f"unavailable: JIT build failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        warnings.warn(f"cosmos_fast: CUDA extension {_status}; using the Triton kernels", stacklevel=2)
        return None
    _status = "jit"
    return module


def status() -> str:
    """How the extension was obtained: "prebuilt", "jit", "unavailable: <reason>", or, on a GPU machine before the
    first CUDA EMA update, "not loaded" (finding out there may mean a JIT compile, which ``status`` never starts)."""
    if _status == "not loaded" and not torch.cuda.is_available():
        load()  # without a GPU this is an import attempt, no compile
    return _status
