"""Public sigmoid (SigLIP) losses: argument checks, the distributed gather, the op underneath."""
from __future__ import annotations

import torch

from ..._validation import as_scalar_tensor, check_same_device, check_unit_interval
from ...distributed import all_gather_no_grad, all_gather_with_grad, check_same_across_ranks, world
from ..contrastive.functional import _check_extra, _check_pair
from .op import sigmoid_pairs


def _as_bias(name, value, like):
    """A 0-d floating tensor from a real number or a one-element tensor (any sign; finite where checked)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (a 0-d or one-element tensor), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise TypeError(f"{name} must be a 0-d tensor or a finite real number, got {value!r}")
    return torch.tensor(float(value), dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                        device=like.device)


def _check_teacher(teacher, a, alpha, soft_mask, has_extra):
    if teacher is None:
        if alpha != 0.0:
            raise ValueError("alpha > 0 needs soft labels: pass teacher=(ta, tb, teacher_scale, teacher_bias)")
        if soft_mask is not None:
            raise ValueError("soft_mask needs soft labels: pass teacher=(ta, tb, teacher_scale, teacher_bias)")
        return None
    if not isinstance(teacher, (tuple, list)) or len(teacher) != 4:
        raise TypeError("teacher must be a tuple (ta [N, D'], tb [N, D'], teacher_scale, teacher_bias)")
    ta, tb, t_scale, t_bias = teacher
    _check_pair("teacher[0]", ta, "teacher[1]", tb, 2)
    check_same_device("a", a, **{"teacher[0]": ta})
    if ta.shape[0] != a.shape[0]:
        raise ValueError(f"teacher features must have N = {a.shape[0]} rows like a, got {ta.shape[0]}")
    if has_extra and ta.shape[1] != a.shape[1]:
        raise ValueError(f"with extra columns the teacher scores the queue features as they are, so its feature "
                         f"size must be D = {a.shape[1]}, got {ta.shape[1]}")
    t_scale = as_scalar_tensor("teacher[2] (teacher_scale)", t_scale, a).detach()
    t_bias = _as_bias("teacher[3] (teacher_bias)", t_bias, a).detach()
    if soft_mask is not None:
        if not isinstance(soft_mask, torch.Tensor) or soft_mask.dtype != torch.bool:
            raise TypeError(f"soft_mask must be a bool tensor [N], got {getattr(soft_mask, 'dtype', type(soft_mask))}")
        if soft_mask.shape != (a.shape[0],):
            raise ValueError(f"soft_mask must have shape [{a.shape[0]}], got {tuple(soft_mask.shape)}")
        check_same_device("a", a, soft_mask=soft_mask)
    return ta.detach().to(a.dtype), tb.detach().to(a.dtype), t_scale, t_bias


def sigmoid_loss(a, b, scale, bias, *, teacher=None, alpha=0.0, soft_mask=None, extra_b=None, group=None):
    """SigLIP's sigmoid loss without the N x N matrix, in forward or backward.

    ``L = 1/N sum_ij [softplus(x_ij) - y_ij x_ij]``, ``x_ij = s a_i . b_j + t``: binary cross-entropy of every
    pair, y_ij = 1 for i = j and 0 otherwise (``-1/N sum log sigmoid(z_ij x_ij)``, z = +-1, as SigLIP writes it).

    Args:
        a, b: [N, D] features (the caller normalises), fp32, bf16, fp16 (or fp64 on the PyTorch path); this rank's
            rows when distributed.
        scale: 0-d tensor (or number), the multiplier exp(logit_scale), > 0; bias: 0-d tensor (or number), the
            logit bias t. Both get gradients.
        teacher: optional ``(ta [N, D'], tb [N, D'], teacher_scale, teacher_bias)``: soft labels
            ``y_ij = (1 - alpha) y_ij + alpha sigmoid(teacher_scale ta_i . tb_j + teacher_bias)`` from the
            detached teacher, on the rows of ``soft_mask`` (bool [N]; every row without one).
        alpha: weight of the soft labels in [0, 1].
        extra_b: optional [K, D] extra negative columns (a queue, no gradient; the teacher scores them as they
            are).
        group: ``torch.distributed`` process group; when given (or when the default group is initialised), rows
            stay local and b's columns are all-gathered with their gradient.

    Returns:
        0-d fp32 tensor (fp64 for fp64 inputs): this rank's loss, the mean over its rows of each row's sum over
        all columns (the mean over ranks is the loss of the global batch, and after DDP's averaging the gradient
        equals the single-process gradient on the concatenated batch). Extra memory O((N + K) D) plus one
        bounded block of dL/dlogits, forward and backward.
    """
    return _sigmoid_loss(a, b, scale, bias, teacher, alpha, soft_mask, extra_b, group, distributed=True)


def _sigmoid_loss(a, b, scale, bias, teacher, alpha, soft_mask, extra_b, group, distributed: bool):
    """sigmoid_loss, over this rank's pairs alone where ``distributed`` is False (open_clip's SigLipLoss built
    with world_size=1)."""
    _check_pair("a", a, "b", b, 2)
    scale = as_scalar_tensor("scale", scale, a)
    bias = _as_bias("bias", bias, a)
    alpha = check_unit_interval("alpha", alpha)
    extra_b = _check_extra("extra_b", extra_b, a)
    teacher = _check_teacher(teacher, a, alpha, soft_mask, extra_b is not None)
    rank, size = world(group) if distributed else (0, 1)
    cols = b
    if size > 1:
        check_same_across_ranks(group, a=a, b=b, **{"teacher[0]": None if teacher is None else teacher[0]})
        cols = all_gather_with_grad(b, group)
        if teacher is not None:
            teacher = (teacher[0], all_gather_no_grad(teacher[1], group), *teacher[2:])
    return sigmoid_pairs(a[None], cols[None], scale, bias, offset=rank * a.shape[0], extra_cols=extra_b,
                         teacher=teacher, alpha=alpha, soft_mask=soft_mask)


def multiview_sigmoid_loss(a_views, b_views, scale, bias, *, group=None):
    """Mean :func:`sigmoid_loss` over all Va x Vb view pairs, in one pass over the pairs.

    Args:
        a_views: [Va, N, D]; b_views: [Vb, N, D] (same dtype and device; local rows when distributed).
        scale, bias: as in :func:`sigmoid_loss`.
    Returns:
        0-d fp32 tensor (fp64 for fp64 inputs), ``mean_{p, q} sigmoid_loss(a_views[p], b_views[q], scale, bias)``.
    """
    _check_pair("a_views", a_views, "b_views", b_views, 3)
    scale = as_scalar_tensor("scale", scale, a_views)
    bias = _as_bias("bias", bias, a_views)
    rank, size = world(group)
    cols = b_views
    if size > 1:
        check_same_across_ranks(group, a_views=a_views, b_views=b_views)
        cols = all_gather_with_grad(b_views, group, dim=1)
    return sigmoid_pairs(a_views, cols, scale, bias, offset=rank * a_views.shape[1])
