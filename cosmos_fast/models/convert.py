"""Load open_clip-format CLIP weights (open_clip ``ViT-B-16``, the ``student``/``teacher`` dicts of upstream
COSMOS checkpoints) into :class:`CosmosModel`: the vision tower maps onto timm's names, the text tower keeps
open_clip's under ``text.``."""
from __future__ import annotations

import re

import torch

_VISION_BLOCK = [("ln_1", "norm1"), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
                 ("attn.out_proj", "attn.proj"), ("ln_2", "norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def _vision_key(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    name = key[len("visual."):]
    if name == "class_embedding":
        return "visual.cls_token", value.reshape(1, 1, -1)
    if name == "positional_embedding":
        return "visual.pos_embed", value.unsqueeze(0)
    if name == "proj":
        return "image_projection.weight", value.t().contiguous()
    block = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", name)
    if block:
        index, rest = block.groups()
        for old, new in _VISION_BLOCK:
            if rest.startswith(old):
                return f"visual.blocks.{index}.{new}{rest[len(old):]}", value
        raise KeyError(f"unknown vision block parameter {key!r}")
    renames = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
               "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
    if name not in renames:
        raise KeyError(f"unknown vision parameter {key!r}")
    return f"visual.{renames[name]}", value


def convert_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (a ``module.`` prefix is dropped) -> CosmosModel keys for the two towers
    and ``logit_scale``. Parameters open_clip does not have (mappings, poolers, ``distill_logit_scale``) are not
    in the result: load it with ``strict=False`` and check the returned missing keys."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("visual."):
            new_key, value = _vision_key(key, value)
            out[new_key] = value
        elif key.startswith(_TEXT_KEYS):
            out[f"text.{key}"] = value
        elif key == "logit_scale":
            out[key] = value
        elif key != "attn_mask":
            raise KeyError(f"unknown open_clip parameter {key!r}")
    return out


def load_open_clip_weights(model, state: dict[str, torch.Tensor]) -> list[str]:
    """Load converted open_clip weights into ``model``; returns the CosmosModel keys left at their init."""
    missing, unexpected = model.load_state_dict(convert_open_clip_state_dict(state), strict=False)
    if unexpected:
        raise KeyError(f"converted keys the model does not have: {unexpected}")
    return missing
