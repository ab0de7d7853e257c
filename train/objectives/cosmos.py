"""COSMOS (``cosmos.md``): L_CLIP over the 2 global crops x 8 captions plus L_COSMOS, the cross-attended student
outputs against the EMA teacher's global embeddings; softmax (InfoNCE) terms, or with ``cosmos.loss=sigmoid``
SigLIP's sigmoid terms with learnt logit biases."""
from __future__ import annotations

import cosmos_fast
from cosmos_fast.ops.contrastive.reference import multiview_contrastive_loss_reference
from cosmos_fast.ops.sigmoid.reference import multiview_sigmoid_loss_reference

from . import Objective as Base
from . import teacher_embeddings


class Objective(Base):
    local_crops = 6

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sigmoid = cfg.cosmos.loss == "sigmoid"
        self.loss_fn = cosmos_fast.nn.CosmosLoss(loss=cfg.cosmos.loss)

    @property
    def model_overrides(self) -> dict:
        # the sigmoid terms' temperatures and biases start as SigLIP's (config section sigmoid)
        settings = self.cfg.sigmoid
        return ({"init_logit_scale": settings.init_logit_scale, "init_logit_bias": settings.init_logit_bias}
                if self.sigmoid else {})

    def forward(self, model, teacher, batch, step, micro_step):
        out = model(batch["global"], batch["local"], batch["captions"], mask_padding=self.cfg.model.mask_padding,
                    reference_attention=self.reference)
        t_image, t_text = (self.gather_targets(x) for x in teacher_embeddings(teacher, batch["global"],
                                                                              batch["captions"][:2]))
        biases = (out["logit_bias"], out["distill_logit_bias"]) if self.sigmoid else ()
        if not self.reference:
            _, clip, cosmos = self.loss_fn(out["image"][:2], out["text"], out["cross_image"], out["cross_text"],
                                           t_image, t_text, out["logit_scale"], out["distill_logit_scale"], *biases)
        else:  # upstream's computation: one full matrix per view pair
            loss = multiview_sigmoid_loss_reference if self.sigmoid else multiview_contrastive_loss_reference
            clip_bias, cosmos_bias = ((b,) for b in biases) if biases else ((), ())
            clip = loss(self.gather(out["image"][:2]), self.gather(out["text"]), out["logit_scale"], *clip_bias)
            cosmos = sum(loss(self.gather(x), t, out["distill_logit_scale"], *cosmos_bias)
                         for x in (out["cross_image"], out["cross_text"]) for t in (t_image, t_text)) / 4
        return clip + cosmos, {"clip": clip.detach(), "cosmos": cosmos.detach()}
