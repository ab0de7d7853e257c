"""Zero-shot evaluation of a checkpoint, student and teacher: the COSMOS paper's retrieval, classification and
open-vocabulary segmentation benchmarks (``--suite paper``: every set present under a root, in the paper's order),
or single sets.

Usage:
    python -m cosmos_fast.eval --checkpoint CKPT --suite paper --root DATA_ROOT [--json results.json]
    python -m cosmos_fast.eval --open-clip ViT-B-16:openai --suite paper --root DATA_ROOT   (open_clip weights)
    python -m cosmos_fast.eval --checkpoint CKPT --coco DATA_ROOT/coco --flickr flickr30k_test.json
    python -m cosmos_fast.eval --checkpoint CKPT --imagenet imagenet/data/val_images --imagefolder DIR
    python -m cosmos_fast.eval --checkpoint CKPT --karpathy dataset_coco.json --images ROOT --split test
    python -m cosmos_fast.eval --checkpoint CKPT --which teacher --segmentation voc21 ade20k --root DATA_ROOT [--csa]
    python -m cosmos_fast.eval --simla-retrieval --checkpoint SIMLA_CKPT --coco DATA_ROOT/coco [--k-test 256]
CKPT: the trainer's checkpoint.pt, upstream COSMOS's ({epoch, student, teacher}), an open_clip CLIP state dict or
a plain CosmosModel state dict; the model config is the checkpoint's, or found by the weights' sizes. Results:
a table on stdout, --json (the suite: suite.json by default) and a bar chart beside it (.png).
--simla-retrieval: a SIMLA checkpoint (this trainer's or SIMLA's released ``{"model": ...}``), evaluated as SIMLA
reports retrieval: ITC top-k candidates re-ranked by the ITM head, WordPiece captions (--tokenizer).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..models import Tokenizer, config_name_for_weights, state_dict_from_checkpoint
from .datasets import SUITE, DatasetMissing, read_coco_captions, read_flickr_json, read_imagenet
from .segmentation import (SEGMENTATION_SUITE, SegmentationSet, ZeroShotSegmenter, draw_examples,
                           evaluate_segmentation, generic_set, read_names_file)
from .metrics import (OPENAI_TEMPLATES_SHORT, class_embeddings, classification_accuracy, invalid_templates,
                      retrieval_recall)
from .zero_shot import (RetrievalSet, encode_images, encode_texts, load_checkpoint, load_model,
                        load_open_clip_model, read_imagefolder, read_karpathy)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cosmos_fast.eval",
                                     description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[3:]))
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="a checkpoint file (see below)")
    weights.add_argument("--open-clip", metavar="NAME[:PRETRAINED]",
                         help="open_clip's model NAME with its PRETRAINED weights (a tag such as openai, or a file): "
                              "OpenAI CLIP and other open_clip models beside COSMOS runs")
    parser.add_argument("--model", help="model config (tiny | vit-b16 | vit-b32); default: the checkpoint's "
                                        "training config, else the one the weights' sizes fit")
    parser.add_argument("--which", nargs="+", default=None, choices=["student", "teacher"],
                        help="default: both (an open_clip model has one: student)")
    parser.add_argument("--suite", choices=["paper"], help="every benchmark of the paper found under --root")
    parser.add_argument("--root", help="the benchmarks' root (--suite): coco/, flickr30k-images/, imagenet/ and "
                                       "torchvision's folders of the ten classification sets")
    parser.add_argument("--sets", nargs="+", metavar="NAME", help=f"only these of the suite: "
                                                                  f"{' '.join(b.name for b in SUITE)}")
    parser.add_argument("--classnames", help="a JSON {dataset: [class names]} overriding clip_benchmark's names "
                                             "(upstream COSMOS's src/dataloaders/label.json gives its numbers)")
    parser.add_argument("--coco", help="COCO 2017 val in upstream's layout: DIR/annotations/captions_val2017.json, "
                                       "DIR/images/val2017/")
    parser.add_argument("--flickr", help="flickr30k_test.json (FLAIR's / upstream's format)")
    parser.add_argument("--imagenet", help="ImageNet val images in wnid folders (DIR/n01440764/...)")
    parser.add_argument("--imagefolder", help="classification: DIR/<class>/<image>, class names from the folders")
    parser.add_argument("--segmentation", nargs="+", metavar="NAME",
                        help=f"zero-shot segmentation sets under --root: {' '.join(b.name for b in SEGMENTATION_SUITE)}"
                             ", or 'generic' (--seg-images, --seg-labels, --seg-names)")
    parser.add_argument("--seg-names", help="class names, one line per class, several separated by ', ' (SCLIP's "
                                            "and upstream's cls_*.txt give their numbers); with several sets, a "
                                            "folder of NAME.txt or cls_NAME.txt files")
    parser.add_argument("--seg-images", help="generic segmentation: the images")
    parser.add_argument("--seg-labels", help="generic segmentation: same-stem .png label maps (255 ignored)")
    parser.add_argument("--csa", action="store_true", help="SCLIP's correlative self-attention in the last block")
    parser.add_argument("--examples", type=int, default=4, help="segmentation examples drawn per set (PNG)")
    parser.add_argument("--templates", nargs="+", default=list(OPENAI_TEMPLATES_SHORT),
                        help="prompt templates for --imagefolder, '{}' marks the class name (default: 4 short "
                             "OpenAI prompts; the benchmarks bring their own)")
    parser.add_argument("--karpathy", help="retrieval: a Karpathy-format JSON (dataset_coco.json, ...)")
    parser.add_argument("--images", help="the directory the --karpathy JSON's image paths are relative to")
    parser.add_argument("--split", default="test", help="the --karpathy split")
    simla = parser.add_argument_group("SIMLA")
    simla.add_argument("--simla-retrieval", action="store_true",
                       help="SIMLA's retrieval (ITC top-k, ITM re-ranking) on the retrieval sets given")
    simla.add_argument("--k-test", type=int, help="ITM candidates per query (default: 256 on COCO, 128 otherwise, "
                       "as SIMLA's configs)")
    simla.add_argument("--image-size", type=int, help="evaluate at this size (SIMLA: 384; default: the weights')")
    simla.add_argument("--tokenizer", help="WordPiece vocabulary: a directory or a Hugging Face name in the local "
                       "cache (default: the model config's, bert-base-uncased or the tiny one)")
    simla.add_argument("--context-length", type=int, default=30, help="caption tokens (SIMLA's retrieval: 30)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0, help="image-loading processes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", help="also write the results here (and a bar chart beside it, .png)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    singles = ("coco", "flickr", "imagenet", "imagefolder", "karpathy", "segmentation")
    if not args.suite and not any(getattr(args, k) for k in singles):
        parser.error("nothing to evaluate: give --suite paper --root DIR, or --coco, --flickr, --imagenet, "
                     "--imagefolder, --karpathy, --segmentation")
    seg_known = {b.name for b in SEGMENTATION_SUITE} | {"generic"}
    if unknown_seg := sorted(set(args.segmentation or ()) - seg_known):
        parser.error(f"--segmentation: unknown {unknown_seg} (known: {' '.join(sorted(seg_known))})")
    if args.segmentation and set(args.segmentation) - {"generic"} and not args.root:
        parser.error("--segmentation NAME needs --root, the directory the sets are under")
    if "generic" in (args.segmentation or ()) and not (args.seg_images and args.seg_labels and args.seg_names):
        parser.error("--segmentation generic needs --seg-images DIR, --seg-labels DIR and --seg-names FILE")
    if args.suite and not args.root:
        parser.error("--suite paper needs --root, the directory the benchmarks are under")
    if args.sets and not args.suite:
        parser.error("--sets chooses among the suite's benchmarks: give --suite paper --root DIR")
    suite_names = [b.name for b in SUITE] + [b.name for b in SEGMENTATION_SUITE]
    unknown = sorted(set(args.sets or ()) - set(suite_names))
    if unknown:
        parser.error(f"--sets: unknown {unknown} (the suite's: {' '.join(suite_names)})")
    if args.karpathy and not args.images:
        parser.error("--karpathy needs --images ROOT, the directory its image paths are relative to")
    if bad := invalid_templates(args.templates):
        parser.error(f"every template needs one '{{}}' for the class name (and no other braces): {bad}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be at least 1 and --workers at least 0")
    if args.simla_retrieval:
        if args.open_clip or not args.checkpoint:
            parser.error("--simla-retrieval evaluates a SIMLA --checkpoint")
        if args.suite or args.imagenet or args.imagefolder or args.segmentation:
            parser.error("--simla-retrieval runs retrieval sets only: --coco, --flickr, --karpathy")
        if args.k_test is not None and args.k_test < 1:
            parser.error("--k-test must be at least 1")
    if (args.suite or args.segmentation) and args.json is None:
        args.json = "suite.json" if args.suite else "segmentation.json"
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


def read_sets(args) -> tuple[dict, dict]:
    """({name: RetrievalSet | ClassificationSet} in the paper's order, {name: where it was looked for} of the
    suite's absent sets). Single-set flags fail on a missing set; the suite skips it."""
    sets, missing = {}, {}
    if args.suite:
        class_names = json.loads(Path(args.classnames).read_text()) if args.classnames else None
        for bench in SUITE:
            if args.sets and bench.name not in args.sets:
                continue
            try:
                sets[bench.name] = bench.read(Path(args.root), class_names)
            except DatasetMissing as exc:
                missing[bench.name] = str(exc)
    if args.coco:
        sets["coco"] = read_coco_captions(Path(args.coco) / "annotations" / "captions_val2017.json",
                                          Path(args.coco) / "images" / "val2017")
    if args.flickr:
        sets["flickr30k"] = read_flickr_json(args.flickr)
    if args.karpathy:
        sets[f"karpathy-{args.split}"] = read_karpathy(args.karpathy, args.images, args.split)
    if args.imagenet:
        sets["imagenet"] = read_imagenet(args.imagenet)
    if args.imagefolder:
        folder = read_imagefolder(args.imagefolder)
        folder.templates = args.templates
        sets["imagefolder"] = folder
    wanted = list(args.segmentation or ())
    if args.suite:
        wanted += [b.name for b in SEGMENTATION_SUITE if not args.sets or b.name in args.sets]
    for bench in SEGMENTATION_SUITE:
        if bench.name in wanted:
            try:
                sets[bench.name] = bench.read(Path(args.root), segmentation_names(args.seg_names, bench.name))
            except DatasetMissing as exc:
                if bench.name in (args.segmentation or ()):
                    raise
                missing[bench.name] = str(exc)
    if "generic" in wanted:
        sets["generic"] = generic_set(args.seg_images, args.seg_labels, args.seg_names)
    return sets, missing


def segmentation_names(path: str | None, name: str) -> list[list[str]] | None:
    """A set's class names from --seg-names: a file, or a folder holding NAME.txt / cls_NAME.txt (SCLIP's and
    upstream's file names; cls_city_scapes.txt and cls_coco_stuff.txt included); None: the set's own."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return read_names_file(path)
    aliases = {"cityscapes": "city_scapes", "coco_stuff164k": "coco_stuff"}
    for candidate in (f"{name}.txt", f"cls_{name}.txt", f"cls_{aliases.get(name, name)}.txt"):
        if (path / candidate).is_file():
            return read_names_file(path / candidate)
    return None


def evaluate(model, tokenizer, sets: dict, args, device, which: str) -> dict[str, dict[str, float]]:
    """{set: metrics} of one model: R@1/5/10 both ways for retrieval sets, top-1/5 for classification sets, mIoU,
    aAcc and per-class IoU for segmentation sets (a PNG of examples beside the JSON)."""
    model = model.to(device)
    results = {}
    for name, data in sets.items():
        if isinstance(data, SegmentationSet):
            results[name] = segment(model, tokenizer, name, data, args, device, which)
            continue
        options = {"batch_size": args.batch_size, "device": device, "progress": not args.no_progress}
        image_emb = encode_images(model, data.images, workers=args.workers, desc=f"{name} images", **options)
        if isinstance(data, RetrievalSet):
            text_emb = encode_texts(model, tokenizer, data.captions, desc=f"{name} texts", **options)
            results[name] = retrieval_recall(image_emb, text_emb, data.caption_image)
        else:
            classes = class_embeddings(
                lambda texts: encode_texts(model, tokenizer, texts, batch_size=args.batch_size, device=device),
                data.class_names, data.templates or args.templates, progress=not args.no_progress, desc=name)
            results[name] = classification_accuracy(image_emb, data.labels, classes)
    return results


def segment(model, tokenizer, name: str, data: SegmentationSet, args, device, which: str) -> dict:
    autocast = torch.bfloat16 if device.type == "cuda" else None
    segmenter = ZeroShotSegmenter(model, tokenizer, data.class_names, settings=data.settings, csa=args.csa,
                                  batch_size=args.batch_size, device=device, autocast_dtype=autocast)
    metrics, examples = evaluate_segmentation(segmenter, data, progress=not args.no_progress,
                                              desc=f"{name} ({which})", keep=args.examples)
    if args.json and examples:
        path = Path(args.json).with_name(f"{Path(args.json).stem}-{name}-{which}.png")
        draw_examples(path, examples, data.class_names, data.palette,
                      f"{name}, {which}: mIoU {metrics['mIoU']:.1f}" + (" (CSA)" if args.csa else ""))
        print(f"wrote {path}")
    return metrics


def columns(sets: dict) -> list[tuple[str, str, str]]:
    """(set, metric, heading) of the table, in the paper's order: R@1 both ways per retrieval set, top-1 per
    classification set, mIoU per segmentation set."""
    out = []
    for name, data in sets.items():
        if isinstance(data, RetrievalSet):
            out += [(name, "i2t_R@1", f"{name} I2T"), (name, "t2i_R@1", f"{name} T2I")]
        elif isinstance(data, SegmentationSet):
            out.append((name, "mIoU", f"{name} mIoU"))
        else:
            out.append((name, "top1", name))
    return out


def print_table(results: dict, cols: list) -> None:
    width = max([10] + [len(h) + 2 for _, _, h in cols])
    print("\n" + f"{'':10}" + "".join(f"{h:>{width}}" for _, _, h in cols))
    for which, metrics in results.items():
        print(f"{which:10}" + "".join(f"{metrics[s][m]:{width}.1f}" for s, m, _ in cols))


def bar_chart(path: Path, results: dict, cols: list, title: str) -> Path | None:
    """The table as grouped bars (one group per column, one bar per model), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cols) + 2), 4.5))
    width = 0.8 / max(1, len(results))
    for k, (which, metrics) in enumerate(results.items()):
        values = [metrics[s][m] for s, m, _ in cols]
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(cols))]
        bars = ax.bar(xs, values, width, label=which)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(cols)), [h for _, _, h in cols], rotation=30, ha="right")
    ax.set_ylabel("R@1 / top-1 / mIoU (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    sets, missing = read_sets(args)  # the data first: a wrong path fails before any model is built
    if missing:
        print("not found, skipped: " + "; ".join(missing.values()))
    if not sets:
        raise DatasetMissing(f"none of the suite's benchmarks is under {args.root}: {'; '.join(missing.values())}")
    if args.simla_retrieval:
        return run_simla_retrieval(args, sets, device)
    if args.open_clip:
        which_models = args.which or ["student"]
        if which_models != ["student"]:
            raise ValueError("an open_clip model has one set of weights: --which student")
        model, name = load_open_clip_model(args.open_clip)
        models, source = {"student": model}, f"open_clip {args.open_clip}"
    else:
        checkpoint = load_checkpoint(args.checkpoint)
        name = model_name(args, checkpoint)
        models = {which: load_model(checkpoint, which, name) for which in args.which or ["student", "teacher"]}
        name = name or config_name_for_weights(state_dict_from_checkpoint(checkpoint, next(iter(models))))
        source = f"checkpoint {args.checkpoint}"
    first = next(iter(models.values())).config
    print(f"{source}: model {name}, {first.image_size} px, context {first.context_length}")
    chance = {}
    for set_name, data in sets.items():
        if isinstance(data, SegmentationSet):
            print(f"{set_name}: {len(data.images)} images, {len(data.class_names)} classes (shorter side "
                  f"{data.settings.short_side}, logit scale {data.settings.logit_scale:g})")
            continue
        if isinstance(data, RetrievalSet):
            chance[set_name] = {"R@1": 100 / len(data.images)}
            size = f"{len(data.captions)} captions (chance R@1 about {chance[set_name]['R@1']:.2g}%)"
        else:
            chance[set_name] = {"top1": 100 / len(data.class_names)}
            size = (f"{len(data.class_names)} classes, {len(data.templates or args.templates)} templates (chance "
                    f"top-1 {chance[set_name]['top1']:.2g}%)")
        print(f"{set_name}: {len(data.images)} images, {size}")
    results = {which: evaluate(model, Tokenizer(model.config.context_length), sets, args, device, which)
               for which, model in models.items()}
    cols = columns(sets)
    print_table(results, cols)
    if args.json:
        path = Path(args.json)
        def task(data):
            return ("retrieval" if isinstance(data, RetrievalSet) else "segmentation"
                    if isinstance(data, SegmentationSet) else "classification")

        record = {"source": source, "model": name, "csa": args.csa, "sets": {
            k: {"task": task(d), "images": len(d.images)} for k, d in sets.items()}, "missing": missing, "columns": [h for _, _, h in cols], "chance": chance,
            "metrics": results}
        if args.imagefolder:
            record["templates"] = args.templates
        path.write_text(json.dumps(record, indent=2) + "\n")
        chart = bar_chart(path.with_suffix(".png"), results, cols, f"zero-shot: {source}")
        print(f"wrote {path}" + (f" and {chart}" if chart else " (no chart: matplotlib is not installed)"))
    return 0


def run_simla_retrieval(args, sets: dict, device) -> int:
    """SIMLA's ITM re-ranked retrieval of the checkpoint's student and momentum model on each retrieval set."""
    from ..models.simla_text import CaptionTokenizer
    from .simla_retrieval import load_simla_model, simla_retrieval

    checkpoint = load_checkpoint(args.checkpoint)
    models = {which: load_simla_model(checkpoint, which, args.model, args.image_size).to(device)
              for which in args.which or ["student", "teacher"]}
    first = next(iter(models.values())).config
    tokenizer = CaptionTokenizer(args.tokenizer or first.tokenizer, args.context_length)
    if tokenizer.vocab_size != first.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {first.vocab_size}: give the "
                         "model's vocabulary with --tokenizer")
    print(f"checkpoint {args.checkpoint}: SIMLA {first.image_size} px, captions of {args.context_length} tokens")
    results = {which: {} for which in models}
    k_test = {name: args.k_test or (256 if name == "coco" else 128) for name in sets}  # SIMLA's configs
    for set_name, data in sets.items():
        k = k_test[set_name]
        print(f"{set_name}: {len(data.images)} images, {len(data.captions)} captions, ITM over the top {k}")
        for which, model in models.items():
            results[which][set_name] = simla_retrieval(model, tokenizer, data.images, data.captions,
                                                       data.caption_image, k, args.batch_size, device, args.workers,
                                                       progress=not args.no_progress)
    cols = columns(sets)
    print_table(results, cols)
    if args.json:
        path = Path(args.json)
        record = {"source": f"checkpoint {args.checkpoint}", "protocol": "SIMLA ITM re-ranked retrieval",
                  "k_test": k_test, "metrics": results}
        path.write_text(json.dumps(record, indent=2) + "\n")
        chart = bar_chart(path.with_suffix(".png"), results, cols, f"SIMLA retrieval: {args.checkpoint}")
        print(f"wrote {path}" + (f" and {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (FileNotFoundError, ValueError, KeyError, ModuleNotFoundError) as exc:
        sys.exit(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}")
