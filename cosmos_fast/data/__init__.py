"""Data for COSMOS training: the built-in shapes dataset, multi-crop and text-crop augmentation, upstream's caption
pools."""
from .augment import CLIP_MEAN, CLIP_STD, MultiCrop, to_model_input
from .pipeline import CosmosTransform, collate_views
from .synthetic import ShapesDataset
from .text import (CAPTION_MODES, FLAIR_CAPTION_FIELDS, caption_pool, crop_text, sample_sentences, sentence_pool,
                   split_caption)

__all__ = ["CAPTION_MODES", "CLIP_MEAN", "CLIP_STD", "CosmosTransform", "FLAIR_CAPTION_FIELDS", "MultiCrop",
           "ShapesDataset", "caption_pool", "collate_views", "crop_text", "sample_sentences", "sentence_pool",
           "split_caption", "to_model_input"]
