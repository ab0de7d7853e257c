"""Trainer configuration: YAML + overrides, and clear errors before anything trains."""
import subprocess
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
    (["run.objective=simclr"], "run.objective must be one of clip, cosmos, psd, siglip, simla"),
    (["psd.source=moco"], "psd.source must be self or ema"),
    (["data.source=webdataset"], "needs data.path"),
    (["steps=3"], "must look like section.key=value"),
    (["run.kernels=triton"], "run.kernels must be one of fused, reference"),
    (["run.precision=fp8"], "run.precision must be one of auto, bf16, fp16, fp32"),
    (["teacher.schedule=linear"], "teacher.schedule must be one of fixed, cosine"),
    (["optim.accumulate=0"], "optim.accumulate must be at least 1"),
    (["run.objective=simla", "run.kernels=reference"], "run.objective=simla runs on the fused kernels, eager"),
    (["run.objective=simla", "run.compile=true"], "run.objective=simla runs on the fused kernels, eager"),
    (["run.objective=simla", "run.grad_checkpointing=true"], "without FSDP or gradient checkpointing"),
    # keys whose default is None took any value; each of these failed (or hung, or was ignored) later in the run
    (["run.stop_at=abc"], "config key 'run.stop_at' takes int, got 'abc'"),
    (["optim.clip_grad=abc"], "config key 'optim.clip_grad' takes float, got 'abc'"),
    (["run.steps="], "config key 'run.steps' takes int, got None"),
    (["run.steps=true"], "config key 'run.steps' takes int, got True"),
    (["optim.betas=[0.9]"], "config key 'optim.betas' takes a list of 2 values"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas[1] must be in [0, 1]"),
    (["data.batch_size=-4"], "data.batch_size must be at least 1, got -4"),  # hung in an endless epoch loop
    (["run.steps=0"], "run.steps must be at least 1"),
    (["run.checkpoint_every=0"], "run.checkpoint_every must be at least 1"),
    (["run.log_every=0"], "run.log_every must be at least 1"),
    (["data.eval_size=0"], "data.eval_size must be at least 1"),
    (["teacher.momentum=2"], "teacher.momentum must be in [0, 1]"),
    (["optim.lr=0"], "optim.lr must be > 0"),
    (["data.image_size=30"], "data.image_size must be a multiple of the patch size of model 'tiny' (8), got 30"),
    (["data.local_size=0"], "data.local_size must be at least 1"),
    (["data.path=/data/shards"], "data.path ('/data/shards') is read only with data.source=webdataset or json"),
    (["data.image_root=/data/images"], "data.image_root ('/data/images') is read only with data.source=webdataset"),
    (["data.source=json"], "data.source=json needs data.path (caption files, comma-separated)"),
    (["data.source=csv"], "data.source must be shapes, webdataset or json, got 'csv'"),
    (["optim.min_lr=0.5"], "optim.min_lr must be in [0, optim.lr = 0.001], got 0.5"),
    (["optim.warmup_lr=-1e-5"], "optim.warmup_lr must be in [0, optim.lr = 0.001], got -1e-05"),
    (["run.objective=simla", "simla.visual_tokenizer=vqgan"], "simla.visual_tokenizer must be one of"),
])
def test_bad_config_is_an_error(overrides, words):
    with pytest.raises(ValueError) as info:
        config.load(CONFIGS / "tiny-cpu.yaml", overrides)
    assert words in str(info.value)


def test_new_keys_default_to_the_plain_run():
    cfg = config.load(CONFIGS / "tiny-cpu.yaml")
    assert (cfg.run.kernels, cfg.run.precision, cfg.run.fsdp, cfg.run.tensorboard) == ("fused", "auto", False, False)
    assert (cfg.run.compile, cfg.run.grad_checkpointing) == (False, False)
    assert cfg.optim.accumulate == 1 and cfg.teacher.update_before_step is False


def test_upstream_recipe_config():
    """vit-b16-cc3m.yaml holds cosmos.md's Recipe."""
    cfg = config.load(CONFIGS / "vit-b16-cc3m.yaml")
    assert cfg.model.name == "vit-b16" and cfg.data.source == "webdataset" and cfg.data.path
    assert (cfg.data.image_size, cfg.data.local_size, cfg.data.context_length) == (224, 96, 77)
    assert cfg.data.batch_size == 1024 and cfg.teacher.momentum == 0.999 and cfg.teacher.schedule == "fixed"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (
        5e-4, (0.9, 0.98), 1e-8, 0.5, 2000)
    assert cfg.run.objective == "cosmos" and cfg.run.steps * cfg.data.batch_size >= 32 * 2_800_000


def test_simla_config_is_the_default_job_with_simla_settings():
    """simla-tiny-cpu.yaml (the SIMLA main job of train/RESULTS_SIMLA.md) differs from tiny-cpu.yaml only where
    it says so."""
    simla, default = config.load(CONFIGS / "simla-tiny-cpu.yaml"), config.load(CONFIGS / "tiny-cpu.yaml")
    assert (simla.run.objective, simla.run.steps, simla.simla.queue_size) == ("simla", 400, 1024)
    assert (simla.data, simla.optim, simla.teacher, simla.model) == (default.data, default.optim, default.teacher,
                                                                     default.model)


def test_missing_config_file(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- run\n- data\n")
    with pytest.raises(config.ConfigError, match="must hold a mapping of sections"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("run: {steps: 3\n")
    with pytest.raises(config.ConfigError, match="is not valid YAML"):
        config.load(tmp_path / "broken.yaml")


def test_the_command_line_prints_a_refused_config_in_one_line():
    """No traceback for a configuration mistake: the message, prefixed like argparse's, and argparse's exit
    status, 2."""
    script = Path(__file__).resolve().parents[1] / "train" / "train.py"
    done = subprocess.run([sys.executable, str(script), "optim.lrr=1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "train.py: error: unknown config key 'optim.lrr' (known in this section: ['accumulate', 'betas', "
        "'clip_grad', 'eps', 'lr', 'min_lr', 'warmup_lr', 'warmup_steps', 'weight_decay'])"]
