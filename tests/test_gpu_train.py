"""The trainer on a CUDA device: bf16 autocast there differs from CPU autocast (F.normalize returns fp32 under
CUDA autocast, bf16 under CPU autocast), so the CPU tests cannot stand in for these. Tiny model, a few steps."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train  # noqa: E402

pytestmark = pytest.mark.gpu

SMALL = ["run.steps=2", "data.batch_size=8", "data.train_size=16", "data.eval_size=10", "data.image_size=32",
         "data.local_size=16", "run.log_every=1", "optim.warmup_steps=1", "teacher.momentum=0.9"]


def _losses(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]  # the training records, not the evaluation's


SIMLA = ["run.objective=simla", "simla.codebook_images=64", "simla.codebook_iterations=2", "simla.queue_size=12",
         "simla.alpha_ramp_steps=2"]


@pytest.mark.parametrize("objective", ["cosmos", "clip", "psd ema", "simla"])
def test_each_objective_trains_under_bf16_autocast(tmp_path, objective):
    name, _, source = objective.partition(" ")
    extra = SIMLA if name == "simla" else [f"run.objective={name}"] + ([f"psd.source={source}"] if source else [])
    assert train.main(SMALL + extra + [f"run.out_dir={tmp_path}", "run.precision=bf16"]) == 0
    losses = _losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)


def test_fused_and_reference_kernels_agree_under_bf16_autocast(tmp_path):
    """The first step's COSMOS loss (same weights, same batch) through the fused kernels and upstream's way."""
    losses = {}
    for kernels in ("fused", "reference"):
        out = tmp_path / kernels
        assert train.main(SMALL + [f"run.kernels={kernels}", f"run.out_dir={out}", "run.precision=bf16"]) == 0
        losses[kernels] = _losses(out)[0]
    assert losses["fused"] == pytest.approx(losses["reference"], rel=2e-2)
