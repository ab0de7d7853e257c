"""EMA teacher update over the COSMOS ViT-B/16 parameter set: cosmos_fast against its peers in one run.

The parameter set is the COSMOS student's (``cosmos.md``): a ViT-B/16 image tower, the CLIP text tower, the two
token mappings, the two cross-attention poolers and the two temperatures; fp32 teacher, student fp32 (as
upstream trains it) and bf16. Implementations: ours through the CUDA extension and through Triton, the
per-tensor ``mul_``/``add_`` loop of DINO and upstream COSMOS, ``torch._foreach_mul_`` + ``_foreach_add_``,
``torch._foreach_lerp_``, and one lerp over a single flat buffer of all parameters (the copy floor: every
byte read and written once). Our set has 152.4M parameters in 322 tensors, 3% fewer than the 157.4M of
``kernels.md``'s measurement, so compare against the floor measured in the same run (GB/s). Before timing,
both of our paths are checked against a float64 reference on the GPU. Results: ``benchmarks/results/ema.{json,png}``.

Usage: python benchmarks/bench_ema.py [--quick] [--smoke]
"""
from __future__ import annotations

import os
import sys

import torch

from common import DEVICE, bench_args, bar_plot, device_name, measure, print_table, require_device, save_results, \
    synchronize

import cosmos_fast
from cosmos_fast import _dispatch, _extension

NAME = "ema"
MOMENTUM = 0.999
GOAL_MS = 0.68  # kernels.md: within 6% of the copy floor on one H100
TEACHER_BYTES = 8  # the fp32 teacher is read and written; the student is read once


def cosmos_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of the COSMOS ViT-B/16 student, in module order."""
    def block(width, mlp):
        return [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,), (width,), (width,),
                (mlp, width), (mlp,), (width, mlp), (width,)]

    vision = [(768, 3, 16, 16), (768,), (1, 1, 768), (1, 197, 768)]
    vision += [s for _ in range(12) for s in block(768, 3072)] + [(768,), (768,), (768, 512)]
    text = [(49408, 512), (77, 512)] + [s for _ in range(12) for s in block(512, 2048)]
    text += [(512,), (512,), (512, 512)]
    mappings = [(512, 768), (512,), (512, 512), (512,)]
    pooler = [(512,), (512,), (512,), (512,), (1536, 512), (1536,), (512, 512), (512,)]
    return vision + text + mappings + pooler + pooler + [(), ()]


SMOKE_SHAPES = [(48, 3, 4, 4), (48,), (1, 5, 48), (144, 48), (144,), ()]  # every kind of tensor, toy sizes


def per_tensor_loop(teacher, student, m):
    for t, s in zip(teacher, student):
        t.mul_(m).add_(s.detach().float(), alpha=1 - m)


def foreach_mul_add(teacher, student, m):
    torch._foreach_mul_(teacher, m)
    torch._foreach_add_(teacher, student, alpha=1 - m)


def foreach_lerp(teacher, student, m):
    torch._foreach_lerp_(teacher, student, 1 - m)


def flat_lerp(teacher_flat, student_flat, m):
    teacher_flat.lerp_(student_flat, 1 - m)


def ours(backend):
    def run(teacher, student, m):
        os.environ["COSMOS_FAST_BACKEND"] = backend
        try:
            cosmos_fast.ema_update_(teacher, student, m)
        finally:
            os.environ.pop("COSMOS_FAST_BACKEND")
    return run


def check(backend, shapes, dtype) -> dict:
    """Our update against float64 on a fresh copy of the parameter set; relative error of the teacher."""
    teacher = [torch.randn(s, device=DEVICE) for s in shapes]
    student = [torch.randn(s, device=DEVICE).to(dtype) for s in shapes]
    expected = [MOMENTUM * t.double() + (1 - MOMENTUM) * s.double() for t, s in zip(teacher, student)]
    ours(backend)(teacher, student, MOMENTUM)
    synchronize()
    error = max(((t.double() - e).norm() / e.norm()).item() for t, e in zip(teacher, expected))
    return {"impl": f"cosmos_fast ({backend})", "dtype": str(dtype).replace("torch.", ""), "error": error,
            "passed": error < 1e-6}


def main() -> int:
    args = bench_args(__doc__.splitlines()[0]).parse_args()
    require_device("bench_ema", args)
    shapes = SMOKE_SHAPES if args.smoke else cosmos_shapes()
    n_params = sum(torch.Size(s).numel() for s in shapes)
    case = "smoke" if args.smoke else "cosmos-vit-b16"
    print(f"{case} parameter set: {n_params / 1e6:.1f}M parameters in {len(shapes)} tensors; "
          f"{n_params * (TEACHER_BYTES + 4) / 1e9:.2f} GB moved with an fp32 student")
    extension = _extension.load()
    notes = [f"CUDA extension: {_extension.status()}"]
    backends = (["cuda"] if extension is not None else []) + (
        ["triton"] if DEVICE == "cuda" or _dispatch.triton_interpreted() else ["torch"])  # a smoke run on CPU
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    checks = [check(b, shapes, d) for b in backends for d in dtypes]
    for c in checks:
        print(f"check {c['impl']} student {c['dtype']}: relative error {c['error']:.2e} "
              f"{'ok' if c['passed'] else 'FAILED'}")

    def lists(dtype):
        def make():
            return [torch.randn(s, device=DEVICE) for s in shapes], [torch.randn(s, device=DEVICE).to(dtype)
                                                                     for s in shapes], MOMENTUM
        return make

    def flat(dtype):
        def make():
            return torch.randn(n_params, device=DEVICE), torch.randn(n_params, device=DEVICE).to(dtype), MOMENTUM
        return make

    impls = [(f"cosmos_fast ({b})", ours(b), lists) for b in backends]
    impls += [("per-tensor mul_/add_ loop", per_tensor_loop, lists), ("foreach mul_+add_", foreach_mul_add, lists),
              ("foreach lerp_", foreach_lerp, lists), ("one flat lerp_ (copy floor)", flat_lerp, flat)]
    rows = []
    for dtype in dtypes:
        for impl, fn, make in impls:
            if dtype != torch.float32 and (impl.startswith("foreach") or impl.startswith("one flat")):
                continue  # PyTorch's foreach ops and lerp need one dtype: the student would need a cast copy
            result = measure(fn, make(dtype), reps=100, pool=2)
            ms = result["ms"]
            row = {"case": case, "impl": impl, "dtype": str(dtype).replace("torch.", ""),
                   "N": n_params, "tensors": len(shapes), **result,
                   "GB/s": None if ms is None else n_params * (TEACHER_BYTES + dtype.itemsize) / ms / 1e6}
            if impl.startswith("cosmos_fast") and not args.smoke:  # goals are for the real parameter set
                row.update(goal=f"<= {GOAL_MS} ms", met="yes" if ms is not None and ms <= GOAL_MS else "no")
            rows.append(row)
            print(f"{impl} student {row['dtype']}: {ms} ms", flush=True)
            save_results(NAME, rows, {"checks": checks, "notes": notes, "momentum": MOMENTUM})
    bar_plot(NAME, rows, label=("impl", "dtype"), values=("ms", "GB/s"),
             title=f"EMA update, {n_params / 1e6:.1f}M params / {len(shapes)} tensors, {device_name()}")
    print()
    print_table(rows, ["impl", "dtype", "tensors", "ms", "GB/s", "goal", "met", "status"])
    failed = [c for c in checks if not c["passed"]]
    if failed:
        print(f"ACCURACY CHECK FAILED: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
