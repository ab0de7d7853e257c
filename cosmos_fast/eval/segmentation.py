"""Zero-shot open-vocabulary semantic segmentation (the COSMOS paper's third task), SCLIP's method on current torch,
without mmsegmentation.

A :class:`ZeroShotSegmenter` scores every patch token of the image tower (after its final LayerNorm, through the
image projection, L2-normalised) against one text query per class name (80 OpenAI templates, averaged and
renormalised; a class may have several names, and takes their maximum probability). Images are resized (shorter
side to the set's size), covered by 224 px windows at a stride of 112, and the windows' logits, bilinearly
upsampled to the window, averaged where they overlap; the windows of a whole batch of images run through the
tower together. Then, as upstream: logits times ``logit_scale``, softmax over queries, optional removal of
classes covering under ``area_thd`` of the predicted foreground, argmax, pixels whose top probability is under
``prob_thd`` set to background (class 0). ``csa=True`` replaces the last block's attention by SCLIP's correlative
self-attention, ``softmax(q q^T s) + softmax(k k^T s)``, keeping its residual and MLP.

:class:`ConfusionMatrix` accumulates predictions over a set and reports what mmseg's IoUMetric does: per-class
IoU, mIoU over the classes present in prediction or label (the others left out), pixel accuracy (aAcc), with
label 255 ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.augment import to_model_input

IGNORE_INDEX = 255


# -- the model's dense features --------------------------------------------------------------------------------

def correlative_self_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's CSA through a timm ``Attention`` module's weights: for x [B, N, C],
    ``proj(softmax(q q^T s) v + softmax(k k^T s) v)`` per head, s = head_dim^-0.5 (no key-query product)."""
    B, N, C = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    scale = (C // heads) ** -0.5
    weights = torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1) + \
        torch.softmax(k @ k.transpose(-1, -2) * scale, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, N, C))


def dense_features(model, images: torch.Tensor, csa: bool = False) -> torch.Tensor:
    """images [B, 3, H, W] -> [B, H / p, W / p, E]: every patch token of a CosmosModel's image tower after its final
    LayerNorm, through the image projection, L2-normalised. ``csa``: SCLIP's attention in the last block."""
    visual = model.visual
    x = visual.norm_pre(visual.patch_drop(visual._pos_embed(visual.patch_embed(images))))
    blocks = list(visual.blocks)
    for block in blocks[:-1] if csa else blocks:
        x = block(x)
    if csa:  # the last block with CSA in place of its attention; its residual and MLP kept, as upstream
        last = blocks[-1]
        x = x + last.ls1(correlative_self_attention(last.attn, last.norm1(x)))
        x = x + last.ls2(last.mlp(last.norm2(x)))
    tokens = model.image_projection(visual.norm(x)[:, visual.num_prefix_tokens:])
    patch = model.config.patch_size
    return F.normalize(tokens, dim=-1).reshape(images.shape[0], images.shape[2] // patch, images.shape[3] // patch, -1)


# -- sliding windows -------------------------------------------------------------------------------------------

def window_boxes(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y1, y2, x1, x2) of mmseg's slide inference: a grid at ``stride``, the last windows moved back inside the
    image; a side shorter than ``crop`` is covered by one window of that side."""
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * stride + crop, height), min(j * stride + crop, width)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


@dataclass
class SegmentationSettings:
    """A set's protocol (upstream COSMOS's seg_configs): the shorter image side, the logit scale, the thresholds."""
    short_side: int = 336
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    long_side_max: int = 2048  # mmseg's Resize(scale=(2048, short_side), keep_ratio=True)


class ZeroShotSegmenter:
    """Zero-shot segmentation with a CosmosModel (see the module docstring).

    Args:
        model: a CosmosModel (upstream evaluates the teacher); tokenizer: its Tokenizer.
        class_names: per class, its names (one text query each).
        templates: prompt templates with ``{}`` (the 80 OpenAI templates by default).
        settings: :class:`SegmentationSettings`; crop, stride: the windows (224 / 112 px).
        csa: SCLIP's correlative self-attention in the last block.
        batch_size: windows per forward; device, dtype: where and in what the tower runs (bf16 autocast on CUDA).
    """

    def __init__(self, model, tokenizer, class_names: list[list[str]], templates: list[str] | None = None,
                 settings: SegmentationSettings | None = None, crop: int = 224, stride: int = 112, csa: bool = False,
                 batch_size: int = 32, device="cpu", autocast_dtype: torch.dtype | None = None):
        from .datasets import imagenet_names_and_templates
        from .metrics import class_embeddings
        from .zero_shot import encode_texts

        if not class_names or not all(isinstance(n, list) and n for n in class_names):
            raise ValueError("class_names must be a non-empty list of non-empty lists of names (one list per class)")
        if crop % model.config.patch_size or stride < 1:
            raise ValueError(f"crop must be a multiple of the patch size {model.config.patch_size} and stride at "
                             f"least 1, got {crop} and {stride}")
        self.model, self.settings = model, settings or SegmentationSettings()
        self.crop, self.stride, self.csa, self.batch_size = crop, stride, csa, batch_size
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        templates = templates or imagenet_names_and_templates()[2]
        queries = [name for names in class_names for name in names]
        self.query_class = torch.tensor([c for c, names in enumerate(class_names) for _ in names], device=self.device)
        self.num_classes = len(class_names)
        starts = torch.tensor([0] + [len(names) for names in class_names]).cumsum(0)
        self.first_query = starts[:-1].to(self.device)
        self.extra_queries = [q for q in range(len(queries)) if q not in set(starts[:-1].tolist())]
        with torch.no_grad():
            self.queries = class_embeddings(
                lambda texts: encode_texts(model, tokenizer, texts, device=self.device), queries, templates
            ).to(self.device)

    def resize(self, image: Image.Image) -> Image.Image:
        """mmseg's keep-ratio Resize: the shorter side to ``short_side`` unless the longer would pass its cap."""
        w, h = image.size
        s = self.settings
        factor = min(s.long_side_max / max(h, w), s.short_side / min(h, w))
        return image.resize((int(w * factor + 0.5), int(h * factor + 0.5)), Image.BILINEAR)

    @torch.no_grad()
    def window_logits(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [n, 3, h, w] -> query logits (cosines) [n, Q, h, w], upsampled bilinearly from the patch grid."""
        outputs = []
        for start in range(0, windows.shape[0], self.batch_size):
            chunk = windows[start:start + self.batch_size].to(self.device)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                feats = dense_features(self.model, chunk, self.csa)
            logits = (feats.float() @ self.queries.t()).permute(0, 3, 1, 2)
            outputs.append(F.interpolate(logits, size=chunk.shape[-2:], mode="bilinear", align_corners=False))
        return torch.cat(outputs)

    @torch.no_grad()
    def logits(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Model-input images [3, H, W] (any sizes) -> per image [Q, H, W]: the windows' logits averaged where they
        overlap. Every window of every image runs in batches of ``batch_size`` (grouped by window size)."""
        boxes = [window_boxes(img.shape[1], img.shape[2], self.crop, self.stride) for img in images]
        by_shape: dict[tuple[int, int], list[tuple[int, tuple]]] = {}
        for i, image_boxes in enumerate(boxes):
            for box in image_boxes:
                by_shape.setdefault((box[1] - box[0], box[3] - box[2]), []).append((i, box))
        sums = [torch.zeros(len(self.query_class), img.shape[1], img.shape[2], device=self.device) for img in images]
        counts = [torch.zeros(1, img.shape[1], img.shape[2], device=self.device) for img in images]
        for items in by_shape.values():
            windows = torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in items])
            for (i, (y1, y2, x1, x2)), logits in zip(items, self.window_logits(windows)):
                sums[i][:, y1:y2, x1:x2] += logits
                counts[i][:, y1:y2, x1:x2] += 1
        return [s / c for s, c in zip(sums, counts)]

    def postprocess(self, logits: torch.Tensor) -> torch.Tensor:
        """[Q, H, W] query logits -> [H, W] int64 class map (upstream's post-processing)."""
        probs = torch.softmax(logits * self.settings.logit_scale, dim=0)
        class_probs = probs[self.first_query]
        for query in self.extra_queries:  # several names: the class takes its names' maximum
            c = int(self.query_class[query])
            class_probs[c] = torch.maximum(class_probs[c], probs[query])
        if self.settings.area_thd is not None:  # drop classes covering under area_thd of the predicted foreground
            predicted = class_probs.argmax(0)
            areas = torch.bincount(predicted.flatten(), minlength=self.num_classes)[1:].float()
            keep = (areas > self.settings.area_thd * areas.sum()).float()
            class_probs = torch.cat([class_probs[:1], class_probs[1:] * keep[:, None, None]])
        top, prediction = class_probs.max(0)
        prediction[top < self.settings.prob_thd] = 0
        return prediction

    @torch.no_grad()
    def predict(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """PIL images -> [H, W] int64 class maps at each image's own size."""
        inputs = [to_model_input()(self.resize(image.convert("RGB"))) for image in images]
        out = []
        for image, logits in zip(images, self.logits(inputs)):
            logits = F.interpolate(logits[None], size=(image.height, image.width), mode="bilinear",
                                   align_corners=False)[0]
            out.append(self.postprocess(logits).cpu())
        return out


# -- the metric ------------------------------------------------------------------------------------------------

class ConfusionMatrix:
    """[C, C] counts (rows: label, columns: prediction) over a whole set; label 255 ignored, predictions outside
    [0, C) counted as wrong. ``metrics()`` as mmseg's IoUMetric."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.outside = torch.zeros(num_classes, dtype=torch.int64)  # per label: predictions outside [0, C)

    def update(self, prediction: torch.Tensor, label: torch.Tensor) -> None:
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} must have one shape")
        keep = label != self.ignore_index
        label, prediction = label[keep].long().cpu(), prediction[keep].long().cpu()
        if label.numel() and (label.min() < 0 or label.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}) or {self.ignore_index}, got "
                             f"{int(label.min())}..{int(label.max())}")
        inside = (prediction >= 0) & (prediction < self.num_classes)
        outside = torch.bincount(label[~inside], minlength=self.num_classes)
        index = label[inside] * self.num_classes + prediction[inside]
        self.matrix += torch.bincount(index, minlength=self.num_classes ** 2).reshape(self.num_classes, -1)
        self.outside += outside

    def metrics(self) -> dict:
        """{"mIoU", "aAcc" (percent), "IoU": per class (None where neither predicted nor labelled)}."""
        matrix = self.matrix.double()
        intersection = matrix.diag()
        area_label = matrix.sum(1) + self.outside.double()
        area_pred = matrix.sum(0)
        union = area_label + area_pred - intersection
        iou = [float(100 * i / u) if u > 0 else None for i, u in zip(intersection, union)]
        present = [v for v in iou if v is not None]
        total = float(area_label.sum())
        return {"mIoU": sum(present) / len(present) if present else float("nan"),
                "aAcc": 100 * float(intersection.sum()) / total if total else float("nan"), "IoU": iou}


# -- the benchmarks ----------------------------------------------------------------------------------------------

@dataclass
class SegmentationSet:
    """Images and label maps (paths), class names (per class, its names), palette, protocol, label shift."""
    images: list[Path]
    labels: list[Path]
    class_names: list[list[str]]
    palette: list[list[int]]
    settings: SegmentationSettings = field(default_factory=SegmentationSettings)
    reduce_zero_label: bool = False  # 0 (unlabelled) -> ignore, every other label - 1 (ADE20K, Context59, VOC20)

    def label(self, index: int) -> torch.Tensor:
        with Image.open(self.labels[index]) as image:
            label = torch.from_numpy(np.array(image, dtype=np.int64))
        if label.dim() != 2:
            raise ValueError(f"{self.labels[index]} is not a single-channel label map (shape {tuple(label.shape)})")
        if self.reduce_zero_label:
            label = torch.where(label == 0, IGNORE_INDEX, label - 1)
            label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
        return label


def segmentation_classes() -> dict:
    return json.loads((resources.files("cosmos_fast.eval") / "data" / "segmentation_classes.json").read_text())


def read_names_file(path: str | Path) -> list[list[str]]:
    """SCLIP's (and upstream COSMOS's) class-name files: one line per class, its names separated by ", "."""
    lines = [line.rstrip("\n") for line in Path(path).read_text().splitlines()]
    names = [[n.strip() for n in line.split(",") if n.strip()] for line in lines if line.strip()]
    if not names:
        raise ValueError(f"{path} holds no class names")
    return names


@dataclass(frozen=True)
class SegmentationBenchmark:
    """Where one of the paper's eight sets lies under a root, and its protocol."""
    name: str
    data_root: str  # under the root
    image_dir: str
    label_dir: str
    split_file: str | None  # the ids to read (None: every image of image_dir)
    image_suffix: str
    label_suffix: str
    reduce_zero_label: bool
    settings: SegmentationSettings

    def read(self, root: Path, names: list[list[str]] | None = None) -> SegmentationSet:
        from .datasets import DatasetMissing

        base = Path(root) / self.data_root
        image_dir, label_dir = base / self.image_dir, base / self.label_dir
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DatasetMissing(f"{self.name} not found: no {image_dir} and {label_dir}")
        if self.split_file is not None:
            split = base / self.split_file
            if not split.is_file():
                raise DatasetMissing(f"{self.name} not found: no split file {split}")
            ids = [line.strip() for line in split.read_text().splitlines() if line.strip()]
            images = [image_dir / f"{i}{self.image_suffix}" for i in ids]
            labels = [label_dir / f"{i}{self.label_suffix}" for i in ids]
        else:
            images = sorted(image_dir.rglob(f"*{self.image_suffix}"))
            labels = [label_dir / p.relative_to(image_dir).parent /
                      (p.name[: -len(self.image_suffix)] + self.label_suffix) for p in images]
        missing = [p for p in [*images, *labels] if not p.is_file()]
        if missing or not images:
            raise FileNotFoundError(f"{self.name}: {len(missing)} files missing under {base}, e.g. "
                                    f"{missing[0] if missing else image_dir}")
        meta = segmentation_classes()[self.name]
        class_names = names or [[n] for n in meta["classes"]]
        if len(class_names) != len(meta["classes"]):
            raise ValueError(f"{self.name} has {len(meta['classes'])} classes; the names given hold "
                             f"{len(class_names)}")
        return SegmentationSet(images, labels, class_names, meta["palette"], self.settings, self.reduce_zero_label)


def _bench(name, data_root, image_dir, label_dir, split, image_suffix, label_suffix, reduce_zero, **settings):
    return SegmentationBenchmark(name, data_root, image_dir, label_dir, split, image_suffix, label_suffix,
                                 reduce_zero, SegmentationSettings(**settings))


# upstream COSMOS's seg_configs (SCLIP's): data roots under one root, resize, logit scale, thresholds
SEGMENTATION_SUITE = (
    _bench("voc21", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt",
           ".jpg", ".png", False, logit_scale=65, prob_thd=0.1, area_thd=0.1),
    _bench("voc20", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", "ImageSets/Segmentation/val.txt",
           ".jpg", ".png", True),
    _bench("context60", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext",
           "ImageSets/SegmentationContext/val.txt", ".jpg", ".png", False, logit_scale=50, prob_thd=0.1),
    _bench("context59", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext",
           "ImageSets/SegmentationContext/val.txt", ".jpg", ".png", True),
    _bench("coco_object", "coco_stuff164k", "images/val2017", "annotations/val2017", None, ".jpg",
           "_instanceTrainIds.png", False, logit_scale=50, prob_thd=0.1),
    _bench("coco_stuff164k", "coco_stuff164k", "images/val2017", "annotations/val2017", None, ".jpg",
           "_labelTrainIds.png", False, short_side=448),
    _bench("ade20k", "ade/ADEChallengeData2016", "images/validation", "annotations/validation", None, ".jpg",
           ".png", True),
    _bench("cityscapes", "cityscapes", "leftImg8bit/val", "gtFine/val", None, "_leftImg8bit.png",
           "_gtFine_labelTrainIds.png", False, short_side=560),
)


def generic_set(image_dir: str | Path, label_dir: str | Path, names_file: str | Path,
                settings: SegmentationSettings | None = None) -> SegmentationSet:
    """Your own data: images (any of .jpg/.png/...) and same-stem label maps (.png, class indices, 255 ignored),
    class names one line per class (several names separated by ", ")."""
    from .zero_shot import IMAGE_EXTENSIONS

    image_dir, label_dir = Path(image_dir), Path(label_dir)
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    labels = [label_dir / f"{p.stem}.png" for p in images]
    missing = [p for p in labels if not p.is_file()]
    if not images or missing:
        raise FileNotFoundError(f"{image_dir}: {len(images)} images; label maps missing, e.g. "
                                f"{missing[0] if missing else label_dir}")
    names = read_names_file(names_file)
    rng = np.random.default_rng(0)
    palette = [[0, 0, 0]] + rng.integers(40, 256, size=(len(names) - 1, 3)).tolist()
    return SegmentationSet(images, labels, names, palette, settings or SegmentationSettings())


def evaluate_segmentation(segmenter: ZeroShotSegmenter, data: SegmentationSet, images_per_batch: int = 8,
                          progress: bool = False, desc: str = "segmentation", keep: int = 0):
    """(metrics of :class:`ConfusionMatrix`, the first ``keep`` (image, label, prediction) triples for a figure)."""
    confusion = ConfusionMatrix(len(data.class_names))
    kept = []
    starts = range(0, len(data.images), images_per_batch)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = []
        for path in data.images[start:start + images_per_batch]:
            with Image.open(path) as image:
                batch.append(image.convert("RGB"))
        for offset, (image, prediction) in enumerate(zip(batch, segmenter.predict(batch))):
            label = data.label(start + offset)
            if label.shape != prediction.shape:
                raise ValueError(f"{data.labels[start + offset]} is {tuple(label.shape)}, its image "
                                 f"{tuple(prediction.shape)}")
            confusion.update(prediction, label)
            if len(kept) < keep:
                kept.append((image, label, prediction))
    return confusion.metrics(), kept


def draw_examples(path: Path, examples, class_names: list[list[str]], palette: list[list[int]], title: str) -> Path:
    """A PNG: per example its image, the ground truth and the prediction side by side, in the set's palette (the
    same colour for a class in both), with a legend of the classes shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = np.array(palette + [[255, 255, 255]] * max(0, 256 - len(palette)), dtype=np.uint8)
    colours[IGNORE_INDEX] = [255, 255, 255]

    def paint(label):
        return colours[label.clamp(0, 255).numpy()]

    fig, axes = plt.subplots(len(examples), 3, figsize=(11, 3.4 * len(examples)), squeeze=False)
    shown = set()
    for row, (image, label, prediction) in zip(axes, examples):
        for ax, picture, heading in zip(row, (np.asarray(image), paint(label), paint(prediction)),
                                        ("image", "ground truth (white: ignored)", "prediction")):
            ax.imshow(picture)
            ax.set_title(heading, fontsize=10)
            ax.axis("off")
        shown |= {int(v) for v in torch.cat([label.flatten(), prediction.flatten()]).unique() if v < len(class_names)}
    handles = [Patch(color=colours[c] / 255, label=class_names[c][0]) for c in sorted(shown)]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(handles) / 6), 1, 0.97))
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
