"""SIMLA as its authors built it (issue 23): BERT through ``transformers`` and DeiT through timm load strictly and
compute what those libraries compute; SIMLA's released checkpoint layout (``fixtures/upstream_simla_keys.json``,
listed from codezakh/SIMLA's own model) loads strictly; SIMLA's JSON-list data, caption cleaning, augmentation and
recipe; the alpha ramp over one epoch; ITM re-ranked retrieval against a hand-computed ranking; the visual
tokenizer interface. Tiny models: nothing is downloaded."""
import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import config as config_lib  # noqa: E402
import train  # noqa: E402

from cosmos_fast.data.augment import SIMLA_RANDAUGMENT_OPS, simla_augmentation  # noqa: E402
from cosmos_fast.data.shards import CaptionFileDataset  # noqa: E402
from cosmos_fast.eval import __main__ as cli  # noqa: E402
from cosmos_fast.eval.metrics import recall_from_scores  # noqa: E402
from cosmos_fast.eval.simla_retrieval import itm_reranked_scores, load_simla_model, simla_retrieval  # noqa: E402
from cosmos_fast.models.simla import (SIMLAModel, load_bert_weights, load_simla_checkpoint,  # noqa: E402
                                      load_vision_weights, simla_config, simla_state_dicts)
from cosmos_fast.models.simla_text import CaptionTokenizer, clean_caption, load_wordpiece  # noqa: E402
from cosmos_fast.models.visual_tokenizers import DVAETokenizer, KMeansTokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
FIXTURES = Path(__file__).parent / "fixtures"
SIZE = 32
CFG = simla_config("tiny", image_size=SIZE)
CAPTIONS = ["a picture of a red circle", "the large shape is a square. the square is blue",
            "the diamond is yellow", "a small green cross at the top left"]


def _bert_config():
    return transformers.BertConfig(vocab_size=CFG.vocab_size, hidden_size=CFG.width, num_hidden_layers=CFG.text_layers,
                                   num_attention_heads=CFG.text_heads, intermediate_size=CFG.intermediate_size,
                                   max_position_embeddings=CFG.max_positions, hidden_dropout_prob=0.1,
                                   attention_probs_dropout_prob=0.1)


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory):
    """A tiny BertModel and a tiny BertForMaskedLM saved with save_pretrained, each beside the tiny WordPiece
    tokenizer, as a Hugging Face directory holds them."""
    dirs = {}
    for kind in ("BertModel", "BertForMaskedLM"):
        torch.manual_seed(1)
        bert = getattr(transformers, kind)(_bert_config()).eval()
        with torch.no_grad():  # a trained model's biases are not zero
            for name, p in bert.named_parameters():
                if name.endswith("bias"):
                    p.normal_(std=0.02)
        path = tmp_path_factory.mktemp(kind)
        bert.save_pretrained(path)
        load_wordpiece("tiny").save_pretrained(path)
        dirs[kind] = (path, bert)
    return dirs


def test_bert_in_hugging_face_layout_loads_strictly_and_matches_transformers(bert_dirs):
    path, bert = bert_dirs["BertModel"]
    torch.manual_seed(0)
    model = SIMLAModel(CFG).eval()
    before = copy.deepcopy(model.text_encoder.state_dict())
    fresh = load_bert_weights(model, path)
    # BERT has no cross-attention and a bare BertModel no MLM head: exactly those keep their initialisation
    expected = {f"text_encoder.{k}" for k in before if ".crossattention." in k or k.startswith("cls.")}
    expected -= {"text_encoder.cls.predictions.decoder.weight", "text_encoder.cls.predictions.decoder.bias"}
    assert set(fresh) == expected
    tokenizer = CaptionTokenizer(path, 16)  # the directory's own tokenizer: the same ids as the shipped one
    ids = tokenizer(CAPTIONS)
    assert torch.equal(ids, CaptionTokenizer("tiny", 16)(CAPTIONS))
    with torch.no_grad():
        ours = model.encode_text(ids)[1]
        theirs = bert(input_ids=ids, attention_mask=(ids != CFG.pad_id).long()).last_hidden_state
    real = ids != CFG.pad_id
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_bert_for_masked_lm_loads_its_head_too(bert_dirs):
    path, bert = bert_dirs["BertForMaskedLM"]
    model = SIMLAModel(CFG).eval()
    fresh = load_bert_weights(model, path)
    assert all(".crossattention." in k for k in fresh)
    ids = CaptionTokenizer(path, 16)(CAPTIONS)
    with torch.no_grad():
        hidden = model.encode_text(ids)[1]
        ours = model.text_encoder.cls(hidden)
        theirs = bert(input_ids=ids, attention_mask=(ids != CFG.pad_id).long()).logits
    real = ids != CFG.pad_id
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    # the decoder stays tied to the word embeddings, as BertForMaskedLM's
    encoder = model.text_encoder
    assert encoder.cls.predictions.decoder.weight is encoder.bert.embeddings.word_embeddings.weight


def test_bert_that_does_not_fit_is_refused(bert_dirs, tmp_path):
    path, _ = bert_dirs["BertModel"]
    with pytest.raises(ValueError, match="num_hidden_layers=4, the SIMLA config 2"):
        load_bert_weights(SIMLAModel(simla_config("tiny", image_size=SIZE, text_layers=2)), path)
    with pytest.raises(ValueError, match="no BERT weights at"):
        load_bert_weights(SIMLAModel(CFG), tmp_path / "absent")
    with pytest.raises(ValueError, match="no WordPiece (tokenizer|vocabulary) at"):  # 4.x raises, 5.x gives an empty one
        load_wordpiece(tmp_path)


def _timm_vit(image_size: int):
    import timm

    torch.manual_seed(2)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=image_size, patch_size=CFG.patch_size, embed_dim=CFG.width, depth=CFG.vision_layers,
        num_heads=CFG.vision_heads, qkv_bias=True, num_classes=10).eval()


def test_deit_weights_through_timm(tmp_path, monkeypatch):
    import huggingface_hub
    from timm.layers import resample_abs_pos_embed

    vit = _timm_vit(SIZE)
    with torch.no_grad():
        vit.pos_embed.normal_()
    file = tmp_path / "deit.pth"
    torch.save({"model": vit.state_dict()}, file)  # DeiT's release format, classifier included
    model = SIMLAModel(CFG).eval()
    load_vision_weights(model, file)
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model.image_tokens(images), vit.forward_features(images))
    # another size: the patch positions resampled as SIMLA's interpolate_pos_embed (bicubic, no antialiasing),
    # which timm's resample_abs_pos_embed computes too
    bigger = SIMLAModel(simla_config("tiny", image_size=48))
    load_vision_weights(bigger, file)
    expected = resample_abs_pos_embed(vit.pos_embed.detach(), new_size=(6, 6), old_size=(4, 4), num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=False)
    torch.testing.assert_close(bigger.visual.pos_embed.detach(), expected)
    # a timm name resolves through the local Hugging Face cache only
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_vision_weights(model, "deit_base_patch16_224_not_a_model")
    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, name: asked.append((repo, name)) or str(file))
    load_vision_weights(SIMLAModel(CFG), "deit_base_patch16_224")
    assert asked[0] == ("timm/deit_base_patch16_224.fb_in1k", "model.safetensors")
    state = {k: v for k, v in vit.state_dict().items() if k != "norm.bias"}
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing \['norm.bias'\]"):
        load_vision_weights(model, tmp_path / "partial.pth")


def _fixture_keys() -> dict:
    return json.loads((FIXTURES / "upstream_simla_keys.json").read_text())["keys"]


def test_released_layout_maps_onto_the_base_model_key_for_key():
    """Every key of SIMLA's own state dict (listed from codezakh/SIMLA's model at its Pretrain.yaml config) has a
    place of the same shape in the base SIMLAModel, and every parameter of the model is filled: strict."""
    keys = _fixture_keys()
    state = {k: (torch.arange(shape[-1]).view(shape) if k.endswith("position_ids") else
                 torch.empty(shape, device="meta")) for k, shape in keys.items()}
    student, momentum, queues = simla_state_dicts({"model": state})
    with torch.device("meta"):
        model = SIMLAModel(simla_config("base"))
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for part in (student, momentum):
        assert set(part) == set(own)
        assert {k: tuple(v.shape) for k, v in part.items()} == own
    assert tuple(queues["image"]["queue"].shape) == (65536, 256) and int(queues["text"]["filled"]) == 65536


def _to_upstream(state: dict, momentum: bool = False) -> dict:
    """This model's state dict in SIMLA's names (the inverse of the loader's table, checked against the fixture)."""
    renames = [("mask_embedding", "visual_encoder.mask_token"), ("visual.", "visual_encoder."),
               ("image_projection.", "vision_proj."), ("text_projection.", "text_proj."), ("temperature", "temp"),
               ("image_token_head.", "mim_head."), ("keyword_head.", "concept_head."), ("itm_head.", "itm_head."),
               ("text_encoder.", "text_encoder.")]
    out = {}
    for key, value in state.items():
        if "token_type_embeddings" in key:  # SIMLA's BERT has none
            continue
        ours, theirs = next((o, t) for o, t in renames if key == o or key.startswith(o))
        name = theirs + key[len(ours):]
        if momentum:
            if theirs in ("temp", "itm_head."):
                continue  # upstream's momentum model shares them
            head, _, rest = name.partition(".")
            name = f"{head}_m" + (f".{rest}" if rest else "")
        out[name] = value
    for prefix in ("text_encoder_m." if momentum else "text_encoder.",):
        out[prefix + "bert.embeddings.position_ids"] = torch.arange(CFG.max_positions)[None]
    return out


def test_released_checkpoint_loads_strictly_and_computes_the_same():
    torch.manual_seed(3)
    student, momentum = SIMLAModel(CFG), SIMLAModel(CFG)
    with torch.no_grad():
        for p in momentum.parameters():
            p.add_(0.01)
        for model in (student, momentum):  # SIMLA's BERT has no token types: a released model sums zeros there
            model.text_encoder.bert.embeddings.token_type_embeddings.weight.zero_()
    upstream = {**_to_upstream(student.state_dict()), **_to_upstream(momentum.state_dict(), momentum=True)}
    # the names are upstream's: every one, its layer index put to 0, is a key of the fixture
    pattern = {re.sub(r"\.(layer|blocks)\.\d+\.", r".\1.0.", k) for k in _fixture_keys()}
    assert {re.sub(r"\.(layer|blocks)\.\d+\.", r".\1.0.", k) for k in upstream} <= pattern
    queue = torch.nn.functional.normalize(torch.randn(CFG.embed_dim, 32), dim=0)
    upstream.update(image_queue=queue, text_queue=queue.flip(1), queue_ptr=torch.tensor([8]))
    checkpoint = {"model": upstream, "optimizer": {}, "epoch": 29, "config": {}}
    loaded, loaded_momentum = SIMLAModel(CFG), SIMLAModel(CFG)
    queues = load_simla_checkpoint(loaded, checkpoint, loaded_momentum)
    for a, b in ((student, loaded), (momentum, loaded_momentum)):
        for name, value in b.state_dict().items():
            if "token_type_embeddings" in name:
                assert value.abs().sum() == 0  # added as zeros: SIMLA's sums
            elif name not in ("temperature", "itm_head.weight", "itm_head.bias") or a is student:
                assert torch.equal(value, a.state_dict()[name]), name
    assert torch.equal(loaded_momentum.itm_head.weight, student.itm_head.weight)  # shared upstream
    assert torch.equal(queues["image"]["queue"], queue.T) and int(queues["image"]["pointer"]) == 8
    ids = CaptionTokenizer("tiny", 16)(CAPTIONS)
    student.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(ids)[0], student.encode_text(ids)[0], rtol=0, atol=0)
    # strict both ways: an unknown key and a missing one are named
    with pytest.raises(ValueError, match="no place for: \\['extra_head.weight'\\]"):
        simla_state_dicts({**upstream, "extra_head.weight": torch.zeros(1)})
    del upstream["mim_head.bias"]
    with pytest.raises(ValueError, match=r"missing \['image_token_head.bias'\]"):
        load_simla_checkpoint(SIMLAModel(CFG), {"model": upstream})


def test_caption_cleaning_as_albef_pre_caption():
    assert clean_caption("A Man's  <person> riding-a bike/horse!! (Outdoors).") == "a mans person riding a bike horse outdoors"
    assert clean_caption("  Two   dogs; one cat?\n") == "two dogs one cat"
    long = " ".join(f"w{i}" for i in range(40))
    assert clean_caption(long) == " ".join(f"w{i}" for i in range(30))
    assert clean_caption(long, max_words=5) == "w0 w1 w2 w3 w4"
    ids = CaptionTokenizer("tiny", 8)(["The large shape is a red circle at the top left"])
    cfg = CFG
    assert ids.shape == (1, 8) and ids[0, 0] == cfg.cls_id and ids[0, -1] == cfg.sep_id  # cut to 8, [SEP] kept
    with pytest.raises(TypeError, match="caption must be a string"):
        clean_caption(["a list"])


def _json_data(root: Path, n: int) -> Path:
    """SIMLA's pre-training format: one JSON list of {"image": path, "caption": str or [str, ...]}."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 40), ((37 * i) % 255, 90, 160)).save(root / "images" / f"{i}.jpg")
        caption = f"A picture of shape {i}!" if i % 2 else [f"the shape {i} is red.", f"a RED shape-{i}"]
        rows.append({"image": f"images/{i}.jpg", "caption": caption})
    path = root / "pairs.json"
    path.write_text(json.dumps(rows))
    return path


def test_json_list_reader(tmp_path):
    path = _json_data(tmp_path, 4)
    data = CaptionFileDataset(str(path))
    assert len(data) == 4 and data[0]["captions"] == ["the shape 0 is red.", "a RED shape-0"]
    assert data[1]["captions"] == ["A picture of shape 1!"] and data[1]["image"].size == (40, 40)
    two = CaptionFileDataset(f"{path},{path}")  # SIMLA's train_file is a list of such files
    assert len(two) == 8
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "images/0.jpg", "caption": 3}]))
    with pytest.raises(ValueError, match=r"bad.json, row 0: 'caption' must be a string or a non-empty list"):
        CaptionFileDataset(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('[{"image": "x.jpg", ')
    with pytest.raises(ValueError, match="neither a JSON list nor JSON lines"):
        CaptionFileDataset(tmp_path / "broken.json")


def test_simla_augmentation_is_albefs_randaugment():
    from timm.data.auto_augment import AugmentOp

    augment = simla_augmentation(48)
    crop, flip, rand = augment.transforms[:3]
    assert crop.size == (48, 48) and crop.scale == (0.2, 1.0)
    ops = {getattr(op, "name", "Identity"): op for op in rand.ops}
    assert tuple(ops) == SIMLA_RANDAUGMENT_OPS and rand.num_layers == 2
    # magnitude 7 of 10, as ALBEF's arg_dict: rotate 21 degrees, shear 0.21, translate 7 px, enhance 1.36
    assert all(op.prob == 0.5 and op.magnitude == 7 for op in ops.values() if isinstance(op, AugmentOp))
    level = {name: op.level_fn(7, op.hparams) for name, op in ops.items() if isinstance(op, AugmentOp) and op.level_fn}
    assert abs(level["Rotate"][0]) == pytest.approx(21) and abs(level["ShearX"][0]) == pytest.approx(0.21)
    assert abs(level["TranslateX"][0]) == pytest.approx(7) and level["Brightness"][0] == pytest.approx(1.36)
    out = augment(Image.new("RGB", (64, 50), (10, 200, 30)))
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32


SMALL = ["run.objective=simla", "data.batch_size=8", "data.eval_size=10", "data.image_size=32", "run.log_every=1",
         "optim.warmup_steps=1", "simla.codebook_images=16", "simla.codebook_iterations=1", "simla.queue_size=16",
         "model.name=tiny"]


def _alphas(out_dir: Path) -> list[float]:
    return [r["alpha"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "alpha" in r]


def test_alpha_ramps_over_one_epoch_of_either_data_source(tmp_path):
    # the built-in data: 16 samples at 8 per step, an epoch of 2 steps
    assert train.main(SMALL + ["data.train_size=16", "run.steps=3", f"run.out_dir={tmp_path / 'shapes'}"]) == 0
    assert _alphas(tmp_path / "shapes") == pytest.approx([0.0, 0.2, 0.4])
    # SIMLA's JSON list of 24 pairs: an epoch of 3 steps
    path = _json_data(tmp_path / "data", 24)
    assert train.main(SMALL + ["data.source=json", f"data.path={path}", "run.steps=4",
                               f"run.out_dir={tmp_path / 'json'}"]) == 0
    assert _alphas(tmp_path / "json") == pytest.approx([0.0, 0.4 / 3, 0.8 / 3, 0.4])
    with pytest.raises(ValueError, match="simla.alpha_ramp_steps must be given for webdataset"):
        config_lib.load(None, SMALL + ["data.source=webdataset", "data.path=/x/{0..1}.tar"])


def test_simla_4m_config_is_upstreams_recipe():
    cfg = config_lib.load(Path(__file__).resolve().parents[1] / "train" / "configs" / "simla-4m.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas) == (1e-4, 0.02, (0.9, 0.999))
    assert (cfg.optim.warmup_lr, cfg.optim.warmup_steps, cfg.optim.min_lr) == (1e-5, 2000, 1e-5)
    assert (cfg.teacher.momentum, cfg.simla.alpha, cfg.simla.queue_size) == (0.995, 0.4, 65536)
    assert (cfg.data.source, cfg.data.image_size, cfg.data.context_length, cfg.data.batch_size) == ("json", 256, 25, 512)
    assert (cfg.simla.text_weights, cfg.simla.vision_weights) == ("bert-base-uncased", "deit_base_patch16_224")
    # SIMLA's weight decay rule: none on 1-d parameters and biases, the 0-d temperature decays
    from objectives.simla import albef_weight_decay

    assert albef_weight_decay("temperature", torch.zeros(())) and albef_weight_decay("visual.pos_embed", torch.zeros(1, 2, 3))
    assert not albef_weight_decay("visual.norm.weight", torch.zeros(4)) and not albef_weight_decay("x.bias", torch.zeros(4, 4))


def test_learning_rate_warms_up_from_warmup_lr_and_ends_at_min_lr():
    cfg = config_lib.load(None, ["optim.lr=1e-4", "optim.warmup_lr=1e-5", "optim.min_lr=1e-5", "optim.warmup_steps=10"])
    lr = [train.learning_rate(step, cfg.optim, 110) for step in range(111)]
    assert lr[0] == pytest.approx(1e-5 + 9e-5 / 10) and lr[9] == pytest.approx(1e-4)
    assert lr[60] == pytest.approx(1e-5 + 9e-5 * 0.5) and lr[110] == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="optim.min_lr must be in"):
        config_lib.load(None, ["optim.min_lr=1.0"])


class _LookupITM(torch.nn.Module):
    """A stand-in with known ITM logits: ``itm_logits(ids, image_tokens)`` reads table[text id, image id] from the
    ids' first column and the tokens' first value."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def itm_logits(self, ids, image_tokens):
        matched = self.table[ids[:, 0], image_tokens[:, 0, 0].long()]
        return torch.stack([torch.zeros_like(matched), matched], dim=1)


def test_itm_reranking_against_a_hand_computed_ranking():
    """3 images, 6 captions (2 per image), k = 2. ITC ranks wrongly; ITM fixes some queries within the top 2."""
    image_emb = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.tensor(
        [[0.0, 1.0], [1.0, 0.2], [1.0, 0.0], [0.1, 1.0], [1.0, 0.9], [0.9, 1.0]]), dim=-1)
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2])
    table = torch.full((6, 3), -5.0)
    table[1, 0], table[2, 0], table[0, 1], table[3, 1], table[4, 2], table[5, 2] = 3.0, 1.0, 0.5, 2.0, 4.0, 1.0
    ids = torch.arange(6)[:, None]
    tokens = torch.arange(3.0)[:, None, None].expand(3, 2, 2)
    i2t, t2i = itm_reranked_scores(_LookupITM(table), tokens, image_emb, ids, text_emb, k=2, batch_size=4)
    # by hand: image 0's ITC top 2 are captions 2 and 1 (ITM 1.0, 3.0): its caption 1 is first;
    # image 1's top 2 are captions 3 and 0 (2.0, 0.5): caption 3 first; image 2's are 5 and 4 (1.0, 4.0): 4 first
    inf = float("-inf")
    assert i2t.tolist() == [[inf, 3.0, 1.0, inf, inf, inf], [0.5, inf, inf, 2.0, inf, inf],
                            [inf, inf, inf, inf, 4.0, 1.0]]
    # captions: each query's two nearest images by ITC, re-scored by ITM
    expected_t2i = [[inf, 0.5, -5.0], [3.0, inf, -5.0], [1.0, inf, -5.0], [inf, 2.0, -5.0], [-5.0, inf, 4.0],
                    [inf, -5.0, 1.0]]
    assert t2i.tolist() == expected_t2i
    metrics = recall_from_scores(i2t, t2i, caption_image, ks=(1, 2))
    # image -> text: every image's best caption is its own at rank 0; text -> image: captions 0, 2 and 5 rank
    # their image below another (0: image 1 scores 0.5 > -inf; 2: image 0 scores 1.0 > -inf; 5: image 1 scores -5
    # < 1.0, so caption 5 finds image 2 first)
    assert metrics == {"i2t_R@1": 100.0, "t2i_R@1": pytest.approx(100 * 4 / 6), "i2t_R@2": 100.0,
                       "t2i_R@2": pytest.approx(100 * 4 / 6)}
    # captions 0 and 2 never had their image among their 2 candidates (-inf): not found at any k, R@3 included
    assert recall_from_scores(i2t, t2i, caption_image, ks=(3,))["t2i_R@3"] == pytest.approx(100 * 4 / 6)


def test_itm_reranking_on_a_model_equals_brute_force():
    torch.manual_seed(4)
    model = SIMLAModel(CFG).eval()
    images = torch.randn(4, 3, SIZE, SIZE)
    ids = CaptionTokenizer("tiny", 16)(CAPTIONS + CAPTIONS[::-1])
    with torch.no_grad():
        tokens = model.image_tokens(images)
        image_emb = torch.nn.functional.normalize(model.image_projection(tokens[:, 0]), dim=-1)
        text_emb = torch.nn.functional.normalize(model.encode_text(ids)[0], dim=-1)
        i2t, t2i = itm_reranked_scores(model, tokens, image_emb, ids, text_emb, k=3, batch_size=5)
        every = torch.stack([model.itm_logits(ids, tokens[i].expand(len(ids), -1, -1))[:, 1] for i in range(4)])
    similarity = image_emb @ text_emb.T
    for i in range(4):
        top = similarity[i].topk(3).indices
        torch.testing.assert_close(i2t[i, top], every[i, top], rtol=1e-5, atol=1e-5)
        assert torch.isinf(i2t[i]).sum() == len(ids) - 3
    for t in range(len(ids)):
        top = similarity[:, t].topk(3).indices
        torch.testing.assert_close(t2i[t, top], every[top, t], rtol=1e-5, atol=1e-5)


def test_simla_retrieval_cli_on_a_released_checkpoint(tmp_path, capsys):
    """``--simla-retrieval`` on flickr30k_test.json (FLAIR's format) with a checkpoint in SIMLA's released layout
    gives, for student and momentum model, what the library computes from the same weights."""
    torch.manual_seed(5)
    student, momentum = SIMLAModel(CFG), SIMLAModel(CFG)
    with torch.no_grad():
        for p in momentum.parameters():
            p.add_(0.01)
        for model in (student, momentum):
            model.text_encoder.bert.embeddings.token_type_embeddings.weight.zero_()
    path = tmp_path / "simla.pth"
    torch.save({"model": {**_to_upstream(student.state_dict()), **_to_upstream(momentum.state_dict(), True)}}, path)
    root = tmp_path / "flickr"
    entries = []
    for i, colour in enumerate(("red", "blue", "yellow")):
        name = f"flickr30k-images/{1000092795 + i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 36), colour).save(root / name)
        entries.append({"image": name, "caption": [f"a {colour} square", f"the picture is {colour}"]})
    (root / "flickr30k_test.json").write_text(json.dumps(entries))
    out = tmp_path / "simla.json"
    assert cli.main(["--simla-retrieval", "--checkpoint", str(path), "--model", "tiny", "--flickr",
                     str(root / "flickr30k_test.json"), "--k-test", "2", "--context-length", "16", "--json", str(out),
                     "--no-progress", "--batch-size", "4"]) == 0
    assert "flickr30k: 3 images, 6 captions, ITM over the top 2" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["k_test"] == {"flickr30k": 2}
    images = [root / e["image"] for e in entries]
    captions = [c for e in entries for c in e["caption"]]
    for which, model in (("student", student), ("teacher", momentum)):
        loaded = load_simla_model(torch.load(path, weights_only=False), which, "tiny")
        for name, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], value) or name in ("itm_head.weight", "itm_head.bias",
                                                                             "temperature"), name
        expected = simla_retrieval(loaded, CaptionTokenizer("tiny", 16), images, captions,
                                   torch.tensor([0, 0, 1, 1, 2, 2]), k=2, batch_size=4)
        assert record["metrics"][which]["flickr30k"] == pytest.approx(expected)


class _ColourCodes(torch.nn.Module):
    """A stand-in dVAE encoder: ``vocab`` tokens from the red channel's mean in each 8 x 8 block (DALL-E
    downsamples 8x), the nearest of ``vocab`` levels evenly spaced over [0.1, 0.9]."""

    def __init__(self, vocab: int = 4):
        super().__init__()
        self.vocab = vocab

    def forward(self, x):
        red = torch.nn.functional.avg_pool2d(x[:, :1], 8)  # [B, 1, g, g] in [0.1, 0.9]
        return -(red - torch.linspace(0.1, 0.9, self.vocab).view(1, -1, 1, 1)).abs()


def test_visual_tokenizers_share_one_interface(tmp_path):
    dvae = DVAETokenizer(_ColourCodes(), vocab_size=4, patch_size=CFG.patch_size)
    from cosmos_fast.models.visual_tokenizers import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = torch.zeros(1, 3, SIZE, SIZE)
    pixels[:, 0, :16, :] = 1.0  # the top half red, the bottom half black
    codes = dvae((pixels - mean) / std)
    assert codes.shape == (1, (SIZE // CFG.patch_size) ** 2) and codes.dtype == torch.int64
    assert codes.view(4, 4)[:2].eq(3).all() and codes.view(4, 4)[2:].eq(0).all()
    assert not any("encoder" in k for k in dvae.state_dict())  # the file's weights are not checkpointed
    kmeans = KMeansTokenizer(8, CFG.patch_size)
    kmeans.fit(torch.randn(4, 3, SIZE, SIZE), iterations=2)
    assert kmeans(pixels).shape == codes.shape
    torch.save(_ColourCodes(), tmp_path / "encoder.pkl")
    assert torch.equal(DVAETokenizer.from_file(tmp_path / "encoder.pkl", vocab_size=4, patch_size=8)(pixels),
                       DVAETokenizer(_ColourCodes(), vocab_size=4, patch_size=8)(pixels))
    with pytest.raises(ValueError, match="gave logits"):
        DVAETokenizer(_ColourCodes(), vocab_size=8192, patch_size=8)(pixels)
    with pytest.raises(ValueError, match="no dVAE encoder file"):
        DVAETokenizer.from_file(tmp_path / "absent.pkl")


def test_trainer_runs_with_the_dvae_tokenizer(tmp_path):
    torch.save(_ColourCodes(CFG.visual_codes), tmp_path / "encoder.pkl")
    out = tmp_path / "run"
    assert train.main(SMALL + ["data.train_size=16", "run.steps=2", f"run.out_dir={out}",
                               "simla.visual_tokenizer=dvae", f"simla.dvae_path={tmp_path / 'encoder.pkl'}"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert not any(k.startswith("visual_tokenizer") for k in state["loss_state"])  # nothing of the dVAE is saved
    # an encoder of another vocabulary is refused by name, on the first batch
    torch.save(_ColourCodes(4), tmp_path / "small.pkl")
    with pytest.raises(ValueError, match=r"the dVAE encoder gave logits \(\d+, 4, 4, 4\), expected \[B, 256, 4, 4\]"):
        train.main(SMALL + ["data.train_size=16", "run.steps=1", f"run.out_dir={tmp_path / 'bad'}",
                            "simla.visual_tokenizer=dvae", f"simla.dvae_path={tmp_path / 'small.pkl'}"])
