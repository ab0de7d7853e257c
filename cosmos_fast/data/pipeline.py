"""From a raw sample to a COSMOS training example, and batches of them."""
from __future__ import annotations

import random

import torch

from .augment import MultiCrop
from .text import crop_text, sentence_pool


class CosmosTransform:
    """``{"key", "image", "pool"}`` (a shard sample: its sentence pool, see ``caption_pool``) or ``{"key", "image",
    "raw_caption", "long_captions"}`` (the built-in data, caption files: pooled by ``sentence_pool``) ->
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
        pool = sample["pool"] if "pool" in sample else sentence_pool(sample["raw_caption"], sample["long_captions"])
        if not pool:
            raise ValueError(f"sample {sample['key']!r} has no caption")
        rng = random.Random(f"{self.seed}/{self.epoch}/{sample['key']}")
        captions = crop_text(pool, rng, self.n_global_captions, self.n_local_captions)
        local = torch.stack(crops[2:]) if len(crops) > 2 else crops[0].new_empty(0, 3, self.local_size, self.local_size)
        return {"key": sample["key"], "global": torch.stack(crops[:2]), "local": local,
                "captions": self.tokenizer(captions)}


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
