"""Fused linear CE / BCE against the float64 dense references, on both backends (PyTorch path, Triton
interpreted), plus argument errors, memory bounds, and the torch.library registrations."""
import pytest
import torch
from accuracy import assert_accurate
from memory import LargestAllocation

import cosmos_fast
from cosmos_fast.ops.fused_linear import blocks, op
from cosmos_fast.ops.fused_linear.reference import fused_linear_bce_reference, fused_linear_cross_entropy_reference
from cosmos_fast.ops.fused_linear.triton_kernels import CONFIG_ENV_VAR

DTYPES = [torch.float32, torch.bfloat16]
IGNORE = -100


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def linear_leaves(N, H, V, with_bias=True):
    """float64 hidden [N, H], weight [V, H] (logits of a few units) and optionally bias [V]."""
    leaves = [randn(N, H, seed=1), randn(V, H, seed=2, scale=2 / H ** 0.5)]
    return leaves + [randn(V, seed=3, scale=0.5)] if with_bias else leaves


def ce_targets(N, V, ignored_every=3, seed=4):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, V, (N,), generator=g)
    if ignored_every:
        target[::ignored_every] = IGNORE
    return target


def ce_functions(target, with_bias, **kwargs):
    """(ours, reference) taking the linear leaves positionally."""
    def split(leaves):
        return leaves[0], leaves[1], dict(bias=leaves[2] if with_bias else None)

    def ours(*leaves):
        h, w, bias = split(leaves)
        return cosmos_fast.fused_linear_cross_entropy(h, w, target, **bias, **kwargs)

    def reference(*leaves):
        h, w, bias = split(leaves)
        return fused_linear_cross_entropy_reference(h, w, target, **bias, **kwargs)

    return ours, reference


def bce_functions(target, with_bias, **kwargs):
    def split(leaves):
        return leaves[0], leaves[1], dict(bias=leaves[2] if with_bias else None)

    def ours(*leaves):
        h, w, bias = split(leaves)
        return cosmos_fast.fused_linear_bce(h, w, target, **bias, **kwargs)

    def reference(*leaves):
        h, w, bias = split(leaves)
        return fused_linear_bce_reference(h, w, target, **bias, **kwargs)

    return ours, reference


def names(with_bias):
    return ["hidden", "weight", "bias"][: 3 if with_bias else 2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,V,alpha", [(20, 48, 1, 0.0), (20, 48, 37, 0.4), (20, 48, 37, 1.0), (33, 40, 1000, 0.0),
                                         (33, 40, 1000, 0.4)])
def test_cross_entropy(backend, N, H, V, alpha, dtype):
    with_bias = V != 37
    target = ce_targets(N, V)
    kwargs = dict(alpha=alpha)
    if alpha:
        kwargs["soft_logits"] = randn(N, V, seed=5, scale=2.0).float()
    ours, reference = ce_functions(target, with_bias, **kwargs)
    assert_accurate(ours, reference, linear_leaves(N, H, V, with_bias), dtype, names(with_bias), fp32_tail=0)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cross_entropy_reductions(backend, reduction):
    N, H, V = 17, 24, 53
    target = ce_targets(N, V, ignored_every=4)
    ours, reference = ce_functions(target, True, soft_logits=randn(N, V, seed=5).float(), alpha=0.3,
                                   reduction=reduction)
    assert_accurate(ours, reference, linear_leaves(N, H, V), torch.float32, names(True), fp32_tail=0)


def test_every_row_ignored_gives_zero_loss_and_zero_gradients(backend):
    h, w, b = (x.float().requires_grad_() for x in linear_leaves(6, 16, 37))
    target = torch.full((6,), IGNORE)
    loss = cosmos_fast.fused_linear_cross_entropy(h, w, target, bias=b, soft_logits=torch.randn(6, 37), alpha=0.5)
    loss.backward()
    assert loss.item() == 0.0
    for x in (h, w, b):
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_no_rows_at_all_gives_zero_loss_and_zero_gradients(backend):
    """A SIMLA batch in which no token was chosen passes hidden [0, H]: 0 (never NaN), and weight and bias still
    get their (zero) gradients, which DDP expects of every parameter."""
    h, w, b = (x.float().requires_grad_() for x in linear_leaves(6, 16, 37))
    empty = h[:0]
    for reduction, shape in (("mean", ()), ("sum", ()), ("none", (0,))):
        loss = cosmos_fast.fused_linear_cross_entropy(empty, w, torch.full((0,), IGNORE), bias=b,
                                                      soft_logits=torch.randn(0, 37), alpha=0.5, reduction=reduction)
        assert loss.shape == shape and loss.dtype == torch.float32 and torch.all(loss == 0)
    cosmos_fast.fused_linear_cross_entropy(empty, w, torch.full((0,), IGNORE), bias=b).backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_soft_logits_are_ignored_at_alpha_zero(backend):
    """As documented: at alpha = 0 soft_logits play no part, whatever their shape (they used to be refused when
    their row count was wrong); from alpha > 0 the same soft_logits are refused."""
    h, w = (x.float() for x in linear_leaves(12, 16, 29, with_bias=False))
    target = ce_targets(12, 29, ignored_every=3)
    plain = cosmos_fast.fused_linear_cross_entropy(h, w, target)
    for soft in (randn(5, 29, seed=6).float(), randn(12, 7, seed=6).float()):
        ignored = cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=soft, alpha=0.0)
        assert torch.equal(ignored, plain)
    with pytest.raises(ValueError, match="soft_logits must have N = 12 rows"):
        cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=randn(5, 29, seed=6).float(), alpha=0.1)
    weight = w.detach().requires_grad_()  # no rows: the BCE takes them as the cross-entropy does
    loss = cosmos_fast.fused_linear_bce(h.detach()[:0], weight, torch.zeros(0, 29))
    loss.backward()
    assert loss.item() == 0 and torch.equal(weight.grad, torch.zeros_like(weight))


def test_compact_soft_logits_equal_full_ones(backend):
    """soft_logits may hold one row per active row (the teacher evaluated at the masked positions only)."""
    N, H, V = 12, 16, 29
    h, w = (x.float() for x in linear_leaves(N, H, V, with_bias=False))
    target = ce_targets(N, V, ignored_every=3)
    soft = randn(N, V, seed=6).float()
    full = cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=soft, alpha=0.6)
    compact = cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=soft[target != IGNORE], alpha=0.6)
    torch.testing.assert_close(compact, full)
    with pytest.raises(ValueError, match="soft_logits must have N = 12 rows"):
        cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=soft[:5], alpha=0.6)


def test_cross_entropy_large_vocabulary(backend, monkeypatch):
    """BERT's vocabulary (V = 30522, split over programs; wide interpreter tiles keep it cheap) on a few rows."""
    monkeypatch.setenv(CONFIG_ENV_VAR, "16,2048,16,4,1")
    N, H, V = 5, 16, 30522
    ours, reference = ce_functions(ce_targets(N, V, ignored_every=0), True, soft_logits=randn(N, V, seed=5).float(),
                                   alpha=0.4)
    assert_accurate(ours, reference, linear_leaves(N, H, V), torch.float32, names(True), fp32_tail=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,V,bool_target,alpha", [(20, 48, 1, True, 0.4), (20, 48, 37, False, 0.0),
                                                     (17, 40, 1000, True, 0.0), (17, 40, 1000, False, 0.4)])
def test_bce(backend, N, H, V, bool_target, alpha, dtype):
    with_bias = V != 37
    g = torch.Generator().manual_seed(7)
    target = torch.rand(N, V, generator=g) < 0.2
    target = target if bool_target else target.to(dtype)
    kwargs = dict(alpha=alpha, soft_logits=randn(N, V, seed=5, scale=2.0).to(dtype)) if alpha else {}
    ours, reference = bce_functions(target, with_bias, **kwargs)
    assert_accurate(ours, reference, linear_leaves(N, H, V, with_bias), dtype, names(with_bias), fp32_tail=0)


def test_small_tiles_cross_every_loop(backend, monkeypatch):
    """Tiles far smaller than the problem: several row, vocabulary, split and hidden (K) blocks, and row blocks
    of the backward (BLOCK_ELEMENTS lowered) that do not align with the tiles."""
    monkeypatch.setenv(CONFIG_ENV_VAR, "16,16,16,4,1")
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 7 * 67)
    N, H, V = 21, 40, 67
    ours, reference = ce_functions(ce_targets(N, V, ignored_every=5), True, soft_logits=randn(N, V, seed=5).float(),
                                   alpha=0.5)
    assert_accurate(ours, reference, linear_leaves(N, H, V), torch.float32, names(True), fp32_tail=0)
    target = torch.rand(N, V, generator=torch.Generator().manual_seed(8)) < 0.1
    ours, reference = bce_functions(target, True, soft_logits=randn(N, V, seed=5).float(), alpha=0.5)
    assert_accurate(ours, reference, linear_leaves(N, H, V), torch.float32, names(True), fp32_tail=0)


def test_alpha_zero_ignores_soft_logits(backend):
    h, w = (x.float() for x in linear_leaves(9, 16, 21, with_bias=False))
    target = ce_targets(9, 21)
    soft = torch.randn(9, 21)
    hard = cosmos_fast.fused_linear_cross_entropy(h, w, target)
    torch.testing.assert_close(cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=soft), hard)
    assert not torch.equal(cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=soft, alpha=0.5), hard)


H16, W16 = torch.randn(4, 8), torch.randn(6, 8)
T4 = torch.tensor([0, 5, IGNORE, 2])
Y46 = torch.zeros(4, 6, dtype=torch.bool)


@pytest.mark.parametrize("call,error,words", [
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16[0], W16, T4), ValueError, "hidden must have 2 dimensions"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, torch.randn(6, 7), T4), ValueError, "weight must have shape [V, 8]"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16.double(), T4), TypeError, "weight has dtype"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16.to("meta"), T4), ValueError, "weight is on meta"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16.long(), W16, T4), TypeError, "hidden must be a floating-point"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4, bias=torch.randn(5)), ValueError, "bias must have shape [6]"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4.int()), TypeError, "target must be an int64"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4[:3]), ValueError, "target must have shape [4]"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, torch.tensor([0, 6, 1, 1])), ValueError,
     "target values must be in [0, 6)"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4, alpha=0.5), ValueError, "alpha > 0 needs soft targets"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4, soft_logits=torch.randn(4, 6), alpha=1.5),
     ValueError, "alpha must be in [0, 1]"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4, soft_logits=torch.randn(4, 5), alpha=0.5),
     ValueError, "soft_logits must have shape"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4, soft_logits=torch.ones(4, 6, dtype=torch.long),
                                                    alpha=0.5), TypeError, "soft_logits must be a floating-point"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: cosmos_fast.fused_linear_cross_entropy(H16, W16, T4, ignore_index=-1.0), TypeError, "ignore_index must be an int"),
    (lambda: cosmos_fast.fused_linear_bce(H16, W16, Y46.long()), TypeError, "target must be a bool or floating-point"),
    (lambda: cosmos_fast.fused_linear_bce(H16, W16, Y46[:, :5]), ValueError, "target must have shape [4, 6]"),
    (lambda: cosmos_fast.fused_linear_bce(H16, W16, Y46, alpha=0.2), ValueError, "alpha > 0 needs soft targets"),
    (lambda: cosmos_fast.fused_linear_bce(H16, W16, Y46, soft_logits=torch.randn(3, 6), alpha=0.2), ValueError,
     "soft_logits must have shape [4, 6]"),
    (lambda: cosmos_fast.fused_linear_bce(H16, W16, Y46, soft_logits=torch.randn(4, 6), alpha=-0.1), ValueError,
     "alpha must be in [0, 1]"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def test_no_n_by_v_buffer(backend, monkeypatch):
    """Every tensor created in forward and backward stays within the block bound, far below N x V logits."""
    N, H, V = 256, 8, 256  # the [V, H] weight gradient stays below the block bound
    budget = N * V // 16
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(blocks, "PASS_ELEMENTS", budget)
    h, w, b = (x.float().requires_grad_() for x in linear_leaves(N, H, V))
    target = ce_targets(N, V, ignored_every=0)
    multi_hot = torch.rand(N, V) < 0.05
    soft = torch.randn(N, V)
    with LargestAllocation() as mode:
        loss = cosmos_fast.fused_linear_cross_entropy(h, w, target, bias=b, soft_logits=soft, alpha=0.5)
        loss = loss + cosmos_fast.fused_linear_bce(h, w, multi_hot, bias=b)
        loss.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert mode.largest <= 4 * budget, f"largest tensor has {mode.largest} bytes; N x V fp32 = {4 * N * V}"
    assert mode.largest >= budget, "the blocks were not seen: this test would not catch an N x V buffer"


def _opcheck_inputs(with_bias, soft):
    N, H, V = 6, 16, 11
    h, w, b = (x.float() for x in linear_leaves(N, H, V))
    return h.requires_grad_(), w.requires_grad_(), (b.requires_grad_() if with_bias else None), \
        (torch.randn(N, V) if soft else None)


@pytest.mark.parametrize("with_bias,soft", [(False, False), (True, True)], ids=["hard", "bias+soft"])
def test_opcheck(backend, with_bias, soft):
    h, w, b, soft_logits = _opcheck_inputs(with_bias, soft)
    alpha = 0.3 if soft else 0.0
    target = torch.tensor([1, IGNORE, 0, 10, IGNORE, 4])
    fwd_args = (h, w, b, target, soft_logits, alpha, IGNORE)
    torch.library.opcheck(op.fused_linear_ce_fwd, fwd_args)
    loss, lse, soft_lse = op.fused_linear_ce_fwd(*fwd_args)
    detached = (h.detach(), w.detach(), None if b is None else b.detach())
    torch.library.opcheck(op.fused_linear_ce_bwd, (torch.rand_like(loss), *detached, target, soft_logits, alpha,
                                                    IGNORE, lse, soft_lse, True, True, with_bias))
    multi_hot = torch.rand(6, 11) < 0.3
    torch.library.opcheck(op.fused_linear_bce_fwd, (h, w, b, multi_hot, soft_logits, alpha))
    torch.library.opcheck(op.fused_linear_bce_bwd, (torch.rand(6), *detached, multi_hot, soft_logits, alpha,
                                                     True, False, with_bias))


def test_compiles_without_graph_breaks(backend):
    h, w, b, soft_logits = _opcheck_inputs(True, True)
    target = torch.tensor([1, IGNORE, 0, 10, IGNORE, 4])
    multi_hot = torch.rand(6, 11) < 0.3

    def step(h, w, b):
        return cosmos_fast.fused_linear_cross_entropy(h, w, target, bias=b, soft_logits=soft_logits, alpha=0.4) + \
            cosmos_fast.fused_linear_bce(torch.tanh(h), w, multi_hot, soft_logits=soft_logits, alpha=0.4)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # the custom ops
    loss = compiled(h, w, b)
    eager_loss = step(h, w, b)  # the eager autograd.Functions
    torch.testing.assert_close(loss, eager_loss)
    grads = torch.autograd.grad(loss, (h, w, b))
    for g, eager_g in zip(grads, torch.autograd.grad(eager_loss, (h, w, b))):
        torch.testing.assert_close(g, eager_g)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_module_is_cross_entropy_of_a_linear_head(backend, reduction):
    """The module against PyTorch's own nn.CrossEntropyLoss of nn.Linear's output (float64 the reference)."""
    N, H, V = 13, 24, 41
    target = ce_targets(N, V, ignored_every=4)
    module = cosmos_fast.nn.FusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction=reduction)
    dense = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, reduction=reduction)
    assert_accurate(lambda h, w, b: module(h, w, target, bias=b),
                    lambda h, w, b: dense(torch.nn.functional.linear(h, w, b), target),
                    linear_leaves(N, H, V), torch.float32, names(True), fp32_tail=0)


def test_bce_module_is_bce_of_a_linear_head_summed_over_labels(backend):
    """The module against V x PyTorch's nn.BCEWithLogitsLoss (a mean over N x V) of nn.Linear's output."""
    N, H, V = 11, 24, 29
    target = torch.rand(N, V, generator=torch.Generator().manual_seed(6)) < 0.2
    dense = torch.nn.BCEWithLogitsLoss()
    assert_accurate(lambda h, w, b: cosmos_fast.nn.FusedLinearBCELoss()(h, w, target, bias=b),
                    lambda h, w, b: V * dense(torch.nn.functional.linear(h, w, b), target.to(h.dtype)),
                    linear_leaves(N, H, V), torch.float32, names(True), fp32_tail=0)


def test_modules_pass_soft_targets_and_hold_no_state():
    h, w = linear_leaves(9, 16, 21, with_bias=False)
    target, soft, keywords = ce_targets(9, 21), randn(9, 21, seed=7), randn(9, 21, seed=8) > 1
    ce = cosmos_fast.nn.FusedLinearCrossEntropyLoss(reduction="sum")
    assert torch.equal(ce(h, w, target, soft_logits=soft, alpha=0.3),
                       cosmos_fast.fused_linear_cross_entropy(h, w, target, soft_logits=soft, alpha=0.3, reduction="sum"))
    bce = cosmos_fast.nn.FusedLinearBCELoss()
    assert torch.equal(bce(h, w, keywords, soft_logits=soft, alpha=0.3),
                       cosmos_fast.fused_linear_bce(h, w, keywords, soft_logits=soft, alpha=0.3))
    assert not list(ce.parameters()) and not ce.state_dict() and not bce.state_dict()
    assert repr(ce) == "FusedLinearCrossEntropyLoss(ignore_index=-100, reduction='sum')"


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(ignore_index=-1.0), TypeError, "ignore_index must be an int, got float"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an int, got bool"),
])
def test_cross_entropy_module_refuses_bad_settings_when_built(kwargs, error, words):
    with pytest.raises(error, match=words):
        cosmos_fast.nn.FusedLinearCrossEntropyLoss(**kwargs)
