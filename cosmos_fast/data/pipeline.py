"""From a raw sample to a COSMOS training example, and batches of them."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from .augment import MultiCrop, simla_augmentation
from .text import crop_text, sentence_pool


def sample_pool(sample: dict) -> list[str]:
    """A raw sample's sentence pool: a shard sample's ``pool``; a caption file's ``captions`` or the built-in
    data's ``raw_caption`` and ``long_captions``, split into sentences (``sentence_pool``)."""
    if "pool" in sample:
        return sample["pool"]
    if "captions" in sample:
        return sentence_pool(sample["captions"][0], sample["captions"][1:])
    return sentence_pool(sample["raw_caption"], sample["long_captions"])


class CosmosTransform:
    """``{"key", "image", "pool"}`` (a shard sample: its sentence pool, see ``caption_pool``), ``{"key", "image",
    "captions"}`` (a caption file's row) or ``{"key", "image", "raw_caption", "long_captions"}`` (the built-in
    data) -> (the pool: :func:`sample_pool`)
    ``{"key", "global" [2, 3, S, S] float32, "local" [V, 3, s, s] float32 (V = n_local, 0 allowed), "captions"
    [C, context_length] int64}``, C = n_global_captions + n_local_captions (2 + 6 for COSMOS).

    Text crops are deterministic in (seed, epoch, key); image crops follow torch's RNG (seed the DataLoader
    workers). ``tokenizer`` maps a list of strings to [n, context_length] ids (``cosmos_fast.models.Tokenizer``).
    """

    def __init__(self, tokenizer, global_size: int = 224, local_size: int = 96, n_local: int = 6,
                 n_global_captions: int = 2, n_local_captions: int = 6, seed: int = 0):
        self.tokenizer = tokenizer
        self.multicrop = MultiCrop(global_size, local_size, n_local)
        self.local_size = local_size
        self.n_global_captions, self.n_local_captions = n_global_captions, n_local_captions
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, sample: dict) -> dict:
        crops = self.multicrop(sample["image"])
        pool = sample_pool(sample)
        if not pool:
            raise ValueError(f"sample {sample['key']!r} has no caption")
        rng = random.Random(f"{self.seed}/{self.epoch}/{sample['key']}")
        captions = crop_text(pool, rng, self.n_global_captions, self.n_local_captions)
        local = torch.stack(crops[2:]) if len(crops) > 2 else crops[0].new_empty(0, 3, self.local_size, self.local_size)
        return {"key": sample["key"], "global": torch.stack(crops[:2]), "local": local,
                "captions": self.tokenizer(captions)}


@contextlib.contextmanager
def _global_generators_seeded(seed: int):
    """Python's and NumPy's global generators seeded with ``seed`` inside, restored after (timm's RandAugment
    draws from them; the sample's seed comes from torch's generator, which the trainer seeds per sample)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SIMLATransform:
    """A raw sample (as :class:`CosmosTransform` takes it) -> ``{"key", "global" [1, 3, S, S] float32, "local"
    [0, 3, 1, 1], "captions" [1, context_length] int64}``: SIMLA's one augmented image
    (:func:`~cosmos_fast.data.augment.simla_augmentation`) and one caption: a caption file's row gives one of its
    captions at random (SIMLA's ``random.choice``), other samples a global text crop of their sentence pool.

    The caption is deterministic in (seed, epoch, key); the image follows torch's RNG (seed the DataLoader
    workers), which also seeds the RandAugment draws. ``tokenizer``: captions -> [n, context_length] ids
    (``cosmos_fast.models.simla_text.CaptionTokenizer``, which cleans them as SIMLA does).
    """

    def __init__(self, tokenizer, image_size: int = 256, randaugment: bool = True, seed: int = 0):
        self.tokenizer, self.augment = tokenizer, simla_augmentation(image_size, randaugment)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, sample: dict) -> dict:
        rng = random.Random(f"{self.seed}/{self.epoch}/{sample['key']}")
        if "captions" in sample:
            caption = rng.choice(sample["captions"])
        else:
            pool = sample_pool(sample)
            if not pool:
                raise ValueError(f"sample {sample['key']!r} has no caption")
            caption = crop_text(pool, rng, 1, 0)[0]
        with _global_generators_seeded(int(torch.randint(2 ** 31, ()))):
            image = self.augment(sample["image"])
        return {"key": sample["key"], "global": image[None], "local": image.new_empty(0, 3, 1, 1),
                "captions": self.tokenizer([caption])}


def collate_views(examples: list[dict | None]) -> dict:
    """Batch examples view-major, as the model takes them: "global" [2, B, ...], "local" [V, B, ...],
    "captions" [8, B, L], "keys" [B]. Skipped (None) examples are dropped."""
    examples = [e for e in examples if e is not None]
    if not examples:
        raise ValueError("collate_views got no examples (every one was skipped as None)")
    return {
        "keys": [e["key"] for e in examples],
        "global": torch.stack([e["global"] for e in examples], dim=1),
        "local": torch.stack([e["local"] for e in examples], dim=1),
        "captions": torch.stack([e["captions"] for e in examples], dim=1),
    }
