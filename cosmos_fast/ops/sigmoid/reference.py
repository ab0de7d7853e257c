"""Dense reference of the sigmoid (SigLIP) loss: the definition in plain PyTorch, every N x (N + K) logit matrix
built, as open_clip's ``SigLipLoss`` and big_vision do. On float64 copies it is the tests' oracle; in the input
dtype the "naive PyTorch" peer of the benchmarks and of the accuracy rule. Not distributed: pass the
concatenated batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss_reference(a, b, scale, bias, *, teacher=None, alpha=0.0, soft_mask=None, extra_b=None):
    """``1/N sum_ij BCE-with-logits(s a_i . b_j + t, y_ij)``, y_ij = 1 on the diagonal and 0 elsewhere (in extra
    columns too), or ``(1 - alpha) y_ij + alpha sigmoid(s_T ta_i . tb_j + t_T)`` on the rows of ``soft_mask``
    (all rows without it) given ``teacher = (ta, tb, s_T, t_T)``; the teacher scores queue columns as they are."""
    n = a.shape[0]
    cols = b if extra_b is None else torch.cat([b, extra_b.detach()])
    logits = scale * a @ cols.t() + bias
    labels = torch.zeros_like(logits)
    labels[torch.arange(n), torch.arange(n)] = 1.0
    if teacher is not None and alpha != 0.0:
        ta, tb, t_scale, t_bias = (t.detach() if isinstance(t, torch.Tensor) else t for t in teacher)
        t_cols = tb if extra_b is None else torch.cat([tb, extra_b.detach().to(tb.dtype)])
        # in the logits' dtype: the float64 oracle must not inherit the teacher features' rounding
        soft = torch.sigmoid(t_scale * ta.to(logits.dtype) @ t_cols.to(logits.dtype).t() + t_bias)
        row_alpha = torch.full((n, 1), alpha, dtype=logits.dtype, device=a.device)
        if soft_mask is not None:
            row_alpha = row_alpha * soft_mask.to(logits.dtype)[:, None]
        labels = (1 - row_alpha) * labels + row_alpha * soft
    return F.binary_cross_entropy_with_logits(logits, labels.detach(), reduction="sum") / n


def multiview_sigmoid_loss_reference(a_views, b_views, scale, bias):
    """Mean over all view pairs, one full matrix per pair."""
    return torch.stack([sigmoid_loss_reference(a, b, scale, bias) for a in a_views for b in b_views]).mean()
