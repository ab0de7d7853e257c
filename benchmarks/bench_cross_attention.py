"""Cross-attention and the COSMOS pooler, forward + backward: cosmos_fast against its peers in one run.

Shapes (``kernels.md`` section 2): COSMOS, per sample 8 queries over 77 text tokens or 196 image patches, d = 512
in 8 heads of 64, at B = 256 and 1024; SIMLA, 25 text queries over 257 image tokens and the reverse (257 over 25,
which cosmos_fast hands to SDPA). Two levels:
- "attention": the op alone on [B, L, H, Dh] bf16 tensors with a key padding mask: ours, SDPA with each of its
  backends that take a padding mask (efficient, cuDNN, math; flash on the CPU; a backend that refuses the inputs
  is reported as such), xformers' memory-efficient attention where installed and usable (a wheel built for
  another torch has no CUDA kernels);
- "pooler": LayerNorms, projections, attention, out-projection, residual and L2 norm under bf16 autocast:
  ``cosmos_fast.nn.CrossAttentionPooler`` eager (one autograd node in the form its rule picks), each single-node
  form forced (context space: K and V never formed; projected K/V: the Triton attention kernel), the module under
  ``torch.compile`` and under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs: what is left once no launch
  costs CPU time), the same two compiles with the projected-K/V form forced, the eager ``nn.MultiheadAttention``
  pooler of upstream COSMOS, and ``torch.compile`` of it.
Ours (the attention op and both pooler forms) is checked against the float64 reference on the GPU first.
Results: ``benchmarks/results/cross_attention``.

Usage: python benchmarks/bench_cross_attention.py [--quick] [--smoke]
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import (DEVICE, FEW_REPETITIONS, bar_plot, bench_args, device_name, measure, print_table,
                    require_device, save_results)

import cosmos_fast
from cosmos_fast import _dispatch
from cosmos_fast.ops.attention import pooler as pooler_ops
from cosmos_fast.ops.attention import triton_kernels
from cosmos_fast.ops.attention.reference import cross_attention_reference

NAME = "cross_attention"
D_MODEL, HEADS = 512, 8
SHAPES = [("cosmos text", 256, 8, 77), ("cosmos image", 1024, 8, 196), ("cosmos text", 1024, 8, 77),
          ("cosmos image", 256, 8, 196), ("simla t->i", 512, 25, 257), ("simla i->t", 512, 257, 25)]
QUICK_SHAPES = SHAPES[:2]
SMOKE_SHAPES = [("cosmos text", 3, 8, 77), ("simla i->t", 2, 257, 25)]  # Triton's range and SDPA's
# the backends SDPA has on this device that take a padding mask (a smoke run on the CPU has two; CUDA's flash
# backend has no kernel for any attn_mask: it failed every shape on the H100 and the H200)
SDPA_BACKENDS = ((SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH) if DEVICE == "cuda"
                 else (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH))
SDPA_NOTE = "SDPA's CUDA flash backend takes no attn_mask (a padding mask here): not timed"
TRITON_RUNS = DEVICE == "cuda" or _dispatch.triton_interpreted()  # whether the Triton kernel can run here
GOALS = {("pooler", 1024, 196): 2.5, ("pooler", 256, 77): 0.8}  # ms, fwd+bwd (kernels.md)


class MultiheadAttentionPooler(nn.Module):
    """Upstream COSMOS's module: nn.MultiheadAttention with LayerNorms, residual and L2 norm outside."""

    def __init__(self):
        super().__init__()
        self.ln_q, self.ln_k = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, query, context, key_padding_mask=None):
        kv = self.ln_k(context)
        out, _ = self.attn(self.ln_q(query), kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        return F.normalize(query + out, dim=-1)


def padding(B, Lk):
    mask = torch.rand(B, Lk, device=DEVICE) < 0.3
    mask[:, 0] = False  # every sample keeps a token, so every peer is defined
    return mask


def attention_inputs(B, Lq, Lk):
    def make():
        q, k, v = (torch.randn(B, L, HEADS, D_MODEL // HEADS, device=DEVICE, dtype=torch.bfloat16,
                               requires_grad=True) for L in (Lq, Lk, Lk))
        return q, k, v, padding(B, Lk), torch.randn(B, Lq, HEADS, D_MODEL // HEADS, device=DEVICE,
                                                    dtype=torch.bfloat16)
    return make


def ours_attention(q, k, v, mask, grad):
    out = cosmos_fast.cross_attention(q, k, v, mask)
    return torch.autograd.grad(out, (q, k, v), grad)


def sdpa(backend):
    def run(q, k, v, mask, grad):
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=~mask[:, None, None, :]).transpose(1, 2)
        return torch.autograd.grad(out, (q, k, v), grad)
    return run


def xformers_bias(mask: torch.Tensor, Lq: int, dtype: torch.dtype) -> torch.Tensor:
    """The key padding mask [B, Lk] as xformers' additive bias [B, H, Lq, Lk] (-inf where masked), a view into
    rows padded to a multiple of 8 elements: its CUTLASS kernel needs the bias rows 8-aligned."""
    B, Lk = mask.shape
    padded = torch.zeros(B, HEADS, Lq, -(-Lk // 8) * 8, device=mask.device, dtype=dtype)
    bias = padded[..., :Lk]
    bias.masked_fill_(mask[:, None, None, :], float("-inf"))
    return bias


def xformers_attention():
    """(xformers' memory-efficient attention as a peer, None) where it runs here, else (None, why): it is not
    installed, does not import, or has no kernel for these inputs (a wheel built for another torch loads
    without its CUDA kernels), or there is no GPU."""
    if DEVICE != "cuda":
        return None, "no GPU"
    try:
        import xformers.ops as xops
    except Exception as exc:  # any failure to import means: no xformers peer in this run
        return None, f"does not import: {type(exc).__name__}: {exc}"

    def run(q, k, v, mask, grad):
        out = xops.memory_efficient_attention(q, k, v, attn_bias=xformers_bias(mask, q.shape[1], q.dtype))
        return torch.autograd.grad(out, (q, k, v), grad)

    try:  # one tiny call: a peer that cannot run is one note, not an error row per shape
        run(*attention_inputs(2, 8, 77)())
    except Exception as exc:
        return None, f"cannot run: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return run, None


def pooler_inputs(B, Lq, Lk):
    def make():
        query = torch.randn(B, Lq, D_MODEL, device=DEVICE, requires_grad=True)
        context = torch.randn(B, Lk, D_MODEL, device=DEVICE, requires_grad=True)
        return query, context, padding(B, Lk), torch.randn(B, Lq, D_MODEL, device=DEVICE)
    return make


def pooler_step(module, form=None, compile_mode=None):
    """fwd+bwd of ``module`` under bf16 autocast; with ``form``, that single-node form of our pooler forced; with
    ``compile_mode``, the forward under ``torch.compile(mode=compile_mode)``."""
    params = list(module.parameters())

    def forward(query, context, mask):
        if form is None:
            return module(query, context, mask)
        return pooler_ops.fused_pooler(query, context, mask, module.ln_q, module.ln_k, module.attn, residual=True,
                                       normalize=True, form=form)

    if compile_mode is not None:
        forward = torch.compile(forward, mode=compile_mode)

    def run(query, context, mask, grad):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = forward(query, context, mask)
        return torch.autograd.grad(out, [query, context] + params, grad.to(out.dtype))
    return run


def check_pooler(form: str, B: int) -> dict:
    """One pooler form under bf16 autocast against the float64 nn.MultiheadAttention pooler (upstream's forward over
    the same parameters) at a COSMOS shape: relative error of the output and of every gradient."""
    Lq, Lk = 8, 196
    ours = cosmos_fast.nn.CrossAttentionPooler(D_MODEL, HEADS).to(DEVICE)
    reference = cosmos_fast.nn.CrossAttentionPooler(D_MODEL, HEADS).to(DEVICE).double()
    reference.load_state_dict(ours.state_dict())
    query, context, mask, grad = pooler_inputs(B, Lq, Lk)()
    leaves = [query, context, *ours.parameters()]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = pooler_ops.fused_pooler(query, context, mask, ours.ln_q, ours.ln_k, ours.attn, residual=True,
                                      normalize=True, form=form)
    grads = torch.autograd.grad(out, leaves, grad)
    leaves64 = [query.detach().double().requires_grad_(), context.detach().double().requires_grad_(),
                *reference.parameters()]
    out64 = reference(*leaves64[:2], mask, reference=True)
    grads64 = torch.autograd.grad(out64, leaves64, grad.double())
    names = ["out", "query", "context"] + [n for n, _ in ours.named_parameters()]
    errors = {name: ((a.double() - b).norm() / b.norm()).item()
              for name, a, b in zip(names, (out, *grads), (out64, *grads64))}
    return {"case": f"pooler {form} B={B} Lk={Lk}", "dtype": "bf16 autocast", "errors": errors,
            "passed": max(errors.values()) < 2e-2}


def check(B: int) -> dict:
    """Ours against float64 at a COSMOS shape (bf16 inputs): worst relative error of output and gradients."""
    Lq, Lk = 8, 77
    mask = padding(B, Lk)
    q64, k64, v64 = (torch.randn(B, L, HEADS, 64, device=DEVICE, dtype=torch.float64, requires_grad=True)
                     for L in (Lq, Lk, Lk))
    grad = torch.randn(B, Lq, HEADS, 64, device=DEVICE, dtype=torch.float64)
    ref = cross_attention_reference(q64, k64, v64, mask)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad)
    q, k, v = (x.detach().bfloat16().requires_grad_() for x in (q64, k64, v64))
    out = cosmos_fast.cross_attention(q, k, v, mask)
    grads = torch.autograd.grad(out, (q, k, v), grad.bfloat16())
    errors = {name: ((a.double() - b).norm() / b.norm()).item()
              for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads))}
    return {"case": f"cosmos text B={B}", "dtype": "bf16", "errors": errors, "passed": max(errors.values()) < 2e-2}


def main() -> int:
    args = bench_args(__doc__.splitlines()[0]).parse_args()
    require_device("bench_cross_attention", args)
    # the projected-K/V form calls the Triton kernel itself: without a GPU it needs the interpreter
    forms = [form for form in pooler_ops.FORMS if form != "projected_kv" or TRITON_RUNS]
    check_batch = 2 if args.smoke else 64
    checks = [check(check_batch)] + [check_pooler(form, check_batch) for form in forms]
    for result in checks:
        print(f"check: {result}")
    notes = [SDPA_NOTE] if DEVICE == "cuda" else []
    xformers_run, xformers_missing = xformers_attention()
    if xformers_run is None:
        notes.append(f"xformers skipped: {xformers_missing}")
        print(f"xformers skipped: {xformers_missing}")
    rows = []
    mha = MultiheadAttentionPooler().to(DEVICE)
    ours_pooler = cosmos_fast.nn.CrossAttentionPooler(D_MODEL, HEADS).to(DEVICE)
    ours_pooler.load_state_dict(mha.state_dict())
    # a smoke run leaves out the compiled ones: compiling costs minutes on a CPU
    compiled_ours = [] if args.smoke else [
        ("torch.compile cosmos_fast pooler", torch.compile(ours_pooler)),
        # CUDA graphs: no per-launch CPU cost
        ("cosmos_fast pooler, compile reduce-overhead", torch.compile(ours_pooler, mode="reduce-overhead"))]
    compiled_mha = [] if args.smoke else [("torch.compile MHA pooler", torch.compile(mha))]
    timing = FEW_REPETITIONS if args.smoke else dict(reps=100)
    for case, B, Lq, Lk in SMOKE_SHAPES if args.smoke else QUICK_SHAPES if args.quick else SHAPES:
        attention = [("cosmos_fast", ours_attention)] + [(f"sdpa {b.name.lower()}", sdpa(b)) for b in SDPA_BACKENDS]
        if xformers_run is not None:
            attention.append(("xformers", xformers_run))
        # each single-node form forced (the Triton kernel behind the projected-K/V form takes Lq <= 64)
        shape_forms = [form for form in forms
                       if form != "projected_kv" or triton_kernels.supports(Lq, D_MODEL // HEADS, torch.bfloat16)]
        poolers = [("cosmos_fast pooler", pooler_step(ours_pooler))]
        poolers += [(f"cosmos_fast pooler, {form} form", pooler_step(ours_pooler, form)) for form in shape_forms]
        poolers += [(name, pooler_step(module)) for name, module in compiled_ours]
        if not args.smoke and "projected_kv" in shape_forms:  # is the eager winner also the compiled one?
            poolers += [(f"torch.compile cosmos_fast pooler, projected_kv form{suffix}",
                         pooler_step(ours_pooler, "projected_kv", mode))
                        for suffix, mode in (("", "default"), (", reduce-overhead", "reduce-overhead"))]
        poolers += [("eager MHA pooler", pooler_step(mha))]
        poolers += [(name, pooler_step(module)) for name, module in compiled_mha]
        for level, impls, make in (("attention", attention, attention_inputs(B, Lq, Lk)),
                                   ("pooler", poolers, pooler_inputs(B, Lq, Lk))):
            for impl, fn in impls:
                result = measure(fn, make, **timing)
                goal = GOALS.get((level, B, Lk)) if "cosmos_fast" in impl and Lq == 8 and not args.smoke else None
                row = {"case": f"{level}: {case}", "impl": impl, "dtype": "bf16", "N": B, "Lq": Lq, "Lk": Lk,
                       **result, "goal": None if goal is None else f"<= {goal} ms",
                       "met": None if goal is None else ("yes" if (result["ms"] or 1e9) <= goal else "no")}
                rows.append(row)
                print(f"{row['case']} B={B} Lq={Lq} Lk={Lk} {impl}: {result['ms']} ms ({result['status']})",
                      flush=True)
                save_results(NAME, rows, {"checks": checks, "notes": notes})
    bar_plot(NAME, [dict(r, label=f"{r['case']} B={r['N']}") for r in rows if r["ms"] is not None],
             label=("label", "impl"), values=("ms",), title=f"cross-attention fwd+bwd, {device_name()}")
    print()
    print_table(rows, ["case", "N", "Lq", "Lk", "impl", "ms", ("peak_gib", "GiB"), "goal", "met", "status"])
    if not all(result["passed"] for result in checks):
        print("ACCURACY CHECK FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
