"""Contrastive loss forward + backward: cosmos_fast against its peers, side by side in one run.

Cases (``kernels.md``, "Numbers to beat"), D = 512:
- "clip": the symmetric CLIP loss of a [N, D] vs b [N, D] with a learnable scale. Peers: the dense PyTorch
  loss (``contrastive_loss_reference`` in the input dtype), ``torch.compile`` of it, and Inf-CL when installed.
- "cosmos80": the COSMOS objective, 80 logit matrices: image [2, N, D] x text [8, N, D] plus
  [X_img; X_txt] [16, N, D] x detached [T_img; T_txt] [4, N, D], through ``cosmos_fast.nn.CosmosLoss``; peer:
  the eager per-pair loop of upstream COSMOS (one dense matrix per pair).
Before timing, cosmos_fast is checked against the float64 dense reference (loss and every gradient); where
an error is NaN or above tolerance, or the check raises, cosmos_fast is not timed in that case and dtype, the
peers still are, and the script exits with status 1. Results: ``benchmarks/results/contrastive.{json,png}``.

Usage: python benchmarks/bench_contrastive.py [--quick] [--smoke]
"""
from __future__ import annotations

import math
import sys
import traceback

import torch
import torch.nn.functional as F

from common import (DEVICE, FEW_REPETITIONS, bench_args, device_name, exit_status, free_memory, mark_goal, measure,
                    plot, print_table, require_device, save_results)

import cosmos_fast
from cosmos_fast.nn import CosmosLoss
from cosmos_fast.ops.contrastive.reference import contrastive_loss_reference, multiview_contrastive_loss_reference

NAME = "contrastive"
D = 512
SCALE = 1 / 0.07
SIZES = {"clip": (4096, 8192, 16384, 32768, 65536, 131072), "cosmos80": (4096, 16384)}
QUICK_SIZES = {"clip": (4096, 16384), "cosmos80": (4096,)}
SMOKE_SIZES = {"clip": (64, 128), "cosmos80": (32,)}
# Views of the CosmosLoss inputs: 2 x 8 CLIP pairs + (8 + 8) x (2 + 2) distillation pairs = 80 matrices.
COSMOS_VIEWS = {"image": 2, "text": 8, "cross_image": 8, "cross_text": 8, "teacher_image": 2, "teacher_text": 2}
COSMOS_PAIRS = 2 * 8 + 16 * 4
CHECK_N = {"clip": 4096, "cosmos80": 1024}  # 80 float64 matrices at N = 4096 would take tens of GiB
SMOKE_CHECK_N = {"clip": 64, "cosmos80": 32}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
# (case, N) -> (ms, GiB) that cosmos_fast must reach on one H100.
GOALS = {
    ("clip", 16384): (3.0, 0.1),
    ("clip", 65536): (40.0, 0.5),
    ("clip", 131072): (160.0, 1.0),
    ("cosmos80", 4096): (8.0, 0.2),
    ("cosmos80", 16384): (100.0, 1.0),
}


def features(shape, dtype, requires_grad=True, device=DEVICE):
    """L2-normalised random features, as the towers hand them to the loss."""
    return F.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype).requires_grad_(requires_grad)


def make_scale(device=DEVICE):
    return torch.tensor(SCALE, dtype=torch.float32, device=device, requires_grad=True)


def clip_inputs(n, dtype, device=DEVICE):
    return features((n, D), dtype, device=device), features((n, D), dtype, device=device), make_scale(device)


def cosmos_inputs(n, dtype, device=DEVICE):
    views = [features((v, n, D), dtype, not name.startswith("teacher"), device) for name, v in COSMOS_VIEWS.items()]
    return (*views, make_scale(device), make_scale(device))


INPUTS = {"clip": clip_inputs, "cosmos80": cosmos_inputs}
INPUT_NAMES = {"clip": ("a", "b", "scale"), "cosmos80": (*COSMOS_VIEWS, "logit_scale", "distill_logit_scale")}


def cosmos_loss(*inputs):
    return CosmosLoss()(*inputs).total


def cosmos_loss_reference(image, text, cross_image, cross_text, teacher_image, teacher_text, scale, distill_scale):
    """Upstream COSMOS: one dense matrix per view pair, 80 in all."""
    clip = multiview_contrastive_loss_reference(image, text, scale)
    students = torch.cat([cross_image, cross_text])
    teachers = torch.cat([teacher_image, teacher_text]).detach()
    return clip + multiview_contrastive_loss_reference(students, teachers, distill_scale)


REFERENCE = {"clip": contrastive_loss_reference, "cosmos80": cosmos_loss_reference}
OURS = {"clip": cosmos_fast.contrastive_loss, "cosmos80": cosmos_loss}


def inf_cl_loss():
    """Inf-CL's symmetric loss (its two directions, halved), or the reason it cannot run here."""
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:  # not installed, or built against another torch/triton
        return None, f"Inf-CL skipped: cannot import inf_cl ({type(exc).__name__}: {exc})"

    def loss(a, b, scale):
        return 0.5 * (cal_inf_loss(a, b, scale=scale) + cal_inf_loss(b, a, scale=scale))

    return loss, None


def implementations(case, inf_cl, smoke):
    """(impl, dtype, loss, dense) for every peer of ``case``; dense ones build N x N matrices. A smoke run leaves
    out the compiled peer (compiling costs minutes on a CPU)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    if case == "cosmos80":
        return [("cosmos_fast", bf16, OURS[case], False), ("eager per-pair", bf16, REFERENCE[case], True)]
    impls = [
        ("cosmos_fast", bf16, OURS[case], False),
        ("cosmos_fast", fp32, OURS[case], False),
        ("naive", bf16, REFERENCE[case], True),
        ("naive", fp32, REFERENCE[case], True),
    ]
    if not smoke:  # specialised per N: dynamic shapes would cost the compiled peer speed
        impls.append(("torch.compile naive", bf16, torch.compile(REFERENCE[case], dynamic=False), True))
    if inf_cl is not None and DEVICE == "cuda":  # Triton kernels, no CPU path
        impls.append(("inf-cl", fp32, inf_cl, False))  # Inf-CL computes in fp32
    return impls


def dense_bytes(case, n, dtype):
    """Rough peak of the dense peers: logits, probabilities and their gradients, N x N each."""
    matrix = n * n * torch.finfo(dtype).bits // 8
    if case == "clip":
        return 4 * matrix
    return 2 * COSMOS_PAIRS * matrix  # autograd keeps every pair's logits and probabilities until backward


def fwd_bwd(loss_fn):
    """Forward and backward; gradients are returned, not accumulated, so every call does the same work."""
    def run(*inputs):
        return torch.autograd.grad(loss_fn(*inputs), [x for x in inputs if x.requires_grad])

    return run


def relative_error(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def errors_against(loss_fn, inputs, names, ref_loss, ref_grads):
    """Relative Frobenius error of the loss and of each input gradient, keyed "loss", "grad_<name>"."""
    wrt = [i for i, x in enumerate(inputs) if x.requires_grad]
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, [inputs[i] for i in wrt])
    errors = {"loss": relative_error(loss, ref_loss)}
    errors.update({f"grad_{names[i]}": relative_error(g, r) for i, g, r in zip(wrt, grads, ref_grads)})
    return errors


def check(case, dtype, n):
    """cosmos_fast (and, for context, the dense loss in the same dtype) against the float64 dense reference
    with ``n`` rows.

    A check that raises is recorded as failed, with the error, so that every check gets reported.
    """
    tol = TOLERANCE[dtype]
    result = {"case": case, "N": n, "dtype": DTYPE_NAMES[dtype], "tolerance": tol, "passed": False,
              "errors": {}, "naive_errors": {}}
    try:
        inputs = INPUTS[case](n, dtype)
        inputs64 = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
        ref_loss = REFERENCE[case](*inputs64)
        ref_grads = torch.autograd.grad(ref_loss, [x for x in inputs64 if x.requires_grad])
        names = INPUT_NAMES[case]
        result["naive_errors"] = errors_against(REFERENCE[case], inputs, names, ref_loss, ref_grads)
        result["errors"] = errors_against(OURS[case], inputs, names, ref_loss, ref_grads)
    except Exception as exc:
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        return result
    result["passed"] = all(math.isfinite(e) and e <= tol for e in result["errors"].values())
    return result


def run_checks(check_n):
    checks = []
    for case, dtype in (("clip", torch.bfloat16), ("clip", torch.float32), ("cosmos80", torch.bfloat16)):
        c = check(case, dtype, check_n[case])
        free_memory()
        checks.append(c)
        errors = ", ".join(f"{k} {v:.2e}" for k, v in c["errors"].items()) or c.get("error")
        naive = ", ".join(f"{k} {v:.2e}" for k, v in c["naive_errors"].items())
        verdict = "ok" if c["passed"] else "FAILED"
        print(f"check {c['case']} {c['dtype']} N={c['N']} (tolerance {c['tolerance']:g}): {verdict}\n"
              f"    cosmos_fast: {errors}\n    naive {c['dtype']}:  {naive}", flush=True)
    return checks


def with_goal(row):
    return row if row["impl"] != "cosmos_fast" else mark_goal(row, GOALS.get((row["case"], row["N"])))


def main():
    args = bench_args(__doc__.splitlines()[0]).parse_args()
    require_device("bench_contrastive", args)
    torch.manual_seed(0)
    timing = FEW_REPETITIONS if args.quick or args.smoke else {}
    sizes = SMOKE_SIZES if args.smoke else QUICK_SIZES if args.quick else SIZES
    # about 75 GiB on an 80 GB H100
    dense_limit = 0.95 * torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else math.inf

    inf_cl, note = inf_cl_loss()
    notes = [note] if note else []
    for line in notes:
        print(line)
    checks = run_checks(SMOKE_CHECK_N if args.smoke else CHECK_N)
    # cosmos_fast is not timed where it computes the wrong thing; its peers still are.
    failed_checks = {(c["case"], c["dtype"]) for c in checks if not c["passed"]}
    meta = {"D": D, "quick": args.quick, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "checks": checks, "notes": notes}

    rows = []
    for case, ns in sizes.items():
        impls = implementations(case, inf_cl, args.smoke)  # once per case: the compiled peer keeps its cache across N
        for n in ns:
            for impl, dtype, loss_fn, dense in impls:
                row = {"case": case, "impl": impl, "dtype": DTYPE_NAMES[dtype], "N": n}
                if impl == "cosmos_fast" and (case, row["dtype"]) in failed_checks:
                    row.update(ms=None, peak_gib=None, reps=0, status="skipped (check failed)")
                elif dense and dense_bytes(case, n, dtype) > dense_limit:
                    row.update(ms=None, peak_gib=None, reps=0, status="skipped (oom)")
                else:
                    row.update(measure(fwd_bwd(loss_fn), lambda: INPUTS[case](n, dtype), **timing))
                rows.append(row if args.smoke else with_goal(row))  # goals are for the real sizes
                ms = "-" if row["ms"] is None else f"{row['ms']:.3f} ms"
                gib = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.3f} GiB"
                print(f"{case} N={n} {impl} {row['dtype']}: {ms}, {gib} ({row['status']})", flush=True)
                save_results(NAME, rows, meta)  # a run cut short still leaves what it measured

    path = save_results(NAME, rows, meta)
    device = device_name()
    plot(NAME, rows, x="N", y=("ms", "peak_gib"), series=("case", "impl", "dtype"),
         title=f"contrastive loss fwd+bwd, D={D}, {device}")
    print(f"\nResults: {path}\n")
    print_table(rows, ["case", "N", "impl", "dtype", "ms", ("peak_gib", "GiB"), "status", "goal", "met"])
    return exit_status("bench_contrastive", rows, [f"{case} {dtype}" for case, dtype in sorted(failed_checks)])


if __name__ == "__main__":
    sys.exit(main())
