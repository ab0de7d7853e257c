"""Data for COSMOS training: the built-in shapes dataset, multi-crop and text-crop augmentation."""
from .augment import CLIP_MEAN, CLIP_STD, MultiCrop, to_model_input
from .pipeline import CosmosTransform, collate_views
from .synthetic import ShapesDataset
from .text import crop_text, sentence_pool

__all__ = ["CLIP_MEAN", "CLIP_STD", "CosmosTransform", "MultiCrop", "collate_views", "ShapesDataset", "crop_text", "sentence_pool", "to_model_input"]
