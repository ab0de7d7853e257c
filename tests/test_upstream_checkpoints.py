"""Upstream COSMOS checkpoints: every one of upstream's 323 keys (ViT-B/16 and B/32) loads strictly into CosmosModel,
exports back unchanged, and the model then computes what upstream's forward computes, checked against a float64
transcription of upstream's CLIP forward written here (not against CosmosModel itself).

The key names and shapes in ``fixtures/upstream_cosmos_keys.json`` were read off upstream's own model
(ExplainableML/cosmos c80348f, ``create_model(name, output_all=True, attentional_pool=True, cosmos=True)``).
"""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cosmos_fast.models import (CosmosModel, Tokenizer, config, config_for_weights,
                                convert_upstream_state_dict, detect_layout, export_upstream_state_dict,
                                load_open_clip_weights, load_weights, state_dict_from_checkpoint, upstream_key,
                                upstream_weight_decay)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train  # noqa: E402

KEYS = json.loads((Path(__file__).parent / "fixtures" / "upstream_cosmos_keys.json").read_text())
CONFIG_OF = {"ViT-B-16": "vit-b16", "ViT-B-32": "vit-b32"}


def upstream_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float64 weights under upstream's keys and shapes (temperatures 2.5 and 3.0, LayerNorm gains near 1,
    so that no module sits at a trivial value)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in KEYS[name].items():
        if key.endswith("logit_scale"):
            state[key] = torch.tensor(2.5 if key == "logit_scale" else 3.0, dtype=torch.float64)
        elif ".ln" in key or key.startswith("ln_") or ".ln_" in key:
            base = 1.0 if key.endswith("weight") else 0.0
            state[key] = base + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=g, dtype=torch.float64)
    return state


# --- upstream's forward, transcribed (src/open_clip/model.py CLIP.forward with cosmos=True, output_all=True) ---

def layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], 1e-5)


def multi_head_attention(query, keys, state, prefix, heads, mask=None):
    """nn.MultiheadAttention's math on batch-first [B, L, d] inputs, its in_proj/out_proj parameters."""
    d = query.shape[-1]
    w, b = state[f"{prefix}.in_proj_weight"], state[f"{prefix}.in_proj_bias"]
    q, k, v = query @ w[:d].T + b[:d], keys @ w[d:2 * d].T + b[d:2 * d], keys @ w[2 * d:].T + b[2 * d:]
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(query.shape)
    return out @ state[f"{prefix}.out_proj.weight"].T + state[f"{prefix}.out_proj.bias"]


def residual_block(x, state, prefix, heads, mask=None):
    h = layer_norm(x, state, f"{prefix}.ln_1")
    x = x + multi_head_attention(h, h, state, f"{prefix}.attn", heads, mask)
    h = layer_norm(x, state, f"{prefix}.ln_2") @ state[f"{prefix}.mlp.c_fc.weight"].T + state[f"{prefix}.mlp.c_fc.bias"]
    return x + F.gelu(h) @ state[f"{prefix}.mlp.c_proj.weight"].T + state[f"{prefix}.mlp.c_proj.bias"]


def upstream_encode_image(images, state):
    """(pooled features [B, 512] unnormalised, patch tokens [B, P, 768] after ln_post): VisionTransformer.forward,
    with DINO's interpolate_pos_encoding for crops other than 224 px."""
    patch = state["visual.conv1.weight"].shape[-1]
    x = F.conv2d(images, state["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    pos = state["visual.positional_embedding"]
    n = pos.shape[0] - 1
    if x.shape[1] - 1 != n:
        side, grid = int(math.sqrt(n)), images.shape[-1] // patch
        grid_pos = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, scale_factor=((grid + 0.1) / side, (grid + 0.1) / side), mode="bicubic")
        pos = torch.cat([pos[:1], grid_pos.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])
    x = layer_norm(x + pos, state, "visual.ln_pre")
    for i in range(12):
        x = residual_block(x, state, f"visual.transformer.resblocks.{i}", heads=12)
    x = layer_norm(x, state, "visual.ln_post")
    return x[:, 0] @ state["visual.proj"], x[:, 1:]


def upstream_encode_text(ids, state):
    """(pooled at the end token and projected [B, 512], all positions' tokens [B, 77, 512] after ln_final)."""
    x = state["token_embedding.weight"][ids] + state["positional_embedding"]
    L = ids.shape[1]
    causal = torch.full((L, L), float("-inf"), dtype=x.dtype).triu(1)
    for i in range(12):
        x = residual_block(x, state, f"transformer.resblocks.{i}", heads=8, mask=causal)
    x = layer_norm(x, state, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ state["text_projection"], x


def upstream_cross_pool(context, query, state, prefix):
    """AttentionalCrossPooler.forward(x=context, q=query): attention of ln_q(query) over ln_k(context)."""
    keys = layer_norm(context, state, f"{prefix}.ln_k")
    return multi_head_attention(layer_norm(query, state, f"{prefix}.ln_q"), keys, state, f"{prefix}.attn", heads=8)


def upstream_forward(global_crops, local_crops, captions, state):
    """CLIP.forward(image=[globals, locals], text, batch_size=B): every output CosmosLoss needs."""
    B = global_crops.shape[1]
    g_feat, g_tokens = upstream_encode_image(global_crops.flatten(0, 1), state)
    l_feat, _ = upstream_encode_image(local_crops.flatten(0, 1), state)
    image = torch.cat([g_feat, l_feat])
    text, text_tokens = upstream_encode_text(captions.flatten(0, 1), state)
    image_keys = g_tokens[:B] @ state["image_token_mapping.weight"].T + state["image_token_mapping.bias"]
    text_keys = text_tokens[:B] @ state["text_token_mapping.weight"].T + state["text_token_mapping.bias"]
    n_img, n_txt = len(image) // B, len(text) // B
    pooled_text = upstream_cross_pool(text_keys.repeat(n_img, 1, 1), image[:, None], state, "text_attn_cross_pool")
    pooled_image = upstream_cross_pool(image_keys.repeat(n_txt, 1, 1), text[:, None], state, "visual.attn_cross_pool")
    return {"image": F.normalize(image, dim=-1), "text": F.normalize(text, dim=-1),
            "cross_image": F.normalize(image + pooled_text[:, 0], dim=-1),
            "cross_text": F.normalize(text + pooled_image[:, 0], dim=-1)}


def crops_and_captions(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2, B, 3, 224, 224, generator=g, dtype=torch.float64)
    local_crops = torch.randn(6, B, 3, 96, 96, generator=g, dtype=torch.float64)
    words = ["a red circle on a gray background", "two dogs. one of them sleeps", "a city at night",
             "the large shape is a cross", "a bowl of fruit on a wooden table. an apple is green"]
    captions = torch.stack([Tokenizer(77)([" ".join(words[(c + b) % 5].split()[: 3 + c]) for b in range(B)])
                            for c in range(8)])
    return global_crops, local_crops, captions


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32"])
def test_upstream_checkpoint_loads_strictly_and_computes_upstreams_function(name):
    """A checkpoint as upstream's main.py saves it ({"epoch", "name", "student" with DDP's prefix, "teacher", ...})
    loads every key into config(name); every output equals upstream's forward (padding attended, as upstream)."""
    state = upstream_state(name)
    assert len(state) == 323
    checkpoint = {"epoch": 32, "name": "run", "student": {f"module.{k}": v for k, v in state.items()},
                  "teacher": {k: v.clone() for k, v in state.items()}, "optimizer": {"state": {}}}
    assert detect_layout(checkpoint["student"]) == "upstream"
    model = CosmosModel(config(CONFIG_OF[name])).double().eval()
    assert load_open_clip_weights(model, checkpoint, which="student") == []  # nothing left at its initial value
    assert config_for_weights(checkpoint["student"]) == config(CONFIG_OF[name])  # found by its sizes

    global_crops, local_crops, captions = crops_and_captions()
    with torch.no_grad():
        ours = model(global_crops, local_crops, captions, mask_padding=False)
        expected = upstream_forward(global_crops, local_crops, captions, state)
    for key in ("image", "text", "cross_image", "cross_text"):
        got = ours[key].flatten(0, 1)
        assert ((got - expected[key]).norm() / expected[key].norm()).item() < 1e-12, key
    assert ours["distill_logit_scale"].item() == pytest.approx(math.exp(3.0))

    # round trip: our state dict exported to upstream's layout is the upstream state dict, key for key
    exported = export_upstream_state_dict(model.state_dict())
    assert list(exported) != [] and set(exported) == set(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_timm_interpolation_is_kept_as_an_option_and_differs_on_local_crops():
    """pos_embed_interpolation="timm" (antialiased resampling) changes the 96 px crops' embeddings, not the 224 px
    ones: the option is real, and the default is upstream's."""
    state = upstream_state("ViT-B-32")
    models = {}
    for interpolation in ("dino", "timm"):
        models[interpolation] = CosmosModel(config("vit-b32", pos_embed_interpolation=interpolation)).double().eval()
        load_weights(models[interpolation], state)
    global_crops, local_crops, _ = crops_and_captions(B=1)
    with torch.no_grad():
        images = {k: (m.encode_image(global_crops[0])[0], m.encode_image(local_crops[0])[0]) for k, m in models.items()}
        expected_local = upstream_encode_image(local_crops[0], state)[0]
    torch.testing.assert_close(images["dino"][0], images["timm"][0], rtol=0, atol=0)
    assert ((images["dino"][1] - expected_local).norm() / expected_local.norm()).item() < 1e-12
    assert ((images["timm"][1] - expected_local).norm() / expected_local.norm()).item() > 1e-3
    with pytest.raises(ValueError, match="pos_embed_interpolation must be 'dino' or 'timm'"):
        config("tiny", pos_embed_interpolation="antialias")


def test_conversion_is_strict_and_names_the_key():
    state = upstream_state("ViT-B-32")
    extra = dict(state, **{"visual.attn_cross_pool.extra.weight": torch.zeros(2)})
    with pytest.raises(KeyError, match=r"not keys of an upstream state dict: \['visual.attn_cross_pool.extra.weight'"):
        convert_upstream_state_dict(extra)
    for dropped in ("text_attn_cross_pool.ln_k.bias", "transformer.resblocks.11.mlp.c_fc.weight",
                    "visual.transformer.resblocks.3.attn.in_proj_bias", "distill_logit_scale"):
        lacking = {k: v for k, v in state.items() if k != dropped}
        with pytest.raises(KeyError, match=f"the upstream state dict lacks \\['{dropped}'"):
            convert_upstream_state_dict(lacking)
    model = CosmosModel(config("vit-b16")).double()  # B/32 weights into a B/16 model: named, not a torch traceback
    with pytest.raises(ValueError, match=r"visual.patch_embed.proj.weight \(768, 3, 32, 32\) \(the model's: "
                                         r"\(768, 3, 16, 16\)\)"):
        load_weights(model, state)
    with pytest.raises(ValueError, match="no layout known here"):
        detect_layout({"head.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"which='teacher' is not in the checkpoint; it holds the weights \['student'\]"):
        state_dict_from_checkpoint({"epoch": 1, "student": state}, "teacher")
    with pytest.raises(ValueError, match="no place for"):  # the tiny config's convolutional stem
        export_upstream_state_dict(CosmosModel(config("tiny")).state_dict())


def test_open_clip_weights_set_the_towers_and_name_what_they_leave():
    """A plain open_clip CLIP state dict (no COSMOS modules) loads the towers and logit_scale; the COSMOS modules
    keep their values and are listed. Every upstream key has its CosmosModel counterpart and back."""
    state = {k: v for k, v in upstream_state("ViT-B-32").items()
             if not k.startswith(("distill", "image_token", "text_token", "text_attn_cross", "visual.attn_cross"))}
    assert detect_layout(state) == "open_clip" and len(state) == 302
    model = CosmosModel(config("vit-b32")).double()
    left = load_open_clip_weights(model, {"state_dict": state})
    assert len(left) == 21 and all(k.startswith(("image_pooler", "text_pooler", "image_token_mapping",
                                                 "text_token_mapping", "distill_logit_scale")) for k in left)
    names = {upstream_key(k) for k in CosmosModel(config("vit-b16")).state_dict()}
    assert names == set(KEYS["ViT-B-16"])
    assert upstream_key("image_pooler.ln_q.weight") == "text_attn_cross_pool.ln_q.weight"  # the reversed names
    assert upstream_key("text_pooler.attn.in_proj_weight") == "visual.attn_cross_pool.attn.in_proj_weight"


def test_weight_decay_follows_upstreams_rule_on_upstreams_names_and_shapes():
    """upstream's main.py: exclude(n, p) = p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" in n, on its own names and
    shapes (the fixture's); our parameter is decayed exactly where its upstream counterpart is. The class
    embedding (ours [1, 1, 768], upstream's [768]) is the case a shape-only rule on our tensors gets wrong."""
    def upstream_excludes(name, shape):
        return len(shape) < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    model = CosmosModel(config("vit-b16"))
    ours = {upstream_key(k): upstream_weight_decay(k, p) for k, p in model.named_parameters()}
    theirs = {k: not upstream_excludes(k, shape) for k, shape in KEYS["ViT-B-16"].items()}
    assert ours == theirs
    assert not upstream_weight_decay("visual.cls_token", model.visual.cls_token)
    assert upstream_weight_decay("visual.pos_embed", model.visual.pos_embed)
    no_decay = {id(p) for p in train.param_groups(model, 0.5)[1]["params"]}
    assert id(model.visual.cls_token) in no_decay and id(model.visual.pos_embed) not in no_decay
