"""Progressive self-distillation (``psd_simla.md``): PSD's soft targets on each of the CLIP objective's view pairs,
from the student's own detached embeddings (at half its temperature; ``psd.source=self``) or the EMA teacher's
(``psd.source=ema``), on a random subset of each batch, with alpha ramped up over ``psd.ramp_steps``."""
from __future__ import annotations

import torch

import cosmos_fast
from cosmos_fast.distributed import world
from cosmos_fast.ops.contrastive.reference import contrastive_loss_reference

from . import Objective as Base
from . import teacher_embeddings


class Objective(Base):
    uses_all_parameters = False  # the poolers and distill_logit_scale take no part

    def forward(self, model, teacher, batch, step, micro_step):
        settings = self.cfg.psd
        out = model(batch["global"], batch["local"][:0], batch["captions"], cross_attention=False)
        image, text, scale = self.gather(out["image"]), self.gather(out["text"]), out["logit_scale"]
        alpha = settings.alpha_max * min(1.0, step / (settings.ramp_steps or self.cfg.run.steps))
        # the soft subset of the whole global batch, from (seed, micro-step): any number of ranks draws the same
        n, (rank, size) = image.shape[1], world()
        draw = torch.rand(n if self.reference else n * size, generator=torch.Generator().manual_seed(
            self.cfg.run.seed * 1_000_003 + micro_step))
        soft_mask = (draw < settings.subset).to(image.device)
        if not self.reference:
            soft_mask = soft_mask[rank * n:(rank + 1) * n]
        # targets softened by a detached similarity: the student's own (at half its temperature) or the teacher's
        if settings.source == "self":
            source_image, source_text, source_scale = image.detach(), text.detach(), 2 * scale.detach()
        else:
            source_image, source_text = (self.gather_targets(x) for x in teacher_embeddings(
                teacher, batch["global"], batch["captions"]))
            source_scale = teacher.module.logit_scale.exp()
        contrastive = contrastive_loss_reference if self.reference else cosmos_fast.contrastive_loss
        pairs = [(p, q) for p in range(image.shape[0]) for q in range(text.shape[0])]
        loss = sum(contrastive(image[p], text[q], scale, teacher=(source_image[p], source_text[q], source_scale),
                               alpha=alpha, soft_mask=soft_mask) for p, q in pairs) / len(pairs)
        return loss, {"alpha": torch.tensor(alpha)}
