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
        raise KeyError(key)
    renames = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
               "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
    if name not in renames:
        raise KeyError(key)
    return f"visual.{renames[name]}", value


def state_dict_from_checkpoint(checkpoint: dict, which: str = "student") -> dict[str, torch.Tensor]:
    """The weights in a checkpoint: upstream COSMOS's ``student``/``teacher`` dict, open_clip's ``state_dict``,
    or the checkpoint itself when it is a plain state dict."""
    if which in checkpoint:
        return checkpoint[which]
    if "state_dict" in checkpoint:
        return checkpoint["state_dict"]
    nested = sorted(k for k, v in checkpoint.items() if isinstance(v, dict))
    if nested:  # a COSMOS-style checkpoint without the asked-for weights: loading its other entries would load nothing
        raise KeyError(f"which={which!r} is not in the checkpoint; it holds the weights {nested}")
    return checkpoint


def convert_open_clip_state_dict(state: dict[str, torch.Tensor],
                                 ignore_unknown: bool = False) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict (a ``module.`` prefix is dropped) -> CosmosModel keys for the two towers
    and ``logit_scale``. A key that is not part of open_clip's CLIP raises KeyError, unless ``ignore_unknown``
    (upstream COSMOS checkpoints carry their own cross-attention modules, whose names ours do not share)."""
    out, unknown = {}, []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("visual."):
            try:
                new_key, value = _vision_key(key, value)
            except KeyError:
                unknown.append(key)
                continue
            out[new_key] = value
        elif key.startswith(_TEXT_KEYS):
            out[f"text.{key}"] = value
        elif key == "logit_scale":
            out[key] = value
        elif key != "attn_mask":
            unknown.append(key)
    if unknown and not ignore_unknown:
        raise KeyError(f"not open_clip CLIP parameters: {unknown[:10]}{' ...' if len(unknown) > 10 else ''} "
                       "(pass ignore_unknown=True to load the towers anyway)")
    return out


def load_open_clip_weights(model, checkpoint: dict, which: str = "student", ignore_unknown: bool = False) -> list[str]:
    """Load open_clip/COSMOS weights (see :func:`state_dict_from_checkpoint`) into ``model``; returns the
    CosmosModel keys left at their initial values (mappings, poolers, ``distill_logit_scale``)."""
    converted = convert_open_clip_state_dict(state_dict_from_checkpoint(checkpoint, which), ignore_unknown)
    if not converted:
        raise ValueError("the checkpoint holds no open_clip CLIP weights (visual.*, transformer.*, token_embedding, "
                         "logit_scale, ...): nothing would be loaded")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected:
        raise KeyError(f"converted keys the model does not have: {unexpected}")
    return missing
