"""Zero-shot evaluation: retrieval and classification metrics."""
from .metrics import OPENAI_TEMPLATES_SHORT, class_embeddings, classification_accuracy, retrieval_recall

__all__ = ["OPENAI_TEMPLATES_SHORT", "class_embeddings", "classification_accuracy", "retrieval_recall"]
