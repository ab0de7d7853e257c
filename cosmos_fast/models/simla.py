"""SIMLA (Khan et al., ECCV 2022; ``psd_simla.md``, ``upstream.md``) as codezakh/SIMLA builds it, on cosmos_fast's
kernels: a DeiT-B/16 image encoder and one BERT-base text encoder used three ways.

Towers:
- Image (``visual``): timm's ``VisionTransformer`` at DeiT-B/16's shape (``qkv_bias``, LayerNorm eps 1e-6) plus a
  learned [MASK] patch embedding (``mask_embedding``, upstream's ``visual_encoder.mask_token``) that replaces the
  embeddings of masked patches before the position embedding. DeiT's ImageNet weights load with
  :func:`load_vision_weights`, the position embeddings resampled to the image size as SIMLA does (bicubic, no
  antialiasing).
- Text (``text_encoder``): BERT as ``transformers`` defines it, post-LayerNorm, in ``BertForMaskedLM``'s layout
  (``text_encoder.bert.embeddings``, ``text_encoder.bert.encoder.layer.N``, ``text_encoder.cls``) with a
  cross-attention in every layer (``crossattention``, SIMLA's ``add_cross_attention``). The embeddings, the
  attention output blocks, the feed-forward blocks and the MLM head are ``transformers``' own classes; the attention
  products run SDPA (self-attention) and :func:`cosmos_fast.cross_attention` (cross-attention; with attention
  dropout in training, SDPA, which has it). ``bert-base-uncased`` loads with :func:`load_bert_weights`.
  The same weights run in three modes (:meth:`SIMLAModel.encode_multimodal`): "text" (no cross-attention),
  "text over image" (the caption's tokens over the image tokens) and "image over text" (the image tokens enter
  through BERT's embeddings as ``inputs_embeds``, positions, LayerNorm and dropout included, and cross-attend to
  the caption's embeddings), as SIMLA's code does.

Vocabulary: BERT's WordPiece (:mod:`cosmos_fast.models.simla_text`); the special ids are the config's. The
``tiny`` config uses the small vocabulary shipped for the built-in shapes data.

Heads (upstream's names in brackets): ITC projections to the embedding (``vision_proj``/``text_proj``) and a
learnable temperature (``temp``, init 0.07, clamped to [0.001, 0.5]); BERT's MLM head (``text_encoder.cls``,
decoder tied to the word embeddings); the image-token head, one Linear from the width to the visual vocabulary
(``mim_head``); a 2-way ITM head on the fused [CLS] (``itm_head``); the keyword (PSL) head from the embedding to the
vocabulary (``concept_head``). The vocabulary-sized heads run only at masked positions, through
:func:`cosmos_fast.fused_linear_cross_entropy` and :func:`cosmos_fast.fused_linear_bce`.

The visual tokens the image half of XMM predicts come from a visual tokenizer outside the model
(:mod:`cosmos_fast.models.visual_tokenizers`: a k-means codebook or DALL-E's dVAE), so a released SIMLA checkpoint
loads strictly (:func:`load_simla_checkpoint`).

``forward`` computes the five SIMLA losses of the student from the momentum model's targets
(:meth:`SIMLAModel.momentum_targets`, run on the EMA copy): every parameter is used inside ``forward``, so DDP
sees the whole graph.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .._validation import check_float_tensor, check_unit_interval
from ..ops.attention import cross_attention
from ..ops.contrastive import contrastive_loss
from ..ops.fused_linear import fused_linear_bce, fused_linear_cross_entropy


@dataclass(frozen=True)
class SIMLAModelConfig:
    """Sizes of a SIMLA model (defaults: the paper's DeiT-B/16 at 256 px and BERT-base, ``bert-base-uncased``'s
    vocabulary and special ids)."""
    image_size: int = 256
    patch_size: int = 16
    width: int = 768  # the ViT's and BERT's (equal: image tokens enter BERT's embeddings)
    vision_layers: int = 12
    vision_heads: int = 12
    text_layers: int = 12
    text_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_positions: int = 512  # BERT's position embeddings: captions and the image-over-text mode's 1 + P tokens
    type_vocab_size: int = 2
    dropout: float = 0.1  # BERT's hidden and attention-probability dropout
    layer_norm_eps: float = 1e-12  # BERT's
    context_length: int = 25  # caption tokens in pre-training (upstream: 25; 30 in retrieval)
    pad_id: int = 0
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    embed_dim: int = 256
    visual_codes: int = 8192  # the visual tokenizer's vocabulary (DALL-E's dVAE: 8192)
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    tokenizer: str = "bert-base-uncased"  # the WordPiece vocabulary the ids come from (load_wordpiece's source)

    def bert_config(self):
        """The ``transformers.BertConfig`` of the text encoder."""
        from transformers import BertConfig

        return BertConfig(vocab_size=self.vocab_size, hidden_size=self.width, num_hidden_layers=self.text_layers,
                          num_attention_heads=self.text_heads, intermediate_size=self.intermediate_size,
                          hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout,
                          max_position_embeddings=self.max_positions, type_vocab_size=self.type_vocab_size,
                          layer_norm_eps=self.layer_norm_eps, pad_token_id=self.pad_id)


SIMLA_CONFIGS = {
    "base": SIMLAModelConfig(),  # DeiT-B/16 at 256 px and BERT-base, as the paper
    # trains on 2 CPU cores in minutes (48-64 px shapes): the shipped vocabulary of the shapes' words, no dropout
    # (from scratch on 2000 images)
    "tiny": SIMLAModelConfig(image_size=64, patch_size=8, width=128, vision_layers=4, vision_heads=4,
                             text_layers=4, text_heads=4, intermediate_size=512, vocab_size=109, max_positions=128,
                             dropout=0.0, context_length=32, pad_id=0, cls_id=2, sep_id=3, mask_id=4,
                             embed_dim=128, visual_codes=256, tokenizer="tiny"),
}


def simla_config(name: str, **overrides) -> SIMLAModelConfig:
    """The named config (a key of ``SIMLA_CONFIGS``: "base" or "tiny") with ``overrides`` (SIMLAModelConfig fields)."""
    if name not in SIMLA_CONFIGS:
        raise ValueError(f"SIMLA model config must be one of {tuple(SIMLA_CONFIGS)}, got {name!r}")
    return replace(SIMLA_CONFIGS[name], **overrides)


# ---- masks and targets -------------------------------------------------------------------------------------

def mask_text_tokens(ids: torch.Tensor, cfg: SIMLAModelConfig, probability: float = 0.15, generator=None):
    """SIMLA's (ALBEF's) MLM masking: every token but [PAD] and [CLS] is chosen with ``probability`` ([SEP] can
    be); a chosen token becomes [MASK] (80%), else with even odds a random id of the whole vocabulary, else stays.

    ids [B, L] int64 -> (masked ids [B, L] int64, chosen bool [B, L]). Draws from ``generator`` (default: torch's).
    """
    probability = check_unit_interval("probability", probability)
    draws = torch.rand((3, *ids.shape), device=ids.device, generator=generator)
    chosen = (draws[0] < probability) & (ids != cfg.pad_id) & (ids != cfg.cls_id)
    replaced = chosen & (draws[1] < 0.8)
    randomised = chosen & ~replaced & (draws[2] < 0.5)
    random_ids = torch.randint(cfg.vocab_size, ids.shape, device=ids.device, generator=generator)
    masked = torch.where(replaced, cfg.mask_id, ids)
    return torch.where(randomised, random_ids, masked), chosen


def block_patch_mask(batch: int, grid: int, n_masked: int, device=None, generator=None, rectangles: int = 8,
                     min_area: int = 4) -> torch.Tensor:
    """Block-wise patch masking (BEiT-style, as SIMLA's MaskingGenerator), all samples at once: exactly
    ``n_masked`` patches per sample.

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


def keyword_targets(cls_attention: torch.Tensor, ids: torch.Tensor, cfg: SIMLAModelConfig, per_head: int = 4,
                    keep: int = 5) -> torch.Tensor:
    """PSL pseudo-labels: each head's ``per_head`` most attended caption tokens vote; the ``keep`` positions with
    the most votes (ties: the larger mean attention) give a multi-hot target over the vocabulary.

    cls_attention [B, heads, L] fp32 ([CLS]'s attention in the last layer); ids [B, L] -> float32 [B, vocab].
    [CLS], [SEP] and padding never count; a caption with fewer tokens keeps them all. (SIMLA's code
    takes the top ``keep`` positions of the vote counts over every position, so that a short caption's zero-vote
    padding becomes the keyword [PAD]; it then clears [CLS] alone.)
    """
    blocked = (ids == cfg.pad_id) | (ids == cfg.cls_id) | (ids == cfg.sep_id)
    attention = cls_attention.masked_fill(blocked[:, None], -1.0)
    top = attention.topk(min(per_head, ids.shape[1]), dim=-1).indices  # [B, heads, per_head]
    votes = torch.zeros(ids.shape, device=ids.device).scatter_add_(
        1, top.flatten(1), torch.ones(top.flatten(1).shape, device=ids.device))
    votes = (votes + attention.mean(dim=1).clamp_min(0)).masked_fill(blocked, -1.0)  # mean attention < 1: tiebreak
    best = votes.topk(min(keep, ids.shape[1]), dim=1).indices
    chosen = votes.gather(1, best) > 0
    target = torch.zeros(ids.shape[0], cfg.vocab_size, device=ids.device)
    return target.scatter_(1, ids.gather(1, best), chosen.float())


# ---- BERT with cross-attention -----------------------------------------------------------------------------

class _QueryKeyValue(nn.Module):
    """``transformers``' attention projections (``query``, ``key``, ``value``), so BERT's weights load by name."""

    def __init__(self, width: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)


class FusionAttention(nn.Module):
    """BERT's attention block in ``transformers``' layout (``self`` projections, ``output`` = BertSelfOutput:
    dense, dropout, post-LayerNorm over the residual). Key padding masks: bool [B, Lk], True = ignore."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertSelfOutput

        self.heads, self.dropout = config.num_attention_heads, config.attention_probs_dropout_prob
        self.self = _QueryKeyValue(config.hidden_size)
        self.output = BertSelfOutput(config)

    def _split(self, x):
        return x.view(*x.shape[:2], self.heads, -1)  # [B, L, heads, Dh]

    def forward(self, x, context, context_padding, cross: bool, return_cls_attention: bool = False):
        """x [B, Lq, W], context [B, Lk, W] -> ([B, Lq, W], [CLS]'s attention [B, heads, Lk] fp32 or None)."""
        q = self._split(self.self.query(x))
        k, v = self._split(self.self.key(context)), self._split(self.self.value(context))
        cls_attention = None
        if return_cls_attention:  # PSL keywords: the attention of the first query, made explicit
            logits = torch.einsum("bhd,bkhd->bhk", q[:, 0].float(), k.float()) * q.shape[-1] ** -0.5
            if context_padding is not None:
                logits = logits.masked_fill(context_padding[:, None], float("-inf"))
            cls_attention = logits.softmax(dim=-1)
        dropout = self.dropout if self.training else 0.0
        if cross and dropout == 0.0:  # the fused kernel has no attention dropout; BERT trains with 0.1
            out = cross_attention(q, k, v, context_padding)
        else:
            mask = None if context_padding is None else ~context_padding[:, None, None]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, dropout_p=dropout).transpose(1, 2)
        return self.output(out.reshape(*x.shape[:2], -1), x), cls_attention


class FusionLayer(nn.Module):
    """One SIMLA BERT layer (post-LN): self-attention, cross-attention to ``context`` when given (the multimodal
    modes), feed-forward; ``transformers``' names (``attention``, ``crossattention``, ``intermediate``, ``output``)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput

        self.attention = FusionAttention(config)
        self.crossattention = FusionAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, x, padding, context=None, context_padding=None, return_cls_attention=False):
        x, cls_attention = self.attention(x, x, padding, cross=False, return_cls_attention=return_cls_attention)
        if context is not None:
            x = self.crossattention(x, context, context_padding, cross=True)[0]
        return self.output(self.intermediate(x), x), cls_attention


class FusionEncoder(nn.Module):
    """``encoder.layer``: the stack of :class:`FusionLayer`."""

    def __init__(self, config):
        super().__init__()
        self.layer = nn.ModuleList(FusionLayer(config) for _ in range(config.num_hidden_layers))


class FusionBert(nn.Module):
    """BERT's embeddings (``transformers.BertEmbeddings``) and the fusion layers: ``bert`` of ``text_encoder``."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings

        self.embeddings = BertEmbeddings(config)
        # their index buffers out of the state dict, whichever transformers made them (4.30 saves position_ids):
        # checkpoints then carry the same keys under every version
        for name, buffer in list(self.embeddings.named_buffers(recurse=False)):
            self.embeddings.register_buffer(name, buffer, persistent=False)
        self.encoder = FusionEncoder(config)

    def forward(self, x: torch.Tensor, padding, context=None, context_padding=None, return_cls_attention=False):
        """x [B, L, W] embeddings (the output of ``embeddings``) -> ([B, L, W], the last layer's [CLS]
        self-attention [B, heads, L] fp32 when ``return_cls_attention``, else None)."""
        cls_attention, layers = None, self.encoder.layer
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            x, attention = layer(x, padding, context, context_padding, return_cls_attention and last)
            cls_attention = attention if last else cls_attention
        return x, cls_attention


class FusionBertForMaskedLM(nn.Module):
    """``text_encoder``: :class:`FusionBert` (``bert``) and BERT's MLM head (``cls``, ``transformers``'
    BertOnlyMLMHead, the decoder tied to the word embeddings and its bias to ``cls.predictions.bias``)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        self.bert = FusionBert(config)
        self.cls = BertOnlyMLMHead(config)
        self.apply(lambda m: _init_bert_module(m, config.initializer_range))
        predictions = self.cls.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias


def _init_bert_module(module: nn.Module, std: float) -> None:
    """BERT's initialisation (``BertPreTrainedModel._init_weights``): N(0, std) weights, zero biases, unit
    LayerNorms, a zero padding embedding."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            nn.init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---- the model ---------------------------------------------------------------------------------------------

class SIMLAModel(nn.Module):
    """See the module docstring. Shapes: images [B, 3, S, S] float (S = ``config.image_size``); ids [B, L] int64
    WordPiece ids (``[CLS] ... [SEP]``, [PAD] after; L <= ``config.context_length``); E = ``embed_dim``,
    W = ``width``, P = (S / patch_size)^2 patches."""

    def __init__(self, cfg: SIMLAModelConfig):
        super().__init__()
        if cfg.max_positions < 1 + (cfg.image_size // cfg.patch_size) ** 2:
            raise ValueError(f"max_positions ({cfg.max_positions}) must cover the image-over-text mode's "
                             f"1 + {(cfg.image_size // cfg.patch_size) ** 2} tokens at image_size {cfg.image_size}")
        self.config = cfg
        self.visual = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                                        depth=cfg.vision_layers, num_heads=cfg.vision_heads, num_classes=0,
                                        qkv_bias=True)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, cfg.width))
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        self.text_encoder = FusionBertForMaskedLM(cfg.bert_config())
        self.image_projection = nn.Linear(cfg.width, cfg.embed_dim)
        self.text_projection = nn.Linear(cfg.width, cfg.embed_dim)
        self.temperature = nn.Parameter(torch.tensor(cfg.init_temperature))
        self.image_token_head = nn.Linear(cfg.width, cfg.visual_codes)
        self.itm_head = nn.Linear(cfg.width, 2)
        self.keyword_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        # prior of ~5 keywords in the vocabulary: the BCE starts near 50 / V per element, not ln 2
        nn.init.constant_(self.keyword_head.bias, -math.log(cfg.vocab_size / 5))

    # ---- towers -------------------------------------------------------------------------------------------
    def padding(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> bool [B, L], True at [PAD]."""
        return ids == self.config.pad_id

    def image_tokens(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 3, S, S] -> tokens [B, 1 + P, W] ([CLS] first) after the final LayerNorm; patches where
        ``patch_mask`` [B, P] (bool) is True enter as the learned [MASK] embedding."""
        visual = self.visual
        x = visual.patch_embed(images)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_embedding.to(x.dtype), x)
        x = visual.norm_pre(visual._pos_embed(x))
        return visual.norm(visual.blocks(x))

    def text_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> [B, L, W]: BERT's embeddings (word, position, token type 0, LayerNorm, dropout)."""
        return self.text_encoder.bert.embeddings(input_ids=ids)

    def encode_multimodal(self, x: torch.Tensor, padding: torch.Tensor | None, context: torch.Tensor | None = None,
                          context_padding: torch.Tensor | None = None, return_cls_attention: bool = False):
        """BERT's layers on input embeddings x [B, L, W] (padding: bool [B, L] or None), cross-attending to
        ``context`` [B, Lk, W] (context_padding bool [B, Lk] or None) in every layer, or to nothing (text mode).
        Returns (outputs [B, L, W], the last layer's [CLS] self-attention [B, heads, L] fp32 when
        ``return_cls_attention``, else None)."""
        return self.text_encoder.bert(x, padding, context, context_padding, return_cls_attention)

    def text_over_image(self, ids: torch.Tensor, image_tokens: torch.Tensor,
                        return_cls_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption ids [B, L] over image tokens [B, 1 + P, W] -> ([B, L, W], [CLS] attention or None)."""
        return self.encode_multimodal(self.text_embeddings(ids), self.padding(ids), image_tokens,
                                      return_cls_attention=return_cls_attention)

    def image_over_text(self, image_tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Image tokens [B, 1 + P, W] through BERT's embeddings, over the caption's embeddings -> [B, 1 + P, W]."""
        x = self.text_encoder.bert.embeddings(inputs_embeds=image_tokens)
        return self.encode_multimodal(x, None, self.text_embeddings(ids), self.padding(ids))[0]

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ITC embedding [B, E] unnormalised, image tokens [B, P, W] without [CLS]), as CosmosModel's."""
        tokens = self.image_tokens(images)
        return self.image_projection(tokens[:, 0]), tokens[:, 1:]

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text mode: (ITC embedding [B, E] unnormalised from [CLS], token outputs [B, L, W])."""
        tokens = self.encode_multimodal(self.text_embeddings(ids), self.padding(ids))[0]
        return self.text_projection(tokens[:, 0]), tokens

    def itm_logits(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """ITM logits [B, 2] (index 1: matched) of captions ids [B, L] over image tokens [B, 1 + P, W]."""
        return self.itm_head(self.text_over_image(ids, image_tokens)[0][:, 0])

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Keep the temperature in [min_temperature, max_temperature] (after every optimizer step)."""
        self.temperature.clamp_(self.config.min_temperature, self.config.max_temperature)

    # ---- SIMLA objective ----------------------------------------------------------------------------------
    def _check_objective_inputs(self, images, ids, masked_ids, chosen, patch_mask, codes=None) -> None:
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
        if codes is not None:
            if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int64 or tuple(codes.shape) != (B, P):
                raise ValueError(f"codes must be an int64 tensor [B={B}, P={P}] of visual tokens, got "
                                 f"{getattr(codes, 'dtype', type(codes))} {tuple(getattr(codes, 'shape', ()))}")

    @torch.no_grad()
    def momentum_targets(self, images, ids, masked_ids, chosen, patch_mask, keywords_per_head: int = 4,
                         keywords: int = 5) -> dict[str, torch.Tensor]:
        """Run on the momentum (EMA) model: everything the student's losses need from it, detached.

        Args: images [B, 3, S, S]; ids [B, L]; masked_ids, chosen [B, L] from :func:`mask_text_tokens`;
        patch_mask bool [B, P] from :func:`block_patch_mask`.
        Returns: "image" [B, E], "text" [B, E] normalised ITC features; "mlm_logits" [n, V] at the chosen caption
        positions (row-major) from the masked caption over the image; "image_token_logits" [m, K] at the masked
        patches from the masked image over the caption; "keyword_logits" [B, V]; "keywords" float32 [B, V]
        multi-hot PSL targets from the last layer's [CLS] self-attention of the caption over the image (SIMLA's
        code passes the student's image tokens there; the momentum model's own are used here).
        """
        self._check_objective_inputs(images, ids, masked_ids, chosen, patch_mask)
        tokens = self.image_tokens(images)
        image = F.normalize(self.image_projection(tokens[:, 0]), dim=-1)
        text = F.normalize(self.encode_text(ids)[0], dim=-1)
        cls_attention = self.text_over_image(ids, tokens, return_cls_attention=True)[1]
        predictions = self.text_encoder.cls.predictions
        mlm_hidden = predictions.transform(self.text_over_image(masked_ids, tokens)[0][chosen])
        masked_tokens = self.image_over_text(self.image_tokens(images, patch_mask), ids)[:, 1:][patch_mask]
        return {
            "image": image, "text": text,
            "mlm_logits": F.linear(mlm_hidden, predictions.decoder.weight, predictions.bias),
            "image_token_logits": self.image_token_head(masked_tokens),
            "keyword_logits": self.keyword_head(image),
            "keywords": keyword_targets(cls_attention, ids, self.config, keywords_per_head, keywords),
        }

    def forward(self, images, ids, masked_ids, chosen, patch_mask, codes, targets: dict[str, torch.Tensor],
                alpha: float, image_queue: torch.Tensor | None = None, text_queue: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """The student's SIMLA losses (each 0-d fp32; the objective is their unweighted sum).

        Args: as :meth:`momentum_targets`, plus ``codes`` int64 [B, P] (the visual tokenizer's tokens of the
        image), ``targets`` (the momentum model's output), ``alpha`` (the distillation weight) and the queues'
        momentum features [K, E] (or None while empty).
        Returns {"itc", "itm", "xmm_text", "xmm_image", "psl"}:
        - itc: InfoNCE of the normalised features, both directions, against the momentum features of the batch
          plus the queues (``s_i2t = v [t^m, Q_t] / tau``, as ALBEF/SIMLA), targets
          ``(1 - alpha) onehot + alpha softmax(momentum similarity / tau)``.
        - itm: 2-way CE on the fused [CLS] of B positives and 2B hard negatives (a text per image and an image
          per text, from the in-batch ITC similarities: :func:`sample_hard_negatives`).
        - xmm_text: MLM of the masked caption over the image, chosen positions only, hard/soft mixed by alpha,
          the soft term's softmax over the vocabulary (SIMLA's BertForMaskedLM takes it over the sequence axis,
          ``dim=1`` of [B, L, V]: a typo; the vocabulary is what ALBEF and the paper mean).
        - xmm_image: the visual tokens of the masked patches from the masked image over the caption, mixed alike.
        - psl: multi-hot keyword BCE from the image embedding, the mean over rows and vocabulary (as SIMLA's code).
        A batch without any chosen caption token or masked patch gets 0 for that XMM half (zero gradients).
        """
        self._check_objective_inputs(images, ids, masked_ids, chosen, patch_mask, codes)
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
        itm_logits = self.itm_logits(torch.cat([ids, ids[negative_text], ids]),
                                     torch.cat([tokens, tokens, tokens[negative_image]]))
        itm_labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
        itm = F.cross_entropy(itm_logits.float(), itm_labels)

        predictions = self.text_encoder.cls.predictions
        mlm_hidden = predictions.transform(self.text_over_image(masked_ids, tokens)[0][chosen])
        xmm_text = fused_linear_cross_entropy(mlm_hidden, predictions.decoder.weight.to(mlm_hidden.dtype), ids[chosen],
                                              bias=predictions.bias.to(mlm_hidden.dtype),
                                              soft_logits=targets["mlm_logits"], alpha=alpha)

        masked_tokens = self.image_over_text(self.image_tokens(images, patch_mask), ids)[:, 1:][patch_mask]
        head = self.image_token_head
        xmm_image = fused_linear_cross_entropy(masked_tokens, head.weight.to(masked_tokens.dtype), codes[patch_mask],
                                               bias=head.bias.to(masked_tokens.dtype),
                                               soft_logits=targets["image_token_logits"], alpha=alpha)

        # fused_linear_bce sums over the vocabulary; SIMLA's code takes binary_cross_entropy_with_logits' mean over
        # rows and vocabulary, so PSL weighs 1/V of that in the sum (summed, it outweighed the four other losses)
        psl = fused_linear_bce(image, self.keyword_head.weight.to(image.dtype), targets["keywords"],
                               bias=self.keyword_head.bias.to(image.dtype), soft_logits=targets["keyword_logits"],
                               alpha=alpha) / self.config.vocab_size
        return {"itc": itc, "itm": itm, "xmm_text": xmm_text, "xmm_image": xmm_image, "psl": psl}


# ---- weights from upstream ---------------------------------------------------------------------------------

def _local_file_or_cached(source: str | os.PathLike, hub_id: str | None, filenames: tuple[str, ...]) -> str:
    """``source`` when it is a file; else the first of ``filenames`` of Hugging Face repo ``hub_id`` in the local
    cache (never downloaded). ValueError naming what was looked for."""
    if os.path.isfile(source):
        return str(source)
    if hub_id is not None:
        from huggingface_hub import try_to_load_from_cache

        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str):
                return found
    raise ValueError(f"no weights at {source!s}: give a file, or a name whose weights are in the local Hugging "
                     f"Face cache ({hub_id or 'no hub id'}: {', '.join(filenames)}); nothing is downloaded")


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):  # DeiT's releases: {"model": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g^2, W] -> [1, 1 + grid^2, W]: the patch positions resampled bicubically (``align_corners=False``,
    no antialiasing: SIMLA's ``interpolate_pos_embed``), the class position kept."""
    old = round((pos_embed.shape[1] - 1) ** 0.5)
    if old * old != pos_embed.shape[1] - 1:
        raise ValueError(f"pos_embed must hold a class position and a square grid, got {tuple(pos_embed.shape)}")
    if old == grid:
        return pos_embed
    patches = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)], dim=1)


def load_vision_weights(model: SIMLAModel, source: str | os.PathLike) -> None:
    """DeiT (timm's ViT layout) into ``model.visual``, strictly: a ``.pth`` (DeiT's ``{"model": ...}`` or a plain
    state dict) or ``.safetensors`` file, or a timm model name whose weights are in the local Hugging Face cache
    ("deit_base_patch16_224"). The classifier (``head.*``) is dropped (SIMLA has none); the position embeddings are
    resampled to the model's grid (:func:`resample_pos_embed`). The [MASK] embedding keeps its initialisation.
    ValueError for missing or unexpected keys and shape mismatches (a distilled DeiT's ``dist_token`` included)."""
    hub_id = None
    if not os.path.isfile(source):
        import timm

        try:
            hub_id = timm.models.get_pretrained_cfg(str(source)).hf_hub_id
        except (RuntimeError, AttributeError):
            hub_id = None
    state = _read_state_dict(_local_file_or_cached(source, hub_id, ("model.safetensors", "pytorch_model.bin")))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    if "pos_embed" in state:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.config.image_size // model.config.patch_size)
    load_state_strict(model.visual, state, f"the image encoder's weights ({source})")


def load_bert_weights(model: SIMLAModel, source: str | os.PathLike) -> list[str]:
    """BERT weights into ``model.text_encoder`` (``transformers``' ``BertForMaskedLM`` reads them: a directory
    saved by ``save_pretrained``, of a BertModel or a BERT with heads, or a name in the local Hugging Face cache,
    "bert-base-uncased"; never downloaded). Every tensor of the file must land: only BERT's pooler and
    next-sentence head, which SIMLA has no place for, are left out. Returns the text encoder's parameters the file
    did not hold, which keep their initialisation: the cross-attention layers (BERT has none; SIMLA starts them
    fresh too) and the MLM head's transform when the file is a bare BertModel. ValueError for a config that
    differs from the model's or a file that does not fit."""
    from transformers import BertForMaskedLM

    try:
        bert, info = BertForMaskedLM.from_pretrained(str(source), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"no BERT weights at {source!s} (a save_pretrained directory or a Hugging Face name in the "
                         f"local cache; nothing is downloaded): {exc}") from exc
    ours = model.config.bert_config()
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size"):
        if getattr(bert.config, field) != getattr(ours, field):
            raise ValueError(f"the BERT weights at {source} have {field}={getattr(bert.config, field)}, the SIMLA "
                             f"config {getattr(ours, field)}")
    ignored = [k for k in info["unexpected_keys"] if not k.startswith(("bert.pooler.", "pooler.", "cls.seq_relationship."))]
    if ignored:
        raise ValueError(f"the BERT weights at {source} hold tensors SIMLA has no place for: {ignored[:8]}")
    missing = set(info["missing_keys"])
    state = {k: v for k, v in bert.state_dict().items() if k not in missing and "position_ids" not in k
             and "token_type_ids" not in k}
    result = model.text_encoder.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the BERT weights at {source} do not fit SIMLA's text encoder: {result.unexpected_keys[:8]}")
    fresh = sorted(set(result.missing_keys) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"})
    return [f"text_encoder.{k}" for k in fresh]


def load_state_strict(module: nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` with every missing or unexpected key and shape mismatch named."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own.keys() & state.keys()
             if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{what} do not fit: missing {missing[:6]}, unexpected {unexpected[:6]}, shapes {wrong[:4]}")
    module.load_state_dict(state)


# upstream's module names -> ours (codezakh/SIMLA models/simla/pretrain.py); the text encoder keeps its names
_UPSTREAM_NAMES = (("visual_encoder.mask_token", "mask_embedding"), ("visual_encoder.", "visual."),
                   ("vision_proj.", "image_projection."), ("text_proj.", "text_projection."),
                   ("temp", "temperature"), ("mim_head.", "image_token_head."), ("concept_head.", "keyword_head."),
                   ("itm_head.", "itm_head."), ("text_encoder.", "text_encoder."))
_MOMENTUM_MODULES = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.", "mim_head_m.",
                     "concept_head_m.")
_QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")


def _rename(key: str) -> str | None:
    for theirs, ours in _UPSTREAM_NAMES:
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs):]
    return None


def simla_state_dicts(checkpoint: dict) -> tuple[dict, dict, dict]:
    """A SIMLA checkpoint (codezakh/SIMLA's ``{"model": state_dict, "optimizer", ...}`` or the bare state dict)
    -> (student, momentum, queues) in SIMLAModel's names.

    The momentum model's ``*_m`` modules become the momentum state (with the student's ITM head and temperature,
    which upstream shares); ``image_queue``/``text_queue`` [E, K] become FeatureQueue states {"image", "text"}:
    {"queue" [K, E], "pointer", "filled" = K} (upstream's queues are full from the start). BERT's ``position_ids``
    buffer is dropped (checked to be 0..n-1) and the token-type embedding, which SIMLA's BERT lacks, is added as
    zeros: the same sums. ValueError naming any key that has no place."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state:
        raise ValueError("a SIMLA checkpoint is a state dict or {'model': state dict}")
    student, momentum, queues, unknown = {}, {}, {}, []
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            if not torch.equal(value.flatten().long(), torch.arange(value.numel())):
                raise ValueError(f"{key} is not 0..{value.numel() - 1}: positions this model cannot reproduce")
            continue
        if key in _QUEUE_KEYS:
            queues[key] = value
            continue
        prefix = next((p for p in _MOMENTUM_MODULES if key.startswith(p)), None)
        if prefix is not None:
            unprimed = prefix[:-3] + "." + key[len(prefix):]
            target, name = momentum, _rename(unprimed)
        else:
            target, name = student, _rename(key)
        if name is None:
            unknown.append(key)
        else:
            target[name] = value
    if unknown:
        raise ValueError(f"the SIMLA checkpoint holds keys SIMLAModel has no place for: {unknown[:8]}")
    for part in (student, momentum):
        embedding = part.get("text_encoder.bert.embeddings.word_embeddings.weight")
        if embedding is not None:
            part["text_encoder.bert.embeddings.token_type_embeddings.weight"] = embedding.new_zeros(2, embedding.shape[1])
    for shared in ("temperature", "itm_head.weight", "itm_head.bias"):
        if shared in student and momentum:
            momentum.setdefault(shared, student[shared])
    if queues:
        if set(queues) != set(_QUEUE_KEYS):
            raise ValueError(f"the SIMLA checkpoint's queues are incomplete: has {sorted(queues)}")
        size = queues["image_queue"].shape[1]
        queues = {name: {"queue": queues[f"{name}_queue"].T.contiguous().float(),
                         "pointer": queues["queue_ptr"].reshape(()).long(), "filled": torch.tensor(size)}
                  for name in ("image", "text")}
    return student, momentum, queues


def config_for_simla_weights(student: dict, name: str = "base") -> SIMLAModelConfig:
    """The named config at the image size and visual vocabulary the weights were trained with."""
    pos = student["visual.pos_embed"]
    patch = student["visual.patch_embed.proj.weight"].shape[-1]
    grid = round((pos.shape[1] - 1) ** 0.5)
    return simla_config(name, image_size=grid * patch, visual_codes=student["image_token_head.weight"].shape[0])


def load_simla_checkpoint(model: SIMLAModel, checkpoint: dict, momentum_model: SIMLAModel | None = None) -> dict:
    """A SIMLA checkpoint (see :func:`simla_state_dicts`) into ``model`` (and the momentum model into
    ``momentum_model`` when given), strictly; other image sizes than the weights' resample the position
    embeddings. Returns the queues' states (empty when the checkpoint has none)."""
    student, momentum, queues = simla_state_dicts(checkpoint)
    grid = model.config.image_size // model.config.patch_size
    for target, state, what in ((model, student, "student"), (momentum_model, momentum, "momentum model")):
        if target is None:
            continue
        if not state:
            raise ValueError(f"the SIMLA checkpoint holds no {what}")
        if "visual.pos_embed" in state:
            state = {**state, "visual.pos_embed": resample_pos_embed(state["visual.pos_embed"], grid)}
        load_state_strict(target, state, f"the SIMLA checkpoint's {what} weights")
    return queues
