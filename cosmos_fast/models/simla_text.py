"""SIMLA's text input: upstream's caption cleaning and BERT's WordPiece tokenizer (``transformers``).

SIMLA (codezakh/SIMLA, from ALBEF) cleans every caption before tokenizing it (:func:`clean_caption`: lower case,
punctuation dropped, at most 30 words), then runs ``bert-base-uncased``'s WordPiece tokenizer: ``[CLS] ... [SEP]``,
truncated to 25 tokens in pre-training (30 in retrieval), ``[PAD]`` after. :class:`CaptionTokenizer` does the same
and returns fixed-length rows, so samples batch without a collate step; the padding is masked everywhere.

Tokenizers load from a local directory or the Hugging Face cache only (nothing is downloaded): ``"tiny"`` is the
small vocabulary shipped here for the built-in shapes data (the CPU main job); ``"bert-base-uncased"`` or a
directory saved by ``save_pretrained`` is BERT's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

TINY_TOKENIZER = Path(__file__).parent / "data" / "simla_tiny_tokenizer"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_PUNCTUATION = re.compile(r"([,.'!?\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def clean_caption(caption: str, max_words: int = 30) -> str:
    """ALBEF's ``pre_caption``, which SIMLA trains and evaluates with: lower case; ``,.'!?"()*#:;~`` removed; ``-``
    and ``/`` become spaces; ``<person>`` becomes "person"; runs of whitespace collapsed; the first ``max_words``
    words kept."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    text = _PUNCTUATION.sub("", caption.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACES.sub(" ", text).rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])


def load_wordpiece(source: str | os.PathLike = "tiny"):
    """A BERT WordPiece tokenizer (``transformers.BertTokenizerFast``) from ``source``: "tiny" (shipped), a
    directory holding ``vocab.txt``/``tokenizer.json``, or a Hugging Face name already in the local cache
    ("bert-base-uncased"). Never downloads. ValueError when nothing usable is found (newer ``transformers``
    return an empty tokenizer instead of failing: caught here by its size)."""
    from transformers import BertTokenizerFast

    where = TINY_TOKENIZER if str(source) == "tiny" else source
    try:
        tokenizer = BertTokenizerFast.from_pretrained(str(where), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no WordPiece tokenizer at {source!s} (a directory with vocab.txt, or a Hugging Face name "
                         f"in the local cache; nothing is downloaded): {exc}") from exc
    if len(tokenizer) <= len(SPECIAL_TOKENS):
        raise ValueError(f"no WordPiece vocabulary at {source!s} (a directory with vocab.txt, or a Hugging Face name "
                         "in the local cache such as bert-base-uncased after one download; nothing is downloaded)")
    return tokenizer


class CaptionTokenizer:
    """Captions -> int64 [n, context_length] WordPiece ids, as SIMLA feeds BERT: each caption cleaned
    (:func:`clean_caption` with ``max_words``), ``[CLS] tokens [SEP]`` truncated to ``context_length``, ``[PAD]``
    after. ``tokenizer`` is a ``transformers`` BERT tokenizer or a :func:`load_wordpiece` source."""

    def __init__(self, tokenizer="tiny", context_length: int = 25, max_words: int = 30):
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 3:
            raise ValueError(f"context_length must be an int >= 3 ([CLS], a token, [SEP]), got {context_length!r}")
        self.tokenizer = load_wordpiece(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self.context_length, self.max_words = context_length, max_words

    @property
    def special_ids(self) -> dict[str, int]:
        """{"pad", "cls", "sep", "mask"} token ids."""
        t = self.tokenizer
        return {"pad": t.pad_token_id, "cls": t.cls_token_id, "sep": t.sep_token_id, "mask": t.mask_token_id}

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        cleaned = [clean_caption(t, self.max_words) for t in texts]
        ids = self.tokenizer(cleaned, padding="max_length", truncation=True, max_length=self.context_length,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64).reshape(len(texts), self.context_length)
