"""Zero-shot evaluation of a CosmosModel on user data: encoders over batches, the two dataset layouts (COCO/Flickr
Karpathy JSON for retrieval, an ImageFolder for classification) and checkpoint loading."""
from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from PIL import Image
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from ..data.augment import to_model_input
from ..models import (CosmosModel, Tokenizer, config_for_weights, config_name_for_weights, load_weights,
                      state_dict_from_checkpoint)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_transform(size: int) -> T.Compose:
    """PIL image -> the model's input, float32 [3, size, size]: shorter side resized to ``size`` (bicubic),
    centre-cropped square, CLIP-normalised."""
    return T.Compose([T.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                      to_model_input()])


class _Images(torch.utils.data.Dataset):
    """Images given as PIL images or paths (opened lazily, in the loader's workers), transformed."""

    def __init__(self, images: Sequence, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.images[index]
        if not isinstance(image, Image.Image):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except OSError as exc:  # an unreadable image would change every metric's denominator if skipped
                raise ValueError(f"cannot read image {image}: {exc}") from exc
        return self.transform(image)


@torch.no_grad()
def encode_images(model: CosmosModel, images: Sequence, transform=None, batch_size: int = 256, device="cpu",
                  workers: int = 0, progress: bool = False, desc: str = "images") -> torch.Tensor:
    """[N, E] unnormalised image embeddings (on the CPU, in the model's dtype) of PIL images or image paths.
    ``transform`` defaults to :func:`image_transform` at the model's image size."""
    transform = transform or image_transform(model.config.image_size)
    loader = torch.utils.data.DataLoader(_Images(images, transform), batch_size=batch_size, num_workers=workers)
    return torch.cat([model.encode_image(batch.to(device))[0].cpu()
                      for batch in tqdm(loader, desc=desc, disable=not progress, leave=False)])


@torch.no_grad()
def encode_texts(model: CosmosModel, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256,
                 device="cpu", progress: bool = False, desc: str = "texts") -> torch.Tensor:
    """[N, E] unnormalised text embeddings (on the CPU, in the model's dtype) of N strings."""
    starts = range(0, len(texts), batch_size)
    return torch.cat([model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(device))[0].cpu()
                      for i in tqdm(starts, desc=desc, disable=not progress, leave=False)])


@dataclass
class RetrievalSet:
    """Images and their captions, several per image: ``caption_image`` [T] int64, ``caption_image[j]`` the index of
    the image caption ``j`` describes."""
    images: list[Path]
    captions: list[str]
    caption_image: torch.Tensor


@dataclass
class ClassificationSet:
    """Images (paths or PIL images), their classes (``labels`` [N] int64 indexes into ``class_names``), the class
    names and the dataset's own prompt templates (None: the caller's)."""
    images: Sequence
    labels: torch.Tensor
    class_names: list[str]
    templates: list[str] | None = None


def read_karpathy(json_path: str | Path, image_root: str | Path, split: str = "test") -> RetrievalSet:
    """One split of a Karpathy-format COCO/Flickr JSON: ``{"images": [{"filename", "filepath"?, "split",
    "sentences": [{"raw"}]}]}``; an image's file is ``image_root/filepath/filename`` (COCO) or
    ``image_root/filename`` (Flickr). Images without captions are left out."""
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise FileNotFoundError(f"no Karpathy JSON at {json_path}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root {image_root} is not a directory")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{json_path} is not JSON: {exc}") from exc
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"{json_path} has no 'images' list of objects: not a Karpathy-format JSON")
    chosen = [e for e in entries if e.get("split") == split and e.get("sentences")]
    if not chosen:
        splits = sorted({str(e.get("split")) for e in entries})
        raise ValueError(f"{json_path}: no captioned images in split {split!r} (splits there: {splits})")
    images, captions, caption_image = [], [], []
    for index, entry in enumerate(chosen):
        if not isinstance(entry.get("filename"), str):
            raise ValueError(f"{json_path}: image {index} of split {split!r} has no 'filename'")
        images.append(image_root / entry.get("filepath", "") / entry["filename"])
        for sentence in entry["sentences"]:
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise ValueError(f"{json_path}: a sentence of {entry['filename']} has no 'raw' text")
            captions.append(sentence["raw"].strip())
            caption_image.append(len(images) - 1)
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} images of split {split!r} are missing under "
                                f"{image_root}, e.g. {missing[0]}")
    return RetrievalSet(images, captions, torch.tensor(caption_image))


def read_imagefolder(root: str | Path) -> ClassificationSet:
    """An ImageFolder layout, ``root/<class>/<image>``: classes in sorted folder order, named by their folder with
    ``_`` read as a space (``golden_retriever`` -> "golden retriever")."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class folders (expected {root}/<class>/<image>)")
    images, labels = [], []
    empty = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            empty.append(folder.name)
        images += files
        labels += [label] * len(files)
    if empty:
        raise ValueError(f"class folders without images ({', '.join(IMAGE_EXTENSIONS)}) in {root}: {empty}")
    return ClassificationSet(images, torch.tensor(labels), [p.name.replace("_", " ") for p in folders])


class _Stub:
    """Stands in, while unpickling, for a class that cannot be imported here (the trainer's config dataclasses
    live in train/, outside the package); its fields still read as attributes."""


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return _Stub


class _LenientPickle:
    """A pickle module for ``torch.load`` that stubs out classes it cannot import."""
    Unpickler = _LenientUnpickler
    load = staticmethod(pickle.load)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint on the CPU. It is unpickled in full (the trainer stores its config): load only files you
    trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LenientPickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # not a torch.save file, or a truncated one
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def load_model(checkpoint: dict, which: str = "student", name: str | None = None) -> CosmosModel:
    """The ``which`` ("student" or "teacher") CosmosModel of a checkpoint in any layout: the trainer's, upstream
    COSMOS's (``{"epoch", "student", "teacher"}``), open_clip's CLIP (the towers; the COSMOS modules, which
    zero-shot evaluation does not use, keep their initial values) or a plain state dict. The config is ``name``,
    or found by the weights' sizes; the image size and context length are the weights' (a model trained at
    another resolution is evaluated as it was trained). In eval mode."""
    config_of_run = checkpoint.get("config")
    if isinstance(config_of_run, dict) and config_of_run.get("run", {}).get("objective") == "simla":
        raise ValueError("this is a SIMLA checkpoint: evaluate it with --simla-retrieval (SIMLA's ITM re-ranked "
                         "retrieval); the other evaluations read COSMOS models")
    state = state_dict_from_checkpoint(checkpoint, which)
    model = CosmosModel(config_for_weights(state, name))
    load_weights(model, state)
    return model.eval()


def load_open_clip_model(spec: str) -> tuple[CosmosModel, str]:
    """(CosmosModel, config name) holding open_clip's ``NAME[:PRETRAINED]`` weights (``ViT-B-16:openai``; PRETRAINED
    a tag open_clip knows, which it may download, or a local file), in eval mode. The towers are open_clip's exactly
    (QuickGELU where the model has it, as OpenAI's CLIP); the COSMOS modules, which zero-shot evaluation does not
    use, keep their initial values."""
    import open_clip

    arch, _, pretrained = spec.partition(":")
    try:
        reference = open_clip.create_model(arch, pretrained=pretrained or None, device="cpu")
    except RuntimeError as exc:  # an unknown model name or pretrained tag
        raise ValueError(f"--open-clip {spec}: {exc}") from exc
    if not hasattr(reference, "visual") or not hasattr(reference, "transformer"):
        raise ValueError(f"--open-clip {spec}: not a CLIP with open_clip's own towers (a timm or HF tower?)")
    state = reference.state_dict()
    name = config_name_for_weights(state)
    quick = any(isinstance(m, open_clip.transformer.QuickGELU) for m in reference.modules())
    cfg = config_for_weights(state, name)
    model = CosmosModel(replace(cfg, quick_gelu=quick))
    load_weights(model, state)
    return model.eval(), name

