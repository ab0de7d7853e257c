"""SigLIP: the CLIP objective's view pairs (2 global crops x 8 captions) with the sigmoid loss
(:func:`cosmos_fast.multiview_sigmoid_loss`) and a learnt logit bias, initialised as SigLIP (scale ln 10, bias
-10; ``sigmoid.init_logit_scale``, ``sigmoid.init_logit_bias``). No local crops, no poolers, no teacher."""
from __future__ import annotations

import cosmos_fast
from cosmos_fast.ops.sigmoid.reference import multiview_sigmoid_loss_reference

from . import Objective as Base


class Objective(Base):
    uses_all_parameters = False  # the poolers and the distillation temperature and bias take no part

    @property
    def model_overrides(self) -> dict:
        settings = self.cfg.sigmoid
        return {"init_logit_scale": settings.init_logit_scale, "init_logit_bias": settings.init_logit_bias}

    def forward(self, model, teacher, batch, step, micro_step):
        out = model(batch["global"], batch["local"][:0], batch["captions"], cross_attention=False)
        image, text = self.gather(out["image"]), self.gather(out["text"])
        loss = multiview_sigmoid_loss_reference if self.reference else cosmos_fast.multiview_sigmoid_loss
        return loss(image, text, out["logit_scale"], out["logit_bias"]), {}
