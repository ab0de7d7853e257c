"""Blockwise sigmoid (SigLIP) loss: soft labels, queue columns, multi-view, distributed; linear memory."""
from .functional import multiview_sigmoid_loss, sigmoid_loss

__all__ = ["multiview_sigmoid_loss", "sigmoid_loss"]
