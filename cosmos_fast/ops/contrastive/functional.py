"""Public contrastive losses: argument checks, the distributed gather, and the two directions."""
from __future__ import annotations

import torch

from ..._validation import (
    as_scalar_tensor,
    check_float_tensor,
    check_same_device,
    check_same_dtype,
    check_unit_interval,
)
from ...distributed import all_gather_no_grad, all_gather_with_grad, check_same_across_ranks, world
from .op import infonce_rows, infonce_symmetric


def _check_pair(a_name, a, b_name, b, ndim):
    check_float_tensor(a_name, a, ndim)
    check_float_tensor(b_name, b, ndim)
    check_same_device(a_name, a, **{b_name: b})
    check_same_dtype(a_name, a, **{b_name: b})
    if a.shape[-2] != b.shape[-2]:
        raise ValueError(f"{a_name} and {b_name} must have the same number of rows N, got {a.shape[-2]} and {b.shape[-2]}")
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{a_name} and {b_name} must have the same feature size D, got {a.shape[-1]} and {b.shape[-1]}")


def _check_extra(name, extra, a):
    if extra is None:
        return None
    check_float_tensor(name, extra, 2)
    check_same_device("a", a, **{name: extra})
    check_same_dtype("a", a, **{name: extra})
    if extra.shape[1] != a.shape[1]:
        raise ValueError(f"{name} must have shape [K, {a.shape[1]}] (feature size D of a), got {tuple(extra.shape)}")
    return extra.detach()


def _check_teacher(teacher, a, alpha, soft_mask, has_extra, with_bias: bool = False):
    """``teacher`` = (ta, tb, teacher_scale[, teacher_bias]) checked against the student's features ``a`` ->
    the same, detached, features in ``a``'s dtype (the kernels multiply them so), scalars as 0-d tensors; None
    without a teacher. ``with_bias``: the sigmoid losses' form, with the teacher's logit bias."""
    form = "(ta, tb, teacher_scale, teacher_bias)" if with_bias else "(ta, tb, teacher_scale)"
    labels = "soft labels" if with_bias else "soft targets"
    if teacher is None:
        if alpha != 0.0:
            raise ValueError(f"alpha > 0 needs {labels}: pass teacher={form}")
        if soft_mask is not None:
            raise ValueError(f"soft_mask needs {labels}: pass teacher={form}")
        return None
    if not isinstance(teacher, (tuple, list)) or len(teacher) != 3 + with_bias:
        raise TypeError("teacher must be a tuple " + form.replace("ta, tb", "ta [N, D'], tb [N, D']"))
    ta, tb, t_scale = teacher[:3]
    _check_pair("teacher[0]", ta, "teacher[1]", tb, 2)
    check_same_device("a", a, **{"teacher[0]": ta})
    if ta.shape[0] != a.shape[0]:
        raise ValueError(f"teacher features must have N = {a.shape[0]} rows like a, got {ta.shape[0]}")
    if has_extra and ta.shape[1] != a.shape[1]:
        raise ValueError(
            f"with extra columns the teacher scores the queue features as they are, so its feature size must be "
            f"D = {a.shape[1]}, got {ta.shape[1]}"
        )
    scalars = [as_scalar_tensor("teacher[2] (teacher_scale)", t_scale, a).detach()]
    if with_bias:
        scalars.append(as_scalar_tensor("teacher[3] (teacher_bias)", teacher[3], a, positive=False).detach())
    if soft_mask is not None:
        if not isinstance(soft_mask, torch.Tensor) or soft_mask.dtype != torch.bool:
            raise TypeError(f"soft_mask must be a bool tensor [N], got {getattr(soft_mask, 'dtype', type(soft_mask))}")
        if soft_mask.shape != (a.shape[0],):
            raise ValueError(f"soft_mask must have shape [{a.shape[0]}], got {tuple(soft_mask.shape)}")
        check_same_device("a", a, soft_mask=soft_mask)
    return (ta.detach().to(a.dtype), tb.detach().to(a.dtype), *scalars)


def contrastive_loss(a, b, scale, *, teacher=None, alpha=0.0, soft_mask=None, extra_a=None, extra_b=None, columns=None,
                     group=None):
    """Symmetric InfoNCE (CLIP loss) without the N x N matrix.

    ``L = 1/2 [mean_i CE(s a_i B^T, Y_i) + mean_j CE(s b_j A^T, Y^T_j)]``, ``kernels.md`` section 1.

    Args:
        a, b: [N, D] features (the caller normalises), fp32, bf16, fp16 (or fp64 on the PyTorch path); the
            local rows of this rank when distributed.
        scale: 0-d tensor (or number), the logit multiplier ``exp(logit_scale)``; it gets a gradient.
        teacher: optional ``(ta [N, D'], tb [N, D'], teacher_scale)`` for soft targets
            ``Y_i = (1 - alpha) e_i + alpha softmax_j(teacher_scale ta_i . tb_j)`` (no gradient flows to them).
        alpha: weight of the soft targets in [0, 1].
        soft_mask: optional bool [N]: rows (and columns) that use soft targets; the others keep one-hot targets.
        extra_a, extra_b: optional [K, D] extra negative columns (queues, no gradient): ``extra_b`` joins the
            columns of the a -> b direction, ``extra_a`` those of b -> a. With a teacher, the teacher scores the
            queue features as they are (they are teacher-space features, as in ALBEF/SIMLA).
        columns: optional ``(cols_b [N, D], cols_a [N, D])`` that replace the in-batch columns, without gradient:
            a's rows are scored against ``cols_b`` (then ``extra_b``), b's rows against ``cols_a`` (then
            ``extra_a``), the positive of row i at column i. ALBEF/SIMLA's ITC, ``s_i2t = v [t^m, Q_t] / tau``,
            is ``contrastive_loss(v, t, 1 / tau, columns=(t_m, v_m), extra_a=Q_v, extra_b=Q_t,
            teacher=(v_m, t_m, 1 / tau), alpha=alpha)``.
        group: ``torch.distributed`` process group; when given (or when the default group is initialised), rows
            stay local and the columns are all-gathered (with gradient, unless they come from ``columns``).

    Returns:
        0-d fp32 tensor: this rank's loss (the mean over ranks is the loss of the global batch, and the gradient
        after DDP's averaging equals the single-process gradient on the concatenated batch).
    """
    _check_pair("a", a, "b", b, 2)
    scale = as_scalar_tensor("scale", scale, a)
    alpha = check_unit_interval("alpha", alpha)
    extra_a = _check_extra("extra_a", extra_a, a)
    extra_b = _check_extra("extra_b", extra_b, a)
    teacher = _check_teacher(teacher, a, alpha, soft_mask, extra_a is not None or extra_b is not None)
    if columns is not None:
        if not isinstance(columns, (tuple, list)) or len(columns) != 2:
            raise TypeError("columns must be a tuple (cols_b [N, D], cols_a [N, D])")
        for name, cols in zip(("columns[0]", "columns[1]"), columns):
            check_float_tensor(name, cols, 2)
            check_same_device("a", a, **{name: cols})
            if cols.shape != a.shape:
                raise ValueError(f"{name} must have the shape of a, {tuple(a.shape)}, got {tuple(cols.shape)}")
        columns = tuple(cols.detach().to(a.dtype) for cols in columns)  # momentum features in the rows' dtype
    rank, size = world(group)
    if size == 1 and extra_a is None and extra_b is None and columns is None:
        # One square problem: both directions share every logit tile.
        loss_ab, loss_ba = infonce_symmetric(a[None], b[None], scale, teacher=teacher, alpha=alpha,
                                             soft_mask=soft_mask)
        return 0.5 * (loss_ab.mean() + loss_ba.mean())
    n = a.shape[0]
    check_same_across_ranks(group, a=a, b=b, **{"teacher[0]": None if teacher is None else teacher[0]},
                            columns=None if columns is None else columns[0])
    if columns is None:
        a_cols, b_cols = all_gather_with_grad(a, group), all_gather_with_grad(b, group)
    else:
        b_cols, a_cols = (all_gather_no_grad(cols, group) for cols in columns)
    teacher_ab = teacher_ba = None
    if teacher is not None:
        ta, tb, t_scale = teacher
        teacher_ab = (ta, all_gather_no_grad(tb, group), t_scale)
        teacher_ba = (tb, all_gather_no_grad(ta, group), t_scale)
    common = dict(offset=rank * n, alpha=alpha, soft_mask=soft_mask)
    loss_ab = infonce_rows(a[None], b_cols[None], scale, extra_cols=extra_b, teacher=teacher_ab, **common)
    loss_ba = infonce_rows(b[None], a_cols[None], scale, extra_cols=extra_a, teacher=teacher_ba, **common)
    return 0.5 * (loss_ab.mean() + loss_ba.mean())


def multiview_contrastive_loss(a_views, b_views, scale, *, group=None):
    """Mean symmetric InfoNCE over all Va x Vb view pairs, in one pass over the pairs.

    Args:
        a_views: [Va, N, D]; b_views: [Vb, N, D] (same dtype and device; local rows when distributed).
        scale: 0-d tensor (or number), the logit multiplier; it gets a gradient.
        group: ``torch.distributed`` process group, as in :func:`contrastive_loss`.

    Returns:
        0-d fp32 tensor, ``mean_{p, q} contrastive_loss(a_views[p], b_views[q], scale)``.
    """
    _check_pair("a_views", a_views, "b_views", b_views, 3)
    scale = as_scalar_tensor("scale", scale, a_views)
    rank, size = world(group)
    if size == 1:
        loss_ab, loss_ba = infonce_symmetric(a_views, b_views, scale)
        return 0.5 * (loss_ab.mean() + loss_ba.mean())
    check_same_across_ranks(group, a_views=a_views, b_views=b_views)
    a_cols = all_gather_with_grad(a_views, group, dim=1)
    b_cols = all_gather_with_grad(b_views, group, dim=1)
    offset = rank * a_views.shape[1]
    loss_ab = infonce_rows(a_views, b_cols, scale, offset=offset)
    loss_ba = infonce_rows(b_views, a_cols, scale, offset=offset)
    return 0.5 * (loss_ab.mean() + loss_ba.mean())
