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
    """Write samples ``{"key", "image" (PIL), "raw_caption", "long_captions"}`` as tar shards; returns them.

    webdataset splits a member's name at the first dot of its base name, so a key such as ``images/0.jpg``
    would be read back as key ``images/0`` with extension ``jpg.jpg`` (no image): keys are written with dots and
    slashes replaced by underscores (and a counter where that makes two equal)."""
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
        raise ValueError(f"max_count must be a positive int, got {max_count!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {out_dir} is a file, not a folder for the shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    existing = set(out_dir.glob(f"{prefix}-*.tar"))
    written: set[str] = set()
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0) as sink:
        for sample in samples:
            key = shard_key(sample["key"], written)
            sink.write({"__key__": key, "jpg": sample["image"].convert("RGB"),
                        "json": {"raw_caption": sample["raw_caption"],
                                 "long_captions": list(sample.get("long_captions", []))}})
    if not written:
        for empty in set(out_dir.glob(f"{prefix}-*.tar")) - existing:
            empty.unlink()
        raise ValueError("no samples to write: the source is empty (or every sample was skipped)")
    return sorted(out_dir.glob(f"{prefix}-*.tar"))


def shard_key(key, written: set[str]) -> str:
    """``key`` as a webdataset member key (no dots, no slashes), unique among ``written`` (which it joins)."""
    base = str(key).replace(".", "_").replace("/", "_").replace("\\", "_") or "sample"
    unique, n = base, 1
    while unique in written:
        unique, n = f"{base}_{n}", n + 1
    written.add(unique)
    return unique


class SkipCounter:
    """webdataset error handler: warn with the sample's key, count, and go on; ``limit`` unreadable samples in a
    row end the stream with an error (shards with nothing readable would otherwise be resampled forever)."""

    def __init__(self, limit: int = 1000):
        self.skipped = self.in_a_row = 0
        self.limit = limit

    def __call__(self, exc: BaseException) -> bool:
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.in_a_row} samples in a row could not be read (the last: {exc}); the shards "
                               "hold nothing this reader can use") from exc
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


class _CountingDecode:
    """``_decode`` that tells the handler a sample was read (a class, not a closure: workers may pickle it)."""

    def __init__(self, handler: SkipCounter):
        self.handler = handler

    def __call__(self, sample: dict) -> dict:
        decoded = _decode(sample)
        self.handler.in_a_row = 0
        return decoded


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
    return pipeline.map(_CountingDecode(handler), handler=handler)


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
