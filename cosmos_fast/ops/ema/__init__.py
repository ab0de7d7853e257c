"""Multi-tensor EMA teacher update (CUDA extension, Triton, PyTorch foreach)."""
from .functional import ema_update_

__all__ = ["ema_update_"]
