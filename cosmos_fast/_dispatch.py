"""The one place that decides which implementation runs an op.

Rule (as in xformers' dispatch): CUDA tensors take an op's first available fast
path (the CUDA extension where the op has one, else Triton), everything else the
PyTorch path. ``COSMOS_FAST_BACKEND=torch`` forces the PyTorch reference path
everywhere (for debugging); ``=triton`` forces Triton, which on CPU tensors needs
``TRITON_INTERPRET=1`` (how the CPU tests exercise the kernels); ``=cuda`` forces
the CUDA extension for the ops that have one.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "COSMOS_FAST_BACKEND"

# Dtypes the Triton kernels accept; anything else (float64) takes the PyTorch path.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# found once, without importing triton (a plain constant: torch.compile traces through it without a warning)
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_FOUND


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_backend() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def _cuda_extension_available() -> bool:
    from . import _extension

    return _extension.load() is not None


def select_backend(x: torch.Tensor, fast: tuple[str, ...] = ("triton",), supported: bool = True) -> str:
    """Backend for an op whose main input is ``x``; ``fast`` lists the op's fast paths, preferred first.

    ``supported=False`` says the fast paths do not cover this call's shapes (the PyTorch path, which for
    attention is SDPA with its own best kernel, serves better); forcing a fast path then is an error."""
    forced = forced_backend()
    if not supported:
        if forced in fast:
            raise ValueError(f"{ENV_VAR}={forced}: this op's {forced} path does not support these shapes")
        return "torch"
    if forced == "torch":
        return "torch"
    if forced == "cuda" and "cuda" in fast:
        if x.device.type != "cuda" or not _cuda_extension_available():
            from . import _extension

            raise RuntimeError(f"{ENV_VAR}=cuda needs CUDA tensors and the CUDA extension ({_extension.status()})")
        return "cuda"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
        if x.device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                f"{ENV_VAR}=triton on {x.device.type} tensors needs TRITON_INTERPRET=1 "
                "(the Triton interpreter runs the kernels on CPU)"
            )
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"{ENV_VAR}=triton forces the Triton kernels, which take {TRITON_DTYPES}; the inputs are "
                            f"{x.dtype} (unset {ENV_VAR} to let them take the PyTorch path)")
        return "triton"
    if x.device.type == "cuda" and x.dtype in TRITON_DTYPES:
        if "cuda" in fast and _cuda_extension_available():
            return "cuda"
        if triton_available():
            return "triton"
    return "torch"


def backends() -> dict[str, object]:
    """What this machine can run, for bug reports and benchmark logs: {"forced": COSMOS_FAST_BACKEND or None,
    "triton": bool, "triton_interpreter": bool, "cuda": bool, "cuda_extension": ``_extension.status()``}."""
    from . import _extension

    return {
        "forced": forced_backend(),
        "triton": triton_available(),
        "triton_interpreter": triton_interpreted(),
        "cuda": torch.cuda.is_available(),
        "cuda_extension": _extension.status(),
    }
