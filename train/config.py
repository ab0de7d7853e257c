"""Training configuration: dataclasses, loaded from YAML and overridden from the command line (``a.b=value``).
An unknown key or a value of the wrong type is an error before anything trains."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import objectives
from cosmos_fast.data.text import CAPTION_MODES


@dataclass
class ModelConfig:
    name: str = "tiny"  # a cosmos_fast.models config: tiny | vit-b16 | vit-b32 (simla: a SIMLA config, tiny | base)
    mask_padding: bool = True  # False: attend to caption padding as upstream COSMOS does
    # start from these weights (fine-tuning): an upstream COSMOS checkpoint (student and teacher), an open_clip
    # CLIP state dict (the towers; the teacher starts as the student) or one of this trainer's checkpoints;
    # run.objective=simla: a released SIMLA checkpoint (student, momentum model and queues)
    init: str | None = None
    pos_embed_interpolation: str = "dino"  # other crop sizes' position embeddings: dino (upstream's) | timm


@dataclass
class DataConfig:
    source: str = "shapes"  # shapes (built in) | webdataset | json (caption files: SIMLA's JSON lists, JSONL, CSV)
    # webdataset shards: a brace pattern, e.g. /data/cc3m/{00000..00575}.tar; json: caption files, comma-separated
    path: str | None = None
    image_root: str | None = None  # json: the images' root (default: each caption file's directory)
    # webdataset captions: textcrop (upstream's pool of FLAIR's seven fields) | textcrop_pixelprose | sentences
    caption_mode: str = "textcrop"
    val_path: str | None = None  # held-out webdataset shards for the validation loss (eval section)
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
    warmup_lr: float = 0.0  # the warm-up's first learning rate (it rises linearly to lr)
    min_lr: float = 0.0  # the cosine's floor
    clip_grad: float | None = None  # max gradient norm
    accumulate: int = 1  # micro-batches per optimizer step (contrastive negatives come from each micro-batch)


@dataclass
class TeacherConfig:
    momentum: float = 0.99
    schedule: str = "fixed"  # fixed | cosine
    final_momentum: float = 1.0
    update_before_step: bool = False  # True: EMA after backward but before optimizer.step(), as upstream COSMOS


@dataclass
class CosmosObjectiveConfig:
    """The COSMOS objective (``cosmos.md``, Loss)."""
    loss: str = "softmax"  # softmax (InfoNCE, the paper's) | sigmoid (SigLIP's loss for both terms, learnt biases)


@dataclass
class SigmoidConfig:
    """The sigmoid losses' learnt temperature and bias at the start (siglip, cosmos.loss=sigmoid): SigLIP's
    initialisation, ln 10 and -10 (about -ln of SigLIP's batch: positives are 1 in 32k of its pairs)."""
    init_logit_scale: float = math.log(10.0)
    init_logit_bias: float = -10.0


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
    visual_tokenizer: str = "kmeans"  # kmeans (fitted on training images) | dvae (DALL-E's, SIMLA's: dvae_path)
    dvae_path: str | None = None  # DALL-E's encoder.pkl (unpickling it needs pip install DALL-E)
    codebook_images: int = 512  # training images the visual-token k-means codebook is fitted on
    codebook_iterations: int = 10
    randaugment: bool = True  # SIMLA's RandAugment(2, 7) after the crop and flip
    tokenizer: str | None = None  # WordPiece vocabulary: a directory or HF name in the cache (default: the model's)
    text_weights: str | None = None  # BERT to start from: bert-base-uncased (HF cache) or a save_pretrained dir
    vision_weights: str | None = None  # DeiT to start from: a .pth/.safetensors file or a timm name in the HF cache


@dataclass
class RunConfig:
    objective: str = "cosmos"  # a module of train/objectives: cosmos | clip | psd | siglip | simla (simla: model.name
    #                            names a SIMLA config, tiny | base)
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
class EvalConfig:
    """The held-out evaluation (train/evaluation.py): every run ends with one, and runs one every ``every``
    steps: the shapes' held-out split, the validation loss on data.val_path, the paper's benchmarks under root."""
    every: int | None = None  # steps between evaluations during training (None: at the end only)
    root: str | None = None  # the benchmarks' root, as python -m cosmos_fast.eval --suite paper --root takes it
    sets: str | None = None  # comma-separated names of the suite's sets to run (default: every one under root)
    val_batches: int = 20  # global batches of data.val_path the validation loss averages


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cosmos: CosmosObjectiveConfig = field(default_factory=CosmosObjectiveConfig)
    sigmoid: SigmoidConfig = field(default_factory=SigmoidConfig)
    psd: PSDConfig = field(default_factory=PSDConfig)
    simla: SIMLAConfig = field(default_factory=SIMLAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _typed(value: Any, hint, where: str) -> Any:
    """``value`` as the field's annotated type (an int where a float is wanted becomes a float), or ValueError."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            return tuple(_typed(v, item, f"{where}[{i}]") for i, (v, item) in enumerate(zip(value, items)))
        raise ValueError(f"config key {where!r} takes a list of {len(items)} values, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is not bool and isinstance(value, bool)):
        return value
    raise ValueError(f"config key {where!r} takes {hint.__name__}, got {value!r}")


def _set(section, key: str, value: Any, where: str) -> None:
    hints = typing.get_type_hints(type(section))
    if key not in hints:
        raise ValueError(f"unknown config key {where!r} (known in this section: {sorted(hints)})")
    setattr(section, key, _typed(value, hints[key], where))


def apply(cfg: TrainConfig, values: dict, prefix: str = "") -> TrainConfig:
    for name, body in values.items():
        if not hasattr(cfg, name) or not dataclasses.is_dataclass(getattr(cfg, name)):
            known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
            raise ValueError(f"unknown config section {prefix + name!r} (known: {known})")
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


class ConfigError(ValueError):
    """A configuration the trainer refuses before it starts: the command line prints its message alone."""


def load(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML).
    Every refusal is a ConfigError (a ValueError) naming the key and what it takes."""
    try:
        return _load(path, overrides)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _load(path: str | Path | None, overrides: list[str]) -> TrainConfig:
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections (model, data, ...), got a "
                              f"{type(values).__name__}")
        apply(cfg, values)
    given: dict[str, list[str]] = {}
    for item in overrides:
        given.setdefault(item.partition("=")[0], []).append(item)
    repeated = {key: items for key, items in given.items() if len(items) > 1 and "=" in items[0]}
    if repeated:
        key, items = next(iter(repeated.items()))
        hint = (f" (the shell expanded a brace pattern into {len(items)} overrides: quote it, "
                f"'{key}=/data/shards-{{000..009}}.tar', or give the shards' directory)" if key == "data.path" else "")
        raise ValueError(f"{key} is given {len(items)} times: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                         f"{hint}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key.count(".") != 1:
            hint = " (--resume takes no path: it reads <run.out_dir>/checkpoint.pt)" if item.endswith(".pt") else ""
            raise ValueError(f"override {item!r} must look like section.key=value{hint}")
        section, name = key.split(".")
        apply(cfg, {section: {name: _parse(raw)}})
    objectives.objective_class(cfg.run.objective)  # ValueError naming the objectives there are
    if cfg.psd.source not in ("self", "ema"):
        raise ValueError(f"psd.source must be self or ema, got {cfg.psd.source!r}")
    if cfg.data.source not in ("shapes", "webdataset", "json"):
        raise ValueError(f"data.source must be shapes, webdataset or json, got {cfg.data.source!r}")
    if cfg.data.source != "shapes" and not cfg.data.path:
        raise ValueError(f"data.source={cfg.data.source} needs data.path (" + (
            "a shard pattern)" if cfg.data.source == "webdataset" else "caption files, comma-separated)"))
    for key, value, allowed in (("run.precision", cfg.run.precision, ("auto", "bf16", "fp16", "fp32")),
                                ("run.kernels", cfg.run.kernels, ("fused", "reference")),
                                ("run.device", cfg.run.device, ("auto", "cpu", "cuda")),
                                ("data.caption_mode", cfg.data.caption_mode, CAPTION_MODES),
                                ("model.pos_embed_interpolation", cfg.model.pos_embed_interpolation, ("dino", "timm")),
                                ("teacher.schedule", cfg.teacher.schedule, ("fixed", "cosine")),
                                ("cosmos.loss", cfg.cosmos.loss, ("softmax", "sigmoid")),
                                ("simla.visual_tokenizer", cfg.simla.visual_tokenizer, ("kmeans", "dvae"))):
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    _check_ranges(cfg)
    return cfg


def _check_ranges(cfg: TrainConfig) -> None:
    """Values that would fail (or hang) later in the run, refused now."""
    at_least = [("data.batch_size", 1), ("data.train_size", 1), ("data.eval_size", 1), ("data.image_size", 1),
                ("data.local_size", 1), ("data.context_length", 2), ("data.workers", 0), ("data.shuffle", 0),
                ("optim.accumulate", 1), ("optim.warmup_steps", 0), ("run.steps", 1), ("run.log_every", 1),
                ("run.checkpoint_every", 1), ("run.stop_at", 1), ("psd.ramp_steps", 1),
                ("simla.alpha_ramp_steps", 1), ("simla.queue_size", 1), ("simla.keywords", 1),
                ("simla.keywords_per_head", 1), ("simla.codebook_images", 1), ("simla.codebook_iterations", 1),
                ("eval.every", 1), ("eval.val_batches", 1)]
    for key, low in at_least:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < low:
            raise ValueError(f"{key} must be at least {low}, got {value}")
    unit = [("teacher.momentum", cfg.teacher.momentum), ("teacher.final_momentum", cfg.teacher.final_momentum),
            ("psd.alpha_max", cfg.psd.alpha_max), ("psd.subset", cfg.psd.subset), ("simla.alpha", cfg.simla.alpha),
            ("simla.mlm_probability", cfg.simla.mlm_probability),
            ("simla.image_mask_ratio", cfg.simla.image_mask_ratio)] + [
            (f"optim.betas[{i}]", beta) for i, beta in enumerate(cfg.optim.betas)]
    for key, value in unit:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {value}")
    for section in dataclasses.fields(cfg):
        for name, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, float) and not math.isfinite(item):
                    raise ValueError(f"{section.name}.{name} must be a finite number, got {value}")
    for key, value in (("optim.lr", cfg.optim.lr), ("optim.eps", cfg.optim.eps),
                       ("optim.clip_grad", cfg.optim.clip_grad)):
        if value is not None and not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")
    for key in ("warmup_lr", "min_lr"):
        if not 0 <= getattr(cfg.optim, key) <= cfg.optim.lr:
            raise ValueError(f"optim.{key} must be in [0, optim.lr = {cfg.optim.lr}], got {getattr(cfg.optim, key)}")
    if cfg.optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}")
    if cfg.model.init is not None:
        if not Path(cfg.model.init).is_file():
            raise ValueError(f"model.init: no checkpoint at {cfg.model.init}")
    if cfg.eval.root is not None and not Path(cfg.eval.root).expanduser().is_dir():
        raise ValueError(f"eval.root {cfg.eval.root} is not a directory")
    if cfg.eval.sets is not None:
        from cosmos_fast.eval.datasets import SUITE

        known = [b.name for b in SUITE]
        unknown = [s for s in cfg.eval.sets.split(",") if s not in known]
        if cfg.eval.root is None or unknown:
            raise ValueError(f"eval.sets chooses among the sets under eval.root ({', '.join(known)}); got "
                             f"{cfg.eval.sets!r}" + ("" if cfg.eval.root else " without eval.root"))
    if cfg.data.source == "shapes" and cfg.data.image_size < 16:
        raise ValueError(f"data.image_size must be at least 16 for the built-in shapes, got {cfg.data.image_size}")
    for key in ("path", "image_root"):
        if cfg.data.source == "shapes" and getattr(cfg.data, key):
            raise ValueError(f"data.{key} ({getattr(cfg.data, key)!r}) is read only with data.source=webdataset "
                             "or json")
    objectives.objective_class(cfg.run.objective).check_config(cfg)
