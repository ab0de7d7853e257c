"""SIMLA (issues 7, 23): the model's three modes, masking, hard negatives, keyword targets, the five losses, and the
trainer's run.objective=simla (smoke run and exact resume). Tiny model at 32 px: the file runs in well under a
minute on 2 CPU cores. Upstream parity (BERT, DeiT, released checkpoints, data, retrieval): test_simla_upstream.py."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train  # noqa: E402

from cosmos_fast.models import SIMLAModel, simla_config  # noqa: E402
from cosmos_fast.models import simla as simla_module  # noqa: E402
from cosmos_fast.models.simla import (block_patch_mask, keyword_targets, mask_text_tokens,  # noqa: E402
                                      sample_hard_negatives)
from cosmos_fast.models.simla_text import CaptionTokenizer  # noqa: E402
from cosmos_fast.models.visual_tokenizers import KMeansTokenizer  # noqa: E402

B, SIZE = 8, 32
CAPTIONS = ["a picture of a red circle", "the large shape is a square. the square is blue",
            "a picture of a green triangle", "the diamond is yellow. the background is gray",
            "a picture of a purple cross", "the large shape is a circle", "the square is in the center",
            "a picture of an orange diamond"]


CFG = simla_config("tiny", image_size=SIZE)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SIMLAModel(CFG)


@pytest.fixture(scope="module")
def ids():
    return CaptionTokenizer("tiny", 16)(CAPTIONS)


def _special(ids):
    return (ids == CFG.pad_id) | (ids == CFG.cls_id) | (ids == CFG.sep_id)


def _codes(images, vocab=CFG.visual_codes):
    tokenizer = KMeansTokenizer(vocab, CFG.patch_size)
    tokenizer.fit(torch.randn(64, 3, SIZE, SIZE), iterations=2)
    return tokenizer(images)


def _images(seed=0):
    return torch.randn(B, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_the_three_modes(model, ids, monkeypatch):
    cfg, images = model.config, _images()
    P = (SIZE // cfg.patch_size) ** 2
    emb, patches = model.encode_image(images)
    assert emb.shape == (B, cfg.embed_dim) and patches.shape == (B, P, cfg.width)
    text_emb, text_tokens = model.encode_text(ids)
    assert text_emb.shape == (B, cfg.embed_dim) and text_tokens.shape == (B, ids.shape[1], cfg.width)
    calls = []
    original = simla_module.cross_attention
    monkeypatch.setattr(simla_module, "cross_attention", lambda *a: calls.append(a[3]) or original(*a))
    image_tokens = model.image_tokens(images)
    fused_text = model.text_over_image(ids, image_tokens)[0]
    fused_image = model.image_over_text(image_tokens, ids)
    assert fused_text.shape == (B, ids.shape[1], cfg.width) and fused_image.shape == (B, 1 + P, cfg.width)
    # the cross-attention kernel runs in every layer of both fused modes; text over image has no key padding,
    # image over text masks the caption's padding
    assert len(calls) == 2 * cfg.text_layers
    assert calls[0] is None and torch.equal(calls[-1], ids == CFG.pad_id)
    assert not torch.allclose(fused_text, text_tokens, atol=1e-3)  # the image changes the caption's outputs
    # padding is invisible: more padding columns leave the real positions' outputs unchanged
    longer = torch.cat([ids, torch.zeros(B, 5, dtype=ids.dtype)], dim=1)
    torch.testing.assert_close(model.encode_text(longer)[0], text_emb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.image_over_text(image_tokens, longer), fused_image, rtol=1e-4, atol=1e-5)


def test_text_masking_follows_simlas_rules(ids):
    """SIMLA's mask(): every token but [PAD] and [CLS] may be chosen ([SEP] too); 80% [MASK], then half of the
    rest a uniform random id of the whole vocabulary, the others unchanged."""
    many = ids.repeat(500, 1)
    masked, chosen = mask_text_tokens(many, CFG, 0.15, generator=torch.Generator().manual_seed(0))
    candidates = (many != CFG.pad_id) & (many != CFG.cls_id)
    assert not (chosen & ~candidates).any() and torch.equal(masked[~chosen], many[~chosen])
    assert chosen[many == CFG.sep_id].float().mean() == pytest.approx(0.15, abs=0.02)  # [SEP] is chosen too
    assert chosen.sum() / candidates.sum() == pytest.approx(0.15, abs=0.01)
    became_mask = (masked[chosen] == CFG.mask_id).float().mean()
    unchanged = (masked[chosen] == many[chosen]).float().mean()
    # kept: the 10% left as they were, plus the random draws that hit the token itself (1 / V of 10%)
    assert became_mask == pytest.approx(0.8, abs=0.02) and unchanged == pytest.approx(0.1, abs=0.02)
    randomised = masked[chosen & (masked != CFG.mask_id) & (masked != many)]
    assert randomised.min() >= 0 and randomised.max() < CFG.vocab_size
    assert len(randomised.unique()) > CFG.vocab_size // 2  # drawn over the whole vocabulary


def test_block_patch_mask(model):
    mask = block_patch_mask(64, 8, 19, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (64, 64) and (mask.sum(dim=1) == 19).all()
    assert len({tuple(row.tolist()) for row in mask}) == 64  # each sample its own blocks
    grid = mask.view(64, 8, 8).float()
    neighbours = torch.nn.functional.conv2d(grid[:, None], torch.tensor([[[[0., 1, 0], [1, 0, 1], [0, 1, 0]]]]),
                                            padding=1)[:, 0]
    assert (neighbours[grid.bool()] > 0).float().mean() > 0.9  # blocks, not scattered patches
    # masked patches enter as the [MASK] embedding: their pixels no longer matter
    images = _images()
    small = block_patch_mask(B, SIZE // model.config.patch_size, 5, generator=torch.Generator().manual_seed(1))
    changed = images.clone()
    p, g = model.config.patch_size, SIZE // model.config.patch_size
    pixel_mask = small.view(B, g, g).repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]
    changed[pixel_mask.expand_as(changed)] = 5.0
    torch.testing.assert_close(model.image_tokens(changed, small), model.image_tokens(images, small))
    assert not torch.allclose(model.image_tokens(changed), model.image_tokens(images))


def test_hard_negatives_skip_the_positive_and_follow_the_similarity(monkeypatch):
    calls = []
    original = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    similarity = torch.randn(64, 64) * 3
    similarity.fill_diagonal_(100.0)  # the positive is by far the most similar
    generator = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample_hard_negatives(similarity, generator=generator) for _ in range(200)])
    assert calls == [(64, 64)] * 200  # one draw for all rows per call: no loop over samples
    assert not (drawn == torch.arange(64)).any()
    # the hardest negative of each row is picked most often
    hardest = similarity.masked_fill(torch.eye(64, dtype=torch.bool), -1e9).argmax(dim=1)
    picked_hardest = (drawn == hardest).float().mean(dim=0)
    assert picked_hardest.mean() > 0.3


def test_keyword_targets(ids):
    vocab = CFG.vocab_size
    attention = torch.rand(B, 4, ids.shape[1]).softmax(dim=-1)
    target = keyword_targets(attention, ids, CFG, per_head=4, keep=5)
    assert target.shape == (B, vocab) and target.dtype == torch.float32
    real = (~_special(ids)).sum(dim=1)
    assert ((target.sum(dim=1) >= 1) & (target.sum(dim=1) <= torch.clamp(real, max=5))).all()
    for row in range(B):
        assert set(target[row].nonzero().flatten().tolist()) <= set(ids[row][~_special(ids)[row]].tolist())
    # a token every head attends to most is always a keyword
    focused = torch.zeros(B, 4, ids.shape[1])
    focused[..., 2] = 1.0
    assert (keyword_targets(focused, ids, CFG)[torch.arange(B), ids[:, 2]] == 1).all()
    assert target[:, [CFG.cls_id, CFG.sep_id, CFG.pad_id]].sum() == 0


def test_each_loss_is_finite_and_decreases(ids):
    torch.manual_seed(0)
    student = SIMLAModel(simla_config("tiny", image_size=SIZE, visual_codes=32))
    images = _images()
    codes = _codes(images, 32)
    momentum = copy.deepcopy(student).requires_grad_(False)
    masked, chosen = mask_text_tokens(ids, CFG, 0.3, generator=torch.Generator().manual_seed(0))
    patch_mask = block_patch_mask(B, SIZE // 8, 5, generator=torch.Generator().manual_seed(0))
    targets = momentum.momentum_targets(images, ids, masked, chosen, patch_mask)
    queue = (torch.nn.functional.normalize(torch.randn(16, 128), dim=-1),) * 2
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    history = []
    for _ in range(8):
        torch.manual_seed(1)  # the same ITM hard negatives every step: one fixed objective to descend
        parts = student(images, ids, masked, chosen, patch_mask, codes, targets, 0.4, *queue)
        assert all(torch.isfinite(v) and v.ndim == 0 for v in parts.values())
        history.append({k: v.item() for k, v in parts.items()})
        optimizer.zero_grad()
        sum(parts.values()).backward()
        optimizer.step()
        student.clamp_logit_scales_()
    for name in history[0]:
        assert history[-1][name] < history[0][name], (name, [h[name] for h in history])


def test_a_batch_without_masked_tokens_or_patches_gives_zero_xmm_and_every_gradient(model, ids):
    """Short captions at BERT's 15% leave some batches without any chosen token: that XMM half is 0 with zero
    gradients (it used to fail on an empty hidden), and every parameter still gets a gradient (DDP needs them)."""
    images = _images(2)
    none_chosen = torch.zeros_like(ids, dtype=torch.bool)
    no_patches = block_patch_mask(B, SIZE // 8, 0)
    targets = model.momentum_targets(images, ids, ids, none_chosen, no_patches)
    parts = model(images, ids, ids, none_chosen, no_patches, _codes(images), targets, 0.4)
    assert parts["xmm_text"].item() == 0.0 and parts["xmm_image"].item() == 0.0
    assert all(torch.isfinite(v) for v in parts.values())
    model.zero_grad()
    (parts["xmm_text"] + parts["xmm_image"]).backward()
    predictions = model.text_encoder.cls.predictions
    assert predictions.decoder.weight.grad is not None and model.image_token_head.weight.grad is not None
    assert predictions.bias.grad.abs().sum() == 0 and model.image_token_head.bias.grad.abs().sum() == 0
    model.zero_grad()


def test_bad_input_names_the_argument(model, ids):
    images = _images(3)
    masked, chosen = mask_text_tokens(ids, CFG, 0.3, generator=torch.Generator().manual_seed(0))
    patch_mask = block_patch_mask(B, SIZE // 8, 5, generator=torch.Generator().manual_seed(0))
    good = dict(images=images, ids=ids, masked_ids=masked, chosen=chosen, patch_mask=patch_mask)
    cases = [
        (dict(images=images[:1], ids=ids[:1], masked_ids=masked[:1], chosen=chosen[:1], patch_mask=patch_mask[:1]),
         ValueError, "SIMLA needs at least 2 samples per batch"),  # B = 1 crashed in torch.multinomial
        (dict(chosen=chosen.long()), TypeError, "chosen must be a bool tensor"),
        (dict(patch_mask=patch_mask[:, :-1]), ValueError, "patch_mask must have shape [8, 16]"),
        (dict(patch_mask=patch_mask.long()), TypeError, "patch_mask must be a bool tensor"),
        (dict(ids=ids.repeat(1, 3), masked_ids=masked.repeat(1, 3), chosen=chosen.repeat(1, 3)), ValueError,
         "ids must have shape [B=8, L <= 32], got (8, 48)"),
        (dict(masked_ids=masked[:, :-1]), ValueError, "masked_ids must have the shape of ids"),
        (dict(images=images[:, :, :30, :30]), ValueError, "H, W multiples of 8"),
    ]
    for change, error, words in cases:
        with pytest.raises(error) as info:
            model.momentum_targets(**{**good, **change})
        assert words in str(info.value)
    with pytest.raises(ValueError, match="codes must be an int64 tensor"):
        model(**good, codes=_codes(images)[:, :-1], targets={}, alpha=0.4)
    with pytest.raises(ValueError, match="probability must be in"):
        mask_text_tokens(ids, CFG, 1.5)
    with pytest.raises(ValueError, match=r"n_masked must be in \[0, grid \* grid = 16\], got -1"):
        block_patch_mask(2, 4, -1)


def test_psl_is_the_mean_bce_over_rows_and_vocabulary(model, ids):
    """PSL weighs as in SIMLA's code: binary_cross_entropy_with_logits' mean over B x V elements, hard and soft
    targets mixed by alpha (float64 reference from the same image embedding)."""
    images = _images(1)
    masked, chosen = mask_text_tokens(ids, CFG, 0.3, generator=torch.Generator().manual_seed(0))
    patch_mask = block_patch_mask(B, SIZE // 8, 5, generator=torch.Generator().manual_seed(0))
    momentum = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        momentum.keyword_head.weight.add_(0.05 * torch.randn_like(momentum.keyword_head.weight))
    targets = momentum.momentum_targets(images, ids, masked, chosen, patch_mask)
    alpha = 0.3
    with torch.no_grad():
        psl = model(images, ids, masked, chosen, patch_mask, _codes(images), targets, alpha)["psl"]
        image = torch.nn.functional.normalize(model.image_projection(model.image_tokens(images)[:, 0]), dim=-1)
    head = model.keyword_head
    logits = image.double() @ head.weight.double().T + head.bias.double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = ((1 - alpha) * bce(logits, targets["keywords"].double())
                + alpha * bce(logits, torch.sigmoid(targets["keyword_logits"].double())))
    assert targets["keywords"].sum(1).gt(0).all()
    torch.testing.assert_close(psl.double(), expected, rtol=1e-5, atol=1e-9)


SMALL = ["run.objective=simla", "data.batch_size=8", "data.train_size=16", "data.eval_size=10",
         "data.image_size=32", "data.local_size=16", "run.log_every=1", "optim.warmup_steps=1",
         "simla.codebook_images=64", "simla.codebook_iterations=2", "simla.queue_size=16", "simla.alpha_ramp_steps=2"]


def _state(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pt", weights_only=False)


def test_trainer_runs_simla(tmp_path):
    assert train.main(SMALL + ["run.steps=3", f"run.out_dir={tmp_path}"]) == 0
    log = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(set(r) >= {"itc", "itm", "xmm_text", "xmm_image", "psl", "alpha"} for r in log)
    assert [r["alpha"] for r in log] == pytest.approx([0.0, 0.2, 0.4])
    state = _state(tmp_path)
    # the queue starts full (random unit vectors, as SIMLA's) and 3 x 8 momentum features moved its pointer
    assert int(state["loss_state"]["image_queue.filled"]) == 16 and int(state["loss_state"]["image_queue.pointer"]) == 8
    assert state["loss_state"]["visual_tokenizer.codebook"].abs().sum() > 0  # the fitted k-means codebook
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert set(metrics) == {"student", "teacher"} and "i2t_R@1" in metrics["student"]["shapes"]


def test_simla_resume_equals_uninterrupted_run(tmp_path):
    assert train.main(SMALL + ["run.steps=4", f"run.out_dir={tmp_path / 'a'}"]) == 0
    assert train.main(SMALL + ["run.steps=4", "run.stop_at=2", f"run.out_dir={tmp_path / 'b'}"]) == 0
    assert train.main(["--resume"] + SMALL + ["run.steps=4", f"run.out_dir={tmp_path / 'b'}"]) == 0
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 4
    for part in ("model", "teacher", "loss_state"):
        assert a[part].keys() == b[part].keys()
        for name, value in a[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[part][name]), f"{part}.{name}"
