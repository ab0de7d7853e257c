"""SIMLA (issue 7): the model's three modes, masking, hard negatives, keyword targets, the five losses, and the
trainer's run.objective=simla (smoke run and exact resume). Tiny model at 32 px: the file runs in well under a
minute on 2 CPU cores."""
import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train  # noqa: E402

from cosmos_fast.models import SIMLAModel, Tokenizer, simla_config  # noqa: E402
from cosmos_fast.models import simla as simla_module  # noqa: E402
from cosmos_fast.models.simla import (END_ID, MASK_ID, START_ID, block_patch_mask, keyword_targets,  # noqa: E402
                                      mask_text_tokens, padding_mask, sample_hard_negatives, special_mask)

B, SIZE = 8, 32
CAPTIONS = ["a picture of a red circle", "the large shape is a square. the square is blue",
            "a picture of a green triangle", "the diamond is yellow. the background is gray",
            "a picture of a purple cross", "the large shape is a circle", "the square is in the center",
            "a picture of an orange diamond"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = SIMLAModel(simla_config("tiny", image_size=SIZE))
    m.fit_visual_codebook(torch.randn(64, 3, SIZE, SIZE), iterations=2)
    return m


@pytest.fixture(scope="module")
def ids():
    return Tokenizer(16)(CAPTIONS)


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
    fused_text = model.text_over_image(ids, image_tokens)
    fused_image = model.image_over_text(image_tokens, ids)
    assert fused_text.shape == (B, ids.shape[1], cfg.width) and fused_image.shape == (B, 1 + P, cfg.width)
    # the cross-attention kernel runs in every layer of both fused modes; text over image has no key padding,
    # image over text masks the caption's padding
    assert len(calls) == 2 * cfg.text_layers
    assert calls[0] is None and torch.equal(calls[-1], padding_mask(ids))
    assert not torch.allclose(fused_text, text_tokens, atol=1e-3)  # the image changes the caption's outputs
    # padding is invisible: more padding columns leave the real positions' outputs unchanged
    longer = torch.cat([ids, torch.zeros(B, 5, dtype=ids.dtype)], dim=1)
    torch.testing.assert_close(model.encode_text(longer)[0], text_emb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.image_over_text(image_tokens, longer), fused_image, rtol=1e-4, atol=1e-5)


def test_text_masking(ids):
    many = ids.repeat(500, 1)
    masked, chosen = mask_text_tokens(many, 0.15, generator=torch.Generator().manual_seed(0))
    ordinary = ~special_mask(many)
    assert not (chosen & ~ordinary).any() and torch.equal(masked[~chosen], many[~chosen])
    assert chosen.sum() / ordinary.sum() == pytest.approx(0.15, abs=0.01)
    became_mask = (masked[chosen] == MASK_ID).float().mean()
    unchanged = (masked[chosen] == many[chosen]).float().mean()
    assert became_mask == pytest.approx(0.8, abs=0.02) and unchanged == pytest.approx(0.1, abs=0.02)
    assert (masked[chosen] < START_ID).logical_or(masked[chosen] == MASK_ID).all()
    assert torch.equal(padding_mask(masked), padding_mask(many))  # [MASK], the largest id, is no end token


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
    vocab = simla_config("tiny").vocab_size
    attention = torch.rand(B, 4, ids.shape[1]).softmax(dim=-1)
    target = keyword_targets(attention, ids, vocab, per_head=4, keep=5)
    assert target.shape == (B, vocab) and target.dtype == torch.float32
    real = (~special_mask(ids)).sum(dim=1)
    assert ((target.sum(dim=1) >= 1) & (target.sum(dim=1) <= torch.clamp(real, max=5))).all()
    for row in range(B):
        assert set(target[row].nonzero().flatten().tolist()) <= set(ids[row][~special_mask(ids)[row]].tolist())
    # a token every head attends to most is always a keyword
    focused = torch.zeros(B, 4, ids.shape[1])
    focused[..., 2] = 1.0
    assert (keyword_targets(focused, ids, vocab)[torch.arange(B), ids[:, 2]] == 1).all()
    assert target[:, [START_ID, END_ID, 0]].sum() == 0


def test_each_loss_is_finite_and_decreases(ids):
    torch.manual_seed(0)
    student = SIMLAModel(simla_config("tiny", image_size=SIZE, visual_codes=32))  # 32 codes: 8 images suffice
    images = _images()
    student.fit_visual_codebook(images, iterations=2)
    momentum = copy.deepcopy(student).requires_grad_(False)
    masked, chosen = mask_text_tokens(ids, 0.3, generator=torch.Generator().manual_seed(0))
    patch_mask = block_patch_mask(B, SIZE // 8, 5, generator=torch.Generator().manual_seed(0))
    targets = momentum.momentum_targets(images, ids, masked, chosen, patch_mask)
    queue = (torch.nn.functional.normalize(torch.randn(16, 128), dim=-1),) * 2
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-3, weight_decay=0.0)
    history = []
    for _ in range(8):
        parts = student(images, ids, masked, chosen, patch_mask, targets, 0.4, *queue)
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
    parts = model(images, ids, ids, none_chosen, no_patches, targets, 0.4)
    assert parts["xmm_text"].item() == 0.0 and parts["xmm_image"].item() == 0.0
    assert all(torch.isfinite(v) for v in parts.values())
    model.zero_grad()
    (parts["xmm_text"] + parts["xmm_image"]).backward()
    assert model.word_embedding.weight.grad is not None and model.image_token_decoder.weight.grad is not None
    assert model.mlm_bias.grad.abs().sum() == 0 and model.image_token_decoder.bias.grad.abs().sum() == 0
    model.zero_grad()


def test_bad_input_names_the_argument(model, ids):
    images = _images(3)
    masked, chosen = mask_text_tokens(ids, 0.3, generator=torch.Generator().manual_seed(0))
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
    with pytest.raises(ValueError, match="probability must be in"):
        mask_text_tokens(ids, 1.5)
    with pytest.raises(ValueError, match=r"n_masked must be in \[0, grid \* grid = 16\], got -1"):
        block_patch_mask(2, 4, -1)


def test_psl_is_the_mean_bce_over_rows_and_vocabulary(model, ids):
    """PSL weighs as in SIMLA's code: binary_cross_entropy_with_logits' mean over B x V elements, hard and soft
    targets mixed by alpha (float64 reference from the same image embedding)."""
    images = _images(1)
    masked, chosen = mask_text_tokens(ids, 0.3, generator=torch.Generator().manual_seed(0))
    patch_mask = block_patch_mask(B, SIZE // 8, 5, generator=torch.Generator().manual_seed(0))
    momentum = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        momentum.keyword_head.weight.add_(0.05 * torch.randn_like(momentum.keyword_head.weight))
    targets = momentum.momentum_targets(images, ids, masked, chosen, patch_mask)
    alpha = 0.3
    with torch.no_grad():
        psl = model(images, ids, masked, chosen, patch_mask, targets, alpha)["psl"]
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
         "simla.codebook_images=64", "simla.codebook_iterations=2", "simla.queue_size=12", "simla.alpha_ramp_steps=2"]


def _state(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pt", weights_only=False)


def test_trainer_runs_simla(tmp_path):
    assert train.main(SMALL + ["run.steps=3", f"run.out_dir={tmp_path}"]) == 0
    log = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(set(r) >= {"itc", "itm", "xmm_text", "xmm_image", "psl", "alpha"} for r in log)
    assert [r["alpha"] for r in log] == pytest.approx([0.0, 0.2, 0.4])
    state = _state(tmp_path)
    assert int(state["loss_state"]["image_queue.filled"]) == 12  # 3 x 8 momentum features, 12 slots
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
