"""Training configuration: dataclasses, loaded from YAML and overridden from the command line (``a.b=value``).
An unknown key or a value of the wrong type is an error before anything trains."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    name: str = "tiny"  # a cosmos_fast.models config: tiny | vit-b16 (run.objective=simla: a SIMLA config, tiny | base)
    mask_padding: bool = True  # False: attend to caption padding as upstream COSMOS does


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes (built in) | webdataset
    path: str | None = None  # webdataset shards: a brace pattern, e.g. /data/cc3m/{00000..00575}.tar
    shuffle: int = 1000  # webdataset: sample shuffle buffer
    train_size: int = 2000
    eval_size: int = 250
    image_size: int = 64
    local_size: int = 32
    context_length: int = 32
    batch_size: int = 64  # global (over all ranks) per micro-batch
    workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.5
    warmup_steps: int = 50
    clip_grad: float | None = None  # max gradient norm
    accumulate: int = 1  # micro-batches per optimizer step (contrastive negatives come from each micro-batch)


@dataclass
class TeacherConfig:
    momentum: float = 0.99
    schedule: str = "fixed"  # fixed | cosine
    final_momentum: float = 1.0
    update_before_step: bool = False  # True: EMA after backward but before optimizer.step(), as upstream COSMOS


@dataclass
class PSDConfig:
    """Progressive self-distillation (psd_simla.md; the values are ours: the paper's are not public)."""
    alpha_max: float = 0.5
    ramp_steps: int | None = None  # alpha reaches alpha_max after this many steps (default: the whole run)
    subset: float = 0.5  # fraction of each batch with soft targets, drawn fresh every step
    source: str = "self"  # self (own detached embeddings, teacher temperature 0.5x) | ema


@dataclass
class SIMLAConfig:
    """SIMLA (psd_simla.md): the paper's values, except the queue, scaled to the data (65536 in the paper)."""
    alpha: float = 0.4  # distillation weight of ITC, XMM and PSL targets
    alpha_ramp_steps: int | None = None  # alpha rises linearly from 0 over this many steps (default: one epoch,
    #                                      data.train_size // data.batch_size; give it for webdataset runs)
    queue_size: int = 65536  # momentum features per modality
    mlm_probability: float = 0.15  # caption tokens chosen for XMM(text) (80/10/10 mask/random/keep)
    image_mask_ratio: float = 75 / 256  # patches masked block-wise for XMM(image)
    keywords: int = 5  # PSL: caption tokens kept as keywords
    keywords_per_head: int = 4  # PSL: top positions of each head's [CLS] attention that vote
    codebook_images: int = 512  # training images the visual-token k-means codebook is fitted on
    codebook_iterations: int = 10


@dataclass
class RunConfig:
    objective: str = "cosmos"  # cosmos | clip | psd | simla (model.name then names a SIMLA config: tiny | base)
    steps: int = 600
    seed: int = 0
    out_dir: str = "runs/tiny-cpu"
    log_every: int = 10
    checkpoint_every: int = 100  # steps; a checkpoint is also written at the end
    stop_at: int | None = None  # stop (with a checkpoint) after this many steps; --resume continues
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 (with a GradScaler) | fp32
    kernels: str = "fused"  # fused (cosmos_fast) | reference (upstream: per-pair full logits, per-tensor EMA, MHA)
    fsdp: bool = False  # under torchrun: shard student and teacher with FSDP2 instead of DDP on the student
    compile: bool = False  # torch.compile each transformer block of both towers, student and teacher
    grad_checkpointing: bool = False  # the student's tower blocks recompute their activations in the backward
    tensorboard: bool = False  # also write TensorBoard scalars to out_dir (needs the tensorboard package)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    psd: PSDConfig = field(default_factory=PSDConfig)
    simla: SIMLAConfig = field(default_factory=SIMLAConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _set(section, key: str, value: Any, where: str) -> None:
    names = {f.name: f for f in dataclasses.fields(section)}
    if key not in names:
        raise ValueError(f"unknown config key {where!r} (known in this section: {sorted(names)})")
    current = getattr(section, key)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if current is not None and value is not None and not isinstance(value, type(current)):
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        else:
            raise ValueError(f"config key {where!r} takes {type(current).__name__}, got {value!r}")
    setattr(section, key, value)


def apply(cfg: TrainConfig, values: dict, prefix: str = "") -> TrainConfig:
    for name, body in values.items():
        if not hasattr(cfg, name) or not dataclasses.is_dataclass(getattr(cfg, name)):
            raise ValueError(f"unknown config section {prefix + name!r} (known: model, data, optim, teacher, psd, simla, run)")
        if not isinstance(body, dict):
            raise ValueError(f"config section {prefix + name!r} must be a mapping")
        for key, value in body.items():
            _set(getattr(cfg, name), key, value, f"{name}.{key}")
    return cfg


def _parse(raw: str):
    """A command-line value as YAML, with numbers YAML 1.1 leaves as strings (1e-4) read as numbers."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                pass
    return value


def load(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML)."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        apply(cfg, yaml.safe_load(path.read_text()) or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".")
        apply(cfg, {section: {name: _parse(raw)}})
    if cfg.run.objective not in ("cosmos", "clip", "psd", "simla"):
        raise ValueError(f"run.objective must be cosmos, clip, psd or simla, got {cfg.run.objective!r}")
    if cfg.run.objective == "simla" and (cfg.run.kernels != "fused" or cfg.run.fsdp or cfg.run.compile
                                         or cfg.run.grad_checkpointing):
        raise ValueError("run.objective=simla runs on the fused kernels, eager, without FSDP or gradient "
                         "checkpointing (run.kernels=fused, run.fsdp=false, run.compile=false, "
                         "run.grad_checkpointing=false)")
    if cfg.psd.source not in ("self", "ema"):
        raise ValueError(f"psd.source must be self or ema, got {cfg.psd.source!r}")
    if cfg.data.source not in ("shapes", "webdataset"):
        raise ValueError(f"data.source must be shapes or webdataset, got {cfg.data.source!r}")
    if cfg.data.source == "webdataset" and not cfg.data.path:
        raise ValueError("data.source=webdataset needs data.path (a shard pattern)")
    for key, value, allowed in (("run.precision", cfg.run.precision, ("auto", "bf16", "fp16", "fp32")),
                                ("run.kernels", cfg.run.kernels, ("fused", "reference")),
                                ("run.device", cfg.run.device, ("auto", "cpu", "cuda")),
                                ("teacher.schedule", cfg.teacher.schedule, ("fixed", "cosine"))):
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if cfg.optim.accumulate < 1:
        raise ValueError(f"optim.accumulate must be at least 1, got {cfg.optim.accumulate}")
    return cfg
