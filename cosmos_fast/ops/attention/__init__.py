"""Cross-attention of short queries over long keys (the COSMOS and SIMLA poolers)."""
from .functional import cross_attention

__all__ = ["cross_attention"]
