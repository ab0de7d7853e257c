"""Contrastive losses against the float64 dense reference, on both backends (PyTorch path, Triton interpreted)."""
import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate

import cosmos_fast
from cosmos_fast.ops.contrastive.reference import contrastive_loss_reference, multiview_contrastive_loss_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALE = 1 / 0.07


def features(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def scale64(value=SCALE):
    return torch.tensor(value, dtype=torch.float64)


def assert_loss_accurate(N, D, dtype, **kwargs):
    """contrastive_loss(**kwargs) on fresh normalised features [N, D] by the accuracy rule."""
    assert_accurate(
        lambda a, b, s: cosmos_fast.contrastive_loss(a, b, s, **kwargs),
        lambda a, b, s: contrastive_loss_reference(a, b, s, **kwargs),
        [features(N, D, seed=1), features(N, D, seed=2), scale64()], dtype, ["a", "b", "scale"],
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 96, 512])
@pytest.mark.parametrize("N", [1, 7, 129, 1000])
def test_hard_targets(backend, N, D, dtype):
    assert_loss_accurate(N, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D", [(7, 32), (129, 96)])
@pytest.mark.parametrize("masked", [False, True], ids=["all-soft", "soft-mask"])
def test_soft_targets(backend, N, D, dtype, masked):
    ta, tb = features(N, 48, seed=3).to(dtype), features(N, 48, seed=4).to(dtype)
    mask = (torch.arange(N) % 3 == 0) if masked else None
    assert_loss_accurate(N, D, dtype, teacher=(ta, tb, torch.tensor(25.0)), alpha=0.4, soft_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,K", [(7, 32, 5), (129, 96, 70)])
def test_momentum_columns(backend, N, D, K, dtype):
    """ALBEF/SIMLA's ITC: rows against momentum features and queues, soft targets from the momentum model."""
    a_m, b_m = features(N, D, seed=3).to(dtype), features(N, D, seed=4).to(dtype)
    kwargs = dict(columns=(b_m, a_m), extra_a=features(K, D, seed=5).to(dtype),
                  extra_b=features(K, D, seed=6).to(dtype), teacher=(a_m, b_m, torch.tensor(20.0)), alpha=0.4)
    assert_loss_accurate(N, D, dtype, **kwargs)


def test_momentum_columns_take_no_gradient():
    a, b = (features(9, 16, seed=s).float().requires_grad_() for s in (1, 2))
    cols = [features(9, 16, seed=s).float().requires_grad_() for s in (3, 4)]
    loss = cosmos_fast.contrastive_loss(a, b, 10.0, columns=tuple(cols))
    grads = torch.autograd.grad(loss, [a, b, *cols], allow_unused=True)
    assert grads[0] is not None and grads[1] is not None and grads[2] is None and grads[3] is None
    differs = cosmos_fast.contrastive_loss(a, b, 10.0)  # the in-batch columns are really replaced
    assert not torch.isclose(loss, differs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,K", [(7, 32, 5), (129, 96, 70)])
@pytest.mark.parametrize("with_teacher", [False, True], ids=["hard", "soft"])
def test_extra_columns(backend, N, D, K, dtype, with_teacher):
    extra_a, extra_b = features(K, D, seed=5).to(dtype), features(K + 3, D, seed=6).to(dtype)
    kwargs = dict(extra_a=extra_a, extra_b=extra_b)
    if with_teacher:
        teacher = (features(N, D, seed=3).to(dtype), features(N, D, seed=4).to(dtype), torch.tensor(20.0))
        kwargs.update(teacher=teacher, alpha=0.7, soft_mask=torch.arange(N) % 2 == 0)
    assert_loss_accurate(N, D, dtype, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Va,Vb,N,D", [(2, 3, 7, 32), (2, 8, 129, 96), (3, 1, 1, 32)])
def test_multiview(backend, Va, Vb, N, D, dtype):
    leaves = [features(Va, N, D, seed=1), features(Vb, N, D, seed=2), scale64()]
    assert_accurate(cosmos_fast.multiview_contrastive_loss, multiview_contrastive_loss_reference, leaves, dtype,
                    ["a_views", "b_views", "scale"])


def test_cosmos_loss_matches_its_definition(backend):
    """CosmosLoss = C(img_g, txt) + 1/4 sum of the four cross-modal groups, each a mean over its 8 x 2 pairs."""
    N, D = 9, 32
    img, txt = features(2, N, D, seed=1), features(8, N, D, seed=2)
    x_img, x_txt = features(8, N, D, seed=3), features(8, N, D, seed=4)
    t_img, t_txt = features(2, N, D, seed=5), features(2, N, D, seed=6)
    s, sd = scale64(), scale64(8.0)

    def reference(img, txt, x_img, x_txt, s, sd):
        clip = multiview_contrastive_loss_reference(img, txt, s)
        groups = [multiview_contrastive_loss_reference(x, t, sd) for x in (x_img, x_txt) for t in (t_img, t_txt)]
        return clip + sum(groups) / 4

    def ours(img, txt, x_img, x_txt, s, sd):
        return cosmos_fast.nn.CosmosLoss()(img, txt, x_img, x_txt, t_img.float(), t_txt.float(), s, sd).total

    leaves = [img, txt, x_img, x_txt, s, sd]
    loss, grads = _loss_and_grads(ours, [x.float() for x in leaves])
    ref_loss, ref_grads = _loss_and_grads(reference, leaves)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-7)
    parts = cosmos_fast.nn.CosmosLoss()(*(x.float() for x in (img, txt, x_img, x_txt, t_img, t_txt, s, sd)))
    torch.testing.assert_close(parts.total, parts.clip + parts.cosmos)


def _loss_and_grads(fn, leaves):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    loss = fn(*leaves)
    return loss, torch.autograd.grad(loss, leaves)


def test_config_with_small_tiles_crosses_every_loop(backend, monkeypatch):
    """Tiles far smaller than the problem: several row, column, feature (K) and output-feature (D) blocks."""
    monkeypatch.setenv("COSMOS_FAST_CONTRASTIVE_CONFIG", "16,16,16,32,4,1")
    N, D, K = 37, 96, 21
    teacher = (features(N, D, seed=3).float(), features(N, D, seed=4).float(), torch.tensor(9.0))
    assert_loss_accurate(N, D, torch.float32, teacher=teacher, alpha=0.5, soft_mask=torch.arange(N) % 2 == 1,
                         extra_a=features(K, D, seed=7).float(), extra_b=features(K, D, seed=8).float())
    leaves = [features(3, N, D, seed=1), features(2, N, D, seed=2), scale64()]
    assert_accurate(cosmos_fast.multiview_contrastive_loss, multiview_contrastive_loss_reference, leaves,
                    torch.float32, ["a_views", "b_views", "scale"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_scale_does_not_overflow(backend, dtype):
    """s = 100 with near-duplicate features: logits near +-100 stay finite and exact."""
    N, D = 65, 32
    base = features(N, D, seed=1)
    b = F.normalize(base + 0.01 * features(N, D, seed=2), dim=-1)
    leaves = [base, b, scale64(100.0)]
    assert_accurate(cosmos_fast.contrastive_loss, contrastive_loss_reference, leaves, dtype, ["a", "b", "scale"])


def test_soft_targets_with_alpha_zero_equal_hard_targets(backend):
    a, b = features(20, 32, seed=1).float(), features(20, 32, seed=2).float()
    teacher = (features(20, 16, seed=3).float(), features(20, 16, seed=4).float(), torch.tensor(10.0))
    hard = cosmos_fast.contrastive_loss(a, b, 5.0)
    soft = cosmos_fast.contrastive_loss(a, b, 5.0, teacher=teacher, alpha=0.0)
    torch.testing.assert_close(soft, hard)
    assert not torch.equal(cosmos_fast.contrastive_loss(a, b, 5.0, teacher=teacher, alpha=0.5), hard)
