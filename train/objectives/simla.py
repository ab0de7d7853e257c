"""SIMLA (run.objective=simla, ``psd_simla.md``): the model with its visual-token codebook, and one training
step's logic: caption and patch masking, the momentum model's targets, the alpha ramp, the momentum feature
queues. The losses themselves are computed by ``SIMLAModel.forward`` on the kernels.

It takes the one image and caption SIMLA uses from each sample (the first global crop and the first global
caption); the trainer updates the momentum model with its EMA step (teacher.momentum; the paper's m = 0.995) and
checkpoints this objective's state (the two queues) beside the momentum model, so a resumed run continues
exactly. Under DDP the queues gather every rank's momentum features; the ITM hard negatives are drawn among the
rank's own rows.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from cosmos_fast.models.simla import (END_ID, SIMLAModel, block_patch_mask, mask_text_tokens, padding_mask,
                                      simla_config)
from cosmos_fast.nn import FeatureQueue

from . import Objective as Base


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


class Objective(Base):
    """One SIMLA step's loss: the sum of the five losses on the first global crop and caption of each sample,
    {name: detached 0-d part, "alpha"}, after which the momentum features join the queues.

    Alpha ramps linearly from 0 to ``simla.alpha`` over ``simla.alpha_ramp_steps`` (default: one epoch of the
    training set), as in ALBEF/SIMLA's first epoch. Masks and ITM negatives draw from torch's RNG (restored on
    resume).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.settings = cfg.simla
        self.ramp_steps = cfg.simla.alpha_ramp_steps or max(1, cfg.data.train_size // cfg.data.batch_size)
        embed_dim = simla_config(cfg.model.name).embed_dim
        self.image_queue = FeatureQueue(embed_dim, cfg.simla.queue_size)
        self.text_queue = FeatureQueue(embed_dim, cfg.simla.queue_size)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.run.kernels != "fused" or cfg.run.fsdp or cfg.run.compile or cfg.run.grad_checkpointing:
            raise ValueError("run.objective=simla runs on the fused kernels, eager, without FSDP or gradient "
                             "checkpointing (run.kernels=fused, run.fsdp=false, run.compile=false, "
                             "run.grad_checkpointing=false)")
        if cfg.model.init is not None:
            raise ValueError("model.init starts a COSMOS model from weights; run.objective=simla builds its own")
        patch = simla_config(cfg.model.name).patch_size
        if cfg.data.image_size % patch:
            raise ValueError(f"data.image_size must be a multiple of the patch size of model {cfg.model.name!r} "
                             f"({patch}), got {cfg.data.image_size}")

    def build_model(self, image_batches):
        return build_model(self.cfg, image_batches), None

    def alpha_at(self, step: int) -> float:
        return self.settings.alpha * min(1.0, step / self.ramp_steps)

    def forward(self, model, teacher, batch, step, micro_step):
        settings, momentum_model = self.settings, teacher.module
        images, ids = batch["global"][0], trim_captions(batch["captions"][0])
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
