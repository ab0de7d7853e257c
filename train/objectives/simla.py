"""SIMLA (run.objective=simla, ``psd_simla.md``, ``upstream.md``): the model, its WordPiece captions and
augmentation, its visual tokenizer, and one training step's logic: caption and patch masking, the momentum
model's targets, the alpha ramp, the momentum feature queues. The losses themselves are computed by
``SIMLAModel.forward`` on the kernels.

It takes one image (SIMLA's augmentation) and one caption per sample (a caption file's row: one of its captions at
random, as SIMLA's loader; the built-in data: a global text crop). The trainer updates the momentum model with its
EMA step (teacher.momentum; the paper's m = 0.995) and checkpoints this objective's state (the two queues, the
k-means codebook) beside the momentum model, so a resumed run continues exactly. Under DDP the queues gather every
rank's momentum features; the ITM hard negatives are drawn among the rank's own rows.

Starts (``model.init``, ``simla.text_weights``, ``simla.vision_weights``): a released SIMLA checkpoint (student,
momentum model and queues), or BERT (``bert-base-uncased``) and DeiT-B/16 weights for the towers, from local files
or the Hugging Face cache.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from cosmos_fast.data.pipeline import SIMLATransform
from cosmos_fast.models.simla import (SIMLAModel, block_patch_mask, load_bert_weights, load_simla_checkpoint,
                                      load_vision_weights, mask_text_tokens, simla_config)
from cosmos_fast.models.simla_text import CaptionTokenizer
from cosmos_fast.models.visual_tokenizers import KMeansTokenizer, build_visual_tokenizer
from cosmos_fast.nn import FeatureQueue

from . import Objective as Base
from . import ObjectiveError


def trim_captions(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B, L] -> [B, L'] cut after the longest caption (the tokenizer pads on the right; BERT's outputs at the
    kept positions are the same: padding is masked)."""
    return ids[:, : max(1, int((ids != pad_id).sum(dim=1).max()))]


def albef_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """SIMLA's (ALBEF's ``add_weight_decay``) rule: no decay on 1-d parameters (gains, biases) and ``.bias``;
    everything else decays, the 0-d temperature included."""
    return parameter.dim() != 1 and not name.endswith(".bias")


class Objective(Base):
    """One SIMLA step's loss: the sum of the five losses, {name: detached 0-d part, "alpha"}, after which the
    momentum features join the queues (which start full of random unit vectors, as SIMLA's).

    Alpha ramps linearly from 0 to ``simla.alpha`` over ``simla.alpha_ramp_steps`` (default: one epoch of the
    training data, ``steps_per_epoch``, which the trainer sets from the dataset; webdataset streams have no epoch:
    give it), as SIMLA's first epoch. Masks and ITM negatives draw from torch's RNG (restored on resume).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.settings = cfg.simla
        self.model_config = simla_config(cfg.model.name, image_size=cfg.data.image_size,
                                         context_length=cfg.data.context_length)
        embed_dim = self.model_config.embed_dim
        self.image_queue = FeatureQueue(embed_dim, cfg.simla.queue_size)
        self.text_queue = FeatureQueue(embed_dim, cfg.simla.queue_size)
        self.image_queue.fill_random_()  # SIMLA's start
        self.text_queue.fill_random_()
        self.visual_tokenizer = build_visual_tokenizer(cfg.simla.visual_tokenizer, self.model_config.visual_codes,
                                                       self.model_config.patch_size, cfg.simla.dvae_path)

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.run.kernels != "fused" or cfg.run.fsdp or cfg.run.compile or cfg.run.grad_checkpointing:
            raise ValueError("run.objective=simla runs on the fused kernels, eager, without FSDP or gradient "
                             "checkpointing (run.kernels=fused, run.fsdp=false, run.compile=false, "
                             "run.grad_checkpointing=false)")
        model = simla_config(cfg.model.name)
        if cfg.data.image_size % model.patch_size:
            raise ValueError(f"data.image_size must be a multiple of the patch size of model {cfg.model.name!r} "
                             f"({model.patch_size}), got {cfg.data.image_size}")
        if cfg.data.source == "webdataset" and cfg.simla.alpha_ramp_steps is None:
            raise ValueError("simla.alpha_ramp_steps must be given for webdataset data (SIMLA ramps alpha over one "
                             "epoch; a shard stream has no length to take it from)")
        if cfg.simla.visual_tokenizer == "dvae" and not cfg.simla.dvae_path:
            raise ValueError("simla.visual_tokenizer=dvae needs simla.dvae_path (DALL-E's encoder.pkl)")
        if cfg.model.init is not None and (cfg.simla.text_weights or cfg.simla.vision_weights):
            raise ValueError("model.init (a SIMLA checkpoint) sets every weight: leave simla.text_weights and "
                             "simla.vision_weights unset")

    @property
    def ramp_steps(self) -> int:
        return self.settings.alpha_ramp_steps or max(1, self.steps_per_epoch or 1)

    def text_tokenizer(self) -> CaptionTokenizer:
        """WordPiece ids as SIMLA makes them (cleaned captions, [CLS] ... [SEP], [PAD]), from ``simla.tokenizer``
        (default: the model config's vocabulary). ObjectiveError when its vocabulary is not the model's."""
        source = self.settings.tokenizer or self.model_config.tokenizer
        try:
            tokenizer = CaptionTokenizer(source, self.cfg.data.context_length)
        except ValueError as exc:
            raise ObjectiveError(f"simla.tokenizer: {exc}") from exc
        cfg, special = self.model_config, tokenizer.special_ids
        expected = {"pad": cfg.pad_id, "cls": cfg.cls_id, "sep": cfg.sep_id, "mask": cfg.mask_id}
        if tokenizer.vocab_size != cfg.vocab_size or special != expected:
            raise ObjectiveError(f"the tokenizer {source} ({tokenizer.vocab_size} tokens, special ids {special}) is "
                                 f"not model {self.cfg.model.name!r}'s ({cfg.vocab_size} tokens, {expected})")
        return tokenizer

    def sample_transform(self, tokenizer):
        return SIMLATransform(tokenizer, self.cfg.data.image_size, self.settings.randaugment, seed=self.cfg.run.seed)

    def decays(self, name: str, parameter: torch.Tensor) -> bool:
        return albef_weight_decay(name, parameter)

    def build_model(self, image_batches: Iterable[torch.Tensor]):
        """The student (and the momentum model's weights when ``model.init`` holds them). The k-means visual
        tokenizer is fitted on the first ``simla.codebook_images`` images of ``image_batches`` (from
        ``run.seed``); weights come from torch's RNG (seed it first), then from the configured starts."""
        cfg, settings = self.cfg, self.settings
        model, momentum = SIMLAModel(self.model_config), None
        try:
            if cfg.model.init is not None:
                momentum_model = SIMLAModel(self.model_config)
                queues = load_simla_checkpoint(model, torch.load(cfg.model.init, map_location="cpu",
                                                                 weights_only=False), momentum_model)
                momentum = momentum_model.state_dict()
                for name, state in queues.items():
                    getattr(self, f"{name}_queue").load_state_dict(state)
            if settings.text_weights:
                load_bert_weights(model, settings.text_weights)
            if settings.vision_weights:
                load_vision_weights(model, settings.vision_weights)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ObjectiveError(f"SIMLA starting weights: {exc}") from exc
        if isinstance(self.visual_tokenizer, KMeansTokenizer):
            images, count = [], 0
            for batch in image_batches:
                images.append(batch)
                count += batch.shape[0]
                if count >= settings.codebook_images:
                    break
            self.visual_tokenizer.fit(torch.cat(images)[: settings.codebook_images], settings.codebook_iterations,
                                      seed=cfg.run.seed)
        return model, momentum

    def load_teacher(self, teacher, weights: dict) -> None:
        teacher.load_state_dict(weights)

    def alpha_at(self, step: int) -> float:
        return self.settings.alpha * min(1.0, step / self.ramp_steps)

    def forward(self, model, teacher, batch, step, micro_step):
        settings, momentum_model = self.settings, teacher.module
        config = momentum_model.config
        images, ids = batch["global"][0], trim_captions(batch["captions"][0], config.pad_id)
        masked_ids, chosen = mask_text_tokens(ids, config, settings.mlm_probability)
        grid = config.image_size // config.patch_size
        patch_mask = block_patch_mask(ids.shape[0], grid, round(settings.image_mask_ratio * grid * grid),
                                      device=images.device)
        targets = momentum_model.momentum_targets(images, ids, masked_ids, chosen, patch_mask,
                                                  settings.keywords_per_head, settings.keywords)
        codes = self.visual_tokenizer(images)
        # clones: the loss keeps the queue columns for its backward, and enqueue overwrites the buffer in place
        queues = [q.features.clone() for q in (self.image_queue, self.text_queue)]
        alpha = self.alpha_at(step)
        parts = model(images, ids, masked_ids, chosen, patch_mask, codes, targets, alpha, *queues)
        self.image_queue.enqueue(targets["image"].float())
        self.text_queue.enqueue(targets["text"].float())
        logged = {name: value.detach() for name, value in parts.items()}
        return sum(parts.values()), {**logged, "alpha": torch.tensor(alpha)}
