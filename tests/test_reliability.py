"""Fault injection on the trainer and the library (issue 19): a diverging run never replaces a good checkpoint,
one bad sample never ends a run, every refusal before training is one line (rc 2) and leaves nothing behind,
a torn log or a full disk never turns a run's outcome into a traceback, and the distributed ops refuse mismatched
ranks with a Python error."""
import errno
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import checkpoints  # noqa: E402
import plot  # noqa: E402
import train  # noqa: E402

import cosmos_fast  # noqa: E402
from cosmos_fast.data import ShapesDataset  # noqa: E402
from cosmos_fast.data.shards import write_shards  # noqa: E402

TINY = ["data.batch_size=4", "data.train_size=8", "data.eval_size=10", "data.image_size=32", "data.local_size=16",
        "run.log_every=1", "optim.warmup_steps=1", "run.checkpoint_every=1"]


def tiny(*overrides):
    """TINY with some of its keys given other values (a key may be given once)."""
    keys = {o.partition("=")[0] for o in overrides}
    return [o for o in TINY if o.partition("=")[0] not in keys] + list(overrides)


def _step(path):
    return torch.load(path, weights_only=False)["step"]


def _same_weights(path_a, path_b):
    a, b = (torch.load(p, weights_only=False)["model"] for p in (path_a, path_b))
    return all(torch.equal(v, b[k]) for k, v in a.items())


# 1. divergence ---------------------------------------------------------------------------------------------------

def test_a_diverging_run_never_replaces_the_good_checkpoint(tmp_path, capsys):
    """Resumed at a blown-up learning rate, step 4's weights diverge while its loss is still finite: the run stops
    at that step and the step-3 checkpoint stays, so a sane resume continues from it. (Before, the diverged
    step-4 state was saved over it and every later resume failed.)"""
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=3", f"run.out_dir={out}"]) == 0
    good = tmp_path / "good.pt"
    good.write_bytes((out / "checkpoint.pt").read_bytes())
    for lr in ("1e30", "1e8"):  # parameters overflow / parameters finite but 1e9x larger
        assert train.cli(["--resume"] + TINY + ["run.steps=8", f"optim.lr={lr}", f"run.out_dir={out}"]) == 1
        err = capsys.readouterr().err
        assert "step 4: the parameters" in err and "the checkpoint of step 3 is kept" in err
        assert _step(out / "checkpoint.pt") == 3 and _same_weights(out / "checkpoint.pt", good)
    assert "went from" in err and "in one step (the run diverged" in err
    assert train.cli(["--resume"] + TINY + ["run.steps=5", f"run.out_dir={out}"]) == 0
    assert _step(out / "checkpoint.pt") == 5


def test_a_fresh_run_that_diverges_writes_no_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=3", "optim.lr=1e8", f"run.out_dir={out}"]) == 1
    assert "step 1: the parameters' norm went from" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists() and not (out / "checkpoint.tmp").exists()


def test_rollback_puts_the_previous_checkpoint_back(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=3", f"run.out_dir={out}"]) == 0
    assert (_step(out / "checkpoint.pt"), _step(out / "checkpoint-prev.pt")) == (3, 2)
    assert train.cli(["--rollback"] + TINY + [f"run.out_dir={out}"]) == 0
    assert "checkpoint.pt is now the step-2 checkpoint; the step-3 checkpoint is kept" in capsys.readouterr().out
    assert _step(out / "checkpoint.pt") == 2 and _step(out / "checkpoint-rolled-back.pt") == 3
    assert train.cli(["--rollback"] + TINY + [f"run.out_dir={out}"]) == 1  # nothing further back
    assert "no checkpoint-prev.pt" in capsys.readouterr().err
    assert train.cli(["--resume"] + TINY + ["run.steps=3", f"run.out_dir={out}"]) == 0
    assert _step(out / "checkpoint.pt") == 3


def test_overwriting_a_run_keeps_none_of_its_checkpoints_as_previous(tmp_path):
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=2", f"run.out_dir={out}"]) == 0
    assert train.cli(["--overwrite"] + TINY + ["run.steps=1", "run.seed=3", f"run.out_dir={out}"]) == 0
    assert _step(out / "checkpoint.pt") == 1 and not (out / "checkpoint-prev.pt").exists()


def test_the_guard_rules():
    """The parameter norm may not double or halve in one step; a loss 3x the recent median holds back a
    checkpoint only once there is a history."""
    guard = checkpoints.DivergenceGuard()
    guard.start(100.0)
    assert guard.diverged(101.0) is None and guard.diverged(150.0) is None
    assert "went from 150 to 300.5" in guard.diverged(300.5)
    assert "no longer finite" in guard.diverged(float("nan"))
    guard = checkpoints.DivergenceGuard(min_history=3)
    assert [guard.loss_spike_reason(v) for v in (4.0, 3.0, 2.0)] == [None, None, None]
    assert guard.loss_spike_reason(8.9) is None  # 3x the median 3 is 9
    assert "its loss 11 is over 3x the median 3.5" in guard.loss_spike_reason(11.0)


def test_a_loss_spike_holds_back_the_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    spikes = {}

    class Guard(checkpoints.DivergenceGuard):
        def loss_spike_reason(self, loss):
            spikes[len(spikes)] = loss
            return "its loss is a spike" if len(spikes) == 2 else None

    monkeypatch.setattr(checkpoints, "DivergenceGuard", Guard)
    assert train.cli(tiny("run.steps=3", "run.checkpoint_every=2", f"run.out_dir={out}")) == 0
    assert "step 2: not checkpointed: its loss is a spike (no checkpoint was written)" in capsys.readouterr().err
    assert _step(out / "checkpoint.pt") == 3 and not (out / "checkpoint-prev.pt").exists()


# 2. bad samples --------------------------------------------------------------------------------------------------

def _shard_with_bad_samples(path):
    """Good samples, a json without caption fields, a sample with neither json nor txt, and at the end a sample
    cut between its image and its json (a half-downloaded shard: the tar ends mid-member)."""
    data = ShapesDataset("train", size=6, image_size=32)
    good = write_shards((data[i] for i in range(6)), path.parent / "good", max_count=6)[0]
    buffer = io.BytesIO()
    with tarfile.open(good) as source, tarfile.open(fileobj=buffer, mode="w") as tar:
        for member in source:
            tar.addfile(member, source.extractfile(member))
        jpeg = source.extractfile(next(m for m in source if m.name.endswith(".jpg"))).read()
        for name, content in (("nofields.jpg", jpeg), ("nofields.json", b'{"url": "x"}'), ("bare.jpg", jpeg),
                              ("cut.jpg", jpeg), ("cut.json", b'{"raw_caption": ["a dog on a beach"]}')):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    raw = buffer.getvalue()
    path.write_bytes(raw[:raw.rindex(b'{"raw_caption": ["a dog') + 10])  # cut inside the last json
    return path


def test_one_bad_sample_never_ends_a_run(tmp_path, recwarn):
    shard = _shard_with_bad_samples(tmp_path / "cc3m-000000.tar")
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=3", "data.source=webdataset", f"data.path={shard}", "data.shuffle=0",
                             f"run.out_dir={out}"]) == 0
    skipped = " ".join(str(w.message) for w in recwarn if str(w.message).startswith("skipped"))
    assert "'nofields'" in skipped and "'bare'" in skipped and "'cut'" in skipped


def test_shards_with_nothing_usable_end_the_run_in_one_line(tmp_path, capsys, monkeypatch):
    from cosmos_fast.data import shards as shards_module

    monkeypatch.setattr(shards_module.SkipCounter.__init__, "__defaults__", (5,))  # 5 in a row, not 1000
    path = tmp_path / "bad-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            for ext, content in (("jpg", ShapesDataset("train", 1, 32)[0]["image"].tobytes()[:0] + b"x"),
                                 ("json", b'{"raw_caption": ["a"]}')):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    monkeypatch.setattr(train, "check_shard", lambda shard: None)  # the first shard's images are unreadable
    out = tmp_path / "run"
    with pytest.warns(UserWarning):
        assert train.cli(TINY + ["data.source=webdataset", f"data.path={path}", f"run.out_dir={out}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("train.py: error: 5 samples in a row could not be read")


# 3. shard patterns -----------------------------------------------------------------------------------------------

def test_repeated_keys_are_refused_and_data_path_takes_a_directory_or_a_glob(tmp_path, capsys):
    data = ShapesDataset("train", size=8, image_size=32)
    shards = write_shards((data[i] for i in range(8)), tmp_path / "shards", max_count=2)
    assert len(shards) == 4
    expanded = [f"data.path={s}" for s in shards]  # what the shell makes of an unquoted brace pattern
    out = tmp_path / "run"
    assert train.cli(TINY + ["data.source=webdataset"] + expanded + [f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "data.path is given 4 times" in err and "quote it" in err and not out.exists()
    for path in (tmp_path / "shards", tmp_path / "shards" / "*.tar", tmp_path / "shards" / "shard-{000000..000003}.tar"):
        assert train.check_shards(str(path)) == [str(s) for s in shards]
    assert train.cli(TINY + ["run.steps=1", "data.source=webdataset", f"data.path={tmp_path / 'shards'}",
                             f"run.out_dir={out}"]) == 0


# 4. torn log, 5. full disk ------------------------------------------------------------------------------------------

def test_a_torn_log_line_does_not_fail_a_resumed_run(tmp_path):
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=4", "run.stop_at=2", f"run.out_dir={out}"]) == 0
    with (out / "metrics.jsonl").open("a") as log:
        log.write('{"step": 2, "loss": 3.')  # killed mid-write
    assert train.cli(["--resume"] + TINY + ["run.steps=4", f"run.out_dir={out}"]) == 0
    assert (out / "eval.json").exists() and (out / "curves.png").stat().st_size > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # each line whole
    assert [r["step"] for r in records if "loss" in r] == [0, 1, 2, 3]


def test_a_failing_plot_neither_fails_nor_masks(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plot, "plot_curves", broken)
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=2", f"run.out_dir={out}"]) == 0
    assert "warning: curves.png not written: OSError" in capsys.readouterr().err
    assert (out / "eval.json").exists()


def test_a_full_disk_keeps_the_good_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert train.cli(TINY + ["run.steps=2", f"run.out_dir={out}"]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def disk_fills(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_fills)
    import matplotlib.figure

    def savefig_fills(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_fills)
    assert train.cli(["--resume"] + TINY + ["run.steps=4", f"run.out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"train.py: error: could not write {out / 'checkpoint.pt'}: No space left "
                                            "on device (the checkpoint of step 2 is kept)")
    assert "Traceback" not in err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not (out / "checkpoint.pt.tmp").exists() and not (out / "curves.png.tmp").exists()
    assert (out / "curves.png").stat().st_size > 0  # the last good plot, not a 0-byte file


# 6. refusals: one line, rc 2, nothing left behind ------------------------------------------------------------------

def _refused(capsys, argv, words, out):
    assert train.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: ") and words in err[0], err
    assert not out.exists()


def test_refusals_before_training_are_one_line_and_leave_no_directory(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = TINY + [f"run.out_dir={out}"]
    webdataset = ["data.source=webdataset"]
    _refused(capsys, base + webdataset + [f"data.path={tmp_path}/cc3m-{{000..003}}.tar"],
             "4 of 4 shards do not exist", out)
    (tmp_path / "empty.tar").write_bytes(b"")
    _refused(capsys, base + webdataset + [f"data.path={tmp_path / 'empty.tar'}"], "empty.tar is an empty file", out)
    tarfile.open(tmp_path / "noimages.tar", "w").close()
    _refused(capsys, base + webdataset + [f"data.path={tmp_path / 'noimages.tar'}"], "holds no image sample", out)
    (tmp_path / "notatar.tar").write_bytes(b"hello world" * 100)
    _refused(capsys, base + webdataset + [f"data.path={tmp_path / 'notatar.tar'}"], "notatar.tar is not a readable tar",
             out)
    (tmp_path / "afile").write_text("")
    _refused(capsys, TINY + [f"run.out_dir={tmp_path / 'afile'}"], "is a file, not a directory", tmp_path / "x")
    _refused(capsys, TINY + [f"run.out_dir={tmp_path / 'afile' / 'run'}"], "is not a writable directory",
             tmp_path / "afile" / "run")
    _refused(capsys, tiny("data.image_size=8", "data.local_size=8", f"run.out_dir={out}"),
             "data.image_size must be at least 16", out)
    _refused(capsys, base + ["optim.lr=inf"], "optim.lr must be a finite number, got inf", out)
    if not torch.cuda.is_available():
        _refused(capsys, base + ["run.device=cuda"], "run.device=cuda: no CUDA device is available", out)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    _refused(capsys, base + ["run.tensorboard=true"], "needs the tensorboard package", out)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    _refused(capsys, base, f"{tmp_path} is not a writable directory", out)


# 7. numbers ------------------------------------------------------------------------------------------------------

def test_a_nan_loss_names_the_step_as_the_progress_line_does(tmp_path, monkeypatch, capsys):
    import objectives.cosmos

    real_forward = objectives.cosmos.Objective.forward

    def nan_at_step_two(self, model, teacher, batch, step, micro_step):
        loss, parts = real_forward(self, model, teacher, batch, step, micro_step)
        return (loss * float("nan") if step == 1 else loss), parts

    monkeypatch.setattr(objectives.cosmos.Objective, "forward", nan_at_step_two)
    assert train.cli(TINY + ["run.steps=4", f"run.out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    # the progress line counts completed steps from 1; the NaN comes in the next one, step 2 (it said "step 1")
    assert "step 1/4 loss" in err and "step 2: loss is nan; stopping (the checkpoint of step 1 is kept)" in err


# 8. the library API ----------------------------------------------------------------------------------------------

def test_tensor_scales_are_checked_and_fp64_losses_are_fp64():
    a, b = (torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1).requires_grad_()
            for _ in range(2))
    for bad in (torch.tensor(0.0), torch.tensor(-2.0), torch.tensor(float("inf")), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="scale must be a finite number > 0, got a tensor holding"):
            cosmos_fast.contrastive_loss(a, b, bad.double())
        with pytest.raises(ValueError, match=r"teacher\[2\] \(teacher_scale\) must be a finite number > 0"):
            cosmos_fast.contrastive_loss(a, b, 10.0, teacher=(a, b, bad.double()), alpha=0.5)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    loss = cosmos_fast.contrastive_loss(a, b, scale)
    assert loss.dtype == torch.float64
    assert cosmos_fast.multiview_contrastive_loss(a[None], b[None], scale).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x, y, s: cosmos_fast.contrastive_loss(x, y, s), (a, b, scale))
    views = [torch.randn(shape, dtype=torch.float64) for shape in ((2, 6, 4), (8, 6, 4), (8, 6, 4), (8, 6, 4),
                                                                   (2, 6, 4), (2, 6, 4))]
    total, clip, cosmos = cosmos_fast.nn.CosmosLoss()(*views, scale, scale)
    assert total.dtype == clip.dtype == cosmos.dtype == torch.float64
    teacher, student = [torch.zeros(3)], [torch.ones(3)]
    cosmos_fast.ema_update_(teacher, student, np.float32(0.25))  # numpy scalars of any width
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.75))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_with_unequal_inputs_get_a_python_error_naming_the_argument(tmp_path):
    """Under gloo a gather of unequal tensors aborted the process (gloo::EnforceNotMet); now every rank raises a
    ValueError naming the argument, and the process goes on."""
    worker = Path(__file__).with_name("dist_mismatch_worker.py")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), "2", str(port), str(tmp_path / f"{rank}.json")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
    for rank in range(2):
        errors = json.loads((tmp_path / f"{rank}.json").read_text())
        assert "a must have the same shape and dtype on every rank" in errors["rows"]
        assert "rank 0: float32 (4, 8), rank 1: float32 (5, 8)" in errors["rows"]
        assert "a_views must have the same shape and dtype on every rank" in errors["features"]
        assert "a must have the same shape and dtype on every rank" in errors["dtype"]
        assert "features must have the same shape and dtype on every rank" in errors["queue"]
        assert errors["equal"] == "ok"
