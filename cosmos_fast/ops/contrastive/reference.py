"""Dense reference of the contrastive loss: the definition, stated in plain PyTorch.

It builds every N x (N + K) logit matrix, as upstream COSMOS and open_clip do.
Two uses: run on float64 copies it is the oracle of the tests; run in the input
dtype it is the "naive PyTorch" peer of the benchmarks and of the accuracy rule.
Not distributed: pass the concatenated batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _direction(rows, cols, extra, scale, t_rows, t_cols, t_scale, alpha, soft_mask):
    n = rows.shape[0]
    if extra is not None:
        cols = torch.cat([cols, extra.detach()])
    logits = scale * rows @ cols.t()
    labels = torch.arange(n, device=rows.device)
    if t_rows is None or alpha == 0.0:
        return F.cross_entropy(logits, labels)
    if extra is not None:  # the queue holds teacher-space features: the teacher scores them as they are
        t_cols = torch.cat([t_cols, extra.detach()])
    teacher_probs = torch.softmax(t_scale * t_rows @ t_cols.t(), dim=1)
    row_alpha = torch.full((n, 1), alpha, dtype=logits.dtype, device=rows.device)
    if soft_mask is not None:
        row_alpha = row_alpha * soft_mask.to(logits.dtype)[:, None]
    targets = (1 - row_alpha) * F.one_hot(labels, cols.shape[0]).to(logits.dtype) + row_alpha * teacher_probs
    return F.cross_entropy(logits, targets.detach())


def contrastive_loss_reference(a, b, scale, *, teacher=None, alpha=0.0, soft_mask=None, extra_a=None, extra_b=None,
                               columns=None):
    """Symmetric InfoNCE, ``kernels.md`` section 1, with full matrices. a, b: [N, D]; ``columns`` (cols_b,
    cols_a) replace the in-batch columns without gradient (ALBEF/SIMLA's momentum features)."""
    ta = tb = ts = None
    if teacher is not None:
        ta, tb, ts = (t.detach() if isinstance(t, torch.Tensor) else t for t in teacher)
    cols_b, cols_a = (b, a) if columns is None else (c.detach().to(a.dtype) for c in columns)
    loss_ab = _direction(a, cols_b, extra_b, scale, ta, tb, ts, alpha, soft_mask)
    loss_ba = _direction(b, cols_a, extra_a, scale, tb, ta, ts, alpha, soft_mask)
    return 0.5 * (loss_ab + loss_ba)


def multiview_contrastive_loss_reference(a_views, b_views, scale):
    """Mean symmetric loss over all view pairs, one full matrix per pair (upstream COSMOS)."""
    losses = [contrastive_loss_reference(a, b, scale) for a in a_views for b in b_views]
    return torch.stack(losses).mean()
