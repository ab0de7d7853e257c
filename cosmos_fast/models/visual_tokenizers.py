"""Visual tokenizers: the discrete targets of SIMLA's masked image modelling (the image half of XMM).

One interface (:class:`VisualTokenizer`): a module mapping model-input images (CLIP-normalised float [B, 3, S, S])
to int64 tokens [B, (S / patch)^2] on the ViT's patch grid, in its row-major order, with ``vocab_size`` tokens.
Two tokenizers:

- :class:`KMeansTokenizer`: a k-means codebook over the patches' pixels, fitted on training images (nothing to
  download; the CPU main job's). Its codebook is a persistent buffer, so a checkpoint of the module carries it.
- :class:`DVAETokenizer`: DALL-E's dVAE encoder, SIMLA's (8192 tokens from a 128 px view at 256 px), from a local
  file: openai/DALL-E's ``encoder.pkl`` (unpickling it needs that project's ``dall_e`` package) or any module
  saved whole with ``torch.save``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

# OpenAI CLIP normalisation (the model inputs')
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisualTokenizer(nn.Module):
    """``forward(images [B, 3, S, S] float) -> int64 [B, (S / patch_size)^2]``; ``vocab_size`` tokens; no gradient."""

    vocab_size: int
    patch_size: int

    def _check(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4 \
                or images.shape[1] != 3:
            raise ValueError(f"images must be a float tensor [B, 3, S, S], got {getattr(images, 'dtype', type(images))}"
                             f" {tuple(getattr(images, 'shape', ()))}")
        if images.shape[2] % self.patch_size or images.shape[3] % self.patch_size:
            raise ValueError(f"images' sides must be multiples of the patch size {self.patch_size}, got "
                             f"{tuple(images.shape[2:])}")


class KMeansTokenizer(VisualTokenizer):
    """A patch's token is its nearest centroid (squared Euclidean) among ``vocab_size`` centroids over the
    model-input pixels of patches (3 patch_size^2 values each), fitted with :meth:`fit`."""

    def __init__(self, vocab_size: int, patch_size: int):
        super().__init__()
        self.vocab_size, self.patch_size = vocab_size, patch_size
        self.register_buffer("codebook", torch.zeros(vocab_size, 3 * patch_size ** 2))

    def patch_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> [B, P, 3 p^2] fp32, the patches in the ViT's order."""
        p = self.patch_size
        return F.unfold(images.float(), kernel_size=p, stride=p).transpose(1, 2)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        pixels = self.patch_pixels(images.to(self.codebook.device))
        distance = self.codebook.pow(2).sum(-1) - 2 * pixels @ self.codebook.T
        return distance.argmin(dim=-1)

    @torch.no_grad()
    def fit(self, images: torch.Tensor, iterations: int = 10, seed: int = 0, chunk: int = 65536) -> None:
        """k-means (Lloyd; the start: ``vocab_size`` distinct random patches) over the patches of images
        [N, 3, S, S] (the model's input normalisation); writes ``codebook``. Deterministic in ``seed``; a centroid
        left without patches keeps its place."""
        self._check(images)
        pixels = self.patch_pixels(images.to(self.codebook.device)).flatten(0, 1)
        K = self.vocab_size
        if pixels.shape[0] < K:
            raise ValueError(f"the codebook needs at least {K} patches, got {pixels.shape[0]}")
        generator = torch.Generator().manual_seed(seed)
        centroids = pixels[torch.randperm(pixels.shape[0], generator=generator)[:K].to(pixels.device)].clone()
        for _ in range(iterations):
            squared = centroids.pow(2).sum(-1)
            assign = torch.cat([(squared - 2 * part @ centroids.T).argmin(-1) for part in pixels.split(chunk)])
            sums = torch.zeros_like(centroids).index_add_(0, assign, pixels)
            counts = torch.bincount(assign, minlength=K).float()[:, None]
            centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        self.codebook.copy_(centroids)


class DVAETokenizer(VisualTokenizer):
    """DALL-E's dVAE encoder as SIMLA uses it: the image in [0, 1] (the CLIP normalisation undone) at
    ``downsample`` / ``patch_size`` of the model's size (128 px for 256 px, 8x downsampling: one token per ViT
    patch), mapped to [0.1, 0.9] (DALL-E's ``map_pixels``), logits [B, vocab, g, g] -> argmax.

    SIMLA's data loader draws the tokenizer's 128 px view as a separate random crop of the image; here it is the
    model's own crop, resized, so each token describes the patch it is the target of.

    The encoder is frozen and kept out of ``state_dict()`` (its weights are the file's: a checkpoint need not carry
    them); ``.to()`` moves it.

    Args: encoder: a module images [B, 3, s, s] -> logits [B, vocab_size, s / downsample, s / downsample];
    vocab_size (DALL-E: 8192); patch_size: the ViT's; downsample: the encoder's (DALL-E: 8).
    """

    def __init__(self, encoder: nn.Module, vocab_size: int = 8192, patch_size: int = 16, downsample: int = 8):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        self._encoder = [encoder.eval().requires_grad_(False)]  # a list: not a child module, not in state_dict
        self.vocab_size, self.patch_size, self.downsample = vocab_size, patch_size, downsample
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs) -> DVAETokenizer:
        """The encoder saved whole in ``path`` (DALL-E's ``encoder.pkl``; a trusted file: it is unpickled)."""
        if not os.path.isfile(path):
            raise ValueError(f"no dVAE encoder file at {path}")
        try:
            encoder = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as exc:
            raise ValueError(f"unpickling {path} needs the module {exc.name!r} (DALL-E's encoder.pkl: "
                             "pip install DALL-E)") from exc
        return cls(encoder, **kwargs)

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half() reach the encoder too
        self._encoder[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        pixels = (images.float() * self.std + self.mean).clamp(0, 1)
        pixels = F.interpolate(pixels, size=(grid[0] * self.downsample, grid[1] * self.downsample), mode="bicubic",
                               align_corners=False, antialias=True).clamp(0, 1)
        logits = self.encoder(0.1 + 0.8 * pixels)
        if logits.dim() != 4 or logits.shape[1] != self.vocab_size or tuple(logits.shape[2:]) != grid:
            raise ValueError(f"the dVAE encoder gave logits {tuple(logits.shape)}, expected [B, {self.vocab_size}, "
                             f"{grid[0]}, {grid[1]}]")
        return logits.argmax(dim=1).flatten(1)


def build_visual_tokenizer(kind: str, vocab_size: int, patch_size: int, path: str | None = None) -> VisualTokenizer:
    """``kind`` "kmeans" (fit it before use) or "dvae" (its encoder from ``path``)."""
    if kind == "kmeans":
        return KMeansTokenizer(vocab_size, patch_size)
    if kind == "dvae":
        if not path:
            raise ValueError("the dvae visual tokenizer needs the path of its encoder (DALL-E's encoder.pkl)")
        return DVAETokenizer.from_file(path, vocab_size=vocab_size, patch_size=patch_size)
    raise ValueError(f"visual tokenizer must be kmeans or dvae, got {kind!r}")
