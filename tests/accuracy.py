"""The accuracy rule of kernels.md, shared by the CPU and GPU tests.

A fast path passes when its error against the float64 reference (relative Frobenius norm) is at most
2x (forward) / 3x (gradients) the error of the plain PyTorch implementation in the same input dtype,
plus a small floor; fp32 must stay far under 1e-4; NaN or Inf never passes.
"""
import torch

# Absolute floors, for errors against references that are (near) zero, e.g. the zero gradients of N = 1.
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 5e-5, torch.float16: 5e-5}
FP32_LIMIT = 1e-5


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return float("inf")
    # A zero reference (N = 1, or a single key, has zero gradients) is compared by the RMS of the error.
    scale = ref.norm().item()
    return (x - ref).norm().item() / (scale if scale > 1e-12 else max(ref.numel(), 1) ** 0.5)


def run(fn, leaves):
    """Output and the gradients of every leaf. A non-scalar output is back-propagated with a fixed random
    upstream gradient (the same values for every implementation)."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    out = fn(*leaves)
    upstream = None
    if out.dim() > 0:
        g = torch.Generator().manual_seed(0)
        upstream = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out, grads


def assert_accurate(fast, naive, leaves64, dtype, names, fp32_tail=1):
    """fast(*leaves) and naive(*leaves) are computed from the leaves cast to ``dtype``; the reference is naive in fp64.

    The last ``fp32_tail`` leaves (a loss's scale) stay fp32 in the low-precision runs, as a model's logit_scale
    parameter does.
    """
    def cast(leaves):
        head = len(leaves) - fp32_tail
        return [x.to(dtype) for x in leaves[:head]] + [x.float() for x in leaves[head:]]

    ref_loss, ref_grads = run(naive, leaves64)
    fast_loss, fast_grads = run(fast, cast(leaves64))
    naive_loss, naive_grads = run(naive, cast(leaves64))
    report = []
    checks = [("fwd", "loss", fast_loss, naive_loss, ref_loss)]
    checks += [("grad", f"d{n}", f, nv, r) for n, f, nv, r in zip(names, fast_grads, naive_grads, ref_grads)]
    for kind, name, f, nv, r in checks:
        err, budget_base = rel_err(f, r), rel_err(nv, r)
        factor = 2.0 if kind == "fwd" else 3.0
        budget = factor * budget_base + FLOOR[dtype]
        report.append(f"{name}: {err:.2e} (naive {budget_base:.2e})")
        assert err <= budget, f"{name}: error {err:.3e} > budget {budget:.3e}; " + "; ".join(report)
        if dtype == torch.float32:
            assert err < FP32_LIMIT, f"{name}: fp32 error {err:.3e} >= {FP32_LIMIT}; " + "; ".join(report)
    return report
