"""The COSMOS model: open_clip conversion, dynamic-length text, padding masks, shapes."""
import pytest
import torch

from cosmos_fast.models import CosmosModel, Tokenizer, config, load_open_clip_weights, trim_to_longest
from cosmos_fast.models.cosmos import conv_stem

CAPTIONS = ["a red circle", "a large blue square at the top left of a gray picture", "two shapes",
            "the background is black and there is a small yellow triangle"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CosmosModel(config("tiny")).double().eval()


def test_open_clip_vit_b16_converts_exactly():
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.create_model("ViT-B-16", pretrained=None).double().eval()
    ours = CosmosModel(config("vit-b16")).double().eval()
    missing = load_open_clip_weights(ours, reference.state_dict())
    assert all(k.split(".")[0] in {"image_token_mapping", "text_token_mapping", "image_pooler", "text_pooler",
                                   "distill_logit_scale"} for k in missing)
    images = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    ids = Tokenizer()(CAPTIONS[:2])
    with torch.no_grad():
        for expected, got in ((reference.encode_image(images), ours.encode_image(images)[0]),
                              (reference.encode_text(ids), ours.encode_text(ids)[0])):
            assert ((got - expected).norm() / expected.norm()).item() <= 1e-6


def test_trainer_checkpoint_student_and_teacher_load_by_name():
    """The trainer's checkpoint {"model", "teacher": an EMATeacher's state (the model under module.)}."""
    import cosmos_fast

    student = CosmosModel(config("tiny"))
    teacher = cosmos_fast.EMATeacher(student)
    with torch.no_grad():
        teacher.module.logit_scale.fill_(3.0)
    checkpoint = {"model": student.state_dict(), "teacher": teacher.state_dict(), "step": 3}
    for which, expected in (("student", student.logit_scale.item()), ("teacher", 3.0)):
        model = CosmosModel(config("tiny"))
        assert load_open_clip_weights(model, checkpoint, which=which) == []
        assert model.logit_scale.item() == pytest.approx(expected)
        torch.testing.assert_close(model.visual.cls_token, student.visual.cls_token)


def test_dynamic_length_text_equals_padded(tiny):
    ids = Tokenizer(context_length=32)(CAPTIONS)
    short = trim_to_longest(ids)
    assert short.shape[1] < ids.shape[1]
    with torch.no_grad():
        full_emb, full_tokens = tiny.encode_text(ids)
        emb, tokens = tiny.encode_text(short)
    torch.testing.assert_close(emb, full_emb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tokens, full_tokens[:, : short.shape[1]], rtol=1e-12, atol=1e-12)


def batch(B, global_size=64, local_size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2, B, 3, global_size, global_size, generator=g, dtype=torch.float64)
    local_crops = torch.randn(6, B, 3, local_size, local_size, generator=g, dtype=torch.float64)
    texts = [[CAPTIONS[(c + b) % len(CAPTIONS)] for b in range(B)] for c in range(8)]
    captions = torch.stack([Tokenizer(context_length=32)(t) for t in texts])
    return global_crops, local_crops, captions


def test_forward_shapes_and_normalisation(tiny):
    with torch.no_grad():
        out = tiny(*batch(3))
    E = tiny.config.embed_dim
    assert out["image"].shape == (8, 3, E) and out["text"].shape == (8, 3, E)
    assert out["cross_image"].shape == (8, 3, E) and out["cross_text"].shape == (8, 3, E)
    for key in ("image", "text", "cross_image", "cross_text"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(8, 3, dtype=torch.float64))
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07, dtype=torch.float64))


def test_forward_checks_its_arguments(tiny):
    """Each bad argument by name; a caption batch unlike the crops' used to be reshaped silently (only its first
    group was used)."""
    global_crops, local_crops, captions = batch(2)
    cases = [
        ((global_crops, local_crops, torch.cat([captions, captions], dim=1)), ValueError,
         "captions must have shape [C, B=2, L <= 32], got (8, 4, 32)"),
        ((global_crops, local_crops, captions[:, :1]), ValueError, "captions must have shape [C, B=2"),
        ((global_crops, local_crops, captions.double()), TypeError, "captions must be an int64"),
        ((global_crops, local_crops, captions[0]), ValueError, "captions must be a non-empty 3-d tensor"),
        ((global_crops, local_crops[:, :1], captions), ValueError, "local_crops must have shape [V, B=2, 3, H, W]"),
        ((global_crops, local_crops.float(), captions), TypeError, "local_crops has dtype torch.float32"),
        ((global_crops[..., :60, :60], local_crops, captions), ValueError,
         "global_crops's height and width must be multiples of the patch size 8, got (60, 60)"),
        ((global_crops[0], local_crops, captions), ValueError, "global_crops must have 5 dimensions"),
    ]
    for args, error, words in cases:
        with pytest.raises(error) as info:
            tiny(*args)
        assert words in str(info.value)
    with pytest.raises(ValueError, match="ids must be a non-empty 2-d tensor"):
        trim_to_longest(captions[0, 0])


def test_loading_weights_that_are_not_there_is_an_error(tiny):
    with pytest.raises(KeyError, match=r"which='teacher' is not in the checkpoint; it holds the weights \['student'\]"):
        load_open_clip_weights(tiny, {"student": {"logit_scale": torch.tensor(2.0)}}, which="teacher")
    with pytest.raises(ValueError, match="no layout known here"):
        load_open_clip_weights(tiny, {"epoch": 3, "head.weight": torch.zeros(2)})


def test_padding_masked_output_equals_output_without_padding(tiny):
    """Masking a caption's padding gives what the sample gets when its caption has no padding at all (alone in
    its batch, trimmed to its own length)."""
    global_crops, local_crops, captions = batch(4)
    with torch.no_grad():
        batched = tiny(global_crops, local_crops, captions)
        for b in range(4):
            alone = tiny(global_crops[:, b:b + 1], local_crops[:, b:b + 1], captions[:, b:b + 1])
            for key in ("cross_image", "cross_text", "image", "text"):
                torch.testing.assert_close(batched[key][:, b], alone[key][:, 0], rtol=1e-10, atol=1e-12, msg=key)
        unmasked = tiny(global_crops, local_crops, captions, mask_padding=False)
    assert not torch.allclose(unmasked["cross_image"], batched["cross_image"])  # upstream attends to padding


@pytest.mark.parametrize("patch_size,width", [(8, 192), (16, 768), (2, 5)])
def test_conv_stem_replaces_the_patch_projection(patch_size, width):
    """log2(patch) stride-2 convolutions, widths doubling up to the model's: the same token grid as the patch
    projection it replaces, and a float64 forward that a hand-run of its layers reproduces."""
    torch.manual_seed(0)
    stem = conv_stem(width, patch_size).double()
    convs = [m for m in stem if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == patch_size.bit_length() - 1 and convs[-1].out_channels == width
    assert all(c.stride == (2, 2) and c.kernel_size == (3, 3) for c in convs)
    x = torch.randn(2, 3, 4 * patch_size, 2 * patch_size, dtype=torch.float64)
    expected = x
    for i, conv in enumerate(convs):
        expected = torch.nn.functional.conv2d(expected, conv.weight, conv.bias, stride=2, padding=1)
        expected = torch.nn.functional.gelu(expected) if i < len(convs) - 1 else expected
    out = stem(x)
    assert out.shape == (2, width, 4, 2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("patch_size", [1, 6, 12])
def test_conv_stem_needs_a_power_of_two_patch(patch_size):
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        conv_stem(64, patch_size)


def test_tiny_model_has_the_conv_stem_and_vit_b16_the_patch_projection():
    tiny = CosmosModel(config("tiny", image_size=48))
    assert isinstance(tiny.visual.patch_embed.proj, torch.nn.Sequential)
    assert tiny.encode_image(torch.randn(2, 3, 48, 48))[1].shape == (2, 36, 192)
    assert tiny.encode_image(torch.randn(2, 3, 24, 24))[1].shape == (2, 9, 192)  # a local crop
    assert not config("vit-b16").conv_stem


def test_logit_scales_are_clamped():
    model = CosmosModel(config("tiny"))
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
        model.distill_logit_scale.fill_(-1.0)
    model.clamp_logit_scales_()
    assert model.logit_scale.item() == pytest.approx(model.config.max_logit_scale)
    assert model.distill_logit_scale.item() == 0.0
    with pytest.raises(ValueError, match="model config must be one of"):
        config("vit-h14")


def test_data_pipeline_feeds_the_model():
    """Shapes samples -> CosmosTransform -> collate_views -> the tiny model: the shapes the model takes."""
    from cosmos_fast.data import CosmosTransform, ShapesDataset, collate_views

    transform = CosmosTransform(Tokenizer(context_length=32), global_size=64, local_size=32, seed=1)
    dataset = ShapesDataset(size=3, image_size=64)
    examples = [transform(dataset[i]) for i in range(3)]
    again = transform(dataset[1])
    assert torch.equal(again["captions"], examples[1]["captions"])  # text crops: deterministic per key and epoch
    transform.set_epoch(1)  # a new epoch draws new text crops (for some sample at least)
    assert any(not torch.equal(transform(dataset[i])["captions"], examples[i]["captions"]) for i in range(3))
    transform.set_epoch(0)
    batch = collate_views(examples + [None])
    assert batch["global"].shape == (2, 3, 3, 64, 64) and batch["local"].shape == (6, 3, 3, 32, 32)
    assert batch["captions"].shape == (8, 3, 32) and batch["captions"].dtype == torch.int64
    with torch.no_grad():
        out = CosmosModel(config("tiny"))(batch["global"], batch["local"], batch["captions"])
    assert out["cross_text"].shape == (8, 3, 128)


def _loss_and_grads(model, inputs):
    """A scalar of every output, its gradients, and the bytes autograd saved for the backward outside any
    checkpointed region."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    loss = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum()
               for v in out.values() if v.ndim == 3)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


def test_grad_checkpointing_gives_the_same_gradients_and_keeps_less():
    torch.manual_seed(0)
    model = CosmosModel(config("tiny")).double()
    inputs = batch(3)
    loss, grads, saved = _loss_and_grads(model, inputs)
    model.set_grad_checkpointing()
    assert model.visual.grad_checkpointing and model.text.transformer.grad_checkpointing
    ck_loss, ck_grads, ck_saved = _loss_and_grads(model, inputs)
    assert ck_saved < saved / 2  # the tower blocks' activations are recomputed, not kept
    torch.testing.assert_close(ck_loss, loss, rtol=1e-12, atol=0)
    assert ck_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(ck_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    model.set_grad_checkpointing(False)
    assert _loss_and_grads(model, inputs)[2] == saved


def test_compile_towers_compiles_every_tower_block_and_keeps_outputs_and_names():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = CosmosModel(config("tiny")).double()
    inputs = batch(3)
    names = list(model.state_dict())
    with torch.no_grad():
        expected = model(*inputs)
    counter = CompileCounter()  # a backend that counts the graphs dynamo hands it and runs them as traced
    model.compile_towers(backend=counter)
    with torch.no_grad():
        got = model(*inputs)
    # one graph per block class and input shape: the image blocks (global and local crops), the text blocks
    # (global and local captions, each at its own trimmed length)
    assert counter.frame_count >= 2
    assert list(model.state_dict()) == names
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-12, atol=1e-12, msg=key)
    torch._dynamo.reset()
