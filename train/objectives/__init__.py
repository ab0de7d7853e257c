"""Training objectives, one module each, behind one small interface (``Objective``).

The trainer's loop knows only this interface: it asks the objective how captions become ids and samples become
examples, how many local crops a sample needs, which model to build, which parameters decay, and for the loss of
a batch. Adding an objective is one file here (``NAME.py`` defining
``Objective``) and its config section, if it has settings: ``run.objective=NAME`` finds it.

Every loss has two implementations, as ``run.kernels`` chooses: ``fused`` (cosmos_fast's kernels: each rank
scores its rows against the gathered columns) and ``reference`` (upstream's computation, full N x N logits per
view pair, on the whole batch gathered with its gradient; after DDP's averaging both give the towers the exact
global gradient).
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cosmos_fast.data.pipeline import CosmosTransform
from cosmos_fast.distributed import all_gather_no_grad, all_gather_with_grad
from cosmos_fast.eval.zero_shot import load_checkpoint
from cosmos_fast.models import (CosmosModel, Tokenizer, config_for_weights, load_weights, state_dict_from_checkpoint,
                                upstream_weight_decay)
from cosmos_fast.models import config as model_config


class ObjectiveError(ValueError):
    """A setting the objective cannot train under (the trainer reports it as a refused configuration)."""


class Objective(nn.Module):
    """What one training objective decides. Subclasses set the class attributes and implement ``forward``.

    ``forward(model, teacher, batch, step, micro_step) -> (loss, {name: detached 0-d part})``: the loss to
    backpropagate on this rank's rows of ``batch`` ({"global" [2, B, 3, S, S], "local" [V, B, 3, s, s],
    "captions" [C, B, L]}, on the device), ``model`` the student (DDP-wrapped or not), ``teacher`` its
    ``EMATeacher``. ``step`` is the optimizer step, ``micro_step`` counts micro-batches (accumulation).
    State that must survive a resume (SIMLA's queues) lives in the module's buffers: the trainer checkpoints
    ``state_dict()``.
    """

    local_crops = 0  # local image crops per sample the loss takes (the pipeline draws no others)
    steps_per_epoch: int | None = None  # set by the trainer from a map-style dataset (None: a stream)
    uses_all_parameters = True  # False: DDP must look for parameters the loss leaves out (the poolers)
    model_overrides: dict = {}  # CosmosConfig fields its model needs (the sigmoid losses' logit biases)

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.reference = cfg.run.kernels == "reference"

    @classmethod
    def check_config(cls, cfg) -> None:
        """Refuse settings this objective cannot train under (ValueError naming the key). Default: the crop sizes
        are multiples of the model config's patch."""
        model = model_config(cfg.model.name)
        for key in ("image_size", "local_size") if cls.local_crops else ("image_size",):
            if getattr(cfg.data, key) % model.patch_size:
                raise ValueError(f"data.{key} must be a multiple of the patch size of model {cfg.model.name!r} "
                                 f"({model.patch_size}), got {getattr(cfg.data, key)}")

    def text_tokenizer(self):
        """Captions -> int64 ids [n, data.context_length]. Default: open_clip's CLIP tokenizer."""
        return Tokenizer(self.cfg.data.context_length)

    def sample_transform(self, tokenizer):
        """A raw sample -> a training example (``CosmosTransform``'s output form). Default: COSMOS's multi-crop
        and text crops, with the local crops this objective takes."""
        return CosmosTransform(tokenizer, self.cfg.data.image_size, self.cfg.data.local_size, n_local=self.local_crops,
                               seed=self.cfg.run.seed)

    def decays(self, name: str, parameter: torch.Tensor) -> bool:
        """Whether AdamW's weight decay applies to the student's parameter ``name``. Default: upstream COSMOS's
        rule (``upstream_weight_decay``)."""
        return upstream_weight_decay(name, parameter)

    def build_model(self, image_batches) -> tuple[nn.Module, dict | None]:
        """The student, and the teacher's weights where ``model.init`` holds them (else None: the teacher starts as
        the student). ``image_batches`` iterates model-input image batches of the training data (SIMLA fits its
        codebook on them). Default: a CosmosModel (see :func:`build_cosmos`)."""
        return build_cosmos(self.cfg, **self.model_overrides)

    def load_teacher(self, teacher: nn.Module, weights: dict) -> None:
        """The teacher's weights that ``build_model`` returned, into the EMA copy. Default: any COSMOS layout
        (``load_weights``)."""
        load_weights(teacher, weights)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path's gather of [V, B, E] features along the rows, with gradient (the fused kernels
        gather inside the loss)."""
        return all_gather_with_grad(x, dim=1) if self.reference else x

    def gather_targets(self, x: torch.Tensor) -> torch.Tensor:
        """Detached targets over the reference path's whole batch (the teacher's), or this rank's rows."""
        return all_gather_no_grad(x, dim=1) if self.reference else x


def build_cosmos(cfg, **overrides) -> tuple[CosmosModel, dict | None]:
    """The student of config ``model.name`` at the data's sizes (with ``overrides`` of its config); with
    ``model.init``, holding those weights (any layout: upstream COSMOS, open_clip, this trainer's), at their image
    size and context length (other crop sizes interpolate the position embeddings), beside the teacher's weights
    where the checkpoint has them. ObjectiveError for weights that do not fit."""
    name, interpolation = cfg.model.name, cfg.model.pos_embed_interpolation
    if cfg.model.init is None:
        return CosmosModel(model_config(name, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                                        pos_embed_interpolation=interpolation, **overrides)), None
    try:
        checkpoint = load_checkpoint(cfg.model.init)
        student = state_dict_from_checkpoint(checkpoint, "student")
        found = config_for_weights(student, name)
        keep = {} if found.init_logit_bias is None else {"init_logit_bias": found.init_logit_bias}
        model = CosmosModel(dataclasses.replace(found, pos_embed_interpolation=interpolation, **{**overrides,
                                                                                                   **keep}))
        if cfg.data.context_length > model.config.context_length:
            raise ValueError(f"data.context_length {cfg.data.context_length} exceeds the weights' "
                             f"{model.config.context_length} text positions")
        load_weights(model, student)
        teacher = state_dict_from_checkpoint(checkpoint, "teacher") if "teacher" in checkpoint else None
    except (KeyError, ValueError, TypeError) as exc:
        raise ObjectiveError(f"model.init {cfg.model.init}: {exc.args[0] if isinstance(exc, KeyError) else exc}") \
            from exc
    return model, teacher


@torch.no_grad()
def teacher_embeddings(teacher, crops: torch.Tensor, captions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The EMA teacher's normalised embeddings of crops [G, B, 3, S, S] and captions [C, B, L]: [G, B, E], [C, B, E]."""
    (G, B), C = crops.shape[:2], captions.shape[0]
    image = F.normalize(teacher.module.encode_image(crops.flatten(0, 1))[0], dim=-1).view(G, B, -1)
    text = F.normalize(teacher.module.encode_text(captions.flatten(0, 1))[0], dim=-1).view(C, B, -1)
    return image, text


def available() -> tuple[str, ...]:
    """The objectives there are: one module each in this package."""
    return tuple(sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_")))


def objective_class(name: str) -> type[Objective]:
    if name not in available():
        raise ValueError(f"run.objective must be one of {', '.join(available())}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}").Objective


def build(cfg) -> Objective:
    """The objective ``run.objective`` names, for this config."""
    return objective_class(cfg.run.objective)(cfg)
