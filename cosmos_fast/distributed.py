"""``torch.distributed`` helpers for losses over the global batch.

Each rank keeps its local rows and scores them against the all-gathered
columns. :func:`all_gather_with_grad` sends the columns' gradients back to
their owners (summed over ranks), so after DDP averages the parameter
gradients, every rank holds the gradient of the single-process loss on the
concatenated batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._validation import validation_enabled

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4, torch.int64: 5,
                torch.int32: 6, torch.bool: 7}
_MAX_DIMS = 6


def world(group=None) -> tuple[int, int]:
    """(rank, world_size) in ``group``; (0, 1) when not distributed."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_same_across_ranks(group=None, **tensors: torch.Tensor | None) -> None:
    """ValueError, on every rank, naming the first of ``tensors`` whose shape, dtype or presence differs between
    ranks (a collective on mismatched tensors would abort the process in gloo, or hang in NCCL).

    One small all-gather of every tensor's signature. It runs under gloo (CPU: no extra synchronisation), and
    under NCCL in validation mode (``cosmos_fast.set_validation(True)`` or ``COSMOS_FAST_VALIDATE=1``: it reads
    the result on the host). Every rank must call it with the same names, as every rank calls the op."""
    rank, size = world(group)
    if size == 1 or torch.compiler.is_compiling():
        return
    gloo = dist.get_backend(group) == "gloo"
    if not gloo and not validation_enabled():
        return
    rows = []
    for name, t in tensors.items():
        if t is not None and t.dim() > _MAX_DIMS:
            raise ValueError(f"{name} must have at most {_MAX_DIMS} dimensions, got {t.dim()}")
        row = [0] * (3 + _MAX_DIMS) if t is None else [1, _DTYPE_CODES.get(t.dtype, 0), t.dim(), *t.shape]
        rows.append(row + [0] * (3 + _MAX_DIMS - len(row)))
    device = torch.device("cpu") if gloo else next(t.device for t in tensors.values() if t is not None)
    local = torch.tensor(rows, dtype=torch.int64, device=device)
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=group)
    table = torch.stack(parts).cpu()  # [ranks, tensors, signature]
    names = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}
    for index, name in enumerate(tensors):
        signatures = table[:, index]
        if not bool((signatures == signatures[0]).all()):
            def describe(sig):
                present, dtype, ndim = (int(v) for v in sig[:3])
                return "None" if not present else f"{names.get(dtype, '?')} {tuple(int(d) for d in sig[3:3 + ndim])}"
            seen = ", ".join(f"rank {r}: {describe(signatures[r])}" for r in range(size))
            raise ValueError(f"{name} must have the same shape and dtype on every rank (the ops gather it), got "
                             f"{seen}")


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(grad.shape[0] // size, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: sum everywhere, keep our slice
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(size)[rank], None


def all_gather_with_grad(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along ``dim`` (equal shapes), differentiable back to each owner."""
    if world(group)[1] == 1:
        return x
    if dim != 0:
        return _AllGather.apply(x.movedim(dim, 0), group).movedim(0, dim)
    return _AllGather.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group=None, dim: int = 0) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along ``dim``, detached (teacher features, queues)."""
    if world(group)[1] == 1:
        return x.detach()
    x = x.detach().movedim(dim, 0).contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts).movedim(0, dim)
