"""Zero-shot metrics: image-text retrieval recall@k (several captions per image) and classification top-k."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

OPENAI_TEMPLATES_SHORT = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {} in the picture.")


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k in both directions.

    Args:
        image_emb: [I, D]; text_emb: [T, D] (normalised here); text_image: [T] int64, the image each caption
            describes (COCO/Flickr: five captions per image).
    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}`` in percent: an image counts as found at k when any of its captions
        ranks in the top k; a caption when its image does.
    """
    if text_emb.shape[0] != text_image.shape[0]:
        raise ValueError(f"text_image must have one entry per caption ({text_emb.shape[0]}), got {text_image.shape[0]}")
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    I = image_emb.shape[0]
    i2t_rank = torch.empty(I, dtype=torch.long)
    for start in range(0, I, chunk):  # [chunk, T] similarities at a time
        sim = image_emb[start:start + chunk] @ text_emb.t()
        order = sim.argsort(dim=1, descending=True)
        correct = text_image[order] == torch.arange(start, start + sim.shape[0])[:, None]
        i2t_rank[start:start + sim.shape[0]] = correct.float().argmax(dim=1)  # first correct position
    t2i_rank = torch.empty(text_emb.shape[0], dtype=torch.long)
    for start in range(0, text_emb.shape[0], chunk):
        sim = text_emb[start:start + chunk] @ image_emb.t()
        target = sim.gather(1, text_image[start:start + sim.shape[0], None])
        t2i_rank[start:start + sim.shape[0]] = (sim > target).sum(dim=1)  # images ranked above the right one
    metrics = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        metrics[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return metrics


@torch.no_grad()
def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                     templates: Sequence[str] = OPENAI_TEMPLATES_SHORT) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its normalised prompt embeddings (CLIP's prompt ensemble).
    ``encode_text`` maps a list of strings to [n, D] embeddings."""
    rows = []
    for name in class_names:
        emb = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def classification_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                            ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent of zero-shot classification by cosine similarity to the class embeddings
    (k larger than the number of classes counts every image as found)."""
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).t()
    topk = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = topk == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}
