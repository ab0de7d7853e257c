"""The reference trainer on tiny settings: exact resume, NaN stop, missing checkpoint, fused vs reference kernels,
webdataset shards, training options, clear errors before training."""
import json
import os
import signal
import sys
import tarfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import config  # noqa: E402
import plot  # noqa: E402
import train  # noqa: E402

from cosmos_fast import _dispatch  # noqa: E402
from cosmos_fast.data import ShapesDataset  # noqa: E402
from cosmos_fast.data.shards import write_shards  # noqa: E402

TINY = ["run.steps=4", "data.batch_size=4", "data.train_size=10", "data.eval_size=10", "run.checkpoint_every=2",
        "run.log_every=1", "optim.warmup_steps=1"]


def args(base, *overrides):
    """``base`` with some of its keys given other values (the trainer refuses a key given twice)."""
    keys = {o.partition("=")[0] for o in overrides}
    return [o for o in base if o.partition("=")[0] not in keys] + list(overrides)


def _state(out_dir):
    return torch.load(Path(out_dir) / "checkpoint.pt", weights_only=False)


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    assert train.main(TINY + [f"run.out_dir={tmp_path / 'a'}"]) == 0
    assert train.main(TINY + [f"run.out_dir={tmp_path / 'b'}", "run.stop_at=3"]) == 0
    assert _state(tmp_path / "b")["step"] == 3
    assert train.main(["--resume"] + TINY + [f"run.out_dir={tmp_path / 'b'}"]) == 0
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert a["step"] == b["step"] == 4 and (a["epoch"], a["position"]) == (b["epoch"], b["position"])
    assert a["scaler"] == b["scaler"]
    for part in ("model", "teacher"):
        for name, value in a[part].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b[part][name]), f"{part}.{name}"
    assert (tmp_path / "a" / "eval.json").exists()
    # the resumed run's curves hold each step once, from the log the run continued
    steps = [r["step"] for r in plot.read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3]
    assert (tmp_path / "b" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
    assert train.main(args(TINY, *extra, "run.steps=2", f"run.out_dir={tmp_path}")) == 0
    assert (tmp_path / "eval.json").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="no checkpoint"):
        train.main(["--resume"] + TINY + [f"run.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="--resume takes no path"):
        train.main(["--resume", str(tmp_path / "checkpoint.pt")] + TINY)


def test_a_finished_run_is_not_overwritten_without_asking(tmp_path, capsys):
    """A rerun without --resume used to truncate the log and replace the checkpoint at once."""
    out = [f"run.out_dir={tmp_path}"]
    assert train.main(TINY + out + ["run.stop_at=2"]) == 0
    with pytest.raises(config.ConfigError, match="holds a run .checkpoint.pt.: --resume continues it, --overwrite"):
        train.main(TINY + out)
    assert _state(tmp_path)["step"] == 2
    with pytest.raises(SystemExit):
        train.main(["--resume", "--overwrite"] + TINY + out)
    # settings the checkpoint cannot continue under are refused by name; others are named and used
    with pytest.raises(ValueError, match=r"data.batch_size=4 \(now 8\)"):
        train.main(["--resume"] + args(TINY, *out, "data.batch_size=8"))
    capsys.readouterr()
    # --resume may come between overrides (argparse's intermixed parsing)
    assert train.main(TINY[:1] + ["--resume"] + TINY[1:] + out + ["run.stop_at=3", "optim.lr=1e-4"]) == 0
    err = capsys.readouterr().err
    assert "--resume with changed settings: optim.lr: 0.001 -> 0.0001, run.stop_at: 2 -> 3" in err
    assert "step 3/4 loss" in err and "eta 0:0" in err  # not a terminal: a line per logged step, not a bar
    assert _state(tmp_path)["step"] == 3
    assert isinstance(_state(tmp_path)["config"], dict)  # plain values: loads without train/config.py
    assert train.main(["--overwrite"] + args(TINY, *out, "run.steps=1")) == 0
    assert _state(tmp_path)["step"] == 1


def test_a_stop_signal_ends_the_step_then_checkpoints(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's preemption) mid-run: the step finishes, a checkpoint is written, the exit code is
    128 + 15; --resume then completes the run as an uninterrupted one would (TINY: 4 steps)."""
    update = train.update_teacher

    def update_then_signal(teacher, student, step, cfg):
        update(teacher, student, step, cfg)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train, "update_teacher", update_then_signal)
    assert train.main(TINY + [f"run.out_dir={tmp_path / 'b'}"]) == 128 + signal.SIGTERM
    # the ranks agree on stopping through the loss's all-reduce: a signal after step 1's loss stops after step 2
    assert _state(tmp_path / "b")["step"] == 3
    assert "SIGTERM: stopping after this step" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone again
    monkeypatch.setattr(train, "update_teacher", update)
    assert train.main(["--resume"] + TINY + [f"run.out_dir={tmp_path / 'b'}"]) == 0
    assert train.main(TINY + [f"run.out_dir={tmp_path / 'a'}"]) == 0
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())


# smaller still for the tests below: 32 px images, 16 px local crops
SMALL = ["run.steps=2", "data.batch_size=4", "data.train_size=8", "data.eval_size=10", "data.image_size=32",
         "data.local_size=16", "run.log_every=1", "optim.warmup_steps=1", "optim.lr=1e-3", "teacher.momentum=0.9"]


def _log(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]  # the training records, not the evaluation's


@pytest.mark.parametrize("objective,backend", [("cosmos", "default"), ("clip", "default"), ("psd ema", "default"),
                                               ("siglip", "default"), ("cosmos sigmoid", "default"),
                                               ("cosmos", "triton"), ("siglip", "triton")])
def test_reference_kernels_match_fused(tmp_path, objective, backend, monkeypatch):
    """Upstream's way (per-pair full logits and F.cross_entropy, per-tensor EMA loop, nn.MultiheadAttention)
    and cosmos_fast's give the same losses step by step, and the same weights, from the same seed (fp32). With
    the triton backend the fused run takes the GPU's paths (the Triton kernels, interpreted on CPU, and the
    pooler's context-space form)."""
    if backend == "triton":
        if not (_dispatch.triton_available() and _dispatch.triton_interpreted()):
            pytest.skip("the fast backend on CPU tensors needs triton and TRITON_INTERPRET=1")
        monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    name, _, variant = objective.partition(" ")
    extra = [f"run.objective={name}"] + {"ema": ["psd.source=ema", "psd.ramp_steps=1"],
                                         "sigmoid": ["cosmos.loss=sigmoid"], "": []}[variant]
    runs = {}
    for kernels in ("fused", "reference"):
        out = tmp_path / kernels
        assert train.main(SMALL + extra + [f"run.kernels={kernels}", f"run.out_dir={out}"]) == 0
        runs[kernels] = (_log(out), _state(out))
    (fused_log, fused), (ref_log, ref) = runs["fused"], runs["reference"]
    assert len(fused_log) == len(ref_log) == 2
    for a, b in zip(fused_log, ref_log):
        for key in {"cosmos": ("loss", "clip", "cosmos"), "clip": ("loss",), "siglip": ("loss",),
                    "psd": ("loss", "alpha")}[name]:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # Adam turns rounding-level gradients into steps of up to lr. The attentions' key biases, to which softmax is
    # blind, have a true gradient of exactly zero: theirs are pure rounding, so they are left out; the other
    # weights agree to a fraction of lr, the losses to rounding
    for part in ("model", "teacher"):
        for name, value in fused[part].items():
            if isinstance(value, torch.Tensor):
                other = ref[part][name]
                if name.endswith(("in_proj_bias", "qkv.bias")):
                    q, _, v = value.chunk(3)
                    value, other = torch.cat([q, v]), torch.cat([other.chunk(3)[0], other.chunk(3)[2]])
                torch.testing.assert_close(other, value, rtol=1e-4, atol=1e-3, msg=f"{part}.{name}")


@pytest.mark.parametrize("option", ["run.grad_checkpointing=true", "run.compile=true"])
def test_checkpointing_and_compile_keep_the_losses(tmp_path, option):
    """Recomputed activations and the compiled tower blocks (inductor, student and teacher) train as the eager
    run does: the same losses step by step, the same weights (compiled: within rounding, as fused kernels
    reorder sums)."""
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    runs = {}
    for name, options in (("eager", []), ("option", [option])):
        assert train.main(SMALL + options + [f"run.out_dir={tmp_path / name}"]) == 0
        runs[name] = (_log(tmp_path / name), _state(tmp_path / name))
    (eager_log, eager), (log, state) = runs["eager"], runs["option"]
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert compiled >= 4 if option == "run.compile=true" else compiled == 0
    exact = option == "run.grad_checkpointing=true"
    for a, b in zip(eager_log, log, strict=True):
        for key in ("loss", "clip", "cosmos"):
            assert b[key] == (a[key] if exact else pytest.approx(a[key], rel=1e-5)), (a["step"], key)
    for part in ("model", "teacher"):
        assert eager[part].keys() == state[part].keys()
        for name, value in eager[part].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(state[part][name], value, rtol=0 if exact else 1e-4,
                                           atol=0 if exact else 1e-3, msg=f"{part}.{name}")
    torch._dynamo.reset()


def _shards(tmp_path, n=8):
    data = ShapesDataset("train", size=n, image_size=32, seed=0)
    return write_shards((data[i] for i in range(n)), tmp_path / "shards", max_count=n)


def test_webdataset_trains(tmp_path):
    (shard,) = _shards(tmp_path)
    out = tmp_path / "run"
    assert train.main(SMALL + ["data.source=webdataset", f"data.path={shard}", "data.shuffle=4",
                               f"run.out_dir={out}"]) == 0
    assert [r["step"] for r in _log(out)] == [0, 1] and _state(out)["step"] == 2


def test_missing_or_empty_data_is_an_error(tmp_path):
    with pytest.raises(config.ConfigError, match="shards do not exist"):
        train.main(SMALL + ["data.source=webdataset", f"data.path={tmp_path}/cc3m-{{000..003}}.tar",
                            f"run.out_dir={tmp_path / 'a'}"])
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(ValueError, match="holds no image"):
        train.main(SMALL + ["data.source=webdataset", f"data.path={empty}", f"run.out_dir={tmp_path / 'b'}"])
    with pytest.raises(ValueError, match="fewer than one batch"):
        train.main(args(SMALL, "data.train_size=2", f"run.out_dir={tmp_path / 'c'}"))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("options", [
    ["run.precision=bf16", "optim.accumulate=2", "optim.clip_grad=1.0", "teacher.update_before_step=true",
     "teacher.schedule=cosine"],
    ["run.precision=fp16", "optim.clip_grad=1.0"],  # with a GradScaler
])
def test_training_options(tmp_path, options):
    assert train.main(SMALL + options + [f"run.out_dir={tmp_path}"]) == 0
    state = _state(tmp_path)
    assert state["step"] == 2 and state["teacher"]["_extra_state"]["num_updates"] == 2
    accumulate = 2 if "optim.accumulate=2" in options else 1
    assert 2 * state["epoch"] + state["position"] == 2 * accumulate  # every micro-batch drawn (2 per epoch)
    assert ("scale" in state["scaler"]) == ("run.precision=fp16" in options)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(config.ConfigError, match="pip install tensorboard"):
        train.main(SMALL + ["run.tensorboard=true", f"run.out_dir={tmp_path}"])


def test_tensorboard(tmp_path):
    """The training scalars and the held-out evaluation's, at their steps."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train.main(SMALL + ["run.tensorboard=true", "eval.every=1", f"run.out_dir={tmp_path}"]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "eval/student/shapes/top1", "eval/teacher/shapes/t2i_R@1"} <= tags
    assert [e.step for e in events.Scalars("eval/student/shapes/top1")] == [0, 1]


def test_fsdp_needs_torchrun(tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        train.main(SMALL + ["run.fsdp=true", f"run.out_dir={tmp_path}"])


def test_seeded_collate_touches_no_generator_but_its_own(monkeypatch):
    """Each sample's crops come from its own seed on the CPU generator, which is restored afterwards; the device
    generators (CUDA's: torch.manual_seed reseeds it, and fork_rng(devices=[]) would not restore it) stay as
    they were, and the same sample gets the same crops in any batch."""
    from cosmos_fast.data import CosmosTransform
    from cosmos_fast.models import Tokenizer

    device_seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", device_seeds.append)
    samples = [ShapesDataset("train", size=3, image_size=32)[i] for i in range(3)]
    collate = train.Collate(CosmosTransform(Tokenizer(16), 32, 16, n_local=2, seed=0), seeded=True)
    cpu_state = torch.get_rng_state()
    batch = collate(samples)
    assert device_seeds == [] and torch.equal(torch.get_rng_state(), cpu_state)
    alone = collate(samples[2:])
    assert torch.equal(alone["global"][:, 0], batch["global"][:, 2])
    assert torch.equal(alone["local"][:, 0], batch["local"][:, 2])
    assert not torch.equal(batch["global"][:, 0], batch["global"][:, 1])


def test_curves_take_the_last_record_of_each_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 9.0}, {"step": 1, "loss": 2.4},
               {"step": 2, "loss": 2.0}]
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert [r["loss"] for r in plot.read_metrics(metrics)] == [3.0, 2.4, 2.0]
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_leave_out_and_name_a_broken_record(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"loss": 2.0}\n{"step": 1, "loss": 0.5}\n')
    with pytest.warns(UserWarning, match="1 line.s. left out: .*metrics.jsonl:2: a record without 'step'"):
        assert [r["step"] for r in plot.read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
    (tmp_path / "metrics.jsonl").write_text('{"step": 0,\n')
    with pytest.warns(UserWarning, match="metrics.jsonl:1: not a JSON record"):
        assert plot.read_metrics(tmp_path / "metrics.jsonl") == []
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "missing")])


def test_the_loop_has_no_per_objective_branch_and_each_objective_is_one_module():
    """train.py's loop knows objectives only through their interface: no comparison with run.objective, no
    objective's name in it; train/objectives/ holds one module per objective, each an Objective."""
    import ast

    import objectives

    source = (Path(train.__file__)).read_text()
    tree = ast.parse(source)
    names = set(objectives.available())
    assert names == {"cosmos", "clip", "psd", "siglip", "simla"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "objective":
            assert not (isinstance(node.value, ast.Attribute) and node.value.attr == "run"), ast.unparse(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in names, f"train.py names the objective {node.value!r}"
    for name in names:
        cls = objectives.objective_class(name)
        assert issubclass(cls, objectives.Objective) and cls.__module__ == f"objectives.{name}"
