"""Data for COSMOS training: the built-in shapes dataset, multi-crop and text-crop augmentation."""
from .augment import CLIP_MEAN, CLIP_STD, MultiCrop
from .synthetic import ShapesDataset
from .text import crop_text, sentence_pool

__all__ = ["CLIP_MEAN", "CLIP_STD", "MultiCrop", "ShapesDataset", "crop_text", "sentence_pool"]
