"""The zero-shot benchmarks of the COSMOS paper, read from their usual on-disk layouts (nothing is downloaded).

Retrieval: COCO 2017 val (``captions_val2017.json``, all of each image's captions), Flickr30k test
(``flickr30k_test.json``, FLAIR's and upstream COSMOS's list of ``{"image", "caption": [...]}``) and Karpathy-split
JSONs (:func:`~cosmos_fast.eval.zero_shot.read_karpathy`). Classification: ImageNet-1k from its wnid folders,
named and prompted as OpenAI's CLIP (open_clip's 1000 curated names and 80 templates, timm's wnid order), and ten
sets through torchvision's dataset classes (``download=False``) with clip_benchmark's class names and templates
(the ``eval`` extra). ``SUITE`` lists them in the paper's order, each with where under a root it is looked for
(upstream COSMOS's ``datasets/README.md`` layout; torchvision's own folders for the ten).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .zero_shot import IMAGE_EXTENSIONS, ClassificationSet, RetrievalSet


class DatasetMissing(FileNotFoundError):
    """A benchmark is not where it was looked for; the message says where."""


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from exc


def _check_images(images: list[Path], what: str) -> None:
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} images of {what} are missing, e.g. {missing[0]}")


def read_coco_captions(json_path: str | Path, image_dir: str | Path) -> RetrievalSet:
    """COCO captions (``captions_val2017.json``: ``images`` [{"id", "file_name"}], ``annotations`` [{"image_id",
    "caption"}]), every caption of every image (COCO val2017: 5000 images, 25014 captions), images in
    ``image_dir``. Images in the order of ``images``, captions in the order of ``annotations``."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise DatasetMissing(f"no COCO captions JSON at {json_path}")
    data = _load_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("annotations"), list):
        raise ValueError(f"{json_path} has no 'images' and 'annotations' lists: not a COCO captions JSON")
    index, images = {}, []
    for entry in data["images"]:
        if not isinstance(entry, dict) or "id" not in entry or not isinstance(entry.get("file_name"), str):
            raise ValueError(f"{json_path}: an image entry without 'id' and 'file_name': {entry!r:.80}")
        index[entry["id"]] = len(images)
        images.append(image_dir / entry["file_name"])
    captions, caption_image = [], []
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or ann.get("image_id") not in index or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{json_path}: an annotation without a known 'image_id' and a 'caption': {ann!r:.80}")
        captions.append(ann["caption"].strip())
        caption_image.append(index[ann["image_id"]])
    _check_images(images, str(json_path))
    return RetrievalSet(images, captions, torch.tensor(caption_image))


def read_flickr_json(json_path: str | Path) -> RetrievalSet:
    """Flickr30k as FLAIR and upstream COSMOS ship it (``flickr30k_test.json``): a list of ``{"image":
    "flickr30k-images/NAME.jpg", "caption": [five captions]}``, image paths relative to the parent of the
    folder holding the JSON (that folder is ``flickr30k-images``), or to that folder itself."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DatasetMissing(f"no Flickr30k JSON at {json_path}")
    data = _load_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path} must hold a list of {{'image', 'caption'}} objects")
    images, captions, caption_image = [], [], []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
            raise ValueError(f"{json_path}: entry {i} has no 'image' and 'caption': {entry!r:.80}")
        texts = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{json_path}: entry {i} ({entry['image']}) has no caption strings")
        candidates = [json_path.parent.parent / entry["image"], json_path.parent / entry["image"],
                      json_path.parent / Path(entry["image"]).name]
        images.append(next((c for c in candidates if c.is_file()), candidates[0]))
        captions += [t.strip() for t in texts]
        caption_image += [i] * len(texts)
    _check_images(images, str(json_path))
    return RetrievalSet(images, captions, torch.tensor(caption_image))


def imagenet_names_and_templates() -> tuple[list[str], list[str], list[str]]:
    """(wnids, curated names, templates) of ImageNet-1k: timm's 1000 synsets in index order, open_clip's curated
    class names (OpenAI's) and its 80 OpenAI templates."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
    from timm.data import ImageNetInfo

    wnids = list(ImageNetInfo().label_names())
    templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    return wnids, list(IMAGENET_CLASSNAMES), templates


def read_imagenet(folder: str | Path) -> ClassificationSet:
    """ImageNet-1k validation images in wnid folders (``n01440764/ILSVRC2012_val_00000293_n01440764.JPEG``):
    labels in the 1000-class index order, over all 1000 curated names (a folder subset is scored against every
    class), the 80 OpenAI templates."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetMissing(f"no ImageNet wnid folders at {folder}")
    wnids, names, templates = imagenet_names_and_templates()
    index = {wnid: i for i, wnid in enumerate(wnids)}
    dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in dirs if p.name not in index]
    if unknown or not dirs:
        raise ValueError(f"{folder} must hold ImageNet wnid folders (n01440764, ...); "
                         + (f"not wnids: {unknown[:5]}" if unknown else "it holds none"))
    images, labels = [], []
    for d in dirs:
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        images += files
        labels += [index[d.name]] * len(files)
    if not images:
        raise ValueError(f"the wnid folders in {folder} hold no images")
    return ClassificationSet(images, torch.tensor(labels), names, templates)


# -- the ten classification sets through torchvision -----------------------------------------------------------

@dataclass(frozen=True)
class TorchvisionSet:
    """A torchvision dataset class, the arguments of its test split, clip_benchmark's name for it (its class names
    and templates) and how torchvision's class names are cleaned where clip_benchmark takes them from there."""
    cls: str
    kwargs: dict
    benchmark_name: str
    folder: str  # torchvision's own folder under the root, for messages
    clean: tuple[str, ...] = ("_",)
    label_attrs: tuple[str, ...] = field(default=("_labels", "targets"))


TORCHVISION_SETS = {
    "food101": TorchvisionSet("Food101", {"split": "test"}, "food101", "food-101"),
    "cifar10": TorchvisionSet("CIFAR10", {"train": False}, "cifar10", "cifar-10-batches-py"),
    "cifar100": TorchvisionSet("CIFAR100", {"train": False}, "cifar100", "cifar-100-python"),
    "sun397": TorchvisionSet("SUN397", {}, "sun397", "SUN397", clean=("_", "/")),
    "cars": TorchvisionSet("StanfordCars", {"split": "test"}, "cars", "stanford_cars"),
    "aircraft": TorchvisionSet("FGVCAircraft", {"split": "test", "annotation_level": "variant"}, "fgvc_aircraft",
                               "fgvc-aircraft-2013b"),
    "dtd": TorchvisionSet("DTD", {"split": "test"}, "dtd", "dtd"),
    "pets": TorchvisionSet("OxfordIIITPet", {"split": "test"}, "pets", "oxford-iiit-pet"),
    "caltech101": TorchvisionSet("Caltech101", {"target_type": "category"}, "caltech101", "caltech101",
                                 label_attrs=("y",)),
    "flowers": TorchvisionSet("Flowers102", {"split": "test"}, "flowers", "flowers-102"),
}
# the keys of upstream COSMOS's label.json / templates.json for the same sets, accepted in a --classnames file
UPSTREAM_NAMES = {"stanford_car": "cars", "aircraft": "aircraft", "food101": "food101", "cifar10": "cifar10",
                  "cifar100": "cifar100", "sun397": "sun397", "dtd": "dtd", "pets": "pets",
                  "caltech101": "caltech101", "flowers": "flowers"}


def clip_benchmark_metadata() -> tuple[dict, dict]:
    """(class names, templates) by dataset, as clip_benchmark packages them (``pip install cosmos_fast[eval]``);
    templates with ``{}`` for the class name."""
    try:
        files = resources.files("clip_benchmark") / "datasets"
        names = json.loads((files / "en_classnames.json").read_text())
        templates = json.loads((files / "en_zeroshot_classification_templates.json").read_text())
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ModuleNotFoundError("the ten classification sets take clip_benchmark's class names and templates: "
                                  "pip install 'cosmos_fast[eval]' (or clip_benchmark)") from exc
    return names, {k: [t.replace("{c}", "{}") for t in v] for k, v in templates.items()}


class _ImagesOf(Sequence):
    """The images of a torchvision dataset as a sequence (labels are read separately, without decoding)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index][0].convert("RGB")


def _labels(dataset, spec: TorchvisionSet) -> list[int]:
    for attr in spec.label_attrs:
        if hasattr(dataset, attr):
            return [int(v) for v in getattr(dataset, attr)]
    if hasattr(dataset, "_samples"):  # StanfordCars: (path, label) pairs
        return [int(label) for _, label in dataset._samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def read_torchvision(name: str, root: str | Path, class_names: dict | None = None) -> ClassificationSet:
    """One of ``TORCHVISION_SETS`` (test split) under ``root`` in torchvision's own layout, without download.
    Class names: ``class_names[name]`` if given (a --classnames file: upstream COSMOS's label.json keys work too),
    else clip_benchmark's (its list where it has one, else torchvision's with ``_`` read as a space); templates
    are clip_benchmark's."""
    import torchvision.datasets as tvd

    if name not in TORCHVISION_SETS:
        raise ValueError(f"name must be one of {tuple(TORCHVISION_SETS)}, got {name!r}")
    spec = TORCHVISION_SETS[name]
    names_cb, templates_cb = clip_benchmark_metadata()
    try:
        dataset = getattr(tvd, spec.cls)(str(root), download=False, **spec.kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        raise DatasetMissing(f"{name} not found under {root} (torchvision's {spec.cls} looks for "
                             f"{Path(root) / spec.folder}: {str(exc).splitlines()[0]})") from exc
    names = None
    if class_names:
        names = class_names.get(name) or next((v for k, v in class_names.items() if UPSTREAM_NAMES.get(k) == name
                                                and k != name), None)
    if names is None:
        names = names_cb.get(spec.benchmark_name)
    if names is None:
        names = list(dataset.classes)
        for ch in spec.clean:
            names = [n.replace(ch, " ") for n in names]
    labels = _labels(dataset, spec)
    if max(labels) >= len(names):
        raise ValueError(f"{name}: {len(names)} class names for labels up to {max(labels)}")
    return ClassificationSet(_ImagesOf(dataset), torch.tensor(labels), list(names), templates_cb[spec.benchmark_name])


# -- the suite ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str  # "retrieval" or "classification"
    where: str  # under the root, for messages and the layout docs

    def read(self, root: Path, class_names: dict | None = None):
        if self.name == "coco":
            return read_coco_captions(root / "coco" / "annotations" / "captions_val2017.json",
                                      root / "coco" / "images" / "val2017")
        if self.name == "flickr30k":
            return read_flickr_json(root / "flickr30k-images" / "flickr30k_test.json")
        if self.name == "imagenet":
            for folder in (root / "imagenet" / "data" / "val_images", root / "imagenet" / "val"):
                if folder.is_dir():
                    return read_imagenet(folder)
            raise DatasetMissing(f"no ImageNet wnid folders at {root / 'imagenet' / 'data' / 'val_images'} "
                                 f"or {root / 'imagenet' / 'val'}")
        return read_torchvision(self.name, root, class_names)


# The paper's order: retrieval (COCO, Flickr30k), then the ten sets in upstream's order, then ImageNet.
SUITE = (
    Benchmark("coco", "retrieval", "coco/annotations/captions_val2017.json + coco/images/val2017/"),
    Benchmark("flickr30k", "retrieval", "flickr30k-images/flickr30k_test.json + its images"),
    *(Benchmark(name, "classification", spec.folder) for name, spec in TORCHVISION_SETS.items()),
    Benchmark("imagenet", "classification", "imagenet/data/val_images/<wnid>/ (or imagenet/val/<wnid>/)"),
)
