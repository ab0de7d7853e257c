"""cosmos_fast: fused kernels for vision-language self-distillation training."""
from . import nn
from ._dispatch import backends
from ._validation import set_validation
from .nn import EMATeacher
from .ops.attention import cross_attention
from .ops.contrastive import contrastive_loss, multiview_contrastive_loss
from .ops.ema import ema_update_
from .ops.fused_linear import fused_linear_bce, fused_linear_cross_entropy
from .ops.sigmoid import multiview_sigmoid_loss, sigmoid_loss

__version__ = "0.1.0"
__all__ = ["EMATeacher", "backends", "contrastive_loss", "cross_attention", "ema_update_", "fused_linear_bce",
           "fused_linear_cross_entropy", "multiview_contrastive_loss", "multiview_sigmoid_loss", "nn", "set_validation",
           "sigmoid_loss"]
