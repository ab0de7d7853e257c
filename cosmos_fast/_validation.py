"""Argument checks shared by the public ops: each failure names the argument."""
from __future__ import annotations

import math
import numbers
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_VALIDATE = [os.environ.get("COSMOS_FAST_VALIDATE", "0") == "1"]


def set_validation(enabled: bool) -> None:
    """Checks that cost a GPU synchronisation per call (the values of tensor scales on the GPU; under NCCL, that
    the distributed ops' shapes and dtypes agree across ranks): on with ``True`` (or ``COSMOS_FAST_VALIDATE=1``),
    for debugging. On CPU tensors and gloo they always run, costing nothing extra there."""
    _VALIDATE[0] = bool(enabled)


def validation_enabled() -> bool:
    return _VALIDATE[0]


def may_read_values(x: torch.Tensor) -> bool:
    """Whether a check may read ``x``'s values: on the CPU, or on a GPU in validation mode; never while
    torch.compile traces (a read would break the graph)."""
    return not torch.compiler.is_compiling() and (x.device.type == "cpu" or validation_enabled())


def check_float_tensor(name: str, x, ndim: int | None = None, allow_no_rows: bool = False) -> torch.Tensor:
    """A floating tensor of ``ndim`` dimensions, not empty; ``allow_no_rows`` admits a first dimension of 0 (the
    other dimensions still non-zero)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0 and not (allow_no_rows and x.dim() > 1 and x.shape[0] == 0 and all(x.shape[1:])):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; all inputs must share a device")


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_key_padding_mask(mask, batch: int, n_keys: int) -> None:
    """None, or a bool [batch, n_keys] tensor (True = padding)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor [B, Lk], got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != (batch, n_keys):
        raise ValueError(f"key_padding_mask must have shape [{batch}, {n_keys}], got {tuple(mask.shape)}")


def check_positive_number(name: str, value) -> float:
    """A finite real number > 0 (numpy scalars included) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive real number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def as_scalar_tensor(name: str, value, like: torch.Tensor, positive: bool = True) -> torch.Tensor:
    """A 0-d floating tensor from a real number or a one-element tensor (autograd kept). ``positive``: the value
    must be finite and > 0 (a tensor's is checked where reading it costs no GPU synchronisation, see
    ``may_read_values``); else any finite number (a logit bias), a tensor's value unchecked."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (a 0-d or one-element tensor), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        if positive and may_read_values(value):
            number = float(value.detach().reshape(()))
            if not (math.isfinite(number) and number > 0):
                raise ValueError(f"{name} must be a finite number > 0, got a tensor holding {number!r}")
        return value.reshape(())
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if not positive:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError(f"{name} must be a 0-d tensor or a finite real number, got {value!r}")
        return torch.tensor(float(value), dtype=dtype, device=like.device)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a 0-d tensor or a positive real number, got {type(value).__name__}")
    return torch.tensor(check_positive_number(name, value), dtype=dtype, device=like.device)


def check_unit_interval(name: str, value) -> float:
    """A real number in [0, 1] (numpy scalars of any width included) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)
