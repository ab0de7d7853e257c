"""Zero-shot segmentation throughput: SCLIP's sliding windows on ViT-B/16, batched against upstream's loop.

Images of 336 x 448 px (the VOC / Context protocol: shorter side 336), 224 px windows at a stride of 112 (6 per
image), 21 classes with 80 templates each, bf16 autocast on the GPU. Implementations: cosmos_fast's
``ZeroShotSegmenter`` (the windows of a batch of images through the tower together), the same one window at a time
(upstream COSMOS's and SCLIP's ``forward_slide`` loop), each with and without CSA. Images per second (CUDA events,
medians over fresh random images) and peak memory; before timing, the batched logits are checked against the
one-window-at-a-time ones. Results: ``benchmarks/results/segmentation.{json,png}``.

Usage: python benchmarks/bench_segmentation.py [--quick] [--smoke]
"""
from __future__ import annotations

import sys

import torch

from common import DEVICE, FEW_REPETITIONS, bar_plot, bench_args, device_name, exit_status, measure, print_table, \
    require_device, save_results

from cosmos_fast.eval.segmentation import SegmentationSettings, ZeroShotSegmenter
from cosmos_fast.models import CosmosModel, Tokenizer, config

NAME = "segmentation"
CLASSES = 21
IMAGES_PER_CALL = 8


def build(smoke: bool):
    """ViT-B/16 (random weights: the time does not depend on them) or, for a smoke run, the tiny model."""
    if smoke:
        model, crop, stride, size, templates = CosmosModel(config("tiny", image_size=32)), 32, 16, (48, 64), None
    else:
        model, crop, stride, size, templates = CosmosModel(config("vit-b16")), 224, 112, (336, 448), None
    model = model.to(DEVICE).eval()
    tokenizer = Tokenizer(model.config.context_length)
    names = [[f"class {c}"] for c in range(CLASSES)]
    return model, tokenizer, names, crop, stride, size, templates


def segmenter(model, tokenizer, names, crop, stride, csa, batch_size, templates):
    return ZeroShotSegmenter(model, tokenizer, names, templates=templates, settings=SegmentationSettings(),
                             crop=crop, stride=stride, csa=csa, batch_size=batch_size, device=DEVICE,
                             autocast_dtype=torch.bfloat16 if DEVICE == "cuda" else None)


def one_at_a_time(seg):
    """Upstream's forward_slide: each image alone, each window alone."""
    def run(*images):
        return [seg.logits([image]) for image in images]

    return run


def main():
    args = bench_args(__doc__.splitlines()[0]).parse_args()
    require_device("bench_segmentation", args)
    torch.manual_seed(0)
    timing = FEW_REPETITIONS if args.quick or args.smoke else {}
    model, tokenizer, names, crop, stride, size, templates = build(args.smoke)
    images_per_call = 2 if args.smoke else IMAGES_PER_CALL

    def make_images():
        return [torch.randn(3, *size, device=DEVICE) for _ in range(images_per_call)]

    rows, checks = [], []
    for csa in (False, True):
        batched = segmenter(model, tokenizer, names, crop, stride, csa, 64, templates)
        single = segmenter(model, tokenizer, names, crop, stride, csa, 1, templates)
        probe = make_images()
        got = batched.logits(probe)
        want = [single.logits([image])[0] for image in probe]
        error = max(((g - w).norm() / w.norm()).item() for g, w in zip(got, want))
        checks.append({"csa": csa, "max_relative_error": error, "passed": error < 2e-2})
        for impl, fn in (("cosmos_fast batched windows", lambda *xs, s=batched: s.logits(list(xs))),
                         ("one window at a time (upstream)", one_at_a_time(single))):
            row = {"impl": impl + (" + CSA" if csa else ""), "csa": csa, "images": images_per_call}
            row.update(measure(fn, make_images, **timing))
            if row["ms"] is not None:
                row["images_per_s"] = 1000 * images_per_call / row["ms"]
            rows.append(row)
            print(f"{row['impl']}: {row.get('images_per_s', 0):.1f} images/s ({row['status']})", flush=True)
    meta = {"image_size": list(size), "windows": {"crop": crop, "stride": stride}, "classes": CLASSES,
            "model": "tiny" if args.smoke else "vit-b16", "checks": checks}
    path = save_results(NAME, rows, meta)
    bar_plot(NAME, rows, label="impl", values=["images_per_s"],
             title=f"zero-shot segmentation, {size[0]}x{size[1]} px, {device_name()}")
    print(f"\nResults: {path}\n")
    print_table(rows, ["impl", "images", "ms", ("images_per_s", "images/s"), ("peak_gib", "GiB"), "status"])
    return exit_status("bench_segmentation", rows, [f"check csa={c['csa']}" for c in checks if not c["passed"]])


if __name__ == "__main__":
    sys.exit(main())
