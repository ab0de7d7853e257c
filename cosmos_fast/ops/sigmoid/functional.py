"""Public sigmoid (SigLIP) losses: argument checks, the distributed gather, the op underneath."""
from __future__ import annotations

from ..._validation import as_scalar_tensor, check_unit_interval
from ...distributed import all_gather_no_grad, all_gather_with_grad, check_same_across_ranks, world
from ..contrastive.functional import _check_extra, _check_pair, _check_teacher
from .op import sigmoid_pairs


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
    bias = as_scalar_tensor("bias", bias, a, positive=False)
    alpha = check_unit_interval("alpha", alpha)
    extra_b = _check_extra("extra_b", extra_b, a)
    teacher = _check_teacher(teacher, a, alpha, soft_mask, extra_b is not None, with_bias=True)
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
    bias = as_scalar_tensor("bias", bias, a_views, positive=False)
    rank, size = world(group)
    cols = b_views
    if size > 1:
        check_same_across_ranks(group, a_views=a_views, b_views=b_views)
        cols = all_gather_with_grad(b_views, group, dim=1)
    return sigmoid_pairs(a_views, cols, scale, bias, offset=rank * a_views.shape[1])
