"""Zero-shot evaluation of a checkpoint on your data: retrieval on a Karpathy-format COCO/Flickr split and/or
classification on an ImageFolder, for the student and the EMA teacher.

Usage:
    python -m cosmos_fast.eval --checkpoint runs/x/checkpoint.pt --imagefolder DIR [--templates "a photo of a {}."]
    python -m cosmos_fast.eval --checkpoint runs/x/checkpoint.pt --karpathy dataset_coco.json --images ROOT --split test
    (both at once, --json results.json to keep them; --model defaults to the one the checkpoint was trained with)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..models import Tokenizer, config_name_for_weights, state_dict_from_checkpoint
from .metrics import (OPENAI_TEMPLATES_SHORT, class_embeddings, classification_accuracy, invalid_templates,
                      retrieval_recall)
from .zero_shot import encode_images, encode_texts, load_checkpoint, load_model, read_imagefolder, read_karpathy


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cosmos_fast.eval",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[3:]))
    parser.add_argument("--checkpoint", required=True,
                        help="the trainer's checkpoint.pt, an upstream COSMOS checkpoint ({epoch, student, teacher}), "
                             "an open_clip CLIP state dict, or a plain CosmosModel state dict")
    parser.add_argument("--model", help="model config (tiny | vit-b16 | vit-b32); default: the checkpoint's "
                                        "training config, else the one the weights' sizes fit")
    parser.add_argument("--which", nargs="+", default=["student", "teacher"], choices=["student", "teacher"])
    parser.add_argument("--imagefolder", help="classification: DIR/<class>/<image>, class names from the folders")
    parser.add_argument("--templates", nargs="+", default=list(OPENAI_TEMPLATES_SHORT),
                        help="prompt templates, '{}' marks the class name (default: 4 short OpenAI prompts)")
    parser.add_argument("--karpathy", help="retrieval: a Karpathy-format JSON (dataset_coco.json, dataset_flickr30k.json)")
    parser.add_argument("--images", help="the directory the JSON's image paths are relative to")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="image-loading processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not args.imagefolder and not args.karpathy:
        parser.error("nothing to evaluate: give --imagefolder DIR and/or --karpathy JSON --images ROOT")
    if args.karpathy and not args.images:
        parser.error("--karpathy needs --images ROOT, the directory its image paths are relative to")
    if bad := invalid_templates(args.templates):
        parser.error(f"every template needs one '{{}}' for the class name (and no other braces): {bad}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    return args


def model_name(args, checkpoint: dict) -> str | None:
    """--model, else the trainer's config's model name, else None (the config is then found by the weights' sizes)."""
    if args.model:
        return args.model
    try:
        saved = checkpoint["config"]  # the trainer's config: a dict (a TrainConfig in checkpoints before 2026-11-24)
        return saved["model"]["name"] if isinstance(saved, dict) else saved.model.name
    except (KeyError, AttributeError, TypeError):
        return None


def evaluate(model, tokenizer, retrieval, classification, templates, args, device) -> dict[str, float]:
    """The metrics of one model on the datasets given (None: skipped)."""
    model = model.to(device)
    options = {"batch_size": args.batch_size, "device": device, "progress": not args.no_progress}
    metrics = {}
    if retrieval is not None:
        image_emb = encode_images(model, retrieval.images, workers=args.workers, **options)
        text_emb = encode_texts(model, tokenizer, retrieval.captions, **options)
        metrics.update(retrieval_recall(image_emb, text_emb, retrieval.caption_image))
    if classification is not None:
        image_emb = encode_images(model, classification.images, workers=args.workers, **options)
        classes = class_embeddings(lambda texts: encode_texts(model, tokenizer, texts, device=device),
                                   classification.class_names, templates)
        metrics.update(classification_accuracy(image_emb, classification.labels, classes))
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    # read the data first: a wrong path fails before any model is built
    retrieval = read_karpathy(args.karpathy, args.images, args.split) if args.karpathy else None
    classification = read_imagefolder(args.imagefolder) if args.imagefolder else None
    checkpoint = load_checkpoint(args.checkpoint)
    name = model_name(args, checkpoint)
    models = {which: load_model(checkpoint, which, name) for which in args.which}
    name = name or config_name_for_weights(state_dict_from_checkpoint(checkpoint, args.which[0]))
    first = next(iter(models.values())).config
    print(f"checkpoint {args.checkpoint}: model {name}, {first.image_size} px, context {first.context_length}")
    chance = {}
    if retrieval is not None:
        chance["R@1"] = 100 / len(retrieval.images)
        print(f"retrieval: {args.karpathy} split {args.split}, {len(retrieval.images)} images, "
              f"{len(retrieval.captions)} captions (chance i2t/t2i R@1 about {chance['R@1']:.2g}%)")
    if classification is not None:
        chance["top1"] = 100 / len(classification.class_names)
        print(f"classification: {args.imagefolder}, {len(classification.class_names)} classes, "
              f"{len(classification.images)} images, {len(args.templates)} templates "
              f"(chance top-1 {chance['top1']:.2g}%)")
    results = {}
    for which, model in models.items():
        tokenizer = Tokenizer(model.config.context_length)
        results[which] = evaluate(model, tokenizer, retrieval, classification, args.templates, args, device)
    columns = list(next(iter(results.values())))
    print(f"\n{'':10}" + "".join(f"{c:>10}" for c in columns))
    for which, metrics in results.items():
        print(f"{which:10}" + "".join(f"{metrics[c]:10.1f}" for c in columns))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "checkpoint": str(args.checkpoint), "model": name, "karpathy": args.karpathy, "split": args.split,
            "imagefolder": args.imagefolder, "templates": args.templates, "chance": chance, "metrics": results,
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, KeyError) as exc:
        sys.exit(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
