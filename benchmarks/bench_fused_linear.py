"""Fused linear + CE / BCE forward + backward: cosmos_fast against its peers, side by side in one run.

SIMLA's three vocabulary heads (``psd_simla.md``), bf16, each with hard targets (alpha = 0) and SIMLA's mix
with the momentum model's soft targets (alpha = 0.4):
- "xmm-text": masked-token CE, 768 -> 30522 (BERT's vocabulary) over 512 x 25 token rows, 15% of them masked
  (the others carry ignore_index);
- "xmm-image": masked-patch CE, 768 -> 8192 (visual tokens) over the same rows and mask rate;
- "psl": keyword BCE, 256 -> 30522 over 512 image embeddings, 5 keywords per row.
Peers: the dense PyTorch loss (``reference.py`` in bf16: all N x V logits, as upstream), ``torch.compile`` of
it, PyTorch's own chunked ``torch.nn.functional.linear_cross_entropy`` (torch 2.13+, with
``LinearCrossEntropyOptions``; hard CE) and Liger-Kernel's LigerFusedLinearCrossEntropyLoss (hard CE only; it has
no soft targets or BCE) where they are there. Soft targets are teacher logits [N, V] for every implementation (upstream's layout). Before timing,
cosmos_fast is checked against the float64 dense reference (loss and every gradient) on fewer rows; where that
fails, cosmos_fast is not timed for that case, the peers still are, and the script exits with status 1.
``floor_ms`` is the bf16 matrix-product floor of the active rows' three products (logits, dX, dW) at
747 TFLOP/s. Results: ``benchmarks/results/fused_linear.{json,png}``.

Usage: python benchmarks/bench_fused_linear.py [--quick] [--smoke]
"""
from __future__ import annotations

import math
import sys
import traceback

import torch

from common import (DEVICE, FEW_REPETITIONS, bar_plot, bench_args, device_name, exit_status, free_memory, measure,
                    print_table, require_device, save_results)

import cosmos_fast
from cosmos_fast.ops.fused_linear.reference import fused_linear_bce_reference, fused_linear_cross_entropy_reference

NAME = "fused_linear"
IGNORE = -100
ALPHAS = (0.0, 0.4)
MATMUL_TFLOPS = 747.0  # H100 bf16 dense
# case -> (loss kind, H, V, rows, fraction of rows that are active)
CASES = {
    "xmm-text": ("ce", 768, 30522, 512 * 25, 0.15),
    "xmm-image": ("ce", 768, 8192, 512 * 25, 0.15),
    "psl": ("bce", 256, 30522, 512, 1.0),
}
QUICK_CASES = ("xmm-text", "psl")
SMOKE_CASES = {"xmm-text": ("ce", 32, 300, 64, 0.15), "psl": ("bce", 16, 300, 16, 1.0)}
CHECK_ROWS = 2048  # rows of the float64 check (the full logits in float64 are 8 bytes each)
KEYWORDS = 5
TOLERANCE = 2e-2  # bf16 inputs
DTYPE = torch.bfloat16


def make_inputs(spec, rows, alpha, dtype=DTYPE):
    """(hidden, weight, bias, target, soft_logits or None) for a case's ``spec`` (a value of CASES), fresh random:
    logits of a few units."""
    kind, H, V, _, active = spec
    hidden = torch.randn(rows, H, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, device=DEVICE) * (2 / H ** 0.5)).to(dtype).requires_grad_()
    bias = (0.5 * torch.randn(V, device=DEVICE)).to(dtype).requires_grad_()
    if kind == "ce":
        target = torch.randint(0, V, (rows,), device=DEVICE)
        target = torch.where(torch.rand(rows, device=DEVICE) < active, target, torch.full_like(target, IGNORE))
    else:
        keywords = torch.randint(0, V, (rows, KEYWORDS), device=DEVICE)
        target = torch.zeros(rows, V, dtype=torch.bool, device=DEVICE).scatter_(1, keywords, True)
    soft = (2 * torch.randn(rows, V, device=DEVICE)).to(dtype) if alpha else None
    return hidden, weight, bias, target, soft


def ours(kind, alpha):
    if kind == "ce":
        return lambda h, w, b, t, s: cosmos_fast.fused_linear_cross_entropy(h, w, t, bias=b, soft_logits=s, alpha=alpha)
    return lambda h, w, b, t, s: cosmos_fast.fused_linear_bce(h, w, t, bias=b, soft_logits=s, alpha=alpha)


def naive(kind, alpha):
    if kind == "ce":
        return lambda h, w, b, t, s: fused_linear_cross_entropy_reference(h, w, t, bias=b, soft_logits=s, alpha=alpha)
    return lambda h, w, b, t, s: fused_linear_bce_reference(h, w, t, bias=b, soft_logits=s, alpha=alpha)


def liger_loss():
    """Liger-Kernel's fused linear CE with our argument order, or the reason it cannot run here."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # not installed, or built against another torch/triton
        return None, f"Liger-Kernel skipped: cannot import liger_kernel ({type(exc).__name__}: {exc})"
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return (lambda h, w, b, t, s: loss_fn(w, h, t, b)), None


def torch_chunked_loss():
    """PyTorch's chunked linear cross-entropy with our argument order, or the reason it is not there."""
    function = getattr(torch.nn.functional, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if function is None or options is None:
        return None, f"torch linear_cross_entropy skipped: torch {torch.__version__} has no chunked one (2.13+)"
    return (lambda h, w, b, t, s: function(h, w, t, linear_bias=b, ignore_index=IGNORE, options=options())), None


def implementations(kind, alpha, liger, smoke, torch_chunked=None):
    """(impl, loss) for every peer of one case and alpha (a smoke run leaves out the compiled peer: compiling
    costs minutes on a CPU)."""
    impls = [("cosmos_fast", ours(kind, alpha)), ("naive", naive(kind, alpha))]
    if not smoke:  # specialised per shape: dynamic shapes would cost the compiled peer speed
        impls.append(("torch.compile naive", torch.compile(naive(kind, alpha), dynamic=False)))
    if liger is not None and kind == "ce" and alpha == 0.0 and DEVICE == "cuda":  # Triton kernels, no CPU path
        impls.append(("liger", liger))
    if torch_chunked is not None and kind == "ce" and alpha == 0.0:
        impls.append(("torch linear_cross_entropy", torch_chunked))
    return impls


def fwd_bwd(loss_fn):
    """Forward and backward; gradients are returned, not accumulated, so every call does the same work."""
    def run(*inputs):
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        return torch.autograd.grad(loss_fn(*inputs), leaves)

    return run


def active_rows(spec, inputs):
    kind, *_ = spec
    target = inputs[3]
    return int((target != IGNORE).sum()) if kind == "ce" else target.shape[0]


def floor_ms(spec, n_active):
    _, H, V, _, _ = spec
    return 3 * 2 * n_active * H * V / (MATMUL_TFLOPS * 1e12) * 1e3


def relative_error(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def errors_against(loss_fn, inputs, ref_loss, ref_grads):
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, list(inputs[:3]))
    errors = {"loss": relative_error(loss, ref_loss)}
    errors.update({f"grad_{name}": relative_error(g, r) for name, g, r in zip(("hidden", "weight", "bias"), grads,
                                                                               ref_grads)})
    return errors


def check(case, spec, alpha):
    """cosmos_fast (and, for context, the dense loss in bf16) against the float64 dense reference.

    A check that raises is recorded as failed, with the error, so that every check gets reported."""
    kind = spec[0]
    rows = min(CHECK_ROWS, spec[3])
    result = {"case": case, "alpha": alpha, "rows": rows, "tolerance": TOLERANCE, "passed": False, "errors": {},
              "naive_errors": {}}
    try:
        inputs = make_inputs(spec, rows, alpha)
        inputs64 = [x.detach().double().requires_grad_() for x in inputs[:3]] + [inputs[3], inputs[4]]
        ref_loss = naive(kind, alpha)(*inputs64)
        ref_grads = torch.autograd.grad(ref_loss, inputs64[:3])
        result["naive_errors"] = errors_against(naive(kind, alpha), inputs, ref_loss, ref_grads)
        result["errors"] = errors_against(ours(kind, alpha), inputs, ref_loss, ref_grads)
    except Exception as exc:
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        return result
    result["passed"] = all(math.isfinite(e) and e <= TOLERANCE for e in result["errors"].values())
    return result


def run_checks(cases):
    checks = []
    for case, spec in cases.items():
        for alpha in ALPHAS:
            c = check(case, spec, alpha)
            free_memory()
            checks.append(c)
            errors = ", ".join(f"{k} {v:.2e}" for k, v in c["errors"].items()) or c.get("error")
            naive_errors = ", ".join(f"{k} {v:.2e}" for k, v in c["naive_errors"].items())
            verdict = "ok" if c["passed"] else "FAILED"
            print(f"check {case} alpha={alpha} rows={c['rows']} (tolerance {TOLERANCE:g}): {verdict}\n"
                  f"    cosmos_fast: {errors}\n    naive bf16:  {naive_errors}", flush=True)
    return checks


def main():
    args = bench_args(__doc__.splitlines()[0]).parse_args()
    require_device("bench_fused_linear", args)
    torch.manual_seed(0)
    timing = FEW_REPETITIONS if args.quick or args.smoke else {}
    cases = SMOKE_CASES if args.smoke else {k: CASES[k] for k in QUICK_CASES} if args.quick else CASES

    liger, note = liger_loss()
    torch_chunked, torch_note = torch_chunked_loss()
    notes = [n for n in (note, torch_note) if n]
    for line in notes:
        print(line)
    checks = run_checks(cases)
    failed_checks = {(c["case"], c["alpha"]) for c in checks if not c["passed"]}
    meta = {"dtype": "bf16", "quick": args.quick, "cases": {k: dict(zip(("loss", "H", "V", "rows", "active"), v))
                                                             for k, v in cases.items()},
            "checks": checks, "notes": notes}

    rows = []
    for case, spec in cases.items():
        kind, H, V, n_rows, _ = spec
        for alpha in ALPHAS:
            n_active = active_rows(spec, make_inputs(spec, n_rows, 0.0))
            for impl, loss_fn in implementations(kind, alpha, liger, args.smoke, torch_chunked):
                row = {"case": case, "alpha": alpha, "impl": impl, "dtype": "bf16", "H": H, "V": V, "rows": n_rows,
                       "active_rows": n_active, "floor_ms": floor_ms(spec, n_active)}
                if impl == "cosmos_fast" and (case, alpha) in failed_checks:
                    row.update(ms=None, peak_gib=None, reps=0, status="skipped (check failed)")
                else:
                    row.update(measure(fwd_bwd(loss_fn), lambda: make_inputs(spec, n_rows, alpha), **timing))
                rows.append(row)
                ms = "-" if row["ms"] is None else f"{row['ms']:.3f} ms"
                gib = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.3f} GiB"
                print(f"{case} alpha={alpha} {impl}: {ms}, {gib} ({row['status']})", flush=True)
                save_results(NAME, rows, meta)  # a run cut short still leaves what it measured

    path = save_results(NAME, rows, meta)
    bar_plot(NAME, rows, label=("case", "alpha", "impl"), values=("ms", "peak_gib"),
             title=f"fused linear + CE/BCE fwd+bwd, bf16, {device_name()}")
    print(f"\nResults: {path}\n")
    print_table(rows, ["case", "alpha", "impl", "active_rows", "V", "ms", ("floor_ms", "floor"), ("peak_gib", "GiB"),
                       "status"])
    return exit_status("bench_fused_linear", rows, [f"{case} alpha={alpha}" for case, alpha in sorted(failed_checks)])


if __name__ == "__main__":
    sys.exit(main())
