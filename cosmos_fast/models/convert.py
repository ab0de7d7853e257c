"""Weights in the field's layouts, to and from :class:`CosmosModel`.

Three layouts are read (``detect_layout``):

- ``"cosmos_fast"``: CosmosModel's own state dict (timm names for the vision tower, open_clip's under ``text.``).
- ``"upstream"``: upstream COSMOS's CLIP (ExplainableML/cosmos), 323 keys for ViT-B/16 and B/32: open_clip's CLIP
  keys plus ``distill_logit_scale``, the two token mappings and the two cross-attention poolers. Their names say
  where the module lives, not what it queries: ``text_attn_cross_pool`` is our ``image_pooler`` (image
  embeddings query the first global caption's tokens) and ``visual.attn_cross_pool`` our ``text_pooler``
  (caption embeddings query the first global crop's patch tokens).
- ``"open_clip"``: open_clip's CLIP towers alone (``ViT-B-16``, OpenAI CLIP); the COSMOS modules then keep their
  initial values.

A checkpoint is a state dict, or a dict holding one: upstream's training checkpoints ``{"epoch", "student",
"teacher", "optimizer", ...}`` (DDP's ``module.`` prefix on the student when saved from a distributed run),
open_clip's ``{"state_dict": ...}``, or the trainer's ``{"model", "teacher", ...}``. Conversions are strict: a
key that is not part of the layout, or one the layout needs and the weights lack, is an error naming it.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

from .cosmos import CONFIGS, CosmosConfig, config

# our vision block names -> upstream's (open_clip's), within visual.transformer.resblocks.<i>
_VISION_BLOCK = [("norm1", "ln_1"), ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                 ("attn.proj", "attn.out_proj"), ("norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
_VISION_RENAMES = {"patch_embed.proj.weight": "conv1.weight", "norm_pre.weight": "ln_pre.weight",
                   "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
# COSMOS's own modules: ours -> upstream's
_COSMOS_RENAMES = {"image_pooler.": "text_attn_cross_pool.", "text_pooler.": "visual.attn_cross_pool.",
                   "image_token_mapping.": "image_token_mapping.", "text_token_mapping.": "text_token_mapping."}
_COSMOS_SCALARS = ("logit_scale", "distill_logit_scale", "logit_bias", "distill_logit_bias")
_OPTIONAL = ("logit_bias", "distill_logit_bias")  # open_clip's SigLIP models have the first; our sigmoid runs both
_UPSTREAM_ONLY = ("distill_logit_scale", "image_token_mapping.", "text_token_mapping.", "text_attn_cross_pool.",
                  "visual.attn_cross_pool.")


def upstream_key(key: str) -> str | None:
    """A CosmosModel parameter name as upstream COSMOS names it (None where upstream has no such parameter: the
    tiny config's convolutional stem)."""
    if key in _COSMOS_SCALARS:
        return key
    for ours, theirs in _COSMOS_RENAMES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    if key.startswith("text."):
        return key[len("text."):]
    if key == "image_projection.weight":
        return "visual.proj"
    if key.startswith("visual."):
        name = key[len("visual."):]
        fixed = {"cls_token": "class_embedding", "pos_embed": "positional_embedding", **_VISION_RENAMES}
        if name in fixed:
            return f"visual.{fixed[name]}"
        block = re.fullmatch(r"blocks\.(\d+)\.(.*)", name)
        if block:
            index, rest = block.groups()
            for ours, theirs in _VISION_BLOCK:
                if rest.startswith(ours):
                    return f"visual.transformer.resblocks.{index}.{theirs}{rest[len(ours):]}"
    return None


def _from_upstream_key(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """An upstream (open_clip-layout) key and value -> CosmosModel's, or None for a key outside the layout."""
    if key in _COSMOS_SCALARS:
        return key, value
    for ours, theirs in _COSMOS_RENAMES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):], value
    if key.startswith(_TEXT_KEYS):
        return f"text.{key}", value
    if not key.startswith("visual."):
        return None
    name = key[len("visual."):]
    if name == "class_embedding":
        return "visual.cls_token", value.reshape(1, 1, -1)
    if name == "positional_embedding":
        return "visual.pos_embed", value.unsqueeze(0)
    if name == "proj":
        return "image_projection.weight", value.t().contiguous()
    renames = {theirs: ours for ours, theirs in _VISION_RENAMES.items()}
    if name in renames:
        return f"visual.{renames[name]}", value
    block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.*)", name)
    if block:
        index, rest = block.groups()
        for ours, theirs in _VISION_BLOCK:
            if rest.startswith(theirs):
                return f"visual.blocks.{index}.{ours}{rest[len(theirs):]}", value
    return None


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP's ``module.`` (and torch.compile's ``_orig_mod.``) prefixes removed from every key that has them."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """"cosmos_fast", "upstream" or "open_clip" (see the module docstring), from the keys of a state dict
    (prefixes stripped); ValueError for none of them."""
    keys = strip_module_prefix(state).keys()
    if "visual.pos_embed" in keys:
        return "cosmos_fast"
    if "visual.positional_embedding" in keys:
        return "upstream" if any(k.startswith(_UPSTREAM_ONLY) for k in keys) else "open_clip"
    raise ValueError("the weights are in no layout known here (a CosmosModel, upstream COSMOS or open_clip CLIP "
                     f"state dict); their first keys: {sorted(keys)[:8]}")


def state_dict_from_checkpoint(checkpoint: dict, which: str = "student") -> dict[str, torch.Tensor]:
    """The ``which`` ("student" or "teacher") weights of a checkpoint, prefixes stripped: upstream COSMOS's
    ``student``/``teacher``, the trainer's ``model``/``teacher`` (an EMATeacher's state: the model under
    ``module.``), open_clip's ``state_dict``, or the checkpoint itself when it is a plain state dict (a student)."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be a dict (a state dict or one holding it), got {type(checkpoint).__name__}")
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', got {which!r}")
    if which in checkpoint and isinstance(checkpoint[which], dict):
        return _weights(checkpoint[which])
    if which == "student":
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), dict):
                return _weights(checkpoint[key])
    nested = sorted(k for k, v in checkpoint.items() if isinstance(v, dict))
    if nested or which == "teacher":  # loading a checkpoint's other entries as weights would load nothing
        raise KeyError(f"which={which!r} is not in the checkpoint; it holds the weights {nested}")
    return _weights(checkpoint)


def _weights(state: dict) -> dict[str, torch.Tensor]:
    """A saved model's weights: an EMATeacher's state (its model under ``module.``, beside ``_extra_state``) or a
    state dict, prefixes stripped."""
    if "_extra_state" in state:
        state = {k: v for k, v in state.items() if k.startswith("module.")}
    return strip_module_prefix(state)


def _expected_upstream_keys(state: dict[str, torch.Tensor], cosmos: bool) -> set[str]:
    """Every key an upstream (cosmos) or open_clip CLIP state dict with this many blocks holds."""
    def blocks(prefix: str) -> set[int]:
        return {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}

    keys = {"logit_scale", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "visual.conv1.weight", "token_embedding.weight", "positional_embedding", "text_projection"}
    keys |= {f"{ln}.{p}" for ln in ("visual.ln_pre", "visual.ln_post", "ln_final") for p in ("weight", "bias")}
    block_keys = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                  "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                  "mlp.c_proj.weight", "mlp.c_proj.bias"]
    for prefix in ("visual.transformer.resblocks.", "transformer.resblocks."):
        count = max(blocks(prefix), default=-1) + 1
        keys |= {f"{prefix}{i}.{k}" for i in range(count) for k in block_keys}
    if cosmos:
        keys |= {"distill_logit_scale"} | {f"{m}.{p}" for m in ("image_token_mapping", "text_token_mapping")
                                           for p in ("weight", "bias")}
        pooler = ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
                  "ln_q.weight", "ln_q.bias", "ln_k.weight", "ln_k.bias"]
        keys |= {f"{m}.{k}" for m in ("text_attn_cross_pool", "visual.attn_cross_pool") for k in pooler}
    return keys


def _listed(keys) -> str:
    keys = sorted(keys)
    return f"{keys[:8]}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"


def convert_upstream_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An upstream COSMOS or open_clip CLIP state dict (prefixes allowed) -> CosmosModel keys, strictly.

    Every key is mapped (``attn_mask``, a non-persistent buffer some saves carry, is dropped); a key outside the
    layout raises KeyError naming it, and so does a key the layout needs that the weights lack (a block, a
    pooler's LayerNorm). open_clip weights give the towers and ``logit_scale`` only."""
    state = {k: v for k, v in strip_module_prefix(state).items() if k != "attn_mask"}
    layout = detect_layout(state)
    if layout == "cosmos_fast":
        raise ValueError("these are CosmosModel weights already (visual.pos_embed, ...): load them with "
                         "model.load_state_dict")
    unknown = [k for k in state if _from_upstream_key(k, state[k]) is None]
    expected = _expected_upstream_keys(state, cosmos=layout == "upstream") | (set(_OPTIONAL) & set(state))
    unknown += sorted(set(state) - expected - set(unknown))
    if unknown:
        raise KeyError(f"not keys of an {layout} state dict: {_listed(unknown)}")
    missing = expected - set(state)
    if missing:
        raise KeyError(f"the {layout} state dict lacks {_listed(missing)}")
    return dict(_from_upstream_key(k, v) for k, v in state.items())


def to_upstream(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One CosmosModel entry as upstream COSMOS holds it (its name, and its shape: the class embedding 1-d, the
    position embedding 2-d, the image projection transposed), or None where upstream has no such parameter."""
    name = upstream_key(key)
    if name is None:
        return None
    if key == "visual.cls_token":
        value = value.reshape(-1)
    elif key == "visual.pos_embed":
        value = value.squeeze(0)
    elif key == "image_projection.weight":
        value = value.t().contiguous()
    return name, value


def upstream_weight_decay(key: str, param: torch.Tensor) -> bool:
    """Whether upstream COSMOS decays this parameter: not those of fewer than 2 dimensions or whose name holds
    ``bn``, ``ln``, ``bias`` or ``logit_scale`` (src/main.py), judged on upstream's name and shape where it has
    the parameter (so the class embedding, 1-d upstream, is not decayed), else on ours. Reads the name and the
    shape only (sharded parameters welcome)."""
    name = upstream_key(key) or key
    ndim = {"visual.cls_token": 1, "visual.pos_embed": param.dim() - 1}.get(key, param.dim())
    return not (ndim < 2 or any(part in name for part in ("bn", "ln", "bias", "logit_scale")))


def export_upstream_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CosmosModel state dict -> upstream COSMOS's layout (its CLIP's ``state_dict()``: the 323 keys of
    ViT-B/16), loadable by upstream's ``student.load_state_dict``. ValueError for weights upstream has no place
    for (the tiny config's convolutional stem)."""
    out, unplaced = {}, []
    for key, value in strip_module_prefix(state).items():
        entry = to_upstream(key, value)
        if entry is None:
            unplaced.append(key)
        else:
            out[entry[0]] = entry[1]
    if unplaced:
        raise ValueError(f"upstream COSMOS's model has no place for {_listed(unplaced)} (the tiny config's "
                         "convolutional stem has no upstream counterpart)")
    return out


def _depth(state: dict, prefix: str) -> int:
    return 1 + max((int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))), default=-1)


def _sizes(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(what a config must match, the geometry a config takes from the weights) of CosmosModel-keyed weights."""
    stem = [k for k in state if re.fullmatch(r"visual\.patch_embed\.proj\.\d+\.weight", k)]
    patch = 2 ** len(stem) if stem else state["visual.patch_embed.proj.weight"].shape[-1]
    found = {"conv_stem": bool(stem), "patch_size": patch, "vision_width": state["visual.pos_embed"].shape[-1],
             "vision_layers": _depth(state, "visual.blocks."), "text_width": state["text.ln_final.weight"].shape[0],
             "text_layers": _depth(state, "text.transformer.resblocks."),
             "embed_dim": state["image_projection.weight"].shape[0]}
    geometry = {"image_size": math.isqrt(state["visual.pos_embed"].shape[1] - 1) * patch,
                "context_length": state["text.positional_embedding"].shape[0],
                "init_logit_bias": 0.0 if "logit_bias" in state else None}  # the value comes with the weights
    return found, geometry


def config_name_for_weights(state: dict[str, torch.Tensor]) -> str:
    """The name of the config in ``CONFIGS`` whose patch, widths and depths the weights (any layout) have."""
    found, _ = _sizes(to_cosmos_state_dict(state))
    fits = [n for n, c in CONFIGS.items() if all(getattr(c, k) == v for k, v in found.items())]
    if not fits:
        raise ValueError(f"no model config ({', '.join(CONFIGS)}) has these weights' sizes {found}")
    return fits[0]


def config_for_weights(state: dict[str, torch.Tensor], name: str | None = None) -> CosmosConfig:
    """The CosmosConfig that holds ``state`` (any layout, prefixes allowed): config ``name`` (default: see
    :func:`config_name_for_weights`) with the image size (the position grid) and context length read off the
    weights, so that weights trained at another resolution load as they were trained. ValueError where the named
    config does not fit the weights."""
    state = to_cosmos_state_dict(state)
    found, geometry = _sizes(state)
    name = name or config_name_for_weights(state)
    if name not in CONFIGS:
        raise ValueError(f"model config must be one of {tuple(CONFIGS)}, got {name!r}")
    wrong = {k: v for k, v in found.items() if getattr(CONFIGS[name], k) != v}
    if wrong:
        raise ValueError(f"the weights do not fit model config {name!r}: they have {wrong}")
    return config(name, **geometry)


def to_cosmos_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of any of the three layouts as CosmosModel keys (strict conversions; see the module docstring)."""
    state = strip_module_prefix(state)
    return state if detect_layout(state) == "cosmos_fast" else convert_upstream_state_dict(state)


def load_weights(model, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a state dict of any layout into ``model`` (a CosmosModel) strictly, except that open_clip weights leave
    the COSMOS modules (token mappings, poolers, ``distill_logit_scale``) at their values, and weights without
    logit biases a model's biases (a sigmoid loss fine-tuning a softmax-trained model); it returns their names.
    A shape that does not fit the model's config is a ValueError naming the key."""
    layout = detect_layout(state)
    converted = to_cosmos_state_dict(state)
    own = model.state_dict()
    unexpected = sorted(set(converted) - set(own))
    if unexpected:
        raise KeyError(f"the {layout} weights hold keys this model does not have: {_listed(unexpected)}")
    wrong = [f"{k} {tuple(v.shape)} (the model's: {tuple(own[k].shape)})" for k, v in converted.items()
             if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"the {layout} weights do not fit the model's config: {'; '.join(wrong[:4])}")
    left = sorted(set(own) - set(converted))
    lacking = [k for k in left if k not in _OPTIONAL]  # logit biases a softmax-trained checkpoint never had
    if lacking and layout != "open_clip":
        raise KeyError(f"the {layout} weights lack {_listed(lacking)}")
    model.load_state_dict(converted, strict=False)
    return left


def load_open_clip_weights(model, checkpoint: dict, which: str = "student") -> list[str]:
    """Load the ``which`` weights of a checkpoint (see :func:`state_dict_from_checkpoint`) of any layout into
    ``model``: an upstream COSMOS or CosmosModel checkpoint sets every parameter; an open_clip CLIP one the towers
    and ``logit_scale``, and the names of the parameters it left at their values are returned."""
    return load_weights(model, state_dict_from_checkpoint(checkpoint, which))


def main(argv=None) -> int:
    """``python -m cosmos_fast.models.convert IN OUT``: a trainer checkpoint (or CosmosModel state dict) -> upstream
    COSMOS's checkpoint layout ``{"epoch", "student", "teacher"}``, which upstream's ``main.py --resume`` loads."""
    parser = argparse.ArgumentParser(prog="python -m cosmos_fast.models.convert", description=main.__doc__.split(
        "\n")[0].split(": ", 1)[1])
    parser.add_argument("checkpoint", type=Path, help="the trainer's checkpoint.pt")
    parser.add_argument("out", type=Path, help="where to write the upstream-layout checkpoint")
    parser.add_argument("--epoch", type=int, default=0, help="the 'epoch' entry (upstream resumes counting from it)")
    args = parser.parse_args(argv)
    from ..eval.zero_shot import load_checkpoint

    try:
        checkpoint = load_checkpoint(args.checkpoint)
        out = {"epoch": args.epoch}
        for which in ("student", "teacher"):
            state = state_dict_from_checkpoint(checkpoint, which)
            out[which] = export_upstream_state_dict(to_cosmos_state_dict(state))
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc.args[0] if isinstance(exc, KeyError) else exc}\n")
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save(out, tmp)
    tmp.replace(args.out)
    print(f"wrote {args.out}: upstream COSMOS layout, {len(out['student'])} keys per model")
    return 0


if __name__ == "__main__":
    sys.exit(main())
