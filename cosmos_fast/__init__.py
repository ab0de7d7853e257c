"""cosmos_fast: fused kernels for vision-language self-distillation training."""
from . import nn
from ._dispatch import backends
from .ops.contrastive import contrastive_loss, multiview_contrastive_loss

__version__ = "0.1.0"
__all__ = ["backends", "contrastive_loss", "multiview_contrastive_loss", "nn"]
