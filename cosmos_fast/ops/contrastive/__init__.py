"""Blockwise contrastive loss (CLIP/InfoNCE, soft targets, queues, multi-view, distributed)."""
from .functional import contrastive_loss, multiview_contrastive_loss

__all__ = ["contrastive_loss", "multiview_contrastive_loss"]
