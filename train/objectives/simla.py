"""SIMLA in the reference trainer (run.objective=simla, ``psd_simla.md``): the model with its visual-token
codebook, and one training step's logic: caption and patch masking, the momentum model's targets, the alpha
ramp, the momentum feature queues. The losses themselves are computed by ``SIMLAModel.forward`` on the kernels.

The trainer's loop stays as it is: it takes the one image and caption SIMLA uses from each sample (the first
global crop and the first global caption), updates the momentum model with its EMA step (teacher.momentum; the
paper's m = 0.995) and checkpoints ``SIMLALoss.state_dict()`` (the two queues) beside the momentum model, so a
resumed run continues exactly. Under DDP the queues gather every rank's momentum features; the ITM hard
negatives are drawn among the rank's own rows.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cosmos_fast.models.simla import (END_ID, SIMLAModel, block_patch_mask, mask_text_tokens, padding_mask,
                                      simla_config)
from cosmos_fast.nn import FeatureQueue


def build_model(cfg, image_batches: Iterable[torch.Tensor]) -> SIMLAModel:
    """The SIMLA model of ``cfg.model.name`` (tiny | base) at the data's image size and context length, its
    visual codebook fitted on the first ``cfg.simla.codebook_images`` images of ``image_batches`` ([b, 3, S, S]
    model-input batches). Weights come from torch's RNG (seed it first); the k-means from ``cfg.run.seed``."""
    model = SIMLAModel(simla_config(cfg.model.name, image_size=cfg.data.image_size,
                                    context_length=cfg.data.context_length))
    images, count = [], 0
    for batch in image_batches:
        images.append(batch)
        count += batch.shape[0]
        if count >= cfg.simla.codebook_images:
            break
    model.fit_visual_codebook(torch.cat(images)[: cfg.simla.codebook_images], cfg.simla.codebook_iterations,
                              seed=cfg.run.seed)
    return model


def trim_captions(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L'] cut after the longest caption's end token (the encoder's output is the same)."""
    has_end = (ids == END_ID).any(dim=1)
    if not bool(has_end.all()):
        return ids
    return ids[:, : int((~padding_mask(ids)).sum(dim=1).max())]


class SIMLALoss(nn.Module):
    """One SIMLA step's loss: ``forward(model, teacher, images [B, 3, S, S], ids [B, L], step)`` -> (sum of the
    five losses, {name: detached 0-d part, "alpha"}), after which the momentum features join the queues.

    ``model`` is the student (DDP-wrapped or not), ``teacher`` the ``EMATeacher`` of it. Alpha ramps linearly
    from 0 to ``simla.alpha`` over ``simla.alpha_ramp_steps`` (default: one epoch of the training set), as in
    ALBEF/SIMLA's first epoch. Masks and ITM negatives draw from torch's RNG (restored on resume).
    """

    def __init__(self, embed_dim: int, cfg):
        super().__init__()
        self.settings = cfg.simla
        self.ramp_steps = cfg.simla.alpha_ramp_steps or max(1, cfg.data.train_size // cfg.data.batch_size)
        self.image_queue = FeatureQueue(embed_dim, cfg.simla.queue_size)
        self.text_queue = FeatureQueue(embed_dim, cfg.simla.queue_size)

    def alpha_at(self, step: int) -> float:
        return self.settings.alpha * min(1.0, step / self.ramp_steps)

    def forward(self, model, teacher, images: torch.Tensor, ids: torch.Tensor, step: int):
        settings, momentum_model = self.settings, teacher.module
        ids = trim_captions(ids)
        masked_ids, chosen = mask_text_tokens(ids, settings.mlm_probability)
        grid = momentum_model.config.image_size // momentum_model.config.patch_size
        patch_mask = block_patch_mask(ids.shape[0], grid, round(settings.image_mask_ratio * grid * grid),
                                      device=images.device)
        targets = momentum_model.momentum_targets(images, ids, masked_ids, chosen, patch_mask,
                                                  settings.keywords_per_head, settings.keywords)
        # clones: the loss keeps the queue columns for its backward, and enqueue overwrites the buffer in place
        queues = [q.features.clone() if int(q.filled) else None for q in (self.image_queue, self.text_queue)]
        alpha = self.alpha_at(step)
        parts = model(images, ids, masked_ids, chosen, patch_mask, targets, alpha, *queues)
        self.image_queue.enqueue(targets["image"].float())
        self.text_queue.enqueue(targets["text"].float())
        logged = {name: value.detach() for name, value in parts.items()}
        return sum(parts.values()), {**logged, "alpha": torch.tensor(alpha)}
