"""The reference trainer on tiny settings: exact resume, NaN stop, missing checkpoint."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train  # noqa: E402

TINY = ["run.steps=4", "data.batch_size=4", "data.train_size=10", "data.eval_size=10", "run.checkpoint_every=2",
        "run.log_every=1", "optim.warmup_steps=1"]


def _state(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pt", weights_only=False)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    assert train.main(TINY + [f"run.out_dir={tmp_path / 'a'}"]) == 0
    assert train.main(TINY + [f"run.out_dir={tmp_path / 'b'}", "run.stop_at=3"]) == 0
    assert _state(tmp_path / "b")["step"] == 3
    assert train.main(["--resume"] + TINY + [f"run.out_dir={tmp_path / 'b'}"]) == 0
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 4 and (a["epoch"], a["position"]) == (b["epoch"], b["position"])
    for part in ("model", "teacher"):
        for name, value in a[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[part][name]), f"{part}.{name}"
    assert (tmp_path / "a" / "eval.json").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    assert train.main(TINY + [f"run.out_dir={out}", "run.stop_at=2"]) == 0
    good = _state(out)["model"]
    assert train.main(["--resume"] + TINY + [f"run.out_dir={out}", "optim.lr=1e30"]) == 1
    assert "stopping" in capsys.readouterr().err
    kept = _state(out)
    assert kept["step"] == 2 and all(torch.equal(v, good[k]) for k, v in kept["model"].items())


@pytest.mark.parametrize("objective", ["clip", "psd self", "psd ema"])
def test_other_objectives_train(tmp_path, objective):
    name, _, source = objective.partition(" ")
    extra = [f"run.objective={name}"] + ([f"psd.source={source}"] if source else [])
    assert train.main(TINY + extra + ["run.steps=2", f"run.out_dir={tmp_path}"]) == 0
    assert (tmp_path / "eval.json").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.main(["--resume"] + TINY + [f"run.out_dir={tmp_path}"])
