"""Matrix products of 16-bit operands kept in fp32 (the blockwise backward passes' dA / dB / dW accumulations)."""
from __future__ import annotations

import torch


def _has_out_dtype(operator: str) -> bool:
    """Whether this PyTorch's ``operator`` takes ``out_dtype`` (cuBLAS then writes the fp32 product directly)."""
    try:
        schemas = torch._C._jit_get_schemas_for_operator(operator)
    except RuntimeError:
        return False
    return any("out_dtype" in str(schema) for schema in schemas)


_MM_HAS_OUT_DTYPE = _has_out_dtype("aten::mm")
_ADDMM_HAS_OUT_DTYPE = _has_out_dtype("aten::addmm")


def mm_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y in fp32, the product never rounded to x's dtype (cuBLAS's out_dtype where PyTorch has it)."""
    if x.dtype == torch.float32:
        return x @ y
    if x.is_cuda and _MM_HAS_OUT_DTYPE:
        return torch.mm(x, y, out_dtype=torch.float32)
    return x.float() @ y.float()


def accumulate_mm(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """acc (fp32) += x @ y, the product never rounded to x's dtype: cuBLAS accumulates into fp32 where PyTorch
    offers addmm's out_dtype (no 16-bit temporary, no extra pass); elsewhere the product is taken in fp32."""
    if x.dtype == acc.dtype:
        acc += x @ y
    elif x.is_cuda and _ADDMM_HAS_OUT_DTYPE:
        torch.addmm(acc, x, y, out_dtype=acc.dtype, out=acc)
    else:
        acc += x.to(acc.dtype) @ y.to(acc.dtype)
