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
    # A zero reference (N = 1 has zero gradients) is compared by absolute error.
    scale = ref.norm().item()
    return (x - ref).norm().item() / (scale if scale > 1e-12 else 1.0)


def run(fn, leaves):
    """Loss and the gradients of every leaf (None where a leaf gets none)."""
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    return loss, grads


def assert_accurate(fast, naive, leaves64, dtype, names):
    """fast(*leaves) and naive(*leaves) are computed from the leaves cast to ``dtype``; the reference is naive in fp64.

    The last leaf is the scale: it stays fp32 in the low-precision runs, as a model's logit_scale parameter does.
    """
    def cast(leaves):
        return [x.to(dtype) for x in leaves[:-1]] + [leaves[-1].float()]

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
