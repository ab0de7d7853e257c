"""The trainer on upstream COSMOS's artifacts: started from an upstream checkpoint (``model.init``), trained on
shards in FLAIR's and PixelProse's caption formats, and on a shard with samples whose captions cannot be used."""
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train  # noqa: E402

from cosmos_fast.data.shards import write_shards  # noqa: E402
from cosmos_fast.models import CosmosModel, config, convert_upstream_state_dict, export_upstream_state_dict  # noqa: E402
from test_upstream_data import FLAIR_SAMPLE, PIXELPROSE_SAMPLE, bad_caption_shard  # noqa: E402

SMALL = ["run.steps=2", "data.batch_size=4", "data.train_size=8", "data.eval_size=10", "data.image_size=32",
         "data.local_size=16", "run.log_every=1", "optim.warmup_steps=1", "optim.lr=1e-3", "teacher.momentum=0.9"]


def _log(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]  # the training records, not the evaluation's


def _state(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pt", weights_only=False)


def test_training_starts_from_an_upstream_checkpoint(tmp_path):
    """model.init=epoch_32.pt (ViT-B/32, upstream's layout, student with DDP's prefix): the student and the teacher
    start from the checkpoint's two models (shown by freezing the teacher, momentum 1, and a vanishing learning
    rate: the run ends where it started), two steps train at 64 / 32 px crops (the position embeddings of the
    checkpoint's 224 px grid interpolated), and the run ends with its evaluation."""
    torch.manual_seed(0)
    student = export_upstream_state_dict(CosmosModel(config("vit-b32")).state_dict())
    teacher = dict(student, **{"visual.proj": torch.randn(768, 512) * 0.05, "distill_logit_scale": torch.tensor(2.0)})
    init = tmp_path / "epoch_32.pt"
    torch.save({"epoch": 32, "name": "cc3m", "student": {f"module.{k}": v for k, v in student.items()},
                "teacher": teacher, "optimizer": {}}, init)
    keep = [o for o in SMALL if o.partition("=")[0] not in ("data.image_size", "data.local_size", "optim.lr",
                                                             "teacher.momentum")]
    out = tmp_path / "run"
    assert train.main(keep + ["model.name=vit-b32", f"model.init={init}", "data.image_size=64", "data.local_size=32",
                              "optim.lr=1e-12", "teacher.momentum=1.0", f"run.out_dir={out}"]) == 0
    state = _state(out)
    expected_teacher = convert_upstream_state_dict(teacher)
    for name, value in expected_teacher.items():
        assert torch.equal(state["teacher"][f"module.{name}"], value), name
    for name, value in convert_upstream_state_dict(student).items():
        torch.testing.assert_close(state["model"][name], value, rtol=0, atol=1e-9, msg=name)
    losses = [r["loss"] for r in _log(out)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((out / "eval.json").read_text())["metrics"]["teacher"]


def test_trains_on_flair_and_pixelprose_shards(tmp_path):
    """Shards as upstream trains on: FLAIR's presplit JSON (all seven fields, lists) and PixelProse's."""
    from PIL import Image

    images = [Image.new("RGB", (40, 40), color) for color in ("red", "green", "blue", "white")]
    flair = [{"key": f"f{i}", "image": image, "json": FLAIR_SAMPLE} for i, image in enumerate(images)]
    prose = [{"key": f"p{i}", "image": image, "json": PIXELPROSE_SAMPLE} for i, image in enumerate(images)]
    for name, samples, mode in (("flair", flair, "textcrop"), ("pixelprose", prose, "textcrop_pixelprose")):
        (shard,) = write_shards(samples, tmp_path / name)
        out = tmp_path / f"run-{name}"
        assert train.main(SMALL + ["data.source=webdataset", f"data.path={shard}", "data.shuffle=0",
                                   f"data.caption_mode={mode}", f"run.out_dir={out}"]) == 0
        assert [r["step"] for r in _log(out)] == [0, 1] and _state(out)["step"] == 2


def test_a_shard_with_bad_caption_samples_trains_on_with_warnings(tmp_path):
    """Four of the shard's eight samples have unusable captions (numbers, no caption field, no json, a cut JSON):
    each is skipped with a warning naming the shard and the key, and the run goes on."""
    shard = bad_caption_shard(tmp_path / "cc3m-000000.tar")
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train.main(SMALL + ["data.source=webdataset", f"data.path={shard}", "data.shuffle=0",
                                   f"run.out_dir={out}"]) == 0
    assert _state(out)["step"] == 2
    skipped = {str(w.message) for w in caught if str(w.message).startswith("skipped")}
    for key in ("numbers", "nofields", "bare", "cut"):
        assert any(f"sample '{key}' of {shard}" in message for message in skipped), key
