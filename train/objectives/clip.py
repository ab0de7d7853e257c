"""CLIP, COSMOS's baseline: COSMOS's CLIP term alone (the 2 global crops x 8 captions, InfoNCE on the towers'
embeddings); no local crops, no poolers, no teacher."""
from __future__ import annotations

import cosmos_fast
from cosmos_fast.ops.contrastive.reference import multiview_contrastive_loss_reference

from . import Objective as Base


class Objective(Base):
    uses_all_parameters = False  # the poolers and distill_logit_scale take no part

    def forward(self, model, teacher, batch, step, micro_step):
        out = model(batch["global"], batch["local"][:0], batch["captions"], cross_attention=False)
        image, text = self.gather(out["image"]), self.gather(out["text"])
        loss = multiview_contrastive_loss_reference if self.reference else cosmos_fast.multiview_contrastive_loss
        return loss(image, text, out["logit_scale"]), {}
