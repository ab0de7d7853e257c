"""The sigmoid (SigLIP) loss against its float64 dense reference, on both backends (PyTorch path, Triton
interpreted), by the accuracy rule; open_clip's SigLipLoss; its memory; its registration."""
import math

import pytest
import torch
import torch.nn.functional as F
from accuracy import assert_accurate
from memory import PeakMemory

import cosmos_fast
from cosmos_fast.ops.sigmoid.reference import multiview_sigmoid_loss_reference, sigmoid_loss_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def features(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def paired(*shape, seed):
    """Features that match those of seed 1 (as trained towers' do): the positives' logits stand out, and dL/ds is
    not a near-cancelling sum (with unrelated features it is, and its relative error means little)."""
    return F.normalize(features(*shape, seed=1) + 0.6 * features(*shape, seed=seed), dim=-1)


def scalars(scale=10.0, bias=-10.0):
    """SigLIP's initialisation: scale exp(ln 10), bias -10."""
    return [torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)]


def assert_sigmoid_accurate(N, D, dtype, **kwargs):
    assert_accurate(
        lambda a, b, s, t: cosmos_fast.sigmoid_loss(a, b, s, t, **kwargs),
        lambda a, b, s, t: sigmoid_loss_reference(a, b, s, t, **kwargs),
        [features(N, D, seed=1), paired(N, D, seed=2), *scalars()], dtype, ["a", "b", "scale", "bias"],
        fp32_tail=2,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D", [(1, 32), (7, 19), (137, 96), (300, 64)])
def test_hard_labels(backend, N, D, dtype):
    assert_sigmoid_accurate(N, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D", [(7, 19), (137, 96)])
@pytest.mark.parametrize("masked", [False, True], ids=["all-soft", "soft-mask"])
def test_soft_labels(backend, N, D, dtype, masked):
    """Binary cross-entropy against (1 - alpha) y + alpha sigmoid(teacher logits) from a detached teacher."""
    teacher = (features(N, 40, seed=3).to(dtype), features(N, 40, seed=4).to(dtype), torch.tensor(20.0),
               torch.tensor(-5.0))
    mask = (torch.arange(N) % 3 == 0) if masked else None
    assert_sigmoid_accurate(N, D, dtype, teacher=teacher, alpha=0.4, soft_mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D,K", [(7, 19, 5), (137, 96, 70)])
@pytest.mark.parametrize("with_teacher", [False, True], ids=["hard", "soft"])
def test_queue_columns(backend, N, D, K, dtype, with_teacher):
    kwargs = dict(extra_b=features(K, D, seed=6).to(dtype))
    if with_teacher:  # the teacher scores the queue (teacher-space) features as they are
        kwargs.update(teacher=(features(N, D, seed=3).to(dtype), features(N, D, seed=4).to(dtype), torch.tensor(15.0),
                               torch.tensor(-3.0)), alpha=0.7, soft_mask=torch.arange(N) % 2 == 0)
    assert_sigmoid_accurate(N, D, dtype, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Va,Vb,N,D", [(2, 3, 9, 19), (2, 8, 70, 48)])
def test_multiview(backend, Va, Vb, N, D, dtype):
    assert_accurate(
        lambda a, b, s, t: cosmos_fast.multiview_sigmoid_loss(a, b, s, t),
        lambda a, b, s, t: multiview_sigmoid_loss_reference(a, b, s, t),
        [features(Va, N, D, seed=1), paired(Vb, N, D, seed=2), *scalars()], dtype, ["a", "b", "scale", "bias"],
        fp32_tail=2,
    )


def test_gradcheck_and_fp64():
    a, b = (features(6, 5, seed=s).requires_grad_() for s in (1, 2))
    s, t = (x.requires_grad_() for x in scalars(4.0, -1.0))
    queue = features(3, 5, seed=5)
    teacher = (features(6, 5, seed=3), features(6, 5, seed=4), torch.tensor(3.0, dtype=torch.float64),
               torch.tensor(0.5, dtype=torch.float64))
    assert cosmos_fast.sigmoid_loss(a, b, s, t).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda *x: cosmos_fast.sigmoid_loss(*x, teacher=teacher, alpha=0.3,
                                                                         extra_b=queue), (a, b, s, t))


def test_queue_and_teacher_take_no_gradient():
    a, b, queue, ta, tb = (features(9, 16, seed=k).float().requires_grad_() for k in range(5))
    loss = cosmos_fast.sigmoid_loss(a, b, 10.0, -10.0, extra_b=queue, teacher=(ta, tb, 5.0, -1.0), alpha=0.5)
    grads = torch.autograd.grad(loss, [a, b, queue, ta, tb], allow_unused=True)
    assert grads[0] is not None and grads[1] is not None and all(g is None for g in grads[2:])
    with torch.no_grad():  # no gradients asked for: the loss alone, the same value
        assert cosmos_fast.sigmoid_loss(a, b, 10.0, -10.0, extra_b=queue, teacher=(ta, tb, 5.0, -1.0),
                                        alpha=0.5).item() == pytest.approx(loss.item(), rel=1e-6)


def test_equals_open_clips_siglip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    image, text = (features(33, 24, seed=k).float().requires_grad_() for k in (1, 2))
    scale = torch.tensor(math.log(10.0)).exp().requires_grad_()
    bias = torch.tensor(-10.0, requires_grad=True)
    ours, theirs = cosmos_fast.nn.SigLipLoss(), open_clip_loss.SigLipLoss()
    results = []
    for module in (ours, theirs):
        loss = module(image, text, scale, bias)
        results.append((loss, *torch.autograd.grad(loss, [image, text, scale, bias])))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert ours(image, text, scale, bias, output_dict=True).keys() == {"contrastive_loss"}
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        cosmos_fast.nn.SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="built for rank 1 of 2 but runs as 0 of 1"):
        cosmos_fast.nn.SigLipLoss(rank=1, world_size=2)(image, text, scale, bias)


def test_cpu_path_memory_is_linear():
    """N = 8192, D = 64, forward and backward: the extra memory the PyTorch path holds at once, against one
    N x N fp32 matrix (256 MiB), which the dense loss builds several of."""
    N, D = 8192, 64
    a, b = (features(N, D, seed=k).float().requires_grad_() for k in (1, 2))
    scale, bias = (x.float().requires_grad_() for x in scalars())
    with PeakMemory() as mode:
        cosmos_fast.sigmoid_loss(a, b, scale, bias).backward()
    assert mode.peak < 24 * 2**20, f"{mode.peak / 2**20:.1f} MiB"
    with PeakMemory() as dense:
        sigmoid_loss_reference(a, b, scale, bias).backward()
    assert dense.peak > 256 * 2**20  # the measure sees a full matrix where one exists


def test_arguments_are_named():
    a, b = features(5, 4, seed=1).float(), features(5, 4, seed=2).float()
    cases = [
        (dict(bias=float("nan")), TypeError, "bias must be a 0-d tensor or a finite real number"),
        (dict(scale=torch.tensor(-1.0)), ValueError, "scale must be a finite number > 0"),
        (dict(alpha=0.5), ValueError, "alpha > 0 needs soft labels"),
        (dict(teacher=(a, b, 1.0)), TypeError, "teacher must be a tuple"),
        (dict(extra_b=torch.randn(3, 5)), ValueError, r"extra_b must have shape \[K, 4\]"),
        (dict(b=b[:4]), ValueError, "a and b must have the same number of rows N"),
    ]
    for kwargs, error, words in cases:
        args = dict(a=a, b=b, scale=10.0, bias=-10.0)
        args.update(kwargs)
        with pytest.raises(error, match=words):
            cosmos_fast.sigmoid_loss(args.pop("a"), args.pop("b"), args.pop("scale"), args.pop("bias"), **args)


def test_registered_op_and_fullgraph_compile():
    """opcheck on the custom op; torch.compile(fullgraph=True) traces the public function without a break."""
    from cosmos_fast.ops.sigmoid.op import sigmoid_pairs_op

    rows, cols = features(1, 9, 8, seed=1).float().requires_grad_(), features(1, 9, 8, seed=2).float()
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    torch.library.opcheck(sigmoid_pairs_op, (rows, cols, None, scale, bias, 0, None, None, None, None, 0.0, None,
                                             True, False))
    a, b = features(9, 8, seed=1).float().requires_grad_(), features(9, 8, seed=2).float().requires_grad_()
    compiled = torch.compile(lambda a, b, s, t: cosmos_fast.sigmoid_loss(a, b, s, t), fullgraph=True,
                             backend="aot_eager")
    loss = compiled(a, b, scale, bias)
    grads = torch.autograd.grad(loss, [a, b, scale, bias])
    expected = cosmos_fast.sigmoid_loss(a, b, scale, bias)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, [a, b, scale, bias])):
        torch.testing.assert_close(got, want)
