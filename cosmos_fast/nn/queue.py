"""``FeatureQueue``: the ring buffer of momentum features behind SIMLA/ALBEF's extra contrastive columns."""
from __future__ import annotations

import torch
from torch import nn

from ..distributed import all_gather_no_grad, check_same_across_ranks


class FeatureQueue(nn.Module):
    """A [size, dim] ring buffer of detached features (the queues of MoCo, ALBEF and SIMLA, ``psd_simla.md``).

    ``enqueue(features)`` all-gathers ``features`` [b, dim] over the ranks of ``group`` (without gradient, so
    every rank's queue holds the same global batch) and writes them at the pointer, wrapping around; when one
    call brings more than ``size`` rows only the last ``size`` are kept. ``features`` is the current contents,
    [K, dim] with K = the number of filled slots (``size`` once full), in slot order, ready to pass as the
    ``extra_a``/``extra_b`` columns of :func:`cosmos_fast.contrastive_loss`.

    The buffer, the pointer and the fill count are persistent buffers, so ``state_dict()`` round-trips a
    resumed run exactly; ``.to(device)`` moves them.

    Args:
        dim: feature size D (SIMLA: 256).
        size: number of slots K (SIMLA: 65536).
        dtype: dtype of the stored features (a floating dtype); enqueued features are cast to it.
        group: ``torch.distributed`` process group to gather over (default: the default group when initialised).
    """

    def __init__(self, dim: int, size: int, dtype: torch.dtype = torch.float32, group=None):
        super().__init__()
        for name, value in (("dim", dim), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.dim, self.size, self.group = dim, size, group
        self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))  # next slot to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))  # slots holding features

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor) -> None:
        """Gather ``features`` [b, dim] from every rank and write them at the pointer (wrapping around)."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape [batch, {self.dim}], got {tuple(features.shape)}")
        if features.device != self.queue.device:
            raise ValueError(f"features are on {features.device} but the queue is on {self.queue.device}; "
                             "move the queue with .to(device)")
        check_same_across_ranks(self.group, features=features)
        gathered = all_gather_no_grad(features, self.group).to(self.queue.dtype)
        count = gathered.shape[0]
        kept = min(count, self.size)
        # Slot indexes computed on the device: no host synchronisation per step.
        slots = (self.pointer + (count - kept) + torch.arange(kept, device=self.queue.device)) % self.size
        self.queue.index_copy_(0, slots, gathered[count - kept:])
        self.pointer.copy_((self.pointer + count) % self.size)
        self.filled.copy_(torch.clamp(self.filled + count, max=self.size))

    @torch.no_grad()
    def fill_random_(self, generator: torch.Generator | None = None) -> None:
        """Every slot a random unit vector (ALBEF's and SIMLA's start: the queue is full from the first step).
        Draws from ``generator`` (default: torch's); ranks seeded alike hold the same queue."""
        features = torch.randn(self.size, self.dim, generator=generator, dtype=torch.float32)
        self.queue.copy_(torch.nn.functional.normalize(features, dim=-1).to(self.queue))
        self.pointer.zero_()
        self.filled.fill_(self.size)

    @property
    def features(self) -> torch.Tensor:
        """The filled slots, [K, dim] (a view: clone it to keep it past the next ``enqueue``)."""
        return self.queue[: int(self.filled)]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, dtype={self.queue.dtype}"
