"""The trainer launched as torchrun would (RANK, WORLD_SIZE, MASTER_* in the environment): 2 gloo processes on CPU
equal one process on the same global batch, under DDP and under FSDP2 (also with compiled, checkpointed tower
blocks), with the fused and the reference kernels (COSMOS, and PSD with its EMA-teacher targets)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import train  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1] / "train" / "train.py"
TINY = ["run.steps=2", "data.batch_size=4", "data.train_size=8", "data.eval_size=10", "data.image_size=32",
        "data.local_size=16", "run.log_every=1", "optim.warmup_steps=1", "optim.lr=1e-3", "teacher.momentum=0.9"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, world=2):
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output


def _run(out_dir):
    records = [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return records, torch.load(out_dir / "checkpoint.pt", weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert train.main(TINY + [f"run.out_dir={out}"]) == 0
    return _run(out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp reference", "fsdp compile checkpointing"])
def test_two_ranks_match_one_process(one_process, tmp_path, mode):
    extra = {"ddp": [], "fsdp": ["run.fsdp=true"], "ddp reference": ["run.kernels=reference"],
             "fsdp compile checkpointing": ["run.fsdp=true", "run.compile=true", "run.grad_checkpointing=true"]}[mode]
    _launch(TINY + extra + [f"run.out_dir={tmp_path}"])
    (expected_log, expected), (log, state) = one_process, _run(tmp_path)
    assert len(log) == len(expected_log) == 2
    for want, got in zip(expected_log, log):
        for key in ("loss", "clip", "cosmos"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (want["step"], key)
    assert (state["step"], state["epoch"], state["position"]) == (expected["step"], expected["epoch"],
                                                                   expected["position"])
    # Adam turns rounding-level gradients (the attention's key bias, to which softmax is blind, has a true
    # gradient of zero) into steps of up to lr: the weights agree to a fraction of lr, the losses to rounding
    for part in ("model", "teacher"):
        for name, value in expected[part].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(state[part][name], value, rtol=1e-4, atol=1e-3, msg=f"{part}.{name}")
    assert (tmp_path / "eval.json").exists()  # written once, by rank 0


@pytest.mark.parametrize("kernels", ["fused", "reference"])
def test_psd_two_ranks_match_one_process(tmp_path, kernels):
    """PSD's soft subset is drawn over the global batch and its EMA-teacher targets are gathered: 2 ranks train
    as one process does."""
    psd = TINY + ["run.objective=psd", "psd.source=ema", "psd.ramp_steps=1"]
    assert train.main(psd + [f"run.out_dir={tmp_path / 'one'}"]) == 0
    _launch(psd + [f"run.kernels={kernels}", f"run.out_dir={tmp_path / 'two'}"])
    (expected_log, expected), (log, state) = _run(tmp_path / "one"), _run(tmp_path / "two")
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in expected_log], rel=1e-5)
    assert log[-1]["alpha"] == expected_log[-1]["alpha"] > 0
    for name, value in expected["model"].items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.parametrize("objective", ["siglip", "cosmos sigmoid"])
def test_sigmoid_objectives_two_ranks_match_one_process(tmp_path, objective):
    """The sigmoid losses' rows stay local and their columns are gathered with gradient (the logit biases, 0-d,
    replicated): 2 ranks under DDP train as one process does."""
    name, _, variant = objective.partition(" ")
    args = TINY + [f"run.objective={name}"] + (["cosmos.loss=sigmoid"] if variant else [])
    assert train.main(args + [f"run.out_dir={tmp_path / 'one'}"]) == 0
    _launch(args + [f"run.out_dir={tmp_path / 'two'}"])
    (expected_log, expected), (log, state) = _run(tmp_path / "one"), _run(tmp_path / "two")
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in expected_log], rel=1e-5)
    for name, value in expected["model"].items():
        if name.endswith(("in_proj_bias", "qkv.bias")):  # the key biases: zero true gradient, rounding-driven steps
            value, other = (torch.cat([x.chunk(3)[0], x.chunk(3)[2]]) for x in (value, state["model"][name]))
        else:
            other = state["model"][name]
        torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-3, msg=name)
    assert state["model"]["logit_bias"].item() != -10.0  # the bias trains
