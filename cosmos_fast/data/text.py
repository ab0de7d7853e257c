"""Text cropping (COSMOS ``cosmos.md``, Multi-modal augmentation): a sentence pool per sample, 2 global captions
of U{1..5} sentences and 6 local captions of one sentence, sampled without replacement."""
from __future__ import annotations

import random
import re
from collections.abc import Iterable

_SPLIT = re.compile(r"[\n.]+")


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


def _sample(pool: list[str], k: int, rng: random.Random) -> list[str]:
    """k sentences without replacement; repeats only once the pool is exhausted."""
    picked: list[str] = []
    while len(picked) < k:
        picked += rng.sample(pool, min(len(pool), k - len(picked)))
    return picked


def crop_text(pool: list[str], rng: random.Random, n_global: int = 2, n_local: int = 6,
              max_global_sentences: int = 5) -> list[str]:
    """``n_global`` global captions (each n ~ U{1..max} sentences joined with ". ") then ``n_local`` local
    captions (one sentence each). ``rng`` makes it deterministic under a seed."""
    if isinstance(pool, str) or not all(isinstance(s, str) for s in pool):
        raise TypeError(f"pool must be a list of sentences (strings), as sentence_pool returns, got {pool!r:.80}")
    if not pool:
        raise ValueError("pool must hold at least one sentence")
    global_captions = [". ".join(_sample(pool, rng.randint(1, max_global_sentences), rng))
                       for _ in range(n_global)]
    return global_captions + _sample(pool, n_local, rng)
