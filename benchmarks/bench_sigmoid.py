"""Sigmoid (SigLIP) loss forward + backward: cosmos_fast against its peers, side by side in one run.

Case: the SigLIP loss of image [N, D] against text [N, D] with a learnable scale and bias, D = 512. Peers:
open_clip's ``SigLipLoss`` (dense: every N x N logit matrix, kept for the backward; open_clip 3.x has no chunked
option), the dense PyTorch loss (``sigmoid_loss_reference`` in the input dtype) and ``torch.compile`` of it.
Before timing, cosmos_fast is checked against the float64 dense reference (loss and every gradient); where an
error is NaN or above tolerance, or the check raises, cosmos_fast is not timed in that dtype, the peers still
are, and the script exits with status 1. Results: ``benchmarks/results/sigmoid.{json,png}``.

Usage: python benchmarks/bench_sigmoid.py [--quick] [--smoke]
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
from cosmos_fast.ops.sigmoid.reference import sigmoid_loss_reference

NAME = "sigmoid"
D = 512
SIZES = (16384, 65536, 131072)
QUICK_SIZES = (16384, 65536)
SMOKE_SIZES = (64, 160)
CHECK_N, SMOKE_CHECK_N = 4096, 64
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}
# N -> (ms, GiB) cosmos_fast must reach on one H100/H200, bf16 (issue 22)
GOALS = {65536: (30.0, 0.5), 131072: (120.0, 1.0)}


def inputs(n, dtype, device=DEVICE):
    """Normalised image and text features (text near its image, as trained towers give them), SigLIP's scale and
    bias (fp32 parameters)."""
    image = F.normalize(torch.randn(n, D, device=device), dim=-1)
    text = F.normalize(image + 0.6 * F.normalize(torch.randn(n, D, device=device), dim=-1), dim=-1)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_(), scale, bias


def open_clip_loss():
    """open_clip's SigLipLoss, or the reason it cannot run here."""
    try:
        from open_clip.loss import SigLipLoss
    except Exception as exc:
        return None, f"open_clip SigLipLoss skipped: {type(exc).__name__}: {exc}"
    return SigLipLoss(), None


def implementations(open_clip, smoke):
    """(impl, dtype, loss, dense) per peer; dense ones build N x N matrices. A smoke run leaves out the compiled
    peer (compiling costs minutes on a CPU)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    impls = [("cosmos_fast", bf16, cosmos_fast.sigmoid_loss, False),
             ("cosmos_fast", fp32, cosmos_fast.sigmoid_loss, False),
             ("naive", bf16, sigmoid_loss_reference, True)]
    if open_clip is not None:
        impls.append(("open_clip SigLipLoss", bf16, open_clip, True))
    if not smoke:
        impls.append(("torch.compile naive", bf16, torch.compile(sigmoid_loss_reference, dynamic=False), True))
    return impls


def dense_bytes(n, dtype):
    """Rough peak of the dense peers: logits, labels, their products and gradients, N x N each."""
    return 5 * n * n * torch.finfo(dtype).bits // 8


def fwd_bwd(loss_fn):
    def run(*xs):
        return torch.autograd.grad(loss_fn(*xs), [x for x in xs if x.requires_grad])

    return run


def relative_error(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check(dtype, n):
    """cosmos_fast (and the dense loss in the same dtype, for context) against the float64 reference."""
    tol = TOLERANCE[dtype]
    result = {"N": n, "dtype": DTYPE_NAMES[dtype], "tolerance": tol, "passed": False, "errors": {},
              "naive_errors": {}}
    names = ("image", "text", "scale", "bias")
    try:
        xs = inputs(n, dtype)
        xs64 = [x.detach().double().requires_grad_() for x in xs]
        ref_loss = sigmoid_loss_reference(*xs64)
        ref_grads = torch.autograd.grad(ref_loss, xs64)
        for key, fn in (("errors", cosmos_fast.sigmoid_loss), ("naive_errors", sigmoid_loss_reference)):
            loss = fn(*xs)
            grads = torch.autograd.grad(loss, xs)
            result[key] = {"loss": relative_error(loss, ref_loss),
                           **{f"grad_{k}": relative_error(g, r) for k, g, r in zip(names, grads, ref_grads)}}
    except Exception as exc:
        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        return result
    result["passed"] = all(math.isfinite(e) and e <= tol for e in result["errors"].values())
    return result


def with_goal(row):
    return row if row["impl"] != "cosmos_fast" or row["dtype"] != "bf16" else mark_goal(row, GOALS.get(row["N"]))


def main():
    args = bench_args(__doc__.splitlines()[0]).parse_args()
    require_device("bench_sigmoid", args)
    torch.manual_seed(0)
    timing = FEW_REPETITIONS if args.quick or args.smoke else {}
    sizes = SMOKE_SIZES if args.smoke else QUICK_SIZES if args.quick else SIZES
    dense_limit = 0.95 * torch.cuda.get_device_properties(0).total_memory if DEVICE == "cuda" else math.inf
    open_clip, note = open_clip_loss()
    notes = [note] if note else []
    for line in notes:
        print(line)
    checks = []
    for dtype in (torch.bfloat16, torch.float32):
        c = check(dtype, SMOKE_CHECK_N if args.smoke else CHECK_N)
        free_memory()
        checks.append(c)
        errors = ", ".join(f"{k} {v:.2e}" for k, v in c["errors"].items()) or c.get("error")
        naive = ", ".join(f"{k} {v:.2e}" for k, v in c["naive_errors"].items())
        print(f"check {c['dtype']} N={c['N']} (tolerance {c['tolerance']:g}): {'ok' if c['passed'] else 'FAILED'}\n"
              f"    cosmos_fast: {errors}\n    naive {c['dtype']}:  {naive}", flush=True)
    failed = {c["dtype"] for c in checks if not c["passed"]}
    meta = {"D": D, "quick": args.quick, "checks": checks, "notes": notes}

    rows = []
    impls = implementations(open_clip, args.smoke)
    for n in sizes:
        for impl, dtype, loss_fn, dense in impls:
            row = {"impl": impl, "dtype": DTYPE_NAMES[dtype], "N": n}
            if impl == "cosmos_fast" and row["dtype"] in failed:
                row.update(ms=None, peak_gib=None, reps=0, status="skipped (check failed)")
            elif dense and dense_bytes(n, dtype) > dense_limit:
                row.update(ms=None, peak_gib=None, reps=0, status="skipped (oom)")
            else:
                row.update(measure(fwd_bwd(loss_fn), lambda: inputs(n, dtype), **timing))
            rows.append(row if args.smoke else with_goal(row))
            ms = "-" if row["ms"] is None else f"{row['ms']:.3f} ms"
            gib = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.3f} GiB"
            print(f"N={n} {impl} {row['dtype']}: {ms}, {gib} ({row['status']})", flush=True)
            save_results(NAME, rows, meta)  # a run cut short still leaves what it measured
    path = save_results(NAME, rows, meta)
    plot(NAME, rows, x="N", y=("ms", "peak_gib"), series=("impl", "dtype"),
         title=f"sigmoid (SigLIP) loss fwd+bwd, D={D}, {device_name()}")
    print(f"\nResults: {path}\n")
    print_table(rows, ["N", "impl", "dtype", "ms", ("peak_gib", "GiB"), "status", "goal", "met"])
    return exit_status("bench_sigmoid", rows, [f"check {dtype}" for dtype in sorted(failed)])


if __name__ == "__main__":
    sys.exit(main())
