"""Contrastive-loss API: argument errors, memory (no N x N buffer), dispatch, torch.library registration."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from memory import LargestAllocation

import cosmos_fast
from cosmos_fast import _dispatch
from cosmos_fast.ops.contrastive import op, torch_impl

try:
    from cosmos_fast.ops.contrastive import triton_kernels
except ImportError:  # no triton: the PyTorch path is still tested
    triton_kernels = None


def feats(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(dtype)


A, B = feats(8, 16, seed=1), feats(8, 16, seed=2)
TEACHER = (feats(8, 4, seed=3), feats(8, 4, seed=4), torch.tensor(3.0))


VIEWS2, VIEWS8 = feats(2, 8, 16, seed=5), feats(8, 8, 16, seed=6)


def cosmos_loss(**features):
    """CosmosLoss on well-formed COSMOS shapes ([2|8, N=8, D=16]) with ``features`` replaced."""
    args = dict(image_features=VIEWS2, text_features=VIEWS8, cross_image_features=VIEWS8, cross_text_features=VIEWS8,
                teacher_image_features=VIEWS2, teacher_text_features=VIEWS2)
    return cosmos_fast.nn.CosmosLoss()(**{**args, **features}, logit_scale=2.0, distill_logit_scale=3.0)


@pytest.mark.parametrize("call,error,words", [
    (lambda: cosmos_fast.contrastive_loss(A, feats(9, 16), 1.0), ValueError, "number of rows N"),
    (lambda: cosmos_fast.contrastive_loss(A, feats(8, 12), 1.0), ValueError, "feature size D"),
    (lambda: cosmos_fast.contrastive_loss(A.long(), B, 1.0), TypeError, "a must be a floating-point"),
    (lambda: cosmos_fast.contrastive_loss(A, B.half(), 1.0), TypeError, "b has dtype"),
    (lambda: cosmos_fast.contrastive_loss(A, B.to("meta"), 1.0), ValueError, "b is on meta"),
    (lambda: cosmos_fast.contrastive_loss(A[0], B[0], 1.0), ValueError, "a must have 2 dimensions"),
    (lambda: cosmos_fast.contrastive_loss(A, B, torch.ones(2)), ValueError, "scale must be a scalar"),
    (lambda: cosmos_fast.contrastive_loss(A, B, "1"), TypeError, "scale must be a 0-d tensor"),
    (lambda: cosmos_fast.contrastive_loss(A, B, float("nan")), ValueError, "scale must be a finite number > 0"),
    (lambda: cosmos_fast.contrastive_loss(A, B, -2.0), ValueError, "scale must be a finite number > 0"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, teacher=TEACHER, alpha=1.5), ValueError, "alpha must be in [0, 1]"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, teacher=TEACHER, alpha=-0.1), ValueError, "alpha must be in [0, 1]"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, alpha=0.3), ValueError, "alpha > 0 needs soft targets"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, teacher=TEACHER[:2]), TypeError, "teacher must be a tuple"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, teacher=(feats(7, 4), feats(7, 4), 1.0), alpha=0.5),
     ValueError, "teacher features must have N = 8"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, teacher=TEACHER, alpha=0.5, soft_mask=torch.ones(8)),
     TypeError, "soft_mask must be a bool tensor"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, teacher=TEACHER, alpha=0.5, soft_mask=torch.ones(5, dtype=bool)),
     ValueError, "soft_mask must have shape [8]"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, extra_b=feats(5, 12)), ValueError, "extra_b must have shape [K, 16]"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, teacher=TEACHER, alpha=0.5, extra_a=feats(5, 16)),
     ValueError, "its feature size must be D = 16"),
    (lambda: cosmos_fast.multiview_contrastive_loss(A, B, 1.0), ValueError, "a_views must have 3 dimensions"),
    (lambda: cosmos_fast.multiview_contrastive_loss(feats(2, 8, 16), feats(3, 7, 16), 1.0),
     ValueError, "number of rows N"),
    (lambda: cosmos_fast.nn.ContrastiveLoss(use_horovod=True), ValueError, "use_horovod"),
    (lambda: cosmos_fast.contrastive_loss(A, B, 1.0, group=0), TypeError, "group must be a torch.distributed"),
    (lambda: cosmos_fast.multiview_contrastive_loss(A[None], B[None], 1.0, group="world"), TypeError,
     "group must be a torch.distributed ProcessGroup or None, got str"),
    (lambda: cosmos_loss(cross_image_features=VIEWS8.long()), TypeError, "cross_image_features must be a floating"),
    (lambda: cosmos_loss(teacher_text_features=VIEWS2.bool()), TypeError, "teacher_text_features must be a floating"),
    (lambda: cosmos_loss(cross_text_features=VIEWS8.double()), TypeError,
     "cross_text_features has dtype torch.float64 but image_features has torch.float32"),
    (lambda: cosmos_loss(cross_text_features=VIEWS8[:6]), ValueError,
     "cross_image_features and cross_text_features must have the same number of views, got 8 and 6"),
    (lambda: cosmos_loss(teacher_image_features=VIEWS8), ValueError,
     "teacher_image_features and teacher_text_features must have the same number of views"),
    (lambda: cosmos_loss(text_features=VIEWS8[:, :7]), ValueError, "text_features must have shape [V, N=8, D=16]"),
    (lambda: cosmos_loss(cross_image_features=VIEWS8[..., :12]), ValueError, "cross_image_features must have shape"),
    (lambda: cosmos_loss(cross_image_features=[VIEWS8]), TypeError, "cross_image_features must be a torch.Tensor"),
    (lambda: cosmos_loss(image_features=VIEWS2[0]), ValueError, "image_features must have 3 dimensions"),
    (lambda: cosmos_fast.nn.CosmosLoss(group=3)(VIEWS2, VIEWS8, VIEWS8, VIEWS8, VIEWS2, VIEWS2, 1.0, 1.0), TypeError,
     "group must be a torch.distributed ProcessGroup or None, got int"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=None) as info:
        call()
    assert words in str(info.value)


def test_scale_takes_any_real_number_type():
    """numpy scalars (np.float32 is no Python float) are numbers like any other; the loss is the same."""
    expected = cosmos_fast.contrastive_loss(A, B, 2.5)
    for scale in (np.float32(2.5), np.float64(2.5), torch.tensor([2.5])):
        torch.testing.assert_close(cosmos_fast.contrastive_loss(A, B, scale), expected, rtol=0, atol=0)


@pytest.mark.parametrize("N", [4096, 1024])
def test_no_n_by_n_buffer(backend, N, monkeypatch):
    """Every tensor the implementation creates in forward and backward (symmetric and generic paths) stays far
    below N x N logits: the chunk and block bounds are lowered to N^2 / 16 and must be what limits memory."""
    if backend == "triton" and N > 1024:
        pytest.skip("the interpreter is too slow for this size; the PyTorch path covers it")
    impl = triton_kernels if backend == "triton" else torch_impl
    budget = N * N // 16
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(triton_kernels, "G_BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(triton_kernels, "G_BLOCK_MIN_ROWS", 16)
    a, b, queue = feats(1, N, 32, seed=1), feats(1, N, 32, seed=2), feats(N // 4, 32, seed=3)
    scale, none4 = torch.tensor(10.0), (None, None, None, 0.0)
    with LargestAllocation() as mode:
        loss_ab, loss_ba, *stats = impl.infonce_symmetric_fwd(a, b, scale, *none4, None)
        d_a, d_b, _ = impl.infonce_symmetric_bwd(torch.full_like(loss_ab, 1 / N), torch.full_like(loss_ba, 1 / N),
                                                 a, b, scale, *none4, None, *stats, True, True)
        row_loss, lse, tlse = impl.infonce_rows_fwd(a, b, queue, scale, 0, *none4, None)
        impl.infonce_rows_bwd(torch.full_like(row_loss, 1 / N), a, b, queue, scale, 0, *none4, None, lse, tlse,
                              True, True)
    assert torch.isfinite(d_a).all() and torch.isfinite(d_b).all()
    # fp32 logits: 4 bytes each; blocks may round up to a whole tile of rows
    assert mode.largest <= 4 * budget * 4, f"largest tensor has {mode.largest} bytes, N x N fp32 = {4 * N * N}"
    assert mode.largest >= budget, "the chunks were not seen: this test would not catch an N x N buffer"


def test_dispatch_rules(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert _dispatch.select_backend(x) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "torch")
    assert _dispatch.select_backend(x) == "torch"
    monkeypatch.setenv(_dispatch.ENV_VAR, "cublas")
    with pytest.raises(ValueError, match="COSMOS_FAST_BACKEND must be one of"):
        _dispatch.select_backend(x)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.select_backend(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="forces the Triton kernels, which take .* the inputs are torch.float64"):
        _dispatch.select_backend(x.double())
    assert set(cosmos_fast.backends()) >= {"forced", "triton", "cuda"}


def _opcheck_cases():
    n, N, D = 5, 5, 16
    rows, cols = feats(1, n, D, seed=1), feats(1, N, D, seed=2)
    scale = torch.tensor(4.0)
    yield "hard", (rows, cols, None, scale, 0, None, None, None, 0.0, None)
    yield "soft+mask+queue", (rows, cols, feats(3, D, seed=3), scale, 0, feats(n, D, seed=4), feats(N, D, seed=5),
                              torch.tensor(2.0), 0.3, torch.tensor([True, False, True, True, False]))
    yield "multiview+offset", (feats(2, 3, D, seed=6), feats(3, 6, D, seed=7), None, scale, 3, None, None, None, 0.0,
                               None)


@pytest.mark.parametrize("case", [c[0] for c in _opcheck_cases()])
def test_opcheck(backend, case):
    args = dict(_opcheck_cases())[case]
    rows, cols, scale = args[0].requires_grad_(), args[1].requires_grad_(), args[3].requires_grad_()
    fwd_args = (rows, cols) + args[2:3] + (scale,) + args[4:]
    torch.library.opcheck(op.infonce_rows_fwd, fwd_args)
    row_loss, lse, tlse = op.infonce_rows_fwd(*fwd_args)
    bwd_args = (torch.rand_like(row_loss), rows.detach(), cols.detach()) + args[2:3] + (scale.detach(),) + args[4:] + (
        lse, tlse, True, True)
    torch.library.opcheck(op.infonce_rows_bwd, bwd_args)


@pytest.mark.parametrize("with_teacher", [False, True], ids=["hard", "soft"])
def test_opcheck_symmetric(backend, with_teacher):
    a, b = feats(2, 5, 16, seed=1).requires_grad_(), feats(3, 5, 16, seed=2).requires_grad_()
    scale = torch.tensor(4.0, requires_grad=True)
    teacher = (None, None, None, 0.0, None)
    if with_teacher:
        a, b = a[:1].detach().requires_grad_(), b[:1].detach().requires_grad_()
        teacher = (feats(5, 8, seed=3), feats(5, 8, seed=4), torch.tensor(2.0), 0.5,
                   torch.tensor([True, False, True, True, False]))
    torch.library.opcheck(op.infonce_symmetric_fwd, (a, b, scale) + teacher)
    loss_ab, loss_ba, *stats = op.infonce_symmetric_fwd(a, b, scale, *teacher)
    bwd_args = (torch.rand_like(loss_ab), torch.rand_like(loss_ba), a.detach(), b.detach(), scale.detach()) + \
        teacher + tuple(stats) + (True, True)
    torch.library.opcheck(op.infonce_symmetric_bwd, bwd_args)


def test_compiles_without_graph_breaks(backend):
    a, b = feats(6, 16, seed=1).requires_grad_(), feats(6, 16, seed=2).requires_grad_()
    scale = torch.tensor(5.0, requires_grad=True)
    loss_fn = cosmos_fast.nn.CosmosLoss()

    def step(a, b, scale):
        views = torch.stack([a, b])
        return cosmos_fast.contrastive_loss(a, b, scale) + loss_fn(views, views, views, views, views, views, scale,
                                                                  scale).total

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(a, b, scale), step(a, b, scale))
    compiled(a, b, scale).backward()
    assert a.grad is not None and scale.grad is not None


def test_drop_in_for_open_clip_clip_loss():
    """Same value and output_dict form as open_clip's ClipLoss on one process."""
    img, txt, scale = feats(10, 16, seed=1), feats(10, 16, seed=2), torch.tensor(14.0)
    logits = scale * img @ txt.t()
    labels = torch.arange(10)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    loss_fn = cosmos_fast.nn.ContrastiveLoss()
    torch.testing.assert_close(loss_fn(img, txt, scale), expected)
    assert set(loss_fn(img, txt, scale, output_dict=True)) == {"contrastive_loss"}
    with pytest.raises(ValueError, match="built for rank"):
        cosmos_fast.nn.ContrastiveLoss(rank=1, world_size=2)(img, txt, scale)
