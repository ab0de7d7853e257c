"""Drop-in ``nn.Module`` API."""
from .attention import CrossAttentionPooler
from .contrastive import ContrastiveLoss, CosmosLoss, CosmosLossOutput, SigLipLoss
from .ema import EMATeacher
from .fused_linear import FusedLinearBCELoss, FusedLinearCrossEntropyLoss
from .queue import FeatureQueue

__all__ = ["ContrastiveLoss", "CosmosLoss", "CosmosLossOutput", "CrossAttentionPooler", "EMATeacher", "FeatureQueue",
           "FusedLinearBCELoss", "FusedLinearCrossEntropyLoss", "SigLipLoss"]
