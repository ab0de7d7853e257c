"""SIMLA's retrieval evaluation (codezakh/SIMLA ``Retrieval.py``, ALBEF's protocol): ITC similarities choose each
query's ``k`` candidates (``k_test``: 256 on COCO, 128 on Flickr30k), the ITM head's matched logit re-ranks them,
and R@1/5/10 are read off the re-ranked scores, image -> text and text -> image.

Checkpoints: this trainer's SIMLA checkpoints (student and momentum model) and SIMLA's released ones
(``{"model": ...}`` in upstream's key layout; :func:`cosmos_fast.models.simla.simla_state_dicts`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..models.simla import (SIMLAModel, config_for_simla_weights, load_state_strict, resample_pos_embed, simla_config,
                            simla_state_dicts)
from ..models.convert import state_dict_from_checkpoint
from .metrics import recall_from_scores
from .zero_shot import _Images, image_transform


def load_simla_model(checkpoint: dict, which: str = "student", name: str | None = None,
                     image_size: int | None = None) -> SIMLAModel:
    """The ``which`` ("student" or "teacher": the momentum model) SIMLAModel of a checkpoint, this trainer's or
    SIMLA's released layout, in eval mode; config ``name`` (default: the trainer's, else "base") at the weights'
    image size, or at ``image_size`` with the position embeddings resampled (SIMLA evaluates at 384 px)."""
    saved = checkpoint.get("config")
    if name is None:
        name = saved["model"]["name"] if isinstance(saved, dict) and "model" in saved else "base"
    if isinstance(saved, dict) and saved.get("run", {}).get("objective") == "simla":  # this trainer's
        state = state_dict_from_checkpoint(checkpoint, which)
        student = state_dict_from_checkpoint(checkpoint, "student")
    else:
        student, momentum, _ = simla_state_dicts(state_dict_from_checkpoint(checkpoint, "student"))
        state = student if which == "student" else momentum
        if not state:
            raise ValueError(f"the SIMLA checkpoint holds no {which} weights")
    found = config_for_simla_weights(student, name)
    if image_size is not None:
        found = simla_config(name, image_size=image_size, visual_codes=found.visual_codes)
    model = SIMLAModel(found)
    grid = found.image_size // found.patch_size
    state = {**state, "visual.pos_embed": resample_pos_embed(state["visual.pos_embed"], grid)}
    load_state_strict(model, state, f"the checkpoint's {which} weights")
    return model.eval()


@torch.no_grad()
def encode_for_retrieval(model: SIMLAModel, images: Sequence, ids: torch.Tensor, batch_size: int = 64,
                         device="cpu", workers: int = 0, progress: bool = False):
    """(image tokens [I, 1 + P, W], image embeddings [I, E], text embeddings [T, E]; embeddings normalised), on
    ``device``: images (paths or PIL) resized to the model's size (SIMLA's test transform: a square resize; here
    the shorter side and a centre crop, as the other evaluations), captions as WordPiece ids [T, L]."""
    loader = torch.utils.data.DataLoader(_Images(images, image_transform(model.config.image_size)),
                                         batch_size=batch_size, num_workers=workers)
    tokens, image_emb = [], []
    for batch in tqdm(loader, desc="images", disable=not progress, leave=False):
        out = model.image_tokens(batch.to(device))
        tokens.append(out)
        image_emb.append(F.normalize(model.image_projection(out[:, 0]), dim=-1))
    text_emb = torch.cat([F.normalize(model.encode_text(ids[i:i + batch_size].to(device))[0], dim=-1)
                          for i in range(0, ids.shape[0], batch_size)])
    return torch.cat(tokens), torch.cat(image_emb), text_emb


@torch.no_grad()
def itm_reranked_scores(model, image_tokens: torch.Tensor, image_emb: torch.Tensor, ids: torch.Tensor,
                        text_emb: torch.Tensor, k: int, batch_size: int = 64,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """SIMLA's retrieval scores: (image -> text [I, T], text -> image [T, I]) fp32. For each query its ``k``
    candidates with the highest ITC similarity (``image_emb @ text_emb.T``) get the ITM head's matched logit
    (``model.itm_logits(ids, image_tokens)[:, 1]``); every other entry is -inf (SIMLA's -100: below any candidate).
    The ITM pairs run ``batch_size`` at a time. Args: image_tokens [I, 1 + P, W]; image_emb [I, E]; ids [T, L];
    text_emb [T, E]; ``k`` >= 1 (capped at the candidates there are)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    similarity = image_emb.float() @ text_emb.float().T  # [I, T]
    device = image_tokens.device

    def rerank(sim: torch.Tensor, pair) -> torch.Tensor:
        """sim [Q, C] -> scores [Q, C]: ITM logits at each query's top k, -inf elsewhere."""
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices  # [Q, k]
        queries = torch.arange(sim.shape[0], device=top.device)[:, None].expand_as(top).flatten()
        candidates = top.flatten()
        logits = []
        for start in tqdm(range(0, len(queries), batch_size), disable=not progress, leave=False, desc="ITM"):
            q, c = queries[start:start + batch_size], candidates[start:start + batch_size]
            text_rows, image_rows = pair(q, c)
            logits.append(model.itm_logits(ids[text_rows].to(device), image_tokens[image_rows])[:, 1].float())
        scores = torch.full(sim.shape, float("-inf"), device=sim.device)
        return scores.index_put_((queries, candidates), torch.cat(logits).to(sim.device))

    i2t = rerank(similarity, lambda image, text: (text, image))
    t2i = rerank(similarity.T, lambda text, image: (text, image))
    return i2t, t2i


def simla_retrieval(model: SIMLAModel, tokenizer, images: Sequence, captions: Sequence[str],
                    caption_image: torch.Tensor, k: int, batch_size: int = 64, device="cpu", workers: int = 0,
                    progress: bool = False) -> dict[str, float]:
    """R@1/5/10 both ways ({"i2t_R@k", "t2i_R@k"}, percent) of SIMLA's ITM re-ranked retrieval on one set:
    ``images`` (paths or PIL), ``captions`` (strings, tokenized by ``tokenizer``: a CaptionTokenizer),
    ``caption_image`` [T] the image each caption describes."""
    ids = tokenizer(list(captions))
    tokens, image_emb, text_emb = encode_for_retrieval(model, images, ids, batch_size, device, workers, progress)
    i2t, t2i = itm_reranked_scores(model, tokens, image_emb, ids, text_emb, k, batch_size, progress)
    return recall_from_scores(i2t.cpu(), t2i.cpu(), caption_image)
