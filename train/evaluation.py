"""The held-out evaluation the trainer runs every ``eval.every`` steps and at the end of every run, for student
and teacher: the built-in data's held-out split (shapes), the validation loss on ``data.val_path`` shards, and the
paper's benchmarks found under ``eval.root`` (``python -m cosmos_fast.eval --suite paper``'s layout). Every rank
takes part (the forwards are collective under FSDP; the validation loss gathers across ranks); rank 0 reports."""
from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from cosmos_fast.data import ShapesDataset, to_model_input
from cosmos_fast.data.shards import shard_stream
from cosmos_fast.data.synthetic import COLORS, SEGMENTATION_CLASSES
from cosmos_fast.distributed import world
from cosmos_fast.eval import class_embeddings, classification_accuracy, encode_images, encode_texts, retrieval_recall
from cosmos_fast.eval.datasets import SUITE, DatasetMissing
from cosmos_fast.eval.segmentation import ConfusionMatrix, SegmentationSettings, ZeroShotSegmenter
from cosmos_fast.eval.zero_shot import RetrievalSet

# Prompt ensemble for the shapes' class names, worded as the captions are: the class shape's own sentence, and
# the raw caption in every colour (the class's colour varies: the average over colours leaves the shape).
SHAPE_TEMPLATES = ("the large shape is a {}", "a picture of a {}") + tuple(
    f"a picture of {'an' if c[0] in 'aeiou' else 'a'} {c} {{}}" for c in COLORS)
# the segmentation queries' templates: the names as the captions use them ("the background is white", "a red
# circle")
SHAPE_SEG_TEMPLATES = ("{}", "the {}", "a picture of {}")


@contextlib.contextmanager
def gathered(model):
    """FSDP2: every sharded part of ``model`` gathered for the duration, for code that calls a tower's
    submodules directly rather than through a forward FSDP hooks (the segmenter's dense features)."""
    parts = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for part in parts:
        part.unshard()
    try:
        yield
    finally:
        for part in parts:
            part.reshard()


@contextlib.contextmanager
def preserved_state(objective):
    """Everything an evaluation must leave as it found: torch's and Python's random states (a resumed run must
    equal an uninterrupted one) and the objective's buffers (SIMLA's queues)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    python_state = random.getstate()
    objective_state = {k: v.clone() for k, v in objective.state_dict().items()}
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            objective.load_state_dict(objective_state)
            random.setstate(python_state)


class HeldOut:
    """``__call__(student, teacher, step) -> {"val_loss"?: float, "student": {set: metrics}, "teacher": {...}}``.

    The sets: "shapes" (the built-in data's held-out split: retrieval of each image's full description, and shape
    classification), and those of ``eval.root`` (read once; absent ones are named once). The validation loss is the
    objective's mean loss over the first ``eval.val_batches`` global batches of ``data.val_path``, the same batches
    every time, each rank taking its slice of each."""

    def __init__(self, cfg, tokenizer, collate, objective, autocast, device):
        self.cfg, self.tokenizer, self.collate = cfg, tokenizer, collate
        self.objective, self.autocast, self.device = objective, autocast, device
        self.sets, self.missing = {}, {}
        if cfg.data.source == "shapes":
            data = ShapesDataset("heldout", size=cfg.data.eval_size, image_size=cfg.data.image_size,
                                 seed=cfg.run.seed)
            self.shapes = [data[i] for i in range(len(data))]
        if cfg.eval.root:
            chosen = set(cfg.eval.sets.split(",")) if cfg.eval.sets else None
            for bench in SUITE:
                if chosen is None or bench.name in chosen:
                    try:
                        self.sets[bench.name] = bench.read(Path(cfg.eval.root).expanduser())
                    except DatasetMissing as exc:
                        self.missing[bench.name] = str(exc)

    @property
    def configured(self) -> bool:
        return self.cfg.data.source == "shapes" or bool(self.sets) or self.cfg.data.val_path is not None

    def describe(self) -> str:
        parts = (["the shapes' held-out split"] if self.cfg.data.source == "shapes" else []) + list(self.sets)
        if self.cfg.data.val_path:
            parts.append(f"the validation loss on {self.cfg.data.val_path}")
        missing = f" (not found under {self.cfg.eval.root}: {', '.join(self.missing)})" if self.missing else ""
        return ", ".join(parts) + missing

    @torch.no_grad()
    def __call__(self, student, teacher, step: int) -> dict:
        """Leaves the random states and the objective's buffers as it found them: a run with evaluations trains
        exactly as one without (the loaders it starts draw seeds from torch's generator)."""
        with preserved_state(self.objective):
            return self._evaluate(student, teacher, step)

    def _evaluate(self, student, teacher, step: int) -> dict:
        results = {}
        if self.cfg.data.val_path:
            results["val_loss"] = self.validation_loss(student, teacher, step)
        for which, model in (("student", student), ("teacher", teacher.module)):
            was_training = model.training
            model.eval()
            metrics = {}
            if self.cfg.data.source == "shapes":
                metrics["shapes"] = self.shapes_metrics(model)
            for name, data in self.sets.items():
                metrics[name] = self.benchmark_metrics(model, data)
            model.train(was_training)
            results[which] = metrics
        return results

    def shapes_metrics(self, model) -> dict[str, float]:
        """Retrieval of each image's full description, shape classification, and zero-shot segmentation of the
        masks (background and the shape classes; one window over the whole image)."""
        image_emb = encode_images(model, [s["image"] for s in self.shapes], transform=to_model_input(),
                                  device=self.device)
        text_emb = self.encode_texts(model, [s["long_captions"][0] for s in self.shapes])
        metrics = retrieval_recall(image_emb, text_emb, torch.arange(len(self.shapes)))
        classes = class_embeddings(lambda texts: self.encode_texts(model, texts), ShapesDataset.classes,
                                   templates=SHAPE_TEMPLATES)
        metrics.update(classification_accuracy(image_emb, torch.tensor([s["label"] for s in self.shapes]), classes))
        size = self.cfg.data.image_size
        segmenter = ZeroShotSegmenter(model, self.tokenizer, SEGMENTATION_CLASSES, templates=list(SHAPE_SEG_TEMPLATES),
                                      settings=SegmentationSettings(short_side=size), crop=size, stride=size,
                                      batch_size=self.cfg.data.batch_size, device=self.device)
        confusion = ConfusionMatrix(len(SEGMENTATION_CLASSES))
        with gathered(model):
            for start in range(0, len(self.shapes), self.cfg.data.batch_size):
                batch = self.shapes[start:start + self.cfg.data.batch_size]
                for sample, prediction in zip(batch, segmenter.predict([s["image"] for s in batch])):
                    confusion.update(prediction, torch.from_numpy(np.array(sample["mask"], dtype=np.int64)))
        segmentation = confusion.metrics()
        metrics.update(mIoU=segmentation["mIoU"], aAcc=segmentation["aAcc"])
        return metrics

    def benchmark_metrics(self, model, data) -> dict[str, float]:
        image_emb = encode_images(model, data.images, device=self.device, batch_size=self.cfg.data.batch_size)
        if isinstance(data, RetrievalSet):
            return retrieval_recall(image_emb, self.encode_texts(model, data.captions), data.caption_image)
        classes = class_embeddings(lambda texts: self.encode_texts(model, texts), data.class_names, data.templates)
        return classification_accuracy(image_emb, data.labels, classes)

    def encode_texts(self, model, texts):
        return encode_texts(model, self.tokenizer, texts, device=self.device, batch_size=self.cfg.data.batch_size)

    def validation_loss(self, student, teacher, step: int) -> float:
        rank, size = world()
        global_batch, n = self.cfg.data.batch_size, self.cfg.data.batch_size // size
        # every rank reads every shard in order (no node split) and takes its rows of each global batch
        stream = iter(shard_stream(self.cfg.data.val_path, caption_mode=self.cfg.data.caption_mode,
                                   split_by_node=False))
        total, batches = torch.zeros((), device=self.device), 0
        torch.manual_seed(self.cfg.run.seed)  # the same crops every time
        for _ in range(self.cfg.eval.val_batches):
            samples = [s for _, s in zip(range(global_batch), stream)]
            if len(samples) < global_batch:
                break
            batch = self.collate(samples[rank * n:(rank + 1) * n])
            batch = {k: batch[k].to(self.device) for k in ("global", "local", "captions")}
            with self.autocast:
                loss, _ = self.objective(student, teacher, batch, step, 0)
            total += loss.float()
            batches += 1
        if batches == 0:
            raise ValueError(f"data.val_path {self.cfg.data.val_path} holds fewer than one batch "
                             f"({global_batch}) of usable samples")
        if size > 1:
            dist.all_reduce(total)
            total /= size
        return total.item() / batches


def flat_record(results: dict) -> dict[str, float]:
    """{"val_loss", "eval/<model>/<set>/<metric>": value} for metrics.jsonl and TensorBoard."""
    record = {"val_loss": results["val_loss"]} if "val_loss" in results else {}
    for which in ("student", "teacher"):
        for name, metrics in results.get(which, {}).items():
            record.update({f"eval/{which}/{name}/{k}": v for k, v in metrics.items()})
    return record


def print_report(results: dict, chance: dict) -> None:
    """One table per set (student and teacher rows), then the validation loss."""
    for name in results["student"]:
        columns = list(results["student"][name])
        hint = ", ".join(f"{k} {v:.3g}%" for k, v in chance.get(name, {}).items())
        print(f"\nheld-out {name}" + (f" (chance {hint})" if hint else ""))
        print(f"{'':10}" + "".join(f"{k:>10}" for k in columns))
        for which in ("student", "teacher"):
            print(f"{which:10}" + "".join(f"{results[which][name][k]:10.1f}" for k in columns))
    if "val_loss" in results:
        print(f"\nvalidation loss: {results['val_loss']:.4f}")


def chance_levels(held_out: HeldOut) -> dict[str, dict[str, float]]:
    chance = {}
    if held_out.cfg.data.source == "shapes":  # and, for segmentation, predicting background everywhere
        background = ConfusionMatrix(len(SEGMENTATION_CLASSES))
        for sample in held_out.shapes:
            mask = torch.from_numpy(np.array(sample["mask"], dtype=np.int64))
            background.update(torch.zeros_like(mask), mask)
        chance["shapes"] = {"R@1": 100 / held_out.cfg.data.eval_size, "top1": 100 / len(ShapesDataset.classes),
                            "mIoU_all_background": background.metrics()["mIoU"]}
    for name, data in held_out.sets.items():
        chance[name] = ({"R@1": 100 / len(data.images)} if isinstance(data, RetrievalSet)
                        else {"top1": 100 / len(data.class_names)})
    return chance
