"""SIMLA (Khan et al., ECCV 2022; ``psd_simla.md``): a ViT and one BERT-style encoder used three ways, on
cosmos_fast's kernels.

Towers:
- Image: a timm ``VisionTransformer`` (with [CLS]) plus a learned [MASK] patch embedding that replaces the
  embeddings of masked patches before the position embedding (block-wise masking: :func:`block_patch_mask`).
- Text: a bidirectional BERT-style encoder written here (word + position embeddings, LayerNorm, pre-LN layers;
  pre-LN rather than BERT's post-LN because the models train from scratch). Every layer holds self-attention,
  a cross-attention and an MLP; the cross-attention runs :func:`cosmos_fast.cross_attention` with a key padding
  mask. The same weights run in three modes (:meth:`SIMLAModel.encode_multimodal`): "text" (no
  cross-attention), "text over image" (caption queries, image-token keys) and "image over text" (the ViT's
  image tokens as input embeddings, cross-attending to the caption's word embeddings). The last mode feeds
  ViT-width tokens to the text encoder, so the two widths must be equal (768 in SIMLA).

Vocabulary: open_clip's CLIP BPE tokenizer (``cosmos_fast.models.Tokenizer``, nothing downloaded), 49408 ids,
plus one id appended for [MASK] (``MASK_ID`` = 49408; vocabulary 49409, where SIMLA's BERT has 30522). Its
start token (49406) serves as [CLS], its end token (49407) as [SEP]; the positions after the end token are
padding (masked in every attention).

Discrete visual targets (the image half of XMM): SIMLA predicts DALL-E dVAE codes, which need a download. Ours
is a k-means codebook over the model-input pixels of patches (patch_size^2 x 3 values each), fitted once on
training images (:meth:`SIMLAModel.fit_visual_codebook`, deterministic in its seed) and kept in the persistent
buffer ``visual_codebook`` [K, 3 p^2], so checkpoints carry it; a patch's token is its nearest centroid.

Heads: ITC projections to the embedding (256 in SIMLA) and a learnable temperature (init 0.07, clamped to
[0.001, 0.5]); an MLM head (dense, GELU, LayerNorm, then a decoder tied to the word embeddings); an image-token
head of the same form over the K codes; a 2-way ITM head on the fused [CLS]; a keyword (PSL) head from the
embedding to the vocabulary. The vocabulary-sized heads run only at masked positions, through
:func:`cosmos_fast.fused_linear_cross_entropy` and :func:`cosmos_fast.fused_linear_bce`.

``forward`` computes the five SIMLA losses of the student from the momentum model's targets
(:meth:`SIMLAModel.momentum_targets`, run on the EMA copy): every parameter is used inside ``forward``, so DDP
sees the whole graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .._validation import check_float_tensor, check_unit_interval
from ..ops.attention import cross_attention
from ..ops.contrastive import contrastive_loss
from ..ops.fused_linear import fused_linear_bce, fused_linear_cross_entropy

CLIP_VOCAB = 49408  # open_clip's BPE ids
START_ID, END_ID = 49406, 49407  # used as [CLS] and [SEP]
MASK_ID = CLIP_VOCAB  # the one id we add


@dataclass(frozen=True)
class SIMLAModelConfig:
    """Sizes of a SIMLA model (defaults: the paper's ViT-B/16 at 256 px and a BERT-base-sized encoder)."""
    image_size: int = 256
    patch_size: int = 16
    width: int = 768  # the ViT's and the text encoder's (equal: image tokens enter the text encoder)
    vision_layers: int = 12
    vision_heads: int = 12
    text_layers: int = 12
    text_heads: int = 12
    context_length: int = 25
    vocab_size: int = CLIP_VOCAB + 1  # + [MASK]
    embed_dim: int = 256
    visual_codes: int = 8192
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5


SIMLA_CONFIGS = {
    "base": SIMLAModelConfig(),  # ViT-B/16 at 256 px and a BERT-base-sized encoder, as the paper
    # trains on 2 CPU cores in minutes (64 px shapes)
    "tiny": SIMLAModelConfig(image_size=64, patch_size=8, width=128, vision_layers=4, vision_heads=4,
                             text_layers=4, text_heads=4, context_length=32, embed_dim=128, visual_codes=256),
}


def simla_config(name: str, **overrides) -> SIMLAModelConfig:
    """The named config (a key of ``SIMLA_CONFIGS``: "base" or "tiny") with ``overrides`` (SIMLAModelConfig fields)."""
    if name not in SIMLA_CONFIGS:
        raise ValueError(f"SIMLA model config must be one of {tuple(SIMLA_CONFIGS)}, got {name!r}")
    return replace(SIMLA_CONFIGS[name], **overrides)


def padding_mask(ids: torch.Tensor) -> torch.Tensor:
    """ids [B, L] int64 -> bool [B, L], True after each caption's first end token (found by value, not as the
    largest id: [MASK] is larger). A row without an end token has no padding."""
    ends = (ids == END_ID).long().cumsum(dim=1)
    return (ends - (ids == END_ID).long()) > 0


def special_mask(ids: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: [CLS], the end token and padding, the positions never masked nor chosen as keywords."""
    return padding_mask(ids) | (ids == START_ID) | (ids == END_ID)


def mask_text_tokens(ids: torch.Tensor, probability: float = 0.15, generator=None):
    """BERT masking of caption tokens: each ordinary token is chosen with ``probability``; a chosen token becomes
    [MASK] (80%), a random ordinary id (10%) or stays (10%).

    ids [B, L] int64 -> (masked ids [B, L] int64, chosen bool [B, L]). Draws from ``generator`` (default: torch's).
    """
    probability = check_unit_interval("probability", probability)
    draws = torch.rand((3, *ids.shape), device=ids.device, generator=generator)
    chosen = (draws[0] < probability) & ~special_mask(ids)
    random_ids = (draws[2] * START_ID).long()  # uniform over the ordinary ids [0, START_ID)
    masked = torch.where(chosen & (draws[1] < 0.8), MASK_ID, ids)
    masked = torch.where(chosen & (draws[1] >= 0.8) & (draws[1] < 0.9), random_ids, masked)
    return masked, chosen


def block_patch_mask(batch: int, grid: int, n_masked: int, device=None, generator=None, rectangles: int = 8,
                     min_area: int = 4) -> torch.Tensor:
    """Block-wise patch masking (BEiT-style), all samples at once: exactly ``n_masked`` patches per sample.

    Each sample draws ``rectangles`` random rectangles (area ~ U[min_area, n_masked] patches, aspect ratio
    log-uniform in [0.3, 1/0.3]); patches covered by an earlier rectangle are masked first (within one rectangle
    in random order), then uncovered patches at random, until ``n_masked``. Returns bool [batch, grid * grid],
    True = masked, in the ViT's row-major patch order.
    """
    if not 0 <= n_masked <= grid * grid:
        raise ValueError(f"n_masked must be in [0, grid * grid = {grid * grid}], got {n_masked}")

    def draw():
        return torch.rand((batch, rectangles), device=device, generator=generator)

    area = min_area + draw() * max(n_masked - min_area, 0)
    aspect = torch.exp(math.log(0.3) + draw() * 2 * math.log(1 / 0.3))
    height = (area * aspect).sqrt().round().clamp(1, grid)
    width = (area / aspect).sqrt().round().clamp(1, grid)
    top = (draw() * (grid - height + 1)).floor()
    left = (draw() * (grid - width + 1)).floor()
    rows = torch.arange(grid, device=device).view(1, 1, grid, 1)
    cols = torch.arange(grid, device=device).view(1, 1, 1, grid)
    inside = ((rows >= top[..., None, None]) & (rows < (top + height)[..., None, None])
              & (cols >= left[..., None, None]) & (cols < (left + width)[..., None, None]))  # [B, R, g, g]
    order = torch.arange(rectangles, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    first_cover = torch.where(inside, order, float(rectangles)).amin(dim=1).flatten(1)  # uncovered: last
    score = first_cover + torch.rand(first_cover.shape, device=device, generator=generator)
    masked = torch.zeros_like(first_cover, dtype=torch.bool)
    return masked.scatter_(1, score.argsort(dim=1)[:, :n_masked], True)


def sample_hard_negatives(similarity: torch.Tensor, generator=None) -> torch.Tensor:
    """One hard negative per row: index j != i drawn with probability softmax(similarity_i) with the diagonal
    (the positive) zeroed and renormalised, by one ``torch.multinomial`` over all rows.

    similarity [B, B] (B >= 2, detached) -> int64 [B]. The softmax runs over the negatives only (the same
    distribution): after a softmax over the whole row a confident positive would leave the negatives underflowed
    to zero, and ALBEF's floor of 1e-5 then makes the draw uniform."""
    eye = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    weights = similarity.float().masked_fill(eye, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def keyword_targets(cls_attention: torch.Tensor, ids: torch.Tensor, vocab_size: int, per_head: int = 4,
                    keep: int = 5) -> torch.Tensor:
    """PSL pseudo-labels: each head's ``per_head`` most attended caption tokens vote; the ``keep`` positions with
    the most votes (ties: the larger mean attention) give a multi-hot target over the vocabulary.

    cls_attention [B, heads, L] fp32 ([CLS]'s attention in the last layer); ids [B, L] -> float32 [B, vocab_size].
    Special positions ([CLS], end, padding) never count; a caption with fewer tokens keeps them all.
    """
    blocked = special_mask(ids)
    attention = cls_attention.masked_fill(blocked[:, None], -1.0)
    top = attention.topk(min(per_head, ids.shape[1]), dim=-1).indices  # [B, heads, per_head]
    votes = torch.zeros(ids.shape, device=ids.device).scatter_add_(
        1, top.flatten(1), torch.ones(top.flatten(1).shape, device=ids.device))
    votes = (votes + attention.mean(dim=1).clamp_min(0)).masked_fill(blocked, -1.0)  # mean attention < 1: tiebreak
    best = votes.topk(min(keep, ids.shape[1]), dim=1).indices
    chosen = votes.gather(1, best) > 0
    target = torch.zeros(ids.shape[0], vocab_size, device=ids.device)
    return target.scatter_(1, ids.gather(1, best), chosen.float())


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs. Self-attention runs SDPA; cross-attention
    runs :func:`cosmos_fast.cross_attention`. Key padding masks: bool [B, Lk], True = ignore."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def _split(self, x):
        return x.view(*x.shape[:2], self.heads, -1)  # [B, L, heads, Dh]

    def forward(self, x, context, context_padding, cross: bool, return_cls_attention: bool = False):
        """x [B, Lq, W], context [B, Lk, W] -> ([B, Lq, W], [CLS] attention [B, heads, Lk] fp32 or None)."""
        q = self._split(self.query(x))
        k, v = (self._split(t) for t in self.key_value(context).chunk(2, dim=-1))
        cls_attention = None
        if return_cls_attention:  # PSL keywords: the attention of the first query, made explicit
            logits = torch.einsum("bhd,bkhd->bhk", q[:, 0].float(), k.float()) * q.shape[-1] ** -0.5
            if context_padding is not None:
                logits = logits.masked_fill(context_padding[:, None], float("-inf"))
            cls_attention = logits.softmax(dim=-1)
        if cross:
            out = cross_attention(q, k, v, context_padding)
        else:
            mask = None if context_padding is None else ~context_padding[:, None, None]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask).transpose(1, 2)
        return self.out(out.reshape(*x.shape)), cls_attention


class FusionLayer(nn.Module):
    """Pre-LN: x += SelfAttn(LN x); x += CrossAttn(LN x, context) (when given); x += MLP(LN x)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_self, self.self_attention = nn.LayerNorm(width), Attention(width, heads)
        self.ln_cross, self.cross_attention = nn.LayerNorm(width), Attention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, padding, context=None, context_padding=None, return_cls_attention=False):
        h = self.ln_self(x)
        attended, cls_attention = self.self_attention(h, h, padding, cross=False,
                                                      return_cls_attention=return_cls_attention)
        x = x + attended
        if context is not None:
            x = x + self.cross_attention(self.ln_cross(x), context, context_padding, cross=True)[0]
        return x + self.mlp(self.ln_mlp(x)), cls_attention


class TokenHead(nn.Module):
    """BERT's prediction-head transform (dense, GELU, LayerNorm); the decoder weight is applied by the fused
    loss, so the vocabulary-sized logits exist only in the kernel's blocks."""

    def __init__(self, width: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))

    def forward(self, x):
        return self.transform(x)


class SIMLAModel(nn.Module):
    """See the module docstring. Shapes: images [B, 3, S, S] float (S = ``config.image_size``); ids [B, L] int64
    open_clip token ids (L <= ``config.context_length``, zero padded); E = ``embed_dim``, W = ``width``,
    P = (S / patch_size)^2 patches."""

    def __init__(self, cfg: SIMLAModelConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                                        depth=cfg.vision_layers, num_heads=cfg.vision_heads, num_classes=0)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, cfg.width))
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        self.word_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        nn.init.normal_(self.word_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        self.ln_embedding = nn.LayerNorm(cfg.width)
        self.layers = nn.ModuleList(FusionLayer(cfg.width, cfg.text_heads) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.image_projection = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_projection = nn.Linear(cfg.width, cfg.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(cfg.init_temperature))
        self.mlm_head = TokenHead(cfg.width)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))  # decoder weight: word_embedding (tied)
        self.image_token_head = TokenHead(cfg.width)
        self.image_token_decoder = nn.Linear(cfg.width, cfg.visual_codes)
        self.itm_head = nn.Linear(cfg.width, 2)
        self.keyword_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        # prior of ~5 keywords in the vocabulary: the BCE starts near 50 / V per element, not ln 2
        nn.init.constant_(self.keyword_head.bias, -math.log(cfg.vocab_size / 5))
        self.register_buffer("visual_codebook", torch.zeros(cfg.visual_codes, 3 * cfg.patch_size ** 2))

    # ---- towers -------------------------------------------------------------------------------------------
    def image_tokens(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, S, S] -> tokens [B, 1 + P, W] ([CLS] first) after the final LayerNorm; patches where
        ``patch_mask`` [B, P] (bool) is True enter as the learned [MASK] embedding."""
        visual = self.visual
        x = visual.patch_embed(images)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_embedding.to(x.dtype), x)
        x = visual.norm_pre(visual._pos_embed(x))
        return visual.norm(visual.blocks(x))

    def word_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> [B, L, W]: word + position embeddings, LayerNorm."""
        return self.ln_embedding(self.word_embedding(ids) + self.position_embedding[: ids.shape[1]])

    def encode_multimodal(self, x: torch.Tensor, padding: torch.Tensor | None, context: torch.Tensor | None = None,
                          context_padding: torch.Tensor | None = None, return_cls_attention: bool = False):
        """The text encoder on input embeddings x [B, L, W] (padding: bool [B, L] or None), cross-attending to
        ``context`` [B, Lk, W] (context_padding bool [B, Lk] or None) in every layer, or to nothing (text mode).
        Returns (outputs [B, L, W] after the final LayerNorm, the last layer's [CLS] self-attention
        [B, heads, L] fp32 when ``return_cls_attention``, else None)."""
        cls_attention = None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            x, attention = layer(x, padding, context, context_padding, return_cls_attention and last)
            cls_attention = attention if last else cls_attention
        return self.ln_final(x), cls_attention

    def text_over_image(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Mode 2: caption queries over image tokens [B, 1 + P, W] -> [B, L, W]."""
        return self.encode_multimodal(self.word_embeddings(ids), padding_mask(ids), image_tokens)[0]

    def image_over_text(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mode 3: image tokens [B, 1 + P, W] as input embeddings over the caption's word embeddings -> [B, 1 + P, W]."""
        return self.encode_multimodal(image_tokens, None, self.word_embeddings(ids), padding_mask(ids))[0]

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ITC embedding [B, E] unnormalised, image tokens [B, P, W] without [CLS]), as CosmosModel's."""
        tokens = self.image_tokens(images)
        return self.image_projection(tokens[:, 0]), tokens[:, 1:]

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mode 1 (text only): (ITC embedding [B, E] unnormalised from [CLS], token outputs [B, L, W])."""
        tokens = self.encode_multimodal(self.word_embeddings(ids), padding_mask(ids))[0]
        return self.text_projection(tokens[:, 0]), tokens

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Keep the temperature in [min_temperature, max_temperature] (after every optimizer step)."""
        self.temperature.clamp_(self.config.min_temperature, self.config.max_temperature)

    # ---- visual tokenizer ---------------------------------------------------------------------------------
    def patch_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> [B, P, 3 p^2] fp32, the patches in the ViT's order."""
        p = self.config.patch_size
        return F.unfold(images.float(), kernel_size=p, stride=p).transpose(1, 2)

    @torch.no_grad()
    def visual_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, S, S] -> int64 [B, P]: the nearest codebook centroid of every patch."""
        pixels = self.patch_pixels(images)
        distance = self.visual_codebook.pow(2).sum(-1) - 2 * pixels @ self.visual_codebook.T
        return distance.argmin(dim=-1)

    @torch.no_grad()
    def fit_visual_codebook(self, images: torch.Tensor, iterations: int = 10, seed: int = 0,
                            chunk: int = 65536) -> None:
        """k-means (Lloyd, k-means++-free: K distinct random patches as the start) over the patches of images
        [N, 3, S, S] (the model's input normalisation); writes ``visual_codebook``. Deterministic in ``seed``;
        a centroid left without patches keeps its place."""
        pixels = self.patch_pixels(images.to(self.visual_codebook.device)).flatten(0, 1)
        K = self.config.visual_codes
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
        self.visual_codebook.copy_(centroids)

    # ---- SIMLA objective ----------------------------------------------------------------------------------
    def _check_objective_inputs(self, images, ids, masked_ids, chosen, patch_mask) -> None:
        """Each argument of :meth:`momentum_targets` and :meth:`forward` by name."""
        check_float_tensor("images", images, 4)
        B, cfg = images.shape[0], self.config
        if B < 2:
            raise ValueError(f"SIMLA needs at least 2 samples per batch (ITM's hard negatives are other samples), "
                             f"got images of shape {tuple(images.shape)}")
        if images.shape[1] != 3 or images.shape[2] % cfg.patch_size or images.shape[3] % cfg.patch_size:
            raise ValueError(f"images must have shape [B, 3, H, W] with H, W multiples of {cfg.patch_size}, got "
                             f"{tuple(images.shape)}")
        for name, x in (("ids", ids), ("masked_ids", masked_ids)):
            if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
                raise TypeError(f"{name} must be an int64 tensor of token ids, got {getattr(x, 'dtype', type(x))}")
            if x.dim() != 2 or x.shape[0] != B or not 0 < x.shape[1] <= cfg.context_length:
                raise ValueError(f"{name} must have shape [B={B}, L <= {cfg.context_length}], got {tuple(x.shape)}")
        P = (images.shape[2] // cfg.patch_size) * (images.shape[3] // cfg.patch_size)
        for name, x, shape in (("chosen", chosen, tuple(ids.shape)), ("patch_mask", patch_mask, (B, P))):
            if not isinstance(x, torch.Tensor) or x.dtype != torch.bool:
                raise TypeError(f"{name} must be a bool tensor, got {getattr(x, 'dtype', type(x))}")
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(x.shape)}")
        if masked_ids.shape != ids.shape:
            raise ValueError(f"masked_ids must have the shape of ids {tuple(ids.shape)}, got {tuple(masked_ids.shape)}")

    @torch.no_grad()
    def momentum_targets(self, images, ids, masked_ids, chosen, patch_mask, keywords_per_head: int = 4,
                         keywords: int = 5) -> dict[str, torch.Tensor]:
        """Run on the momentum (EMA) model: everything the student's losses need from it, detached.

        Args: images [B, 3, S, S]; ids [B, L]; masked_ids, chosen [B, L] from :func:`mask_text_tokens`;
        patch_mask bool [B, P] from :func:`block_patch_mask`.
        Returns: "image" [B, E], "text" [B, E] normalised ITC features; "mlm_logits" [n, V] at the chosen caption
        positions (row-major); "image_token_logits" [m, K] at the masked patches; "keyword_logits" [B, V];
        "keywords" float32 [B, V] multi-hot PSL targets from the text pass's last-layer [CLS] attention.
        """
        self._check_objective_inputs(images, ids, masked_ids, chosen, patch_mask)
        tokens = self.image_tokens(images)
        image = F.normalize(self.image_projection(tokens[:, 0]), dim=-1)
        text_tokens, cls_attention = self.encode_multimodal(self.word_embeddings(ids), padding_mask(ids),
                                                            return_cls_attention=True)
        text = F.normalize(self.text_projection(text_tokens[:, 0]), dim=-1)
        mlm_hidden = self.mlm_head(self.text_over_image(masked_ids, tokens)[chosen])
        masked_tokens = self.image_over_text(self.image_tokens(images, patch_mask), ids)[:, 1:][patch_mask]
        return {
            "image": image, "text": text,
            "mlm_logits": F.linear(mlm_hidden, self.word_embedding.weight, self.mlm_bias),
            "image_token_logits": self.image_token_decoder(self.image_token_head(masked_tokens)),
            "keyword_logits": self.keyword_head(image),
            "keywords": keyword_targets(cls_attention, ids, self.config.vocab_size, keywords_per_head, keywords),
        }

    def forward(self, images, ids, masked_ids, chosen, patch_mask, targets: dict[str, torch.Tensor], alpha: float,
                image_queue: torch.Tensor | None = None, text_queue: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """The student's SIMLA losses (each 0-d fp32; the objective is their unweighted sum).

        Args: as :meth:`momentum_targets`, plus ``targets`` (its output, from the momentum model), ``alpha``
        (the distillation weight) and the queues' momentum features [K, E] (or None while empty).
        Returns {"itc", "itm", "xmm_text", "xmm_image", "psl"}:
        - itc: InfoNCE of the normalised features, both directions, against the momentum features of the batch
          plus the queues (``s_i2t = v [t^m, Q_t] / tau``, as ALBEF/SIMLA), targets
          ``(1 - alpha) onehot + alpha softmax(momentum similarity / tau)``.
        - itm: 2-way CE on the fused [CLS] of B positives and 2B hard negatives (a text per image and an image
          per text, from the in-batch ITC similarities: :func:`sample_hard_negatives`).
        - xmm_text: MLM of the masked caption over the image, chosen positions only, hard/soft mixed by alpha.
        - xmm_image: the visual codes of the masked patches from the masked image over the caption, mixed alike.
        - psl: multi-hot keyword BCE from the image embedding, the mean over rows and vocabulary (as SIMLA's code).
        A batch without any chosen caption token or masked patch gets 0 for that XMM half (zero gradients).
        """
        self._check_objective_inputs(images, ids, masked_ids, chosen, patch_mask)
        tokens = self.image_tokens(images)
        image = F.normalize(self.image_projection(tokens[:, 0]), dim=-1)
        text = F.normalize(self.encode_text(ids)[0], dim=-1)
        scale = 1 / self.temperature
        image_queue, text_queue = (None if q is None else q.to(image.dtype) for q in (image_queue, text_queue))
        itc = contrastive_loss(image, text, scale, teacher=(targets["image"], targets["text"], scale.detach()),
                               alpha=alpha, extra_a=image_queue, extra_b=text_queue,
                               columns=(targets["text"], targets["image"]))

        with torch.no_grad():
            # ITC's in-batch logits of each direction (momentum columns)
            negative_text = sample_hard_negatives((image @ targets["text"].T) * scale)  # a caption for every image
            negative_image = sample_hard_negatives((text @ targets["image"].T) * scale)  # an image for every caption
        B = ids.shape[0]
        fused = self.text_over_image(torch.cat([ids, ids[negative_text], ids]),
                                     torch.cat([tokens, tokens, tokens[negative_image]]))
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        itm = F.cross_entropy(self.itm_head(fused[:, 0]).float(), itm_labels)

        mlm_hidden = self.mlm_head(self.text_over_image(masked_ids, tokens)[chosen])
        xmm_text = fused_linear_cross_entropy(mlm_hidden, self.word_embedding.weight.to(mlm_hidden.dtype), ids[chosen],
                                              bias=self.mlm_bias.to(mlm_hidden.dtype),
                                              soft_logits=targets["mlm_logits"], alpha=alpha)

        masked_tokens = self.image_over_text(self.image_tokens(images, patch_mask), ids)[:, 1:][patch_mask]
        image_hidden = self.image_token_head(masked_tokens)
        decoder = self.image_token_decoder
        xmm_image = fused_linear_cross_entropy(image_hidden, decoder.weight.to(image_hidden.dtype),
                                               self.visual_codes(images)[patch_mask],
                                               bias=decoder.bias.to(image_hidden.dtype),
                                               soft_logits=targets["image_token_logits"], alpha=alpha)

        # fused_linear_bce sums over the vocabulary; SIMLA's code takes binary_cross_entropy_with_logits' mean over
        # rows and vocabulary, so PSL weighs 1/V of that in the sum (summed, it outweighed the four other losses)
        psl = fused_linear_bce(image, self.keyword_head.weight.to(image.dtype), targets["keywords"],
                               bias=self.keyword_head.bias.to(image.dtype), soft_logits=targets["keyword_logits"],
                               alpha=alpha) / self.config.vocab_size
        return {"itc": itc, "itm": itm, "xmm_text": xmm_text, "xmm_image": xmm_image, "psl": psl}
