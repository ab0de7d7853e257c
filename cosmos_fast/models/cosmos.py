"""The COSMOS model (``cosmos.md``, Towers and Cross-attention module) on the field's libraries: a timm
VisionTransformer (dynamic image size: 96 px local crops interpolate the position embedding as upstream COSMOS
does, DINO's way), open_clip's CLIP text transformer and BPE tokenizer, two token mappings, two cross-attention
poolers and two temperatures."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import QuickGELU, TextTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .._validation import check_float_tensor, check_same_device, check_same_dtype
from ..nn import CrossAttentionPooler


@dataclass(frozen=True)
class CosmosConfig:
    """Sizes of a COSMOS model (defaults: ViT-B/16 at 224 px with a 512-wide, 12-layer text transformer, as upstream).
    ``image_size`` sets the ViT's position grid (other multiples of ``patch_size`` run too); ``context_length``
    the text positions; ``embed_dim`` the shared embedding, which the poolers work in."""
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    embed_dim: int = 512
    cross_heads: int = 8
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    # a learnt logit bias for each temperature (the sigmoid losses: SigLIP's init is -10 with a scale of ln 10);
    # None: no biases (the softmax losses have none)
    init_logit_bias: float | None = None
    quick_gelu: bool = False  # OpenAI CLIP's x * sigmoid(1.702 x) in both towers' MLPs (its weights need it)
    conv_stem: bool = False  # stride-2 3x3 convolutions instead of the linear patch projection (see conv_stem)
    # position embeddings of other crop sizes: "dino" (upstream COSMOS's, see dino_interpolate_pos_embed) or
    # "timm" (timm's resample_abs_pos_embed: bicubic to the exact grid, antialiased when shrinking)
    pos_embed_interpolation: str = "dino"

    def __post_init__(self):
        if self.pos_embed_interpolation not in ("dino", "timm"):
            raise ValueError(f"pos_embed_interpolation must be 'dino' or 'timm', got {self.pos_embed_interpolation!r}")


CONFIGS = {
    "vit-b16": CosmosConfig(),
    "vit-b32": CosmosConfig(patch_size=32),  # upstream's ViT-B/32: the B/16 towers with 32 px patches
    # small enough to train on 2 CPU cores in minutes
    "tiny": CosmosConfig(image_size=64, patch_size=8, vision_width=192, vision_layers=4, vision_heads=3,
                         context_length=32, text_width=128, text_layers=4, text_heads=4, embed_dim=128,
                         cross_heads=4, conv_stem=True),
}


def config(name: str, **overrides) -> CosmosConfig:
    """The named config (a key of ``CONFIGS``: "vit-b16", "vit-b32" or "tiny") with ``overrides`` (CosmosConfig
    fields)."""
    if name not in CONFIGS:
        raise ValueError(f"model config must be one of {tuple(CONFIGS)}, got {name!r}")
    return replace(CONFIGS[name], **overrides)


class Tokenizer:
    """open_clip's CLIP BPE tokenizer (its vocabulary ships with the package: nothing is downloaded)."""

    def __init__(self, context_length: int = 77):
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """[N, context_length] int64 ids: start, text (truncated), end, zero padding."""
        return self._bpe(texts, context_length=self.context_length)


def _check_token_ids(name: str, ids, ndim: int) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor of token ids, got {ids.dtype}")
    if ids.dim() != ndim or ids.numel() == 0:
        raise ValueError(f"{name} must be a non-empty {ndim}-d tensor of token ids, got shape {tuple(ids.shape)}")


def trim_to_longest(ids: torch.Tensor) -> torch.Tensor:
    """Cut a batch of token ids [N, L] to its longest caption (the end token, the largest id, ends each caption):
    the text tower's output is the same, and short captions cost a fraction of the context length."""
    _check_token_ids("ids", ids, 2)
    return ids[:, : int(ids.argmax(dim=-1).max()) + 1]


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """log2(patch_size) stride-2 3x3 convolutions (GELU between; widths doubling up to ``width``): [B, 3, S, S] ->
    [B, width, S / patch_size, S / patch_size], a drop-in for the ViT's patch projection. Xiao et al. 2021 ("Early
    convolutions help transformers see better"): trained from scratch, a ViT with it learns shape much sooner
    (the tiny tower on the shapes, supervised for 200 steps: 62% of held-out classes right, against 33% with the
    linear 8 px projection; ``train/RESULTS.md``)."""
    n = patch_size.bit_length() - 1
    if patch_size < 2 or 2 ** n != patch_size:
        raise ValueError(f"conv_stem needs a power-of-two patch_size of at least 2, got {patch_size}")
    widths = [3] + [max(1, width >> (n - 1 - i)) for i in range(n)]
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)] + ([nn.GELU()] if i < n - 1 else [])
    return nn.Sequential(*layers)


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Upstream COSMOS's (DINO's) position embeddings for a ``grid`` of patches: pos_embed [1, 1 + g0 * g0, C]
    (class position first, square g0 x g0 grid) -> [1, 1 + gh * gw, C].

    The grid is resized bicubically by ``scale_factor = ((gh + 0.1) / g0, (gw + 0.1) / g0)``, not to a size: the
    0.1 keeps the output at gh x gw, and the scale factor, not the size ratio, sets where each output samples the
    input (DINO issue 8); no antialiasing. The class position is unchanged; at the training grid nothing is."""
    g0 = math.isqrt(pos_embed.shape[1] - 1)
    if (g0, g0) == tuple(grid):
        return pos_embed
    C = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, g0, g0, C).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid[0] + 0.1) / g0, (grid[1] + 0.1) / g0), mode="bicubic")
    if tuple(patches.shape[-2:]) != tuple(grid):
        raise ValueError(f"position embeddings of a {g0}x{g0} grid interpolate to {tuple(patches.shape[-2:])}, "
                         f"not the {grid[0]}x{grid[1]} grid of the input")
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, -1, C)], dim=1)


class CosmosVisionTransformer(VisionTransformer):
    """timm's VisionTransformer whose position embeddings follow other crop sizes as upstream COSMOS's do
    (:func:`dino_interpolate_pos_embed`), or as timm's own (``pos_embed_interpolation="timm"``)."""

    def __init__(self, *args, pos_embed_interpolation: str = "dino", **kwargs):
        super().__init__(*args, **kwargs)
        self.pos_embed_interpolation = pos_embed_interpolation

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed_interpolation == "timm":
            return super()._pos_embed(x)
        B, H, W, C = x.shape  # dynamic_img_size: patch tokens arrive as a grid
        x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
        return self.pos_drop(x + dino_interpolate_pos_embed(self.pos_embed, (H, W)))


class CosmosModel(nn.Module):
    """COSMOS's student (or, copied by ``EMATeacher``, its teacher): the towers, the two token mappings, the image
    and text poolers (``CrossAttentionPooler``, upstream's parameter names) and the two temperatures.
    ``forward`` gives every embedding ``CosmosLoss`` needs from the student; ``encode_image`` / ``encode_text`` the
    towers alone (zero-shot evaluation, the teacher). Parameters are fp32; run under autocast for bf16."""

    def __init__(self, cfg: CosmosConfig):
        super().__init__()
        self.config = cfg
        self.visual = CosmosVisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size,
                                              embed_dim=cfg.vision_width, depth=cfg.vision_layers,
                                              num_heads=cfg.vision_heads, num_classes=0, pre_norm=True,
                                              dynamic_img_size=True, norm_layer=nn.LayerNorm,  # CLIP's eps, 1e-5
                                              pos_embed_interpolation=cfg.pos_embed_interpolation,
                                              act_layer="quick_gelu" if cfg.quick_gelu else None)
        if cfg.conv_stem:
            self.visual.patch_embed.proj = conv_stem(cfg.vision_width, cfg.patch_size)
        self.image_projection = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        self.text = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                    width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                                    output_dim=cfg.embed_dim, act_layer=QuickGELU if cfg.quick_gelu else nn.GELU)
        self.image_token_mapping = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_token_mapping = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.image_pooler = CrossAttentionPooler(cfg.embed_dim, cfg.cross_heads)  # image queries, text keys
        self.text_pooler = CrossAttentionPooler(cfg.embed_dim, cfg.cross_heads)  # caption queries, patch keys
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.distill_logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias))
            self.distill_logit_bias = nn.Parameter(torch.tensor(cfg.init_logit_bias))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] (any S divisible by the patch size) -> (embedding [B, E] unnormalised,
        patch tokens [B, P, vision_width] after the final LayerNorm, no [CLS])."""
        tokens = self.visual.forward_features(images)
        return self.image_projection(tokens[:, 0]), tokens[:, 1:]

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L] (L <= context length; trimmed batches welcome) -> (embedding [B, E] unnormalised, pooled at
        the end token; token outputs [B, L, text_width] after the final LayerNorm)."""
        text = self.text
        length = ids.shape[1]
        x = text.token_embedding(ids) + text.positional_embedding[:length]
        x = text.transformer(x, attn_mask=text.attn_mask[:length, :length])
        x = text.ln_final(x)
        pooled = x[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        return pooled @ text.text_projection, x

    def compile_towers(self, **options) -> None:
        """``torch.compile`` every transformer block of both towers in place (``nn.Module.compile``; ``options``
        go to ``torch.compile``). Regional compilation: the blocks of a tower share one compiled graph, so the
        first step compiles two blocks' worth, not two towers'. Parameter names and state dicts are unchanged;
        the poolers and losses keep their own kernels."""
        for block in [*self.visual.blocks, *self.text.transformer.resblocks]:
            block.compile(**options)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each tower block's activations in the backward instead of keeping them (timm's and
        open_clip's own switches): activation memory of one block per tower, for a second forward of each."""
        self.visual.set_grad_checkpointing(enabled)
        self.text.transformer.grad_checkpointing = enabled

    def _check_forward_inputs(self, global_crops, local_crops, captions) -> None:
        """Each argument by name: crops [V, B, 3, H, W] (H, W multiples of the patch size; V may be 0 for the
        local crops), captions [C, B, L] token ids with L <= the context length, one B throughout."""
        check_float_tensor("global_crops", global_crops, 5)
        if not isinstance(local_crops, torch.Tensor):
            raise TypeError(f"local_crops must be a torch.Tensor, got {type(local_crops).__name__}")
        check_same_device("global_crops", global_crops, local_crops=local_crops, captions=captions)
        check_same_dtype("global_crops", global_crops, local_crops=local_crops)
        B, patch = global_crops.shape[1], self.config.patch_size
        for name, crops in (("global_crops", global_crops), ("local_crops", local_crops)):
            if crops.dim() != 5 or crops.shape[1] != B or crops.shape[2] != 3:
                raise ValueError(f"{name} must have shape [V, B={B}, 3, H, W], got {tuple(crops.shape)}")
            if crops.shape[3] % patch or crops.shape[4] % patch:
                raise ValueError(f"{name}'s height and width must be multiples of the patch size {patch}, got "
                                 f"{tuple(crops.shape[3:])}")
        _check_token_ids("captions", captions, 3)
        if captions.shape[1] != B or captions.shape[2] > self.config.context_length:
            raise ValueError(f"captions must have shape [C, B={B}, L <= {self.config.context_length}], got "
                             f"{tuple(captions.shape)}")

    @torch.no_grad()
    def clamp_logit_scales_(self) -> None:
        """Keep both temperatures in [0, ln 100] (after every optimizer step, as upstream)."""
        for p in (self.logit_scale, self.distill_logit_scale):
            p.clamp_(0, self.config.max_logit_scale)

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor, captions: torch.Tensor,
                mask_padding: bool = True, reference_attention: bool = False,
                cross_attention: bool = True) -> dict[str, torch.Tensor]:
        """One COSMOS student pass.

        Args:
            global_crops: [G, B, 3, S, S] (G = 2 for COSMOS); local_crops: [V, B, 3, s, s] (V may be 0);
                captions: [C, B, L] token ids (2 global captions first).
            mask_padding: mask padded caption positions in the cross-attention (ours); False attends to them,
                as upstream does.
            reference_attention: run the poolers' attention as ``nn.MultiheadAttention`` (upstream) instead of
                cosmos_fast's kernel; the same parameters, the same result within rounding.
            cross_attention: False skips the poolers (the CLIP and PSD objectives use the towers alone).
        Returns (all normalised): "image" [G + V, B, E] and "text" [C, B, E] tower embeddings, "cross_image"
        [G + V, B, E] and "cross_text" [C, B, E] cross-attended outputs (only with ``cross_attention``);
        "logit_scale", "distill_logit_scale" (exponentiated); with logit biases (``init_logit_bias``) also
        "logit_bias", "distill_logit_bias".
        """
        self._check_forward_inputs(global_crops, local_crops, captions)
        n_global, B = global_crops.shape[:2]
        g_emb, g_patches = self.encode_image(global_crops.flatten(0, 1))
        image = g_emb.view(n_global, B, -1)
        if local_crops.shape[0]:
            l_emb = self.encode_image(local_crops.flatten(0, 1))[0]
            image = torch.cat([image, l_emb.view(local_crops.shape[0], B, -1)])
        C = captions.shape[0]
        ids = captions.flatten(0, 1)
        # each caption group runs at its own longest length (local captions are one sentence); unmasked
        # (upstream) keys keep the whole context, padding included
        global_ids = trim_to_longest(ids[: 2 * B]) if mask_padding else ids[: 2 * B]
        text_parts = [self.encode_text(global_ids)]
        if C > 2:
            text_parts.append(self.encode_text(trim_to_longest(ids[2 * B:])))
        text = torch.cat([emb for emb, _ in text_parts]).view(C, B, -1)
        scales = {"logit_scale": self.logit_scale.exp(), "distill_logit_scale": self.distill_logit_scale.exp()}
        if self.config.init_logit_bias is not None:
            scales.update(logit_bias=self.logit_bias * 1, distill_logit_bias=self.distill_logit_bias * 1)
        if not cross_attention:
            return {"image": F.normalize(image, dim=-1), "text": F.normalize(text, dim=-1), **scales}
        first_caption_ids = global_ids[:B]
        first_caption_tokens = text_parts[0][1][:B]
        # keys of the image side: the first global caption's tokens; of the text side: the first global crop's patches
        text_keys = self.text_token_mapping(first_caption_tokens)
        patch_keys = self.image_token_mapping(g_patches[:B])
        padding = None
        if mask_padding:  # positions after each caption's end token
            padding = torch.arange(text_keys.shape[1], device=ids.device)[None, :] > first_caption_ids.argmax(-1)[:, None]
        cross_image = self.image_pooler(image.transpose(0, 1), text_keys, padding,
                                        reference=reference_attention).transpose(0, 1)
        cross_text = self.text_pooler(text.transpose(0, 1), patch_keys, reference=reference_attention).transpose(0, 1)
        return {
            "image": F.normalize(image, dim=-1), "text": F.normalize(text, dim=-1),
            "cross_image": cross_image, "cross_text": cross_text, **scales,
        }
