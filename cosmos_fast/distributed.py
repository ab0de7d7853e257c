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


def world(group=None) -> tuple[int, int]:
    """(rank, world_size) in ``group``; (0, 1) when not distributed."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


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
