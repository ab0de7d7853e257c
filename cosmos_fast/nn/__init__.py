"""Drop-in ``nn.Module`` API."""
from .contrastive import ContrastiveLoss, CosmosLoss, CosmosLossOutput

__all__ = ["ContrastiveLoss", "CosmosLoss", "CosmosLossOutput"]
