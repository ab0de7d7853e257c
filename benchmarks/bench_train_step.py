"""The whole COSMOS training step on one GPU: reference (upstream-style) vs fused kernels vs fused + compile.

ViT-B/16 student and EMA teacher (``cosmos_fast.models`` config ``vit-b16``), 2 global 224 px + 6 local 96 px
crops and 8 captions per sample (2 global of 1-5 sentences, 6 local of one, as cosmos.md's text crops; random
sentences of 8-32 tokens, context 77), random data; one step = student forward, teacher forward on the
global crops and captions, the COSMOS loss, backward, fused AdamW, temperature clamp, EMA update, all under
bf16 autocast, exactly as ``train/train.py`` runs them (its COSMOS objective and ``update_teacher``):
- ``reference``: ``run.kernels=reference``: per-pair full logit matrices and F.cross_entropy, nn.MultiheadAttention
  poolers, a per-tensor EMA loop (upstream COSMOS's way);
- ``fused``: cosmos_fast's blockwise losses, fused poolers and one-pass EMA;
- ``fused+compile``: the same with every tower block of student and teacher under ``torch.compile``
  (``run.compile=true``);
- ``fused+compile+ckpt`` (256 per GPU only, the memory goal): also ``run.grad_checkpointing=true``.
For 64/128/256 samples per GPU: samples/s, median ms of each stage (forward incl. teacher and loss, backward,
optimizer, EMA; CUDA events) and peak GiB. Then a short run whose reference and fused losses must agree step by
step (same initial weights, same random batches). ``--profile VARIANT`` also runs that variant's steps under
``torch.profiler``: how much of a step the GPU spends in kernels, and in which. Results:
``benchmarks/results/train_step`` (JSON, PNG).

Usage: python benchmarks/bench_train_step.py [--quick] [--smoke] [--steps N] [--batches 64,128,256]
       [--agreement-steps N] [--profile VARIANT]
(``--smoke``: the tiny model at 4 samples, eager variants only, 2 steps each: checks that the script runs.)
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from common import (DEVICE, bar_plot, bench_args, device_name, failure_status, free_memory, peak_gib, print_table,
                    require_device, reset_peak_memory, save_results, synchronize, timing_event)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import config as config_lib  # noqa: E402
import objectives  # noqa: E402
import train as trainer  # noqa: E402

import cosmos_fast  # noqa: E402
from cosmos_fast.models import CosmosModel  # noqa: E402
from cosmos_fast.models import config as model_config  # noqa: E402

NAME = "train_step"
BATCHES = (64, 128, 256)
# each variant's trainer options (train/config.py), applied as train/train.py applies them
VARIANTS = {"reference": ["run.kernels=reference"], "fused": [], "fused+compile": ["run.compile=true"],
            "fused+compile+ckpt": ["run.compile=true", "run.grad_checkpointing=true"]}
LARGE_BATCH_ONLY = ("fused+compile+ckpt",)  # from 256 per GPU: recomputation buys memory, which only it lacks
STAGES = ("forward", "backward", "optimizer", "ema")
GOAL_SAMPLES_PER_S = 800  # at 128 per GPU (kernels.md); 256 per GPU within 75 GiB
AGREEMENT_TOLERANCE = 2e-2  # relative, per step, bf16 autocast on both sides
EAGER_UPSTREAM = "eager reference-style code: 372 samples/s at 128 per GPU, 47 GiB (kernels.md)"
VIT_B16 = dict(model="vit-b16", image_size=224, local_size=96)
SMOKE_MODEL = dict(model="tiny", image_size=48, local_size=24)
SMOKE_BATCH = 4


SENTENCE_TOKENS = (8, 32)  # the length of one random sentence, uniform


def random_batch(B: int, cfg, vocab: int, device=DEVICE):
    """Fresh crops and captions with cosmos.md's text crops' shape: a global caption joins 1-5 sentences (cut at
    the context length), a local caption is one sentence; token ids with a start and an end-of-text token."""
    size, local_size, length = cfg.data.image_size, cfg.data.local_size, cfg.data.context_length
    global_crops = torch.randn(2, B, 3, size, size, device=device)
    local_crops = torch.randn(6, B, 3, local_size, local_size, device=device)
    captions = torch.zeros(8, B, length, dtype=torch.long, device=device)
    low, high = SENTENCE_TOKENS
    sentences = torch.randint(low, high + 1, (8, B, 5), device=device)
    joined = torch.arange(5, device=device) < torch.randint(1, 6, (8, B, 1), device=device)
    joined[2:] = torch.arange(5, device=device) < 1  # the local captions: one sentence each
    lengths = (sentences * joined).sum(-1).clamp(max=length - 2)
    words = torch.randint(1, vocab - 2, (8, B, length), device=device)
    positions = torch.arange(length, device=device)
    captions = torch.where(positions < lengths[..., None], words, captions)
    captions[..., 0] = vocab - 2  # start of text
    captions.scatter_(2, lengths[..., None], vocab - 1)  # end of text: the caption's embedding is read here
    return global_crops, local_crops, captions


def step_config(B: int, options: list[str], model: str = "vit-b16", image_size: int = 224, local_size: int = 96):
    return config_lib.load(None, [f"model.name={model}", f"data.image_size={image_size}",
                                  f"data.local_size={local_size}", "data.context_length=77", f"data.batch_size={B}",
                                  *options])


def agreement(steps: int, B: int, device: str = DEVICE, **model) -> dict:
    """Losses of ``steps`` training steps of the reference and the fused kernels from the same initial weights
    on the same random batches (bf16 autocast on GPU, fp32 on CPU): the two must agree step by step."""
    losses = {}
    for kernels in ("reference", "fused"):
        cfg = step_config(B, VARIANTS[kernels], **model)
        torch.manual_seed(0)
        net = CosmosModel(model_config(cfg.model.name, image_size=cfg.data.image_size, context_length=77)).to(device)
        teacher = cosmos_fast.EMATeacher(net, momentum=0.999)
        optimizer = torch.optim.AdamW(trainer.param_groups(net, 0.5), lr=1e-4, betas=(0.9, 0.98),
                                      fused=device == "cuda")
        torch.manual_seed(1)
        batches = [random_batch(B, cfg, net.text.token_embedding.num_embeddings, device) for _ in range(steps)]
        losses[kernels] = []
        for step, (global_crops, local_crops, captions) in enumerate(batches):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss, _ = objectives.build(cfg)(net, teacher, {"global": global_crops, "local": local_crops,
                                                               "captions": captions}, step, step)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            net.clamp_logit_scales_()
            trainer.update_teacher(teacher, net, step, cfg)
            losses[kernels].append(loss.item())
    worst = max(abs(f - r) / abs(r) for r, f in zip(losses["reference"], losses["fused"]))
    return {**losses, "worst_relative_difference": worst}


def run_variant(variant: str, B: int, steps: int, warmup: int = 3, profile_steps: int = 0, **model) -> dict:
    """Time ``steps`` training steps after ``warmup`` ones; ``model`` as ``step_config``'s (ViT-B/16 by default).
    With ``profile_steps``, that many more steps run under ``torch.profiler`` (``kernel_profile``)."""
    cfg = step_config(B, VARIANTS[variant], **(model or VIT_B16))
    torch.manual_seed(0)
    net = CosmosModel(model_config(cfg.model.name, image_size=cfg.data.image_size, context_length=77)).to(DEVICE)
    teacher = cosmos_fast.EMATeacher(net, momentum=0.999)
    trainer.prepare_towers(net, teacher, cfg)
    objective = objectives.build(cfg)
    optimizer = torch.optim.AdamW(trainer.param_groups(net, 0.5), lr=1e-4, betas=(0.9, 0.98),
                                  fused=DEVICE == "cuda")
    vocab = net.text.token_embedding.num_embeddings
    batches = [random_batch(B, cfg, vocab) for _ in range(2)]

    def one_step(step, marks=None):
        """One training step; ``marks`` (len(STAGES) + 1 events) are recorded around its stages."""
        record = (lambda i: marks[i].record()) if marks else (lambda i: None)
        global_crops, local_crops, captions = batches[step % len(batches)]
        record(0)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):  # fp32 on CPU, as train.py
            loss, _ = objective(net, teacher, {"global": global_crops, "local": local_crops, "captions": captions},
                                step, step)
        record(1)
        loss.backward()
        record(2)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        net.clamp_logit_scales_()
        record(3)
        trainer.update_teacher(teacher, net, step, cfg)
        record(4)
        return loss

    events = {stage: [] for stage in STAGES}
    totals = []
    reset_peak_memory()
    for step in range(warmup + steps):
        marks = [timing_event() for _ in range(len(STAGES) + 1)]
        loss = one_step(step, marks)
        if step >= warmup:
            for i, stage in enumerate(STAGES):
                events[stage].append((marks[i], marks[i + 1]))
            totals.append((marks[0], marks[-1]))
    synchronize()
    stage_ms = {stage: statistics.median(s.elapsed_time(e) for s, e in pairs) for stage, pairs in events.items()}
    step_ms = statistics.median(s.elapsed_time(e) for s, e in totals)
    result = {"step_ms": step_ms, "samples_per_s": B / step_ms * 1000, **{f"{s}_ms": v for s, v in stage_ms.items()},
              "peak_gib": peak_gib(), "loss": loss.item(), "status": "ok"}
    if profile_steps:
        result["profile"] = kernel_profile(one_step, warmup + steps, profile_steps)
    return result


# kernel (or CPU operator) families by name, first match wins: attention (before GEMMs: xformers' and SDPA's
# CUTLASS kernels are fmha_cutlass*), cuBLAS/CUTLASS GEMMs, inductor's Triton kernels
KERNEL_FAMILIES = (("attention", re.compile(r"flash|fmha|attention|attn")),
                   ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|matmul|\b(?:addmm|baddbmm|bmm|mm|linear)\b")),
                   ("triton", re.compile(r"triton")))


def kernel_family(name: str) -> str:
    lower = name.lower()
    return next((family for family, pattern in KERNEL_FAMILIES if pattern.search(lower)), "other")


def kernel_profile(one_step, first_step: int, steps: int, top: int = 15) -> dict:
    """Run ``steps`` more steps under ``torch.profiler``: per step, the wall time, the time the device spent in
    kernels (busy fraction: what is left is idle GPU, the host's launches or synchronisations), that time by
    kernel family, and the ``top`` kernels by time. Without a GPU: CPU operators instead of kernels."""
    from torch.profiler import ProfilerActivity, profile
    cuda = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for step in range(first_step, first_step + steps):
            one_step(step)
        synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / steps
    # (event, its self time in ms per step), longest first
    kernels = sorted(((e, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / steps)
                      for e in prof.key_averages() if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda),
                     key=lambda kernel: -kernel[1])
    busy_ms = sum(ms for _, ms in kernels)
    families: dict[str, float] = {}
    for e, ms in kernels:
        family = kernel_family(e.key)
        families[family] = families.get(family, 0.0) + ms
    return {"steps": steps, "wall_ms": wall_ms, "busy_ms": busy_ms, "busy_fraction": busy_ms / wall_ms,
            "kind": "CUDA kernels" if cuda else "CPU operators",
            "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top": [{"name": e.key[:120], "family": kernel_family(e.key), "calls": e.count / steps, "ms": ms}
                    for e, ms in kernels[:top]]}


def print_profile(variant: str, B: int, profile: dict) -> None:
    print(f"\nprofile of {variant} at B={B}, per step over {profile['steps']} steps: {profile['wall_ms']:.1f} ms "
          f"wall, {profile['busy_ms']:.1f} ms in {profile['kind']} ({100 * profile['busy_fraction']:.0f}% busy)")
    print("by family: " + ", ".join(f"{k} {v:.1f} ms" for k, v in profile["families_ms"].items()))
    print_table(profile["top"], [("ms", "ms/step"), ("calls", "calls/step"), "family", "name"])


def batch_list(text: str) -> tuple[int, ...]:
    """``--batches 64,128``: positive integers."""
    try:
        values = tuple(int(b) for b in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def count(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


# what --steps, --agreement-steps and --batches are when not given, by kind of run
DEFAULTS = {"full": dict(steps=10, agreement_steps=10, batches=BATCHES),
            "quick": dict(steps=3, agreement_steps=3, batches=(128,)),
            "smoke": dict(steps=2, agreement_steps=2, batches=(SMOKE_BATCH,))}


def main() -> int:
    parser = bench_args(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=count(1),
                        help="timed steps per variant, after the warm-up ones (default 10; --quick 3, --smoke 2)")
    parser.add_argument("--agreement-steps", type=count(0),
                        help="steps of reference vs fused from the same weights and batches (B=32), losses compared "
                             "(default 10; --quick 3, --smoke 2); 0 skips the run")
    parser.add_argument("--profile", choices=sorted(VARIANTS), metavar="VARIANT",
                        help="also profile this variant (one of %(choices)s) over 3 steps at each batch size: "
                             "device busy fraction, time by kernel family, the top kernels (JSON: the row's "
                             "'profile')")
    parser.add_argument("--batches", type=batch_list,
                        help="samples per GPU to time, comma-separated (default 64,128,256; --quick 128, --smoke "
                             f"{SMOKE_BATCH}); a session with short calls can split them")
    args = parser.parse_args()
    for key, value in DEFAULTS["smoke" if args.smoke else "quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    require_device("bench_train_step", args)
    batches = args.batches
    # a smoke run: the eager variants (compiling costs minutes on a CPU; tests/test_train.py covers run.compile)
    variants = [v for v in VARIANTS if not args.smoke or "run.compile=true" not in VARIANTS[v]]
    model = SMOKE_MODEL if args.smoke else VIT_B16
    rows = []
    for B in batches:
        for variant in variants:
            if variant in LARGE_BATCH_ONLY and B < max(BATCHES) and not args.quick:  # --quick: all, at 128
                continue
            try:
                result = run_variant(variant, B, args.steps, warmup=1 if args.smoke else 3,
                                     profile_steps=3 if variant == args.profile else 0, **model)
            except Exception as exc:  # out of memory (raw, or wrapped by a compile), or a failing variant
                result = {"status": failure_status(exc)}
            free_memory()  # outside the except block, whose traceback held the failed step's tensors
            goal = None if args.smoke or variant == "reference" else (
                f">= {GOAL_SAMPLES_PER_S}/s" if B == 128 else "<= 75 GiB" if B == 256 else None)
            met = None
            if goal and result["status"] == "ok":
                met = "yes" if (result["samples_per_s"] >= GOAL_SAMPLES_PER_S if B == 128
                                else result["peak_gib"] <= 75) else "no"
            rows.append({"case": f"{model['model']} B={B}", "impl": variant, "N": B, **result, "goal": goal,
                         "met": met})
            print({k: v for k, v in rows[-1].items() if k != "profile"}, flush=True)
            if "profile" in result:
                print_profile(variant, B, result["profile"])
            save_results(NAME, rows, {"notes": [EAGER_UPSTREAM]})
    steps = args.agreement_steps
    extra = {"notes": [EAGER_UPSTREAM]}
    if steps:
        agreed = extra["agreement"] = agreement(steps, SMOKE_BATCH if args.smoke else 32, **model)
        agreed["passed"] = agreed["worst_relative_difference"] < AGREEMENT_TOLERANCE
        print(f"reference vs fused over {steps} steps: losses {agreed}")
    save_results(NAME, rows, extra)
    bar_plot(NAME, [r for r in rows if r["status"] == "ok"], label=("case", "impl"), values=("samples_per_s",),
             title=f"COSMOS {model['model']} training step, {device_name()}")
    print()
    print_table(rows, ["case", "impl", ("samples_per_s", "samples/s"), ("step_ms", "step ms"), ("forward_ms", "fwd"),
                       ("backward_ms", "bwd"), ("optimizer_ms", "optim"), ("ema_ms", "EMA"), ("peak_gib", "GiB"),
                       "goal", "met", "status"])
    return 0 if not steps or extra["agreement"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
