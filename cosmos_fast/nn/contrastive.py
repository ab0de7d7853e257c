"""``nn.Module`` wrappers of the contrastive losses."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from .._validation import check_float_tensor, check_same_device, check_same_dtype
from ..distributed import world
from ..ops.contrastive.functional import contrastive_loss, multiview_contrastive_loss
from ..ops.sigmoid.functional import _sigmoid_loss, multiview_sigmoid_loss

DIST_IMPLS = (None, "bidir", "shift", "reduce", "gather")


class ContrastiveLoss(nn.Module):
    """Drop-in for open_clip's ``ClipLoss``: ``forward(image_features, text_features, logit_scale, output_dict=False)``.

    ``logit_scale`` is the multiplier (``model.logit_scale.exp()``, as open_clip models return it). Each rank
    scores its rows against the all-gathered columns and gradients flow back to their owners, so the gradient
    after DDP's averaging is always that of the global loss (open_clip's ``gather_with_grad=True``). With
    ``local_loss=False`` the returned value is the global loss (the mean over ranks), as open_clip reports it;
    with ``local_loss=True`` it is this rank's share. The other open_clip arguments are accepted for drop-in use
    (``gather_with_grad`` and ``cache_labels`` change nothing: the gather always keeps gradients, no labels exist).

    image_features, text_features: [N, D] (this rank's rows), one float dtype; logit_scale: 0-d tensor or number.
    Returns a 0-d fp32 loss (fp64 for fp64 features), or ``{"contrastive_loss": loss}`` with ``output_dict``.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int | None = None, world_size: int | None = None, use_horovod: bool = False, group=None):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported: cosmos_fast gathers with torch.distributed")
        self.local_loss = local_loss
        self.group = group
        self._expected_world = (rank, world_size)

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        rank, size = world(self.group)
        want_rank, want_size = self._expected_world
        if (want_size is not None and want_size != size) or (want_rank is not None and want_rank != rank):
            raise ValueError(f"ContrastiveLoss was built for rank {want_rank} of {want_size} but runs as {rank} of {size}")
        loss = contrastive_loss(image_features, text_features, logit_scale, group=self.group)
        if not self.local_loss and size > 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean, group=self.group)
            loss = loss + (mean / size - loss.detach())
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's ``SigLipLoss``: ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)``, the same constructor (``cache_labels``, ``rank``, ``world_size``, ``dist_impl``).

    ``logit_scale`` is the multiplier (``model.logit_scale.exp()``), ``logit_bias`` the bias, as open_clip's
    models return them. With ``world_size > 1`` this rank's image rows are scored against every rank's text
    features, gathered once with their gradient: the loss and gradients equal those of every ``dist_impl`` of
    open_clip's (which exchange the text features rank to rank), without its per-rank N x N logit blocks;
    ``dist_impl`` is accepted and validated for drop-in use. With ``world_size=1`` the loss covers this
    process's pairs alone, as open_clip's does. Returns this rank's 0-d fp32 loss (open_clip computes in the
    features' dtype; this in fp32), or ``{"contrastive_loss": loss}`` with ``output_dict``.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 group=None):
        super().__init__()
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
        self.rank, self.world_size, self.group = rank, world_size, group

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        distributed = self.world_size > 1
        if distributed:
            rank, size = world(self.group)
            if (rank, size) != (self.rank, self.world_size):
                raise ValueError(f"SigLipLoss was built for rank {self.rank} of {self.world_size} but runs as {rank} "
                                 f"of {size}")
        loss = _sigmoid_loss(image_features, text_features, logit_scale, logit_bias, None, 0.0, None, None,
                             self.group, distributed=distributed)
        return {"contrastive_loss": loss} if output_dict else loss


class CosmosLossOutput(NamedTuple):
    """The COSMOS objective and its two terms, each a 0-d fp32 tensor (fp64 for fp64 features): total = clip +
    cosmos; backpropagate ``total``."""
    total: torch.Tensor
    clip: torch.Tensor
    cosmos: torch.Tensor


class CosmosLoss(nn.Module):
    """The COSMOS objective: ``L = L_CLIP + L_COSMOS`` (``cosmos.md``, Loss), 80 logit matrices in two kernel calls.

    ``forward`` takes (all [V, N, D], the caller normalises; local rows when distributed):
        image_features: [2, N, D] student embeddings of the global crops.
        text_features: [8, N, D] student caption embeddings (2 global + 6 local).
        cross_image_features: [8, N, D] cross-attended image outputs X_img.
        cross_text_features: [8, N, D] cross-attended caption outputs X_txt.
        teacher_image_features, teacher_text_features: [2, N, D] teacher targets (detached here).
        logit_scale, distill_logit_scale: 0-d multipliers ``exp(...)`` of the two temperatures.
    ``L_CLIP`` is the mean over image x caption pairs; ``L_COSMOS`` the mean of the four groups
    ``C(X_img, T_img) + C(X_img, T_txt) + C(X_txt, T_img) + C(X_txt, T_txt)``, which, the groups being equal in
    size, is one multiview loss of ``[X_img; X_txt]`` against ``[T_img; T_txt]``.
    Returns ``CosmosLossOutput(total, clip, cosmos)``, each 0-d fp32 (fp64 for fp64 features).

    ``loss="sigmoid"`` makes both terms SigLIP's sigmoid loss (:func:`cosmos_fast.sigmoid_loss` over the same view
    pairs), with the logit biases ``logit_bias`` and ``distill_logit_bias`` (0-d) as two more arguments.
    """

    def __init__(self, group=None, loss: str = "softmax"):
        super().__init__()
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {loss!r}")
        self.group, self.loss = group, loss

    @staticmethod
    def _check_features(**features) -> None:
        """Each argument by its own name: [V, N, D] floats of one dtype and device, one N and D; the four
        groups of L_COSMOS equal in size (else the one multiview mean is not the mean of the four groups)."""
        (ref_name, ref), *others = features.items()
        for name, x in features.items():
            check_float_tensor(name, x, 3)
        check_same_device(ref_name, ref, **dict(others))
        check_same_dtype(ref_name, ref, **dict(others))
        for name, x in others:
            if x.shape[1:] != ref.shape[1:]:
                raise ValueError(f"{name} must have shape [V, N={ref.shape[1]}, D={ref.shape[2]}] like {ref_name}, "
                                 f"got {tuple(x.shape)}")
        for student, other in (("cross_image_features", "cross_text_features"),
                               ("teacher_image_features", "teacher_text_features")):
            if features[student].shape[0] != features[other].shape[0]:
                raise ValueError(f"{student} and {other} must have the same number of views, got "
                                 f"{features[student].shape[0]} and {features[other].shape[0]}")

    def forward(self, image_features, text_features, cross_image_features, cross_text_features,
                teacher_image_features, teacher_text_features, logit_scale, distill_logit_scale,
                logit_bias=None, distill_logit_bias=None) -> CosmosLossOutput:
        self._check_features(image_features=image_features, text_features=text_features,
                             cross_image_features=cross_image_features, cross_text_features=cross_text_features,
                             teacher_image_features=teacher_image_features,
                             teacher_text_features=teacher_text_features)
        students = torch.cat([cross_image_features, cross_text_features])
        teachers = torch.cat([teacher_image_features, teacher_text_features]).detach()
        if self.loss == "sigmoid":
            if logit_bias is None or distill_logit_bias is None:
                raise ValueError("loss='sigmoid' needs logit_bias and distill_logit_bias")
            clip = multiview_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, group=self.group)
            cosmos = multiview_sigmoid_loss(students, teachers, distill_logit_scale, distill_logit_bias,
                                            group=self.group)
        else:
            if logit_bias is not None or distill_logit_bias is not None:
                raise ValueError("logit biases belong to loss='sigmoid'; the softmax loss has none")
            clip = multiview_contrastive_loss(image_features, text_features, logit_scale, group=self.group)
            cosmos = multiview_contrastive_loss(students, teachers, distill_logit_scale, group=self.group)
        return CosmosLossOutput(clip + cosmos, clip, cosmos)
