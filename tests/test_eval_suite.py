"""The paper's zero-shot benchmarks in their real on-disk layouts (COCO captions JSON, FLAIR's Flickr30k JSON,
ImageNet wnid folders, four of torchvision's layouts), the metrics on hand-computed cases with several captions per
image and ties, the names and templates the field ships, and ``--suite paper`` end to end."""
import json

import pytest
import torch
from PIL import Image

import cosmos_fast
from cosmos_fast.eval import __main__ as cli
from cosmos_fast.eval import class_embeddings, retrieval_recall
from cosmos_fast.eval.datasets import (SUITE, DatasetMissing, imagenet_names_and_templates, read_coco_captions,
                                       read_flickr_json, read_imagenet, read_torchvision)
from cosmos_fast.eval.segmentation import SEGMENTATION_SUITE
from cosmos_fast.eval.zero_shot import load_open_clip_model
from cosmos_fast.models import CosmosModel, Tokenizer, config

pytest.importorskip("clip_benchmark", reason="the ten sets' names and templates come from clip_benchmark")
COLORS = [(220, 40, 40), (40, 80, 220), (40, 170, 60), (235, 205, 40)]


def image(path, color, size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_coco(root):
    """COCO 2017 val's layout and JSON fields; image 1 has six captions, as some of COCO's images do."""
    images, annotations = [], []
    for i, n_captions in enumerate((5, 6, 5)):
        name = f"{139 + i:012d}.jpg"
        image(root / "coco" / "images" / "val2017" / name, COLORS[i])
        images.append({"license": 1, "file_name": name, "height": 32, "width": 40, "id": 139 + i})
        annotations += [{"image_id": 139 + i, "id": 1000 * i + k, "caption": f" picture {i} caption {k} "}
                        for k in range(n_captions)]
    annotations.insert(2, annotations.pop())  # annotations are not grouped by image in COCO's file
    path = root / "coco" / "annotations" / "captions_val2017.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations}))


def make_flickr(root):
    entries = []
    for i in range(3):
        image(root / "flickr30k-images" / f"{1000092795 + i}.jpg", COLORS[i])
        entries.append({"image": f"flickr30k-images/{1000092795 + i}.jpg",
                        "caption": [f"flickr {i} caption {k}." for k in range(5)]})
    (root / "flickr30k-images" / "flickr30k_test.json").write_text(json.dumps(entries))


def make_imagenet(root):
    for wnid, color in (("n01440764", COLORS[0]), ("n01443537", COLORS[1])):
        for k in range(2):
            image(root / "imagenet" / "data" / "val_images" / wnid / f"ILSVRC2012_val_{k:08d}_{wnid}.JPEG", color)


def make_food101(root):
    meta = {"apple_pie": ["apple_pie/1005649", "apple_pie/1011328"], "beef_tartare": ["beef_tartare/1000431"]}
    for items in meta.values():
        for item in items:
            image(root / "food-101" / "images" / f"{item}.jpg", COLORS[len(item) % 4])
    (root / "food-101" / "meta").mkdir(parents=True)
    (root / "food-101" / "meta" / "test.json").write_text(json.dumps(meta))


def make_dtd(root):
    lines = ["banded/banded_0002.jpg", "blotchy/blotchy_0003.jpg", "banded/banded_0004.jpg"]
    for line in lines:
        image(root / "dtd" / "dtd" / "images" / line, COLORS[len(line) % 4])
    (root / "dtd" / "dtd" / "labels").mkdir(parents=True)
    (root / "dtd" / "dtd" / "labels" / "test1.txt").write_text("\n".join(lines) + "\n")
    (root / "dtd" / "dtd" / "imdb").mkdir()


def make_pets(root):
    rows = [("Abyssinian_100", 1, 1, 1), ("american_bulldog_10", 2, 2, 1), ("Abyssinian_101", 1, 1, 1)]
    for name, *_ in rows:
        image(root / "oxford-iiit-pet" / "images" / f"{name}.jpg", COLORS[len(name) % 4])
    (root / "oxford-iiit-pet" / "annotations").mkdir(parents=True)
    (root / "oxford-iiit-pet" / "annotations" / "test.txt").write_text(
        "".join(f"{n} {c} {s} {b}\n" for n, c, s, b in rows))


def make_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"
    for image_id in ("1025794", "1340192"):
        image(data / "images" / f"{image_id}.jpg", COLORS[int(image_id[-1]) % 4])
    (data / "variants.txt").write_text("707-320\n727-200\nA300B4\n")
    (data / "images_variant_test.txt").write_text("1025794 707-320\n1340192 A300B4\n")


def test_coco_and_flickr_readers(tmp_path):
    make_coco(tmp_path)
    coco = read_coco_captions(tmp_path / "coco" / "annotations" / "captions_val2017.json",
                              tmp_path / "coco" / "images" / "val2017")
    assert [p.name for p in coco.images] == ["000000000139.jpg", "000000000140.jpg", "000000000141.jpg"]
    assert len(coco.captions) == 16 and torch.bincount(coco.caption_image).tolist() == [5, 6, 5]
    assert coco.captions[2] == "picture 2 caption 4" and coco.caption_image[2] == 2  # stripped, by image_id
    make_flickr(tmp_path)
    flickr = read_flickr_json(tmp_path / "flickr30k-images" / "flickr30k_test.json")
    assert flickr.images[1] == tmp_path / "flickr30k-images" / "1000092796.jpg"
    assert flickr.caption_image.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and flickr.captions[5] == "flickr 1 caption 0."
    with pytest.raises(DatasetMissing, match="no COCO captions JSON at"):
        read_coco_captions(tmp_path / "nope.json", tmp_path)
    (tmp_path / "coco" / "images" / "val2017" / "000000000140.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 images .* are missing, e.g. .*000000000140.jpg"):
        read_coco_captions(tmp_path / "coco" / "annotations" / "captions_val2017.json",
                           tmp_path / "coco" / "images" / "val2017")


def test_imagenet_wnid_folders_take_openais_names_and_templates(tmp_path):
    """The 1000 curated names and the 80 templates are open_clip's (OpenAI's), in timm's wnid order."""
    wnids, names, templates = imagenet_names_and_templates()
    assert len(wnids) == len(names) == 1000 and len(templates) == 80
    assert (wnids[0], names[0]) == ("n01440764", "tench") and (wnids[1], names[1]) == ("n01443537", "goldfish")
    assert names[-1] == "toilet paper" and names[409] == "analog clock"
    assert templates[0] == "a bad photo of a {}." and templates[-1] == "a tattoo of the {}."
    make_imagenet(tmp_path)
    data = read_imagenet(tmp_path / "imagenet" / "data" / "val_images")
    assert data.labels.tolist() == [0, 0, 1, 1] and data.class_names == names and data.templates == templates
    (tmp_path / "imagenet" / "data" / "val_images" / "cats").mkdir()
    with pytest.raises(ValueError, match=r"not wnids: \['cats'\]"):
        read_imagenet(tmp_path / "imagenet" / "data" / "val_images")


def test_torchvision_layouts_with_clip_benchmarks_names_and_templates(tmp_path):
    for make in (make_food101, make_dtd, make_pets, make_aircraft):
        make(tmp_path)
    food = read_torchvision("food101", tmp_path)
    assert food.class_names == ["apple pie", "beef tartare"] and food.labels.tolist() == [0, 0, 1]
    assert food.templates == ["a photo of {}, a type of food."]
    dtd = read_torchvision("dtd", tmp_path)
    assert dtd.class_names == ["banded", "blotchy"] and dtd.labels.tolist() == [0, 1, 0]
    assert dtd.templates[0] == "a photo of a {} texture." and len(dtd.templates) == 8
    pets = read_torchvision("pets", tmp_path)  # clip_benchmark's 37 names, not torchvision's title-cased ones
    assert len(pets.class_names) == 37 and pets.class_names[:2] == ["Abyssinian", "American Bulldog"]
    assert pets.labels.tolist() == [0, 1, 0] and pets.templates == ["a photo of a {}, a type of pet."]
    aircraft = read_torchvision("aircraft", tmp_path)
    assert aircraft.class_names == ["707-320", "727-200", "A300B4"] and aircraft.labels.tolist() == [0, 2]
    assert aircraft.templates == ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."]
    assert pets.images[0].size == (40, 32)  # PIL images, decoded when encoded
    upstream_keys = {"stanford_car": ["a"], "aircraft": ["Boeing 707-320", "Boeing 727-200", "Airbus A300B4"]}
    assert read_torchvision("aircraft", tmp_path, upstream_keys).class_names[0] == "Boeing 707-320"
    with pytest.raises(DatasetMissing, match=r"cifar10 not found under .*\(torchvision's CIFAR10 looks for "
                                             r".*cifar-10-batches-py"):
        read_torchvision("cifar10", tmp_path)


def test_retrieval_with_several_captions_per_image_and_ties():
    """Ranks count the candidates scoring strictly higher (ties go to the model), whatever order a sort leaves
    equals in."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    captions = torch.tensor([[1.0, 0.0], [0.8, 0.6],   # image 0's captions
                             [0.0, 1.0],               # image 1's
                             [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # image 2's: two tie with others' captions
    text_image = torch.tensor([0, 0, 1, 2, 2, 2])
    m = retrieval_recall(images, captions, text_image, ks=(1, 2))
    # image 0: its caption 0 scores 1.0, tied with caption 3 (image 2's): rank 0. image 1: caption 2 scores 1.0,
    # tied with caption 4: rank 0. image 2: caption 5 scores 1.0 (the only 1.0): rank 0.
    assert m["i2t_R@1"] == pytest.approx(100.0)
    # caption 0 -> image 0 (1.0) ahead of image 2 (0.6): rank 0; caption 1 -> image 0 0.8 < image 2 0.96: rank 1;
    # caption 2 -> image 1 1.0: rank 0; caption 3 -> image 2 0.6 < image 0 1.0: rank 1; caption 4 -> image 2 0.8 <
    # image 1 1.0: rank 1; caption 5 -> image 2 1.0: rank 0
    assert m["t2i_R@1"] == pytest.approx(50.0) and m["t2i_R@2"] == pytest.approx(100.0)


def test_class_embedding_is_the_renormalised_mean_over_the_templates():
    _, names, templates = imagenet_names_and_templates()
    g = torch.Generator().manual_seed(0)
    table = {}

    def encode(texts):  # a fixed random vector per prompt
        return torch.stack([table.setdefault(t, torch.randn(6, generator=g)) for t in texts])

    emb = class_embeddings(encode, names[:2], templates)
    for row, name in zip(emb, names[:2]):
        vectors = torch.nn.functional.normalize(torch.stack([table[t.format(name)] for t in templates]), dim=-1)
        mean = vectors.mean(0)
        torch.testing.assert_close(row, mean / mean.norm())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = CosmosModel(config("tiny", image_size=32, context_length=16))
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "teacher": cosmos_fast.EMATeacher(model).state_dict()}, path)
    return path


def test_suite_prints_the_table_writes_json_and_png_and_names_the_missing_sets(tmp_path, checkpoint, capsys):
    root = tmp_path / "data"
    make_coco(root)
    make_dtd(root)
    out = tmp_path / "suite.json"
    assert cli.main(["--checkpoint", str(checkpoint), "--suite", "paper", "--root", str(root), "--json", str(out),
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "not found, skipped:" in printed and "flickr30k" in printed and "imagenet" in printed
    header = next(line for line in printed.splitlines() if "coco I2T" in line)
    assert header.split() == ["coco", "I2T", "coco", "T2I", "dtd"]  # the paper's order: retrieval first
    assert any(line.startswith("student") for line in printed.splitlines())
    record = json.loads(out.read_text())
    assert list(record["sets"]) == ["coco", "dtd"] and record["columns"] == ["coco I2T", "coco T2I", "dtd"]
    # the paper's segmentation sets belong to the suite too
    assert set(record["missing"]) == {b.name for b in SUITE + SEGMENTATION_SUITE} - {"coco", "dtd"}
    assert "cifar10" in record["missing"] and "cifar-10-batches-py" in record["missing"]["cifar10"]
    for which in ("student", "teacher"):
        assert set(record["metrics"][which]["coco"]) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
        assert set(record["metrics"][which]["dtd"]) == {"top1", "top5"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["--checkpoint", str(checkpoint), "--suite", "paper", "--root", str(root), "--sets", "dtd",
                     "--json", str(out), "--no-progress"]) == 0
    assert list(json.loads(out.read_text())["sets"]) == ["dtd"]
    with pytest.raises(DatasetMissing, match="none of the suite's benchmarks is under"):
        cli.main(["--checkpoint", str(checkpoint), "--suite", "paper", "--root", str(tmp_path / "empty"),
                  "--no-progress"])
    with pytest.raises(SystemExit):  # --sets without --suite, and an unknown set
        cli.main(["--checkpoint", str(checkpoint), "--sets", "dtd", "--coco", str(root / "coco")])


def test_open_clip_weights_are_scored_as_open_clip_computes(tmp_path, capsys):
    """--open-clip NAME:FILE: OpenAI CLIP's QuickGELU towers, equal to open_clip's own model; scored by the CLI."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32-quickgelu").eval()
    weights = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), weights)
    model, name = load_open_clip_model(f"ViT-B-32-quickgelu:{weights}")
    assert name == "vit-b32" and model.config.quick_gelu
    images, ids = torch.randn(2, 3, 224, 224), Tokenizer()(["a red square", "a photo of two dogs"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images)[0], reference.encode_image(images), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(model.encode_text(ids)[0], reference.encode_text(ids), rtol=1e-4, atol=1e-5)
    make_coco(tmp_path)
    assert cli.main(["--open-clip", f"ViT-B-32-quickgelu:{weights}", "--coco", str(tmp_path / "coco"),
                     "--no-progress"]) == 0
    assert "open_clip ViT-B-32-quickgelu" in capsys.readouterr().out


def test_a_webdataset_run_ends_with_its_evaluation_and_validation_loss(tmp_path):
    """data.val_path shards give a validation loss every eval.every steps and at the end, eval.root the paper's
    benchmarks found there; both land in metrics.jsonl, eval.json and the curves. A webdataset run without either
    says so instead of ending silently."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    import train

    from cosmos_fast.data import ShapesDataset
    from cosmos_fast.data.shards import write_shards

    data = ShapesDataset("train", size=24, image_size=32)
    (train_shard,) = write_shards((data[i] for i in range(16)), tmp_path / "train", max_count=16)
    (val_shard,) = write_shards((data[i] for i in range(16, 24)), tmp_path / "val", max_count=8)
    make_coco(tmp_path / "bench")
    out = tmp_path / "run"
    base = ["run.steps=4", "data.batch_size=4", "data.image_size=32", "data.local_size=16", "run.log_every=1",
            "optim.warmup_steps=1", "data.source=webdataset", f"data.path={train_shard}", "data.shuffle=0"]
    assert train.main(base + [f"data.val_path={val_shard}", "eval.val_batches=2", "eval.every=2",
                              f"eval.root={tmp_path / 'bench'}", f"run.out_dir={out}"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [1, 3]  # after step 2 and at the end
    assert all(r["val_loss"] > 0 and "eval/teacher/coco/t2i_R@1" in r for r in evaluations)
    result = json.loads((out / "eval.json").read_text())
    assert result["val_loss"] == evaluations[-1]["val_loss"] and set(result["metrics"]["student"]) == {"coco"}
    assert "flickr30k" not in result["metrics"]["student"]  # absent: not evaluated
    # evaluations leave training as it was (random states, queues): a run without the mid-run evaluation and the
    # benchmarks trains the same steps and ends with the same validation loss (the same batches every time)
    assert train.main(base + [f"data.val_path={val_shard}", "eval.val_batches=2", "run.seed=0",
                              f"run.out_dir={tmp_path / 'again'}"]) == 0
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    plain = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in records if "loss" in r]


def test_a_webdataset_run_without_held_out_data_says_so(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    import train

    from cosmos_fast.data import ShapesDataset
    from cosmos_fast.data.shards import write_shards

    data = ShapesDataset("train", size=8, image_size=32)
    (shard,) = write_shards((data[i] for i in range(8)), tmp_path / "train", max_count=8)
    assert train.main(["run.steps=1", "data.batch_size=4", "data.image_size=32", "data.local_size=16",
                       "data.source=webdataset", f"data.path={shard}", f"run.out_dir={tmp_path / 'run'}"]) == 0
    assert "no held-out evaluation is configured for webdataset data" in capsys.readouterr().err
    assert not (tmp_path / "run" / "eval.json").exists()
