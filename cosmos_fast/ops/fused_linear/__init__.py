"""Fused linear + loss heads (SIMLA's masked-token CE and keyword BCE) without the N x V logits."""
from .functional import fused_linear_bce, fused_linear_cross_entropy

__all__ = ["fused_linear_bce", "fused_linear_cross_entropy"]
