"""Zero-shot evaluation: retrieval and classification metrics, encoders and dataset readers for user data
(``python -m cosmos_fast.eval``: a checkpoint on a Karpathy JSON split and/or an ImageFolder)."""
from .metrics import OPENAI_TEMPLATES_SHORT, class_embeddings, classification_accuracy, retrieval_recall
from .zero_shot import (ClassificationSet, RetrievalSet, encode_images, encode_texts, image_transform,
                        load_checkpoint, read_imagefolder, read_karpathy)

__all__ = ["OPENAI_TEMPLATES_SHORT", "ClassificationSet", "RetrievalSet", "class_embeddings",
           "classification_accuracy", "encode_images", "encode_texts", "image_transform", "load_checkpoint",
           "load_model", "read_imagefolder", "read_karpathy", "retrieval_recall"]
