"""The largest tensor an implementation creates, for the tests that prove an op never builds its full matrix."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestAllocation(TorchDispatchMode):
    """Inside ``with LargestAllocation() as mode:``, ``mode.largest`` is the size in bytes of the largest tensor
    any op returned. Views and in-place ops allocate nothing and are not counted (the Triton interpreter's
    set_/copy_ of argument storages, as uint8, stand for the GPU's own memory)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


class PeakMemory(TorchDispatchMode):
    """Inside ``with PeakMemory() as mode:``, ``mode.peak`` is the most bytes that tensors created inside the block
    held at one time (each op's outputs counted until they are freed; views and in-place results allocate
    nothing). Tensors made before the block (the inputs) are not counted: it measures an op's extra memory."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _release(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func._schema.is_mutable:
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel():
                size = t.untyped_storage().nbytes()
                self.live += size
                weakref.finalize(t, self._release, size)
        self.peak = max(self.peak, self.live)
        return out
