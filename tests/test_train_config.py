"""Trainer configuration: YAML + overrides, and clear errors before anything trains."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "train" / "configs"


def test_default_config_and_overrides():
    cfg = config.load(CONFIGS / "tiny-cpu.yaml", ["run.steps=5", "optim.lr=1e-4", "optim.clip_grad=1.0"])
    assert cfg.model.name == "tiny" and cfg.data.source == "shapes"
    assert cfg.run.steps == 5 and cfg.optim.lr == 1e-4 and cfg.optim.clip_grad == 1.0


@pytest.mark.parametrize("overrides,words", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["optimizer.lr=1"], "unknown config section 'optimizer'"),
    (["run.steps=many"], "config key 'run.steps' takes int"),
    (["run.objective=simclr"], "run.objective must be cosmos, clip or psd"),
    (["psd.source=moco"], "psd.source must be self or ema"),
    (["data.source=webdataset"], "needs data.path"),
    (["steps=3"], "must look like section.key=value"),
])
def test_bad_config_is_an_error(overrides, words):
    with pytest.raises(ValueError) as info:
        config.load(CONFIGS / "tiny-cpu.yaml", overrides)
    assert words in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
