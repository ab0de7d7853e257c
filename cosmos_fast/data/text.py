"""Text cropping (COSMOS ``cosmos.md``, Multi-modal augmentation; upstream's ``sample_dict``): a sentence pool per
sample, 2 global captions of U{1..5} sentences and 6 local captions of one sentence, sampled without replacement.

Pools (``data.caption_mode``):

- ``textcrop`` (upstream's, FLAIR/DreamLIP recaptioned shards): the seven caption fields of the sample's JSON
  concatenated in upstream's order (``FLAIR_CAPTION_FIELDS``), each a list of sentences as FLAIR's presplit step
  leaves it (a field still holding a string is split as that step splits it). No deduplication, as upstream.
- ``textcrop_pixelprose``: ``[original_caption]`` + the ``caption`` string split on newlines, ``</s>`` and ``.``.
- ``sentences`` (ours, for the built-in data and plain captions): the raw caption and every field whose name
  starts with "long", split into sentences, whitespace collapsed, duplicates removed.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable

_SPLIT = re.compile(r"[\n.]+")
_UPSTREAM_SPLIT = re.compile(r"\n|</s>|[.]")

# upstream's textcrop pool order (src/training/data.py, sample_dict)
FLAIR_CAPTION_FIELDS = ("raw_caption", "shortIB_captions", "shortSV_captions", "shortLLA_captions",
                        "longIB_captions", "longSV_captions", "longLLA_captions")
PIXELPROSE_CAPTION_FIELDS = ("original_caption", "caption")
CAPTION_MODES = ("textcrop", "textcrop_pixelprose", "sentences")


def split_caption(text: str) -> list[str]:
    """Upstream's (and FLAIR's presplit) sentence split: on newlines, ``</s>`` and '.', stripped, empties dropped."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return [part.strip() for part in _UPSTREAM_SPLIT.split(text) if part.strip()]


def _sentences_of(meta: dict, field: str) -> list[str]:
    """A FLAIR field as its list of sentences: a list of strings as it is, a string split as presplit splits it,
    a missing or null field as no sentences."""
    value = meta.get(field)
    if value is None:
        return []
    if isinstance(value, str):
        return split_caption(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError(f"caption field {field!r} must be a list of strings or a string, got "
                     f"{type(value).__name__} {value!r:.60}")


def caption_pool(meta: dict, mode: str = "textcrop") -> list[str]:
    """The sentence pool of one sample's caption JSON (``meta``) in ``mode`` (see the module docstring).

    ValueError (naming the fields) when the JSON has none of the mode's fields or they hold no sentence, or when
    a field has the wrong type: the shard reader skips such a sample with a warning."""
    if not isinstance(meta, dict):
        raise ValueError(f"the caption JSON must be an object, got {type(meta).__name__}")
    if mode == "textcrop":
        fields = FLAIR_CAPTION_FIELDS
        pool = [s for field in fields for s in _sentences_of(meta, field)]
    elif mode == "textcrop_pixelprose":
        fields = PIXELPROSE_CAPTION_FIELDS
        original = meta.get("original_caption")
        if original is not None and not isinstance(original, str):
            raise ValueError(f"caption field 'original_caption' must be a string, got {type(original).__name__}")
        caption = meta.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"caption field 'caption' must be a string, got {type(caption).__name__}")
        pool = ([original] if original is not None else []) + (split_caption(caption) if caption else [])
    elif mode == "sentences":
        fields = ("raw_caption", "caption", "long*")
        raw = meta.get("raw_caption") or meta.get("caption") or ""
        longs: list[str] = []
        for key, value in meta.items():
            if key.startswith("long"):
                longs += [value] if isinstance(value, str) else [v for v in value or [] if isinstance(v, str)]
        pool = sentence_pool(" ".join(raw) if isinstance(raw, list) else raw, longs)
    else:
        raise ValueError(f"mode must be one of {CAPTION_MODES}, got {mode!r}")
    if not any(s.strip() for s in pool):
        present = sorted(k for k in meta if not k.startswith("__"))
        raise ValueError(f"no caption sentence in the fields of caption mode {mode!r} ({', '.join(fields)}); "
                         f"the JSON has {present[:8]}")
    return pool


def sentence_pool(raw_caption: str, long_captions: Iterable[str] = ()) -> list[str]:
    """Sentences of the raw caption and the long captions (split on newlines and '.'), stripped, non-empty,
    in order, duplicates removed. A caption with no usable sentence falls back to the raw caption itself.
    ``long_captions`` is a list of strings, or one string (one long caption, not a sequence of characters)."""
    if raw_caption is not None and not isinstance(raw_caption, str):
        raise TypeError(f"raw_caption must be a string or None, got {type(raw_caption).__name__}")
    if isinstance(long_captions, str):
        long_captions = [long_captions]
    pool: list[str] = []
    for text in [raw_caption, *long_captions]:
        for sentence in _SPLIT.split(text or ""):
            sentence = " ".join(sentence.split())
            if sentence and sentence not in pool:
                pool.append(sentence)
    if not pool and raw_caption and raw_caption.strip():
        pool = [raw_caption.strip()]
    return pool


def sample_sentences(pool: list[str], k: int, rng: random.Random) -> list[str]:
    """k sentences without replacement (upstream's ``random_sample_from_list``): a pool smaller than k is
    repeated whole, in order, as often as it fits, then topped up by a random sample of the rest."""
    if len(pool) >= k:
        return rng.sample(pool, k)
    repeats, rest = divmod(k, len(pool))
    return repeats * pool + rng.sample(pool, rest)


def crop_text(pool: list[str], rng: random.Random, n_global: int = 2, n_local: int = 6,
              max_global_sentences: int = 5) -> list[str]:
    """``n_global`` global captions (each n ~ U{1..max} sentences joined with ". ") then ``n_local`` local
    captions (one sentence each), drawn in upstream's order (every n first, then the sentences), so that one
    ``random.Random`` state gives upstream's captions. ``rng`` makes it deterministic under a seed."""
    if isinstance(pool, str) or not all(isinstance(s, str) for s in pool):
        raise TypeError(f"pool must be a list of sentences (strings), as caption_pool returns, got {pool!r:.80}")
    if not pool:
        raise ValueError("pool must hold at least one sentence")
    counts = [rng.randint(1, max_global_sentences) for _ in range(n_global)]
    global_captions = [". ".join(sample_sentences(pool, n, rng)) for n in counts]
    return global_captions + sample_sentences(pool, n_local, rng)
