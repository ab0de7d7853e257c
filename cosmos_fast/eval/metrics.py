"""Zero-shot metrics: image-text retrieval recall@k (several captions per image) and classification top-k."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .._validation import check_float_tensor

OPENAI_TEMPLATES_SHORT = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {} in the picture.")


def _check_embeddings(name_a: str, a, name_b: str, b) -> None:
    check_float_tensor(name_a, a, 2)
    check_float_tensor(name_b, b, 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} [*, {a.shape[1]}] and {name_b} [*, {b.shape[1]}] must have the same dimension D")


def _check_indexes(name: str, x, length: int, bound: int, what: str) -> None:
    """A 1-d integer tensor of ``length`` entries in [0, bound)."""
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor of {what} indexes, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {tuple(x.shape)}")
    if length and (int(x.min()) < 0 or int(x.max()) >= bound):
        raise ValueError(f"{name} must hold {what} indexes in [0, {bound}), got values in "
                         f"[{int(x.min())}, {int(x.max())}]")


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks) if isinstance(ks, Sequence) else ks
    if not isinstance(ks, tuple) or not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def invalid_templates(templates: Sequence[str]) -> list[str]:
    """The prompt templates that ``str.format`` cannot fill with one class name: not exactly one ``{}``, or other
    braces."""
    return [t for t in templates if t.count("{}") != 1 or t.replace("{}", "").count("{")]


def _check_strings(name: str, values) -> None:
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise TypeError(f"{name} must be a non-empty list of strings, got {values!r:.80}")
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"{name} must hold strings only, got {[type(v).__name__ for v in values][:5]}")


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k in both directions.

    Args:
        image_emb: [I, D]; text_emb: [T, D] (normalised here); text_image: [T] int64, the image each caption
            describes (COCO/Flickr: five captions per image).
    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}`` in percent: an image counts as found at k when any of its captions
        ranks in the top k; a caption when its image does. A rank counts the candidates scoring strictly higher
        than the right one (ties go to the model), so the recalls never depend on a sort's order among equals.
    """
    _check_embeddings("image_emb", image_emb, "text_emb", text_emb)
    _check_indexes("text_image", text_image, text_emb.shape[0], image_emb.shape[0], "image")
    ks = _check_ks(ks)
    text_image = text_image.long()
    captionless = (torch.bincount(text_image, minlength=image_emb.shape[0]) == 0).nonzero().flatten()
    if len(captionless):  # its image -> text rank would be meaningless
        raise ValueError(f"text_image gives no caption to {len(captionless)} of the {image_emb.shape[0]} images "
                         f"(first: image {int(captionless[0])}); every image needs at least one")
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    # [chunk, T] and [chunk, I] similarities at a time
    i2t_rank = torch.cat([_image_ranks(image_emb[start:start + chunk] @ text_emb.t(), text_image, start)
                          for start in range(0, image_emb.shape[0], chunk)])
    t2i_rank = torch.cat([_caption_ranks(text_emb[start:start + chunk] @ image_emb.t(), text_image[start:start + chunk])
                          for start in range(0, text_emb.shape[0], chunk)])
    return _recalls(i2t_rank, t2i_rank, ks)


def _image_ranks(scores: torch.Tensor, text_image: torch.Tensor, first: int) -> torch.Tensor:
    """scores [i, T] of images first .. first + i - 1 against every caption -> [i]: per image, the captions
    scoring strictly higher than its best-scored own caption."""
    correct = text_image[None, :] == torch.arange(first, first + scores.shape[0])[:, None]
    best = scores.masked_fill(~correct, float("-inf")).max(dim=1, keepdim=True).values
    return _unfound_last((scores > best).sum(dim=1), best.squeeze(1), scores.shape[1])


def _caption_ranks(scores: torch.Tensor, caption_image: torch.Tensor) -> torch.Tensor:
    """scores [t, I] of captions against every image, caption_image [t] -> [t]: per caption, the images scoring
    strictly higher than its own."""
    target = scores.gather(1, caption_image[:, None])
    return _unfound_last((scores > target).sum(dim=1), target.squeeze(1), scores.shape[1])


def _unfound_last(ranks: torch.Tensor, score: torch.Tensor, candidates: int) -> torch.Tensor:
    """A right answer scored -inf (re-ranked retrieval: never among the query's candidates) is never found: its
    rank is the number of candidates, whatever the other scores (counting only the finite ones above it would
    let it be found at any k above the re-ranked k)."""
    return torch.where(score == float("-inf"), candidates, ranks)


def _recalls(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor, ks) -> dict[str, float]:
    metrics = {}
    for k in ks:
        metrics[f"i2t_R@{k}"] = 100.0 * (i2t_rank < k).float().mean().item()
        metrics[f"t2i_R@{k}"] = 100.0 * (t2i_rank < k).float().mean().item()
    return metrics


@torch.no_grad()
def recall_from_scores(i2t: torch.Tensor, t2i: torch.Tensor, text_image: torch.Tensor,
                       ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from score matrices (re-ranked retrieval: SIMLA's ITM scores), with
    :func:`retrieval_recall`'s rule: an image counts as found at k when its best-scored caption has fewer than k
    captions scoring strictly higher; a caption when its image has. i2t [I, T], t2i [T, I] (-inf allowed:
    candidates never scored); text_image [T] int64."""
    for name, x, shape in (("i2t", i2t, None), ("t2i", t2i, tuple(i2t.shape[::-1]))):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a float matrix, got {getattr(x, 'dtype', type(x))}")
        if shape is not None and tuple(x.shape) != shape:
            raise ValueError(f"t2i must have shape {list(shape)} (i2t's transposed), got {tuple(x.shape)}")
    _check_indexes("text_image", text_image, i2t.shape[1], i2t.shape[0], "image")
    ks = _check_ks(ks)
    text_image = text_image.long()
    if (torch.bincount(text_image, minlength=i2t.shape[0]) == 0).any():
        raise ValueError("text_image gives no caption to some images; every image needs at least one")
    return _recalls(_image_ranks(i2t, text_image, 0), _caption_ranks(t2i, text_image), ks)


@torch.no_grad()
def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], class_names: Sequence[str],
                     templates: Sequence[str] = OPENAI_TEMPLATES_SHORT, progress: bool = False,
                     desc: str = "classes") -> torch.Tensor:
    """[C, D] fp32: per class, the normalised mean of its normalised prompt embeddings (CLIP's prompt ensemble).
    ``encode_text`` maps a list of strings to [n, D] embeddings; each template has one ``{}`` for the name."""
    _check_strings("class_names", class_names)
    _check_strings("templates", templates)
    if bad := invalid_templates(templates):
        raise ValueError(f"every template needs one {{}} for the class name (and no other braces), got {bad}")
    rows = []
    for name in tqdm(class_names, desc=f"{desc} classes", disable=not progress, leave=False):
        emb = F.normalize(encode_text([t.format(name) for t in templates]).float(), dim=-1)
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def classification_accuracy(image_emb: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                            ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent of zero-shot classification by cosine similarity to the class embeddings
    (k larger than the number of classes counts every image as found).

    image_emb [I, D]; labels [I] integer class indexes in [0, C); class_emb [C, D] -> {"top{k}": percent}."""
    _check_embeddings("image_emb", image_emb, "class_emb", class_emb)
    _check_indexes("labels", labels, image_emb.shape[0], class_emb.shape[0], "class")
    ks = _check_ks(ks)
    labels = labels.to(image_emb.device)
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).t()
    topk = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = topk == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks}
