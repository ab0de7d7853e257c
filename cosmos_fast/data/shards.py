"""webdataset shards: writing them (``python -m cosmos_fast.data.make_shards``) and streaming them back.

A sample is an image (``jpg``/``jpeg``/``png``/``webp``) plus a ``json`` with caption fields, upstream COSMOS's
formats: FLAIR/DreamLIP recaptioned sets (``raw_caption`` and six ``short*``/``long*`` fields, lists of sentences)
or PixelProse (``original_caption``, ``caption``); or a plain ``txt`` caption. The stream gives each sample's
sentence pool in the chosen caption mode (``cosmos_fast.data.text.caption_pool``). Streaming splits shards over
ranks and workers (or resamples them for endless epochs); a sample that cannot be used (an image that does not
decode, no image, no caption, captions of the wrong type) is skipped with a warning naming its shard and key and
counted, so one bad file never ends a long run.
"""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

from .text import CAPTION_MODES, FLAIR_CAPTION_FIELDS, caption_pool, sentence_pool, split_caption

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHARD_FORMATS = ("flair", "pixelprose")


def captions_of(meta: dict) -> tuple[str, list[str]]:
    """(raw caption, long captions) from a caption row of ours: ``raw_caption`` (or ``caption``) and every field
    whose name starts with "long" (a string or a list of strings)."""
    raw = meta.get("raw_caption") or meta.get("caption") or ""
    longs: list[str] = []
    for key, value in meta.items():
        if key.startswith("long"):
            longs += [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
    return raw, longs


def caption_json(sample: dict, shard_format: str = "flair") -> dict:
    """A sample's caption JSON in upstream's ``shard_format``. A sample carrying ``"json"`` (upstream's fields
    already) keeps it; ``{"raw_caption", "long_captions"}`` (or a caption file's ``{"captions"}``: the first as the
    raw caption, the others as long ones) become FLAIR's presplit lists (the raw caption's
    sentences in ``raw_caption``, the long captions' in ``longIB_captions``, the other five fields empty) or
    PixelProse's ``original_caption`` and newline-joined ``caption``."""
    if "json" in sample:
        return sample["json"]
    if "captions" in sample:
        raw, longs = sample["captions"][0], list(sample["captions"][1:])
    else:
        raw, longs = sample.get("raw_caption") or "", list(sample.get("long_captions", []))
    if shard_format == "pixelprose":
        return {"original_caption": raw, "caption": "\n".join(longs)}
    fields = {field: [] for field in FLAIR_CAPTION_FIELDS}
    fields["raw_caption"] = split_caption(raw)
    fields["longIB_captions"] = [s for text in longs for s in split_caption(text)]
    return fields


def write_shards(samples: Iterable[dict], out_dir: str | os.PathLike, prefix: str = "shard",
                 max_count: int = 1000, shard_format: str = "flair") -> list[Path]:
    """Write samples ``{"key", "image" (PIL), "raw_caption", "long_captions"}`` (or ``{"key", "image", "json"}``
    with upstream's caption fields) as tar shards in upstream's ``shard_format`` ("flair" or "pixelprose", see
    :func:`caption_json`); returns them.

    webdataset splits a member's name at the first dot of its base name, so a key such as ``images/0.jpg``
    would be read back as key ``images/0`` with extension ``jpg.jpg`` (no image): keys are written with dots and
    slashes replaced by underscores (and a counter where that makes two equal)."""
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
        raise ValueError(f"max_count must be a positive int, got {max_count!r}")
    if shard_format not in SHARD_FORMATS:
        raise ValueError(f"shard_format must be one of {SHARD_FORMATS}, got {shard_format!r}")
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
                        "json": caption_json(sample, shard_format)})
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


class UnusableShardsError(RuntimeError):
    """Too many samples in a row could not be used: the shards hold nothing this reader can train on."""


class SkipCounter:
    """webdataset error handler: warn with the sample's shard and key, count, and go on; ``limit`` unusable samples
    in a row end the stream with an error (shards with nothing readable would otherwise be resampled forever).
    ``skipped`` counts them (in this process: each DataLoader worker has its own)."""

    def __init__(self, limit: int = 1000):
        self.skipped = self.in_a_row = 0
        self.limit = limit

    def __call__(self, exc: BaseException) -> bool:
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise UnusableShardsError(f"{self.in_a_row} samples in a row could not be read (the last: {exc}); the shards "
                               "hold nothing this reader can use") from exc
        warnings.warn(f"skipped: {exc}", stacklevel=2)
        return True


def _where(sample: dict) -> str:
    """"sample 'KEY' of SHARD" for messages (webdataset records the shard as ``__url__``)."""
    url = sample.get("__url__")
    return f"sample {sample.get('__key__')!r}" + (f" of {url}" if url else "")


def decode_sample(sample: dict, caption_mode: str = "textcrop") -> dict:
    """Raw tar members (bytes) -> ``{"key", "image" (PIL RGB), "pool" (the sentences, see ``caption_pool``)}``.

    A ``json`` member's captions are read in ``caption_mode``; a sample with only a ``txt`` caption gets its
    sentences (split as upstream splits). Every refusal is a ValueError naming the shard and key (the skip
    warning's text)."""
    where = _where(sample)
    image_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if image_key is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise ValueError(f"{where} has no image ({', '.join(IMAGE_KEYS)}; it has {members})")
    if "json" not in sample and "txt" not in sample:
        raise ValueError(f"{where} has no caption (neither json nor txt)")
    try:
        with Image.open(io.BytesIO(sample[image_key])) as image:
            image = image.convert("RGB")
        meta = json.loads(sample["json"]) if "json" in sample else None
        text = sample["txt"].decode("utf-8") if meta is None else None
    except Exception as exc:
        raise ValueError(f"{where} is unreadable: {type(exc).__name__}: {exc}") from exc
    try:
        if meta is not None:
            pool = caption_pool(meta, caption_mode)
        else:
            pool = sentence_pool(text) if caption_mode == "sentences" else split_caption(text)
            if not pool:
                raise ValueError("its txt caption holds no sentence")
    except ValueError as exc:
        raise ValueError(f"{where} has no usable caption: {exc}") from exc
    return {"key": sample["__key__"], "image": image, "pool": pool}


class _CountingDecode:
    """``decode_sample`` that tells the handler a sample was read (a class, not a closure: workers may pickle it)."""

    def __init__(self, handler: SkipCounter, caption_mode: str):
        self.handler, self.caption_mode = handler, caption_mode

    def __call__(self, sample: dict) -> dict:
        decoded = decode_sample(sample, self.caption_mode)
        self.handler.in_a_row = 0
        return decoded


def resolve_shards(path: str) -> list[str]:
    """The shards a ``data.path`` names: a directory (its ``*.tar`` files), a glob (``/data/cc3m/*.tar``), a brace
    pattern (``/data/cc3m/cc3m-{0000..0575}.tar``, webdataset's) or one file; remote URLs (``pipe:``, ``s3://``)
    are passed on as written. Sorted, duplicates dropped. FileNotFoundError naming the path where a directory
    or glob holds no shard, or where named local shards do not exist."""
    if path.startswith("pipe:") or "://" in path:
        return list(braceexpand(path))
    local = Path(path).expanduser()
    if local.is_dir():
        shards = sorted(str(p) for p in local.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"the directory {path} holds no .tar shards")
        return shards
    if any(c in path for c in "*?["):
        shards = sorted(glob.glob(str(local)))
        if not shards:
            raise FileNotFoundError(f"no shard matches {path}")
        return shards
    shards = list(dict.fromkeys(braceexpand(str(local))))
    missing = [u for u in shards if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards do not exist (first: {missing[0]})")
    return shards


def check_shard(path: str) -> None:
    """A local shard is a readable tar holding an image sample (checked before training starts); ValueError
    naming the shard otherwise."""
    mode = "r:gz" if path.endswith((".gz", ".tgz")) else "r:"
    try:
        with tarfile.open(path, mode) as tar:
            has_image = any(m.name.rsplit(".", 1)[-1].lower() in IMAGE_KEYS for m in tar)
    except (tarfile.TarError, OSError) as exc:
        size = Path(path).stat().st_size if Path(path).exists() else None
        what = "an empty file" if size == 0 else f"not a readable tar ({type(exc).__name__}: {exc})"
        raise ValueError(f"the shard {path} is {what}") from exc
    if not has_image:
        raise ValueError(f"the shard {path} holds no image sample (is the dataset empty?)")


def shard_stream(urls: str | list[str], *, resampled: bool = False, shuffle: int = 0, seed: int = 0,
                 handler: SkipCounter | None = None, caption_mode: str = "textcrop",
                 split_by_node: bool = True) -> wds.WebDataset:
    """Decoded samples (:func:`decode_sample`) of the shards at ``urls`` (brace patterns allowed), split over ranks
    (unless ``split_by_node`` is False: every rank reads every shard) and DataLoader workers; ``resampled`` draws
    shards with replacement forever (each rank and worker its own stream). Unusable samples and unreadable tar
    members go to ``handler`` (default: a new SkipCounter)."""
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
    handler = handler or SkipCounter()
    pipeline = wds.WebDataset(urls, resampled=resampled, shardshuffle=100 if shuffle and not resampled else False,
                              nodesplitter=wds.split_by_node if split_by_node and not resampled else None,
                              handler=handler, seed=seed,
                              empty_check=False)
    if shuffle:
        pipeline = pipeline.shuffle(shuffle)
    return pipeline.map(_CountingDecode(handler, caption_mode), handler=handler)


class CaptionFileDataset(torch.utils.data.Dataset):
    """(image path, caption(s)) rows of caption files; image paths relative to ``image_root`` (default: each
    file's directory; absolute paths stay as they are).

    Formats, by content: a JSON **list** of objects (SIMLA's and ALBEF's pre-training files: ``{"image": path,
    "caption": str or [str, ...]}``), JSON lines (one object per line: ``caption_column`` or DreamLIP-style fields),
    or CSV (columns ``image_column`` and ``caption_column``). ``path`` may name several files (a list, or one
    string with commas), read in order, as SIMLA's ``train_file`` list.

    A sample is ``{"key", "image" (PIL RGB), "captions": [str, ...]}`` (the row's caption or captions) or, for a
    DreamLIP-style row, ``{"key", "image", "raw_caption", "long_captions"}``. An unreadable image is skipped:
    ``__getitem__`` warns with the row's key and returns None (the collate step drops it) and ``skipped`` counts
    it (per process). A row without an image or with a caption that is not a string or a list of strings is an
    error when the file is read, naming the file and row.
    """

    def __init__(self, path, image_root: str | os.PathLike | None = None, image_column: str = "image",
                 caption_column: str = "caption"):
        paths = [Path(p) for p in (path.split(",") if isinstance(path, str) else
                                   [path] if isinstance(path, os.PathLike) else path)]
        if not paths:
            raise ValueError("path must name at least one caption file")
        self.rows, self.roots = [], []
        self.image_column, self.caption_column = image_column, caption_column
        for file in paths:
            rows = self._read(file)
            for number, row in enumerate(rows):
                self._check_row(row, file, number)
            self.rows += rows
            self.roots += [Path(image_root) if image_root is not None else file.parent] * len(rows)
        self.skipped = 0

    @staticmethod
    def _read(file: Path) -> list:
        if not file.exists():
            raise FileNotFoundError(f"caption file {file} does not exist")
        if file.suffix == ".csv":
            import csv

            with file.open(newline="") as f:
                rows = list(csv.DictReader(f))
        elif file.suffix in (".jsonl", ".json"):
            text = file.read_text()
            try:
                if text.lstrip().startswith("["):  # a JSON list (SIMLA, ALBEF)
                    rows = json.loads(text)
                else:
                    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise ValueError(f"caption file {file} is neither a JSON list nor JSON lines: {exc}") from exc
        else:
            raise ValueError(f"caption file must be .json (a list or JSON lines), .jsonl or .csv, got {file.name}")
        if not rows:
            raise ValueError(f"caption file {file} has no rows")
        return rows

    def _check_row(self, row, file: Path, number: int) -> None:
        if not isinstance(row, dict) or self.image_column not in row:
            raise ValueError(f"caption file {file}, row {number}: expected an object with {self.image_column!r}, got "
                             f"{row!r:.80}")
        caption = row.get(self.caption_column)
        if caption is not None and not (isinstance(caption, str) or (
                isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption))):
            raise ValueError(f"caption file {file}, row {number}: {self.caption_column!r} must be a string or a "
                             f"non-empty list of strings, got {caption!r:.80}")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        row = self.rows[index]
        key = str(row[self.image_column])
        try:
            with Image.open(self.roots[index] / key) as image:
                image = image.convert("RGB")
        except (OSError, ValueError) as exc:
            self.skipped += 1
            warnings.warn(f"skipped sample {key!r}: {exc}", stacklevel=2)
            return None
        caption = row.get(self.caption_column)
        if caption is not None:
            return {"key": key, "image": image, "captions": [caption] if isinstance(caption, str) else list(caption)}
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
