"""webdataset shards: writing them (``python -m cosmos_fast.data.make_shards``) and streaming them back.

A sample is an image (``jpg``/``png``/``webp``) plus a ``json`` with DreamLIP-style caption fields
(``raw_caption`` and lists of long captions such as ``longIB_captions``) or a plain ``txt`` caption. Streaming
splits shards over ranks and workers (or resamples them for endless epochs); a sample that fails to decode is
skipped with a warning naming its key and counted, so one bad file never ends a long run.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def captions_of(meta: dict) -> tuple[str, list[str]]:
    """(raw caption, long captions) from a sample's JSON: ``raw_caption`` (or ``caption``) and every field whose
    name starts with "long" (a string or a list of strings)."""
    raw = meta.get("raw_caption") or meta.get("caption") or ""
    longs: list[str] = []
    for key, value in meta.items():
        if key.startswith("long"):
            longs += [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    return raw, longs


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str = "shard",
                 max_count: int = 1000) -> list[Path]:
    """Write samples ``{"key", "image" (PIL), "raw_caption", "long_captions"}`` as tar shards; returns them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0) as sink:
        for sample in samples:
            sink.write({"__key__": sample["key"], "jpg": sample["image"].convert("RGB"),
                        "json": {"raw_caption": sample["raw_caption"],
                                 "long_captions": list(sample.get("long_captions", []))}})
    return sorted(out_dir.glob(f"{prefix}-*.tar"))


class SkipCounter:
    """webdataset error handler: warn with the sample's key, count, and go on."""

    def __init__(self):
        self.skipped = 0

    def __call__(self, exc: BaseException) -> bool:
        self.skipped += 1
        warnings.warn(f"skipped: {exc}", stacklevel=2)
        return True


def _decode(sample: dict) -> dict:
    """Raw tar members (bytes) -> our sample. Errors name the sample's key (for the skip warning)."""
    key = sample["__key__"]
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        raise ValueError(f"sample {key!r} has no image ({', '.join(IMAGE_KEYS)})")
    try:
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image = image.convert("RGB")
        meta = json.loads(sample["json"]) if "json" in sample else None
        text = sample["txt"].decode("utf-8") if "txt" in sample else ""
    except Exception as exc:
        raise ValueError(f"sample {key!r} is unreadable: {type(exc).__name__}: {exc}") from exc
    raw, longs = captions_of(meta) if meta is not None else (text, [])
    return {"key": key, "image": image, "raw_caption": raw, "long_captions": longs}


def shard_stream(urls: str | list[str], *, resampled: bool = False, shuffle: int = 0, seed: int = 0,
                 handler: SkipCounter | None = None) -> wds.WebDataset:
    """Samples of the shards at ``urls`` (brace patterns allowed), split over ranks and DataLoader workers;
    ``resampled`` draws shards with replacement forever (each rank and worker its own stream)."""
    handler = handler or SkipCounter()
    pipeline = wds.WebDataset(urls, resampled=resampled, shardshuffle=100 if shuffle and not resampled else False,
                              nodesplitter=None if resampled else wds.split_by_node, handler=handler, seed=seed,
                              empty_check=False)
    if shuffle:
        pipeline = pipeline.shuffle(shuffle)
    return pipeline.map(_decode, handler=handler)


class CaptionFileDataset(torch.utils.data.Dataset):
    """(image path, caption(s)) rows of a CSV or JSONL file; paths relative to ``image_root``.

    CSV: columns ``image_column`` and ``caption_column``. JSONL: objects with ``image_column`` and either
    ``caption_column`` or DreamLIP-style fields. An unreadable image is skipped: ``__getitem__`` warns with the
    row's key and returns None (``collate_skip_none`` drops it) and ``skipped`` counts it (per process).
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 image_column: str = "image", caption_column: str = "caption"):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"caption file {path} does not exist")
        self.root = Path(image_root) if image_root is not None else path.parent
        if path.suffix == ".csv":
            import csv

            with path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        elif path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            raise ValueError(f"caption file must be .csv or .jsonl, got {path.name}")
        if not rows:
            raise ValueError(f"caption file {path} has no rows")
        if image_column not in rows[0]:
            raise ValueError(f"caption file {path} has no column {image_column!r} (has {sorted(rows[0])})")
        self.rows, self.image_column, self.caption_column = rows, image_column, caption_column
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        row = self.rows[index]
        key = str(row[self.image_column])
        try:
            with Image.open(self.root / key) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as exc:
            self.skipped += 1
            warnings.warn(f"skipped sample {key!r}: {exc}", stacklevel=2)
            return None
        if self.caption_column in row:
            raw, longs = row[self.caption_column], []
        else:
            raw, longs = captions_of(row)
        return {"key": key, "image": image, "raw_caption": raw, "long_captions": longs}


def collate_skip_none(batch: list) -> list:
    """A collate function for samples that may be None (skipped): keeps the others as a list."""
    return [sample for sample in batch if sample is not None]


def iterate_folder(folder: str | os.PathLike) -> Iterator[dict]:
    """Samples of a folder of images with same-named ``.txt`` captions (one sentence per line)."""
    for image_path in sorted(p for p in Path(folder).iterdir() if p.suffix.lstrip(".").lower() in IMAGE_KEYS):
        text_path = image_path.with_suffix(".txt")
        lines = text_path.read_text().splitlines() if text_path.exists() else []
        with Image.open(image_path) as image:
            yield {"key": image_path.stem, "image": image.convert("RGB"), "raw_caption": lines[0] if lines else "",
                   "long_captions": lines[1:]}
