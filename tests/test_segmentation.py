"""Zero-shot segmentation: the mIoU against a hand-computed confusion matrix, the sliding windows against one pass,
CSA against a float64 transcription of its formula, the post-processing's thresholds, the eight sets' readers in
their real layouts (label shifts included), and the CLI end to end."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cosmos_fast.eval import __main__ as cli
from cosmos_fast.eval.segmentation import (IGNORE_INDEX, SEGMENTATION_SUITE, ConfusionMatrix, SegmentationSettings,
                                           ZeroShotSegmenter, dense_features, generic_set, read_names_file,
                                           segmentation_classes, window_boxes)
from cosmos_fast.models import CosmosModel, Tokenizer, config


def test_miou_against_a_hand_computed_confusion_matrix():
    """Random label maps with ignored pixels and classes absent from both prediction and label (left out of the
    mean), predictions of a class never labelled (IoU 0), accumulated over several images as one matrix."""
    g = torch.Generator().manual_seed(0)
    C = 6
    confusion = ConfusionMatrix(C)
    intersect, area_label, area_pred = np.zeros(C), np.zeros(C), np.zeros(C)
    for _ in range(3):
        label = torch.randint(0, 4, (17, 23), generator=g)  # classes 0..3 labelled
        label[torch.rand(17, 23, generator=g) < 0.2] = IGNORE_INDEX
        prediction = torch.randint(0, 5, (17, 23), generator=g)  # class 4 predicted, never labelled; 5 neither
        confusion.update(prediction, label)
        for y, p in zip(label.flatten().tolist(), prediction.flatten().tolist()):  # the definition, pixel by pixel
            if y == IGNORE_INDEX:
                continue
            area_label[y] += 1
            area_pred[p] += 1
            intersect[y] += y == p
    union = area_label + area_pred - intersect
    expected_iou = [100 * i / u if u else None for i, u in zip(intersect, union)]
    metrics = confusion.metrics()
    assert metrics["IoU"][5] is None and metrics["IoU"][4] == 0.0  # absent: left out; predicted only: 0
    assert metrics["IoU"] == pytest.approx(expected_iou)
    assert metrics["mIoU"] == pytest.approx(np.mean([v for v in expected_iou if v is not None]))
    assert metrics["aAcc"] == pytest.approx(100 * intersect.sum() / area_label.sum())
    with pytest.raises(ValueError, match=r"labels must be in \[0, 6\) or 255"):
        confusion.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 9))


def test_windows_follow_mmsegs_slide_inference():
    # 336 x 500: rows at 0 and 112 (the last moved back to 112), columns at 0, 112, 224 and 276 (moved back)
    boxes = window_boxes(336, 500, 224, 112)
    assert [(b[0], b[2]) for b in boxes] == [(0, 0), (0, 112), (0, 224), (0, 276), (112, 0), (112, 112),
                                             (112, 224), (112, 276)]
    assert all(b[1] - b[0] == 224 and b[3] - b[2] == 224 for b in boxes)
    assert window_boxes(100, 300, 224, 112) == [(0, 100, 0, 224), (0, 100, 76, 300)]  # a short side: one row


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return CosmosModel(config("tiny", image_size=32, context_length=16)).double().eval()


def segmenter(model, classes, **kwargs):
    return ZeroShotSegmenter(model, Tokenizer(16), classes, templates=["a photo of a {}."], **kwargs)


def test_sliding_windows_covering_the_image_equal_one_pass(tiny):
    """A window that covers the whole image gives the single pass's logits; overlapping windows average."""
    seg = segmenter(tiny, [["red"], ["blue", "navy"], ["green"]], crop=48, stride=16)
    image = torch.randn(3, 48, 40, dtype=torch.float64)
    (windowed,) = seg.logits([image])
    single = seg.window_logits(image[None])[0]
    torch.testing.assert_close(windowed, single.float(), rtol=1e-6, atol=1e-6)
    seg_small = segmenter(tiny, [["red"], ["blue"]], crop=16, stride=8)
    image = torch.randn(3, 32, 24, dtype=torch.float64)
    (logits,) = seg_small.logits([image])
    # pixel (0, 0) is in one window only, pixel (12, 12) in four: each the average of its windows' logits
    windows = window_boxes(32, 24, 16, 8)
    per_window = seg_small.window_logits(torch.stack([image[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows]))
    covering = [k for k, (y1, y2, x1, x2) in enumerate(windows) if y1 <= 12 < y2 and x1 <= 12 < x2]
    assert len(covering) == 4
    expected = torch.stack([per_window[k][:, 12 - windows[k][0], 12 - windows[k][2]] for k in covering]).mean(0)
    torch.testing.assert_close(logits[:, 12, 12], expected.float(), rtol=1e-6, atol=1e-6)
    # and a batch of two images gives each its own single-image result
    other = torch.randn(3, 40, 32, dtype=torch.float64)
    both = seg_small.logits([image, other])
    torch.testing.assert_close(both[0], logits)
    torch.testing.assert_close(both[1], seg_small.logits([other])[0])


def test_csa_against_a_float64_transcription(tiny):
    """SCLIP's CSA in the last block: attention weights softmax(q q^T s) + softmax(k k^T s), then the residual and
    the MLP; the tokens through ln_post and the projection, normalised."""
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    got = dense_features(tiny, images, csa=True)
    visual = tiny.visual
    with torch.no_grad():
        x = visual.norm_pre(visual._pos_embed(visual.patch_embed(images)))
        for block in visual.blocks[:-1]:
            x = block(x)
        last = visual.blocks[-1]
        h = last.norm1(x)
        W, b = last.attn.qkv.weight, last.attn.qkv.bias
        C, heads = h.shape[-1], last.attn.num_heads
        d = C // heads
        out = torch.zeros_like(h)
        for n in range(h.shape[0]):
            for head in range(heads):
                rows = slice(head * d, (head + 1) * d)
                q = h[n] @ W[rows].T + b[rows]
                k = h[n] @ W[C:][rows].T + b[C:][rows]
                v = h[n] @ W[2 * C:][rows].T + b[2 * C:][rows]
                weights = torch.softmax(q @ q.T / math.sqrt(d), -1) + torch.softmax(k @ k.T / math.sqrt(d), -1)
                out[n, :, rows] = weights @ v
        x = x + out @ last.attn.proj.weight.T + last.attn.proj.bias
        x = x + last.mlp(last.norm2(x))
        tokens = torch.nn.functional.normalize(tiny.image_projection(visual.norm(x)[:, 1:]), dim=-1)
    torch.testing.assert_close(got.flatten(1, 2), tokens, rtol=1e-10, atol=1e-12)
    plain = dense_features(tiny, images, csa=False)
    assert not torch.allclose(plain, got)
    expected_plain = torch.nn.functional.normalize(tiny.image_projection(visual.forward_features(images)[:, 1:]), dim=-1)
    torch.testing.assert_close(plain.flatten(1, 2), expected_plain, rtol=1e-10, atol=1e-12)


def test_postprocessing_thresholds_and_several_names(tiny):
    """Several names: the class takes their maximum probability; prob_thd sends uncertain pixels to class 0;
    area_thd removes classes covering less than its share of the predicted foreground."""
    seg = segmenter(tiny, [["bg"], ["a", "b"], ["c"]], settings=SegmentationSettings(logit_scale=1.0, prob_thd=0.4))
    # queries bg, a, b, c of classes 0, 1, 1, 2. pixel 0: a high -> class 1; pixel 1: all equal -> top prob 0.25 <
    # 0.4 -> 0; pixel 2: b high -> class 1; pixel 3: c high -> class 2
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0]], [[5.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 5.0, 0.0]],
                           [[0.0, 0.0, 0.0, 5.0]]])  # [Q=4, 1, W=4]
    logits[:, 0, 1] = 0.0
    assert seg.postprocess(logits).tolist() == [[1, 0, 1, 2]]
    seg.settings = SegmentationSettings(logit_scale=1.0, area_thd=0.3)
    wide = torch.zeros(4, 1, 10)
    wide[1, 0, :8] = 5.0  # class 1 on 8 pixels
    wide[3, 0, 8:] = 5.0  # class 2 on 2: under 0.3 of the 10 foreground pixels -> removed
    prediction = seg.postprocess(wide)
    assert prediction[0, :8].tolist() == [1] * 8 and 2 not in prediction.tolist()[0]


def label_png(path, label, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="L")
    if palette:  # VOC's label maps are palette images
        image = image.convert("P")
    image.save(path)


def rgb(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)


LABEL = np.array([[0, 1, 2, 255]] * 30 + [[3, 3, 3, 0]] * 0, dtype=np.uint8).repeat(10, axis=1)  # [30, 40]


def make_layouts(root):
    voc = root / "VOCdevkit" / "VOC2012"
    for i in ("2007_000033", "2007_000042"):
        rgb(voc / "JPEGImages" / f"{i}.jpg")
        label_png(voc / "SegmentationClass" / f"{i}.png", LABEL, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n2007_000042\n")
    context = root / "VOCdevkit" / "VOC2010"
    rgb(context / "JPEGImages" / "2008_000002.jpg")
    label_png(context / "SegmentationClassContext" / "2008_000002.png", LABEL)
    (context / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (context / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    coco = root / "coco_stuff164k"
    rgb(coco / "images" / "val2017" / "000000000139.jpg")
    label_png(coco / "annotations" / "val2017" / "000000000139_labelTrainIds.png", LABEL)
    label_png(coco / "annotations" / "val2017" / "000000000139_instanceTrainIds.png", LABEL)
    ade = root / "ade" / "ADEChallengeData2016"
    rgb(ade / "images" / "validation" / "ADE_val_00000001.jpg")
    label_png(ade / "annotations" / "validation" / "ADE_val_00000001.png", LABEL)
    city = root / "cityscapes"
    rgb(city / "leftImg8bit" / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png")
    label_png(city / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelTrainIds.png", LABEL)


def test_the_eight_readers_in_their_layouts_with_their_label_shifts(tmp_path):
    make_layouts(tmp_path)
    classes = segmentation_classes()
    sets = {b.name: b.read(tmp_path) for b in SEGMENTATION_SUITE}
    counts = {"voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_object": 81, "coco_stuff164k": 171,
              "ade20k": 150, "cityscapes": 19}
    for name, data in sets.items():
        assert len(data.class_names) == counts[name] == len(data.palette), name
        assert [n[0] for n in data.class_names] == classes[name]["classes"]
    assert sets["voc21"].class_names[0] == ["background"] and sets["voc20"].class_names[0] == ["aeroplane"]
    assert sets["ade20k"].class_names[:3] == [["wall"], ["building"], ["sky"]]
    assert len(sets["voc21"].images) == 2 and sets["cityscapes"].images[0].name.endswith("_leftImg8bit.png")
    row = [0, 1, 2, 255]
    for name in ("voc21", "context60", "coco_object", "coco_stuff164k", "cityscapes"):  # labels as stored
        assert sets[name].label(0)[0, ::10].tolist() == row, name
    for name in ("ade20k", "context59", "voc20"):  # 0 (unlabelled / background) ignored, the others shifted down
        assert sets[name].label(0)[0, ::10].tolist() == [255, 0, 1, 255], name
    assert sets["coco_stuff164k"].settings.short_side == 448 and sets["cityscapes"].settings.short_side == 560
    assert (sets["voc21"].settings.logit_scale, sets["voc21"].settings.prob_thd,
            sets["voc21"].settings.area_thd) == (65, 0.1, 0.1)
    assert sets["context60"].settings.logit_scale == 50 == sets["coco_object"].settings.logit_scale
    names = tmp_path / "cls_voc21.txt"  # SCLIP's format: several names per class
    names.write_text("sky, wall, tree\n" + "\n".join(classes["voc21"]["classes"][1:]))
    voc = SEGMENTATION_SUITE[0].read(tmp_path, read_names_file(names))
    assert voc.class_names[0] == ["sky", "wall", "tree"] and voc.class_names[1] == ["aeroplane"]
    (tmp_path / "labels").mkdir()
    label_png(tmp_path / "labels" / "a.png", LABEL)
    rgb(tmp_path / "images" / "a.jpg")
    (tmp_path / "names.txt").write_text("background\nred, crimson\nblue\nsea\n")
    generic = generic_set(tmp_path / "images", tmp_path / "labels", tmp_path / "names.txt")
    assert generic.class_names[1] == ["red", "crimson"] and generic.label(0)[0, ::10].tolist() == row


def test_cli_segments_a_set_and_draws_examples(tmp_path, capsys):
    torch.manual_seed(0)
    model = CosmosModel(config("tiny", image_size=32, context_length=16))
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "teacher": {"module." + k: v for k, v in model.state_dict().items()}},
               checkpoint)
    make_layouts(tmp_path / "data")
    out = tmp_path / "seg.json"
    assert cli.main(["--checkpoint", str(checkpoint), "--which", "teacher", "--segmentation", "voc21", "ade20k",
                     "--root", str(tmp_path / "data"), "--json", str(out), "--no-progress", "--examples", "2",
                     "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "voc21 mIoU" in printed and "ade20k mIoU" in printed and "teacher" in printed
    record = json.loads(out.read_text())
    assert record["sets"]["voc21"]["task"] == "segmentation" and len(record["metrics"]["teacher"]["ade20k"]["IoU"]) == 150
    assert 0 <= record["metrics"]["teacher"]["voc21"]["mIoU"] <= 100
    png = tmp_path / "seg-voc21-teacher.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(checkpoint), "--segmentation", "voc99", "--root", str(tmp_path)])
