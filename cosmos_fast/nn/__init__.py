"""Drop-in ``nn.Module`` API."""
from .contrastive import ContrastiveLoss, CosmosLoss, CosmosLossOutput
from .ema import EMATeacher

__all__ = ["ContrastiveLoss", "CosmosLoss", "CosmosLossOutput", "EMATeacher"]
