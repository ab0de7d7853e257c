"""`python -m cosmos_fast.eval` on a tiny ImageFolder and a tiny Karpathy JSON, with a checkpoint of a randomly
initialised tiny model in the trainer's format; and its errors."""
import json

import pytest
import torch
from PIL import Image

import cosmos_fast
from cosmos_fast.eval import __main__ as cli
from cosmos_fast.eval.zero_shot import read_imagefolder, read_karpathy
from cosmos_fast.models import CosmosModel, config

COLORS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The trainer's layout: student under "model", the EMATeacher's state under "teacher", trained at 32 px."""
    torch.manual_seed(0)
    model = CosmosModel(config("tiny", image_size=32, context_length=16))
    teacher = cosmos_fast.EMATeacher(model, momentum=0.9)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "teacher": teacher.state_dict(), "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    for name, rgb in COLORS.items():
        (root / f"dark_{name}").mkdir()
        for i in range(3):
            Image.new("RGB", (40 + 8 * i, 36), rgb).save(root / f"dark_{name}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "val2014").mkdir()
    images = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        Image.new("RGB", (48, 40), rgb).save(root / "val2014" / f"{i}.jpg")
        images.append({"filepath": "val2014", "filename": f"{i}.jpg", "split": "test",
                       "sentences": [{"raw": f"a {name} picture."}, {"raw": f"all {name}"}]})
    images.append({"filepath": "val2014", "filename": "absent.jpg", "split": "train", "sentences": [{"raw": "x"}]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path, root


def test_readers(imagefolder, karpathy):
    folder = read_imagefolder(imagefolder)
    assert folder.class_names == ["dark blue", "dark green", "dark red"]  # sorted folders, "_" read as a space
    assert folder.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(folder.images) == 9
    coco = read_karpathy(*karpathy, split="test")  # the train image's file is absent: not read
    assert len(coco.images) == 3 and coco.captions[:2] == ["a red picture.", "all red"]
    assert coco.caption_image.tolist() == [0, 0, 1, 1, 2, 2]


def test_cli_both_tasks_student_and_teacher(checkpoint, imagefolder, karpathy, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert cli.main(["--checkpoint", str(checkpoint), "--model", "tiny", "--imagefolder", str(imagefolder),
                     "--templates", "a photo of a {}.", "{}", "--karpathy", str(karpathy[0]), "--images",
                     str(karpathy[1]), "--batch-size", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "32 px" in printed and "student" in printed and "teacher" in printed
    results = json.loads(out.read_text())
    assert results["chance"]["karpathy-test"]["R@1"] == pytest.approx(100 / 3)
    assert results["chance"]["imagefolder"]["top1"] == pytest.approx(100 / 3)
    assert results["templates"] == ["a photo of a {}.", "{}"]
    for which in ("student", "teacher"):
        retrieval, classes = results["metrics"][which]["karpathy-test"], results["metrics"][which]["imagefolder"]
        assert set(retrieval) == {"i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5", "i2t_R@10", "t2i_R@10"}
        assert set(classes) == {"top1", "top5"}
        assert all(0 <= v <= 100 for v in [*retrieval.values(), *classes.values()])
        assert retrieval["i2t_R@5"] == classes["top5"] == 100.0  # 3 images, 3 classes: everything is in the top 5
    # an untrained student and its fresh EMA copy are the same model
    for name, metrics in results["metrics"]["student"].items():
        assert metrics == pytest.approx(results["metrics"]["teacher"][name])


def test_cli_errors(checkpoint, imagefolder, karpathy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        cli.main(["--checkpoint", str(tmp_path / "none.pt"), "--model", "tiny", "--imagefolder", str(imagefolder)])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        cli.main(["--checkpoint", str(checkpoint), "--imagefolder", str(tmp_path / "absent")])
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="without images"):
        cli.main(["--checkpoint", str(checkpoint), "--imagefolder", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no captioned images in split 'val'"):
        cli.main(["--checkpoint", str(checkpoint), "--karpathy", str(karpathy[0]), "--images", str(karpathy[1]),
                  "--split", "val"])
    with pytest.raises(SystemExit):  # argparse: --karpathy without --images
        cli.main(["--checkpoint", str(checkpoint), "--karpathy", str(karpathy[0])])
    with pytest.raises(ValueError, match="the weights do not fit model config 'vit-b16'"):
        cli.main(["--checkpoint", str(checkpoint), "--model", "vit-b16", "--imagefolder", str(imagefolder)])
    no_teacher = tmp_path / "student_only.pt"
    torch.save({"model": torch.load(checkpoint)["model"]}, no_teacher)
    with pytest.raises(KeyError, match="which='teacher' is not in the checkpoint"):
        cli.main(["--checkpoint", str(no_teacher), "--model", "tiny", "--imagefolder", str(imagefolder)])


def test_the_model_name_comes_from_the_trainers_config_or_the_weights(checkpoint, imagefolder, capsys):
    """The trainer stores its config as plain dicts (older checkpoints: the TrainConfig object); without it the
    config whose sizes the weights have is taken."""
    args = cli.parse_args(["--checkpoint", "x.pt", "--imagefolder", "d"])
    assert cli.model_name(args, {"config": {"model": {"name": "vit-b16"}}}) == "vit-b16"
    assert cli.model_name(args, {"config": {"run": {}}}) is None
    assert cli.main(["--checkpoint", str(checkpoint), "--imagefolder", str(imagefolder), "--no-progress"]) == 0
    assert "model tiny, 32 px" in capsys.readouterr().out


def test_cli_scores_an_upstream_checkpoint_student_and_teacher(tmp_path, imagefolder, karpathy, capsys):
    """A checkpoint as upstream COSMOS's main.py saves it (ViT-B/32: {"epoch", "name", "student" with DDP's
    prefix, "teacher"}): the config is found by the weights' sizes, both models are scored, and each is the one
    its entry holds."""
    from cosmos_fast.eval.zero_shot import load_model
    from cosmos_fast.models import export_upstream_state_dict

    torch.manual_seed(0)
    student = export_upstream_state_dict(CosmosModel(config("vit-b32")).state_dict())
    teacher = dict(student, **{"visual.proj": torch.randn(768, 512) * 0.05, "logit_scale": torch.tensor(3.0)})
    path = tmp_path / "epoch_32.pt"  # the teacher shares the student's other tensors: saved once
    torch.save({"epoch": 32, "name": "cc3m", "student": {f"module.{k}": v for k, v in student.items()},
                "teacher": teacher}, path)
    out = tmp_path / "upstream.json"
    assert cli.main(["--checkpoint", str(path), "--imagefolder", str(imagefolder), "--karpathy", str(karpathy[0]),
                     "--images", str(karpathy[1]), "--no-progress", "--json", str(out)]) == 0
    assert "model vit-b32, 224 px, context 77" in capsys.readouterr().out
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"student", "teacher"} and metrics["student"] != metrics["teacher"]
    checkpoint = torch.load(path)
    for which, state in (("student", student), ("teacher", teacher)):
        model = load_model(checkpoint, which)
        torch.testing.assert_close(model.image_projection.weight, state["visual.proj"].t(), rtol=0, atol=0)
        assert model.logit_scale.item() == state["logit_scale"].item()


def test_unreadable_inputs_are_named(tmp_path, checkpoint, imagefolder):
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("hello")
    with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
        cli.main(["--checkpoint", str(not_torch), "--model", "tiny", "--imagefolder", str(imagefolder)])
    simla = tmp_path / "simla.pt"
    torch.save({"model": {}, "config": {"run": {"objective": "simla"}, "model": {"name": "tiny"}}}, simla)
    with pytest.raises(ValueError, match="this is a SIMLA checkpoint"):
        cli.main(["--checkpoint", str(simla), "--imagefolder", str(imagefolder)])
    for text, words in (("[1, 2]", "no 'images' list of objects"),
                        ('{"images": [{"split": "test", "sentences": [{"raw": "x"}]}]}',
                         "image 0 of split 'test' has no 'filename'"),
                        ('{"images": [{"split": "test", "filename": "a.jpg", "sentences": [{"tokens": []}]}]}',
                         "a sentence of a.jpg has no 'raw' text")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=words):
            cli.main(["--checkpoint", str(checkpoint), "--model", "tiny", "--karpathy", str(bad), "--images",
                      str(tmp_path)])
    with pytest.raises(SystemExit):  # two placeholders: str.format would raise IndexError per class
        cli.main(["--checkpoint", str(checkpoint), "--imagefolder", str(imagefolder), "--templates", "{} {}"])


def test_a_corrupt_image_is_named(tmp_path, checkpoint):
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        cli.main(["--checkpoint", str(checkpoint), "--model", "tiny", "--imagefolder", str(folder), "--no-progress"])
