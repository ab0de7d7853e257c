"""Reference COSMOS trainer: one readable loop (nanoGPT/DINO style) on cosmos_fast's kernels.

Usage: python train/train.py [--config train/configs/tiny-cpu.yaml] [section.key=value ...]
       torchrun --nproc-per-node N train/train.py ...   (DDP, or FSDP2 with run.fsdp=true)

Each step: the objective's loss on a batch (COSMOS by default: the student on 2 global + 6 local crops and 8
captions, the EMA teacher on the 2 global crops and captions; train/objectives/ holds cosmos, clip, psd, siglip
and simla), backward, AdamW, temperature clamp, EMA update of the teacher; a JSONL log and a progress bar;
checkpoints that never replace a good one with a diverged one; zero-shot retrieval and classification on the
held-out split at the end (shapes).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
import config as config_lib  # noqa: E402
import evaluation  # noqa: E402
import objectives  # noqa: E402
import plot as plot_lib  # noqa: E402

import cosmos_fast  # noqa: E402
from cosmos_fast.data import ShapesDataset, collate_views  # noqa: E402
from cosmos_fast.data.shards import (CaptionFileDataset, UnusableShardsError, check_shard, resolve_shards,  # noqa: E402
                                     shard_stream)
from cosmos_fast.distributed import world  # noqa: E402
from cosmos_fast.models import CosmosModel, upstream_weight_decay  # noqa: E402

# full (unsharded) state dicts on the CPU: a checkpoint loads into any world size, with or without FSDP
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def param_groups(model: torch.nn.Module, weight_decay: float, decays=upstream_weight_decay) -> list[dict]:
    """Two AdamW groups by ``decays(name, parameter)``: the objective's rule (default: upstream COSMOS's, no weight
    decay on gains, biases, temperatures and the class embedding, judged on upstream's names and shapes)."""
    named = list(model.named_parameters())
    decay = [p for name, p in named if decays(name, p)]
    no_decay = [p for name, p in named if not decays(name, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, optim, total: int) -> float:
    """Linear warm-up from ``optim.warmup_lr`` to ``optim.lr`` over ``optim.warmup_steps``, then a cosine to
    ``optim.min_lr`` at step ``total`` (per step; SIMLA's timm scheduler steps the cosine once per epoch)."""
    if step < optim.warmup_steps:
        return optim.warmup_lr + (optim.lr - optim.warmup_lr) * (step + 1) / optim.warmup_steps
    progress = (step - optim.warmup_steps) / max(1, total - optim.warmup_steps)
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class Collate:
    """Transform each raw sample, then batch view-major (a class, not a lambda: workers pickle it).

    ``seeded``: each sample's image crops are drawn from its own seed (run seed, epoch, key), so a sample's views
    do not depend on which rank, worker or batch position handles it (what makes N ranks equal one process).
    Resampled webdataset streams repeat keys across epochs they do not count, so they draw from torch's RNG.
    """

    def __init__(self, transform, seeded: bool):
        self.transform, self.seeded = transform, seeded

    def _one(self, sample):
        if sample is None:  # a caption file's unreadable image: skipped (collate_views drops it)
            return None
        if not self.seeded:
            return self.transform(sample)
        # the CPU generator alone (torchvision draws from it): torch.manual_seed would also reseed, and not restore,
        # the CUDA generator, and costs a stack trace per device kind on each call
        with torch.random.fork_rng(devices=[]):
            key = f"{self.transform.seed}/{self.transform.epoch}/{sample['key']}"
            torch.default_generator.manual_seed(zlib.crc32(key.encode()))
            return self.transform(sample)

    def __call__(self, samples):
        return collate_views([self._one(s) for s in samples])


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if world()[1] > 1:
        values = values.clone()
        dist.all_reduce(values)  # gloo has no AVG
        values /= world()[1]
    return values


@torch.no_grad()
def update_teacher(teacher: cosmos_fast.EMATeacher, student: torch.nn.Module, step: int, cfg) -> None:
    """t <- m t + (1 - m) s over all parameters. fused: EMATeacher's one multi-tensor pass (under FSDP the same
    kernel on the local shards, sharded alike); reference: upstream's per-tensor loop. The model's buffers are
    constants (the text causal mask), so the teacher's copies from construction stay right."""
    if cfg.run.kernels == "fused" and not cfg.run.fsdp:
        teacher.update(step)
        return
    momentum = teacher.momentum_at(step)
    pairs = [(local(t), local(s)) for t, s in zip(teacher.module.parameters(), student.parameters())]
    if cfg.run.kernels == "fused":
        cosmos_fast.ema_update_([t for t, _ in pairs], [s for _, s in pairs], momentum)
    else:
        for t, s in pairs:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    teacher.num_updates += 1


def shard(model: CosmosModel, teacher_side: bool) -> None:
    """FSDP2: each transformer block, then the rest. The scalar temperatures (and logit biases) stay replicated
    (fully_shard shards no 0-d parameter; their gradients are averaged by hand). The encode_* methods get FSDP's
    hooks too. The teacher reshards after every forward (nothing to backpropagate); the student's root keeps its
    parameters gathered for the backward, as FSDP2 does by default."""
    for block in list(model.visual.blocks) + list(model.text.transformer.resblocks):
        fully_shard(block)
    fully_shard(model, ignored_params=scalar_parameters(model), reshard_after_forward=True if teacher_side else None)
    for name in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, name)


def scalar_parameters(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """The 0-d parameters (temperatures, logit biases): replicated under FSDP."""
    return {p for p in model.parameters() if p.ndim == 0}


def prepare_towers(student: CosmosModel, teacher: cosmos_fast.EMATeacher, cfg) -> None:
    """run.grad_checkpointing: the student's tower blocks recompute their activations in the backward (the
    teacher keeps none: it runs without gradients). run.compile: every tower block of student and teacher under
    torch.compile, after sharding (FSDP2's order; the teacher's graphs are its no-grad ones). The weights are
    untouched."""
    if cfg.run.grad_checkpointing:
        student.set_grad_checkpointing()
    if cfg.run.compile:
        student.compile_towers()
        teacher.module.compile_towers()


def gradient_sync(model, enabled: bool):
    """Reduce gradients across ranks only on a step's last micro-batch (DDP: no_sync; FSDP2: a flag)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def check_shards(path: str, key: str = "data.path") -> list[str]:
    """Before anything trains: the shards ``path`` names (a directory, a glob or a brace pattern) exist, and
    the first is a readable tar holding an image. Returns them."""
    try:
        shards = resolve_shards(path)
        if not shards[0].startswith("pipe:") and "://" not in shards[0]:
            check_shard(shards[0])
    except (FileNotFoundError, ValueError) as exc:
        raise config_lib.ConfigError(f"{key}: {exc}") from exc
    return shards


def epoch_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch: a function of (seed, epoch) alone, so a resumed run finds its place."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, size - batch_size + 1, batch_size)]


def training_set(cfg):
    """The map-style training data: the built-in shapes, or the caption files of ``data.path`` (data.source=json:
    SIMLA's JSON lists and the other caption-file formats, images under ``data.image_root``)."""
    if cfg.data.source == "json":
        try:
            dataset = CaptionFileDataset(cfg.data.path, cfg.data.image_root)
        except (OSError, ValueError) as exc:
            raise config_lib.ConfigError(f"data.path: {exc}") from exc
    else:
        dataset = ShapesDataset("train", size=cfg.data.train_size, image_size=cfg.data.image_size, seed=cfg.run.seed)
    if len(dataset) < cfg.data.batch_size:
        raise config_lib.ConfigError(f"the dataset has {len(dataset)} samples, fewer than one batch "
                                     f"({cfg.data.batch_size})")
    return dataset


def batches(dataset, collate, cfg, epoch: int, position: int):
    """(epoch, position, batch) forever, starting at batch ``position`` of ``epoch``; each rank takes its slice of
    every global batch, so N ranks see together what one process sees."""
    rank, size = world()
    n = cfg.data.batch_size // size
    while True:
        collate.transform.set_epoch(epoch)  # fresh text crops every epoch
        plan = [b[rank * n:(rank + 1) * n]
                for b in epoch_batches(len(dataset), cfg.data.batch_size, cfg.run.seed, epoch)[position:]]
        if plan:
            # the loader's own generator: starting one must not draw from torch's RNG, which a checkpoint restores
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=plan, collate_fn=collate, num_workers=cfg.data.workers,
                generator=torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch))
            for offset, batch in enumerate(loader):
                yield epoch, position + offset, batch
        epoch, position = epoch + 1, 0


def shard_batches(shards: list[str], collate, cfg, position: int):
    """(0, position, batch) forever from webdataset shards, resampled: each rank and worker draws shards with
    replacement (open_clip's --dataset-resampled). A stream cannot seek, so a resumed run draws afresh."""
    stream = shard_stream(shards, resampled=True, shuffle=cfg.data.shuffle, seed=cfg.run.seed,
                          caption_mode=cfg.data.caption_mode)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.data.batch_size // world()[1], collate_fn=collate,
                                         num_workers=cfg.data.workers)
    for offset, batch in enumerate(loader):
        yield 0, position + offset, batch


def write_curves(out_dir: Path) -> None:
    """``curves.png`` from the run's metrics (where matplotlib is installed). Never raises: a plot that cannot be
    made (a full disk) is one line of warning and no partial file, and never hides why a run ended."""
    try:
        written = plot_lib.plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")
    except Exception as exc:  # noqa: BLE001 - the plot is a courtesy; the run's own outcome stands
        print(f"warning: curves.png not written: {type(exc).__name__}: {exc}", file=sys.stderr)
        return
    if written is not None:
        print(f"training curves: {written}")


def open_log(path: Path, resume: bool):
    """metrics.jsonl for appending (resume) or afresh. A run killed mid-write leaves a torn last line: it is cut
    off before appending, so that every line stays one JSON record."""
    if resume and path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a" if resume else "w")


def check_out_dir(out_dir: Path) -> None:
    """run.out_dir is, or can become, a writable directory (checked before anything is created)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise config_lib.ConfigError(f"run.out_dir {out_dir} is a file, not a directory")
    existing = out_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(f"run.out_dir {out_dir}: {existing} is not a writable directory")


def pick_device(cfg, size: int) -> torch.device:
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise config_lib.ConfigError("run.device=cuda: no CUDA device is available here (run.device=cpu or auto)")
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.run.device == "auto" else cfg.run.device))
    if device.type == "cuda" and size > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def tensorboard_writer_class(cfg):
    """torch's SummaryWriter where run.tensorboard asks for it (None otherwise)."""
    if not cfg.run.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise config_lib.ConfigError("run.tensorboard=true needs the tensorboard package: pip install "
                                     "tensorboard") from exc
    return SummaryWriter


# Settings a checkpoint cannot be resumed under: the weights would not load, or the saved data position and
# optimizer state would mean something else.
RESUME_FIXED = ("run.objective", "model.name", "data.source", "data.image_size", "data.context_length",
                "data.batch_size", "optim.accumulate", "run.seed")


def flat_config(cfg) -> dict:
    """{"section.key": value} of a TrainConfig, or of the dict a checkpoint stores."""
    sections = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    return {f"{section}.{key}": value for section, body in sections.items() for key, value in body.items()}


def check_resume_config(saved, cfg) -> None:
    """Refuse what cannot resume (``RESUME_FIXED``); name every other changed setting (on purpose, e.g. more steps
    or a lower learning rate, but the run then no longer equals an uninterrupted one)."""
    if saved is None:
        return
    if not isinstance(saved, dict):  # checkpoints before 2026-11-24 pickled the TrainConfig itself
        saved = dataclasses.asdict(saved)
    old, new = flat_config(saved), flat_config(cfg)
    changed = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k] and k != "run.out_dir"}
    fixed = {k: v for k, v in changed.items() if k in RESUME_FIXED}
    if fixed:
        raise config_lib.ConfigError("--resume: the checkpoint was trained under settings it cannot continue without: "
                         + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in fixed.items())
                         + "; pass the checkpoint's values (or --config it was run with)")
    if changed and world()[0] == 0:
        print("--resume with changed settings: " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
              file=sys.stderr)


class StopSignal:
    """SIGTERM (a scheduler's preemption) or Ctrl-C asks the loop to stop with a checkpoint, as run.stop_at does,
    after the step whose loss all-reduce first carries the request (so that every rank stops at the same step);
    a second Ctrl-C interrupts at once. The handlers hold from construction to ``restore()``
    (only in the main thread, the one Python delivers signals to)."""

    def __init__(self):
        self.received = None
        self._previous = {}
        self._pid = os.getpid()  # forked DataLoader workers inherit the handler: they keep serving, silently
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if os.getpid() == self._pid:
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(Ctrl-C again to interrupt now)", file=sys.stderr)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Config sections and keys (see train/config.py): model, data, optim, teacher, psd, simla, run; "
               "e.g. run.steps=400 optim.lr=5e-4 data.batch_size=32.")
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "tiny-cpu.yaml"),
                        help="YAML config (default: train/configs/tiny-cpu.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from <run.out_dir>/checkpoint.pt (takes no path: set run.out_dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even if run.out_dir holds a checkpoint (it is replaced)")
    parser.add_argument("--rollback", action="store_true",
                        help="put <run.out_dir>/checkpoint-prev.pt back in place of checkpoint.pt (then --resume)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_intermixed_args(argv)
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in run.out_dir, --overwrite replaces it: pass one")
    cfg = config_lib.load(args.config, args.overrides)
    if args.rollback:
        if args.resume or args.overwrite:
            parser.error("--rollback only swaps the checkpoints: run --resume after it")
        print(checkpoints.rollback(Path(cfg.run.out_dir)))
        return 0
    checkpoint_path = Path(cfg.run.out_dir) / "checkpoint.pt"
    if args.resume and not checkpoint_path.exists():
        raise config_lib.ConfigError(f"--resume: no checkpoint at {checkpoint_path}")
    if not args.resume and not args.overwrite and checkpoint_path.exists():
        raise config_lib.ConfigError(f"{cfg.run.out_dir} holds a run (checkpoint.pt): --resume continues it, "
                                     "--overwrite starts afresh in its place, or set another run.out_dir")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # started by torchrun
    if cfg.run.fsdp and not distributed:
        raise config_lib.ConfigError("run.fsdp=true shards over ranks: start the trainer with torchrun "
                                     "--nproc-per-node 2 or more")
    if distributed:
        cuda = cfg.run.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        return train(cfg, args.resume)
    finally:
        if distributed:
            dist.destroy_process_group()


def train(cfg, resume: bool) -> int:
    rank, size = world()
    device = pick_device(cfg, size)
    if cfg.data.batch_size % size:
        raise config_lib.ConfigError(f"data.batch_size ({cfg.data.batch_size}) must divide evenly over {size} ranks")
    precision = cfg.run.precision if cfg.run.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16,
                              enabled=precision != "fp32")
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    # every refusal comes before the run directory is made: a refused run leaves nothing behind
    out_dir = Path(cfg.run.out_dir)
    check_out_dir(out_dir)
    summary_writer = tensorboard_writer_class(cfg)

    objective = objectives.build(cfg).to(device)
    try:
        tokenizer = objective.text_tokenizer()
    except objectives.ObjectiveError as exc:
        raise config_lib.ConfigError(str(exc)) from exc
    # samples draw only the views the objective's loss takes (COSMOS's 2 global and 6 local crops; SIMLA's one)
    collate = Collate(objective.sample_transform(tokenizer), seeded=cfg.data.source != "webdataset")
    if cfg.data.val_path is not None:
        check_shards(cfg.data.val_path, key="data.val_path")
    if cfg.data.source == "webdataset":
        shards = check_shards(cfg.data.path)
    else:
        train_set = training_set(cfg)
        objective.steps_per_epoch = len(train_set) // cfg.data.batch_size

    # the model, before the EMA copy (SIMLA fits its visual-token codebook on training images here)
    images = (batch["global"][0] for _, _, batch in (shard_batches(shards, collate, cfg, 0) if cfg.data.source ==
                                                      "webdataset" else batches(train_set, collate, cfg, 0, 0)))
    try:
        raw, teacher_weights = objective.build_model(images)
    except objectives.ObjectiveError as exc:
        raise config_lib.ConfigError(str(exc)) from exc
    raw = raw.to(device)
    teacher = cosmos_fast.EMATeacher(raw, momentum=cfg.teacher.momentum, schedule=cfg.teacher.schedule,
                                     final_momentum=cfg.teacher.final_momentum, total_steps=cfg.run.steps)
    if teacher_weights is not None:
        objective.load_teacher(teacher.module, teacher_weights)
    if cfg.run.fsdp:
        shard(raw, teacher_side=False)
        shard(teacher.module, teacher_side=True)
    prepare_towers(raw, teacher, cfg)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.optim.weight_decay, objective.decays), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    first_step, epoch, position = 0, 0, 0
    checkpoint_path = out_dir / "checkpoint.pt"  # main() checked that it exists with --resume, or may be replaced
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)  # on every rank
        check_resume_config(state.get("config"), cfg)
        set_model_state_dict(raw, state["model"], options=StateDictOptions(full_state_dict=True))
        set_model_state_dict(teacher, state["teacher"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        objective.load_state_dict(state.get("loss_state", {}))  # SIMLA's queues
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        first_step, epoch, position = state["step"], state["epoch"], state["position"]
    model = raw
    if size > 1 and not cfg.run.fsdp:
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=not objective.uses_all_parameters)
    if cfg.data.source == "webdataset":
        stream = shard_batches(shards, collate, cfg, position)
    else:
        stream = batches(train_set, collate, cfg, epoch, position)
    log = writer = None
    if rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise config_lib.ConfigError(f"run.out_dir {out_dir}: {exc.strerror or exc}") from exc
        log = open_log(out_dir / "metrics.jsonl", resume)
        writer = summary_writer(str(out_dir / "tensorboard")) if summary_writer else None
    held_out = evaluation.HeldOut(cfg, tokenizer, collate, objective, autocast, device)
    if rank == 0 and not held_out.configured:
        print("no held-out evaluation is configured for webdataset data: set data.val_path (a validation loss) "
              "and/or eval.root (the paper's benchmarks)", file=sys.stderr)
    guard = checkpoints.DivergenceGuard()
    guard.start(checkpoints.parameter_norm([local(p) for p in raw.parameters()], sharded=cfg.run.fsdp))
    good_step = first_step if resume else None  # the step of the checkpoint on disk
    if rank == 0 and first_step >= cfg.run.steps:
        print(f"the checkpoint is at step {first_step}, run.steps is {cfg.run.steps}: nothing left to train")
    start = time.time()
    # a terminal gets the bar; a log file (a batch job's) one line per logged step instead of carriage returns
    lines = rank == 0 and not sys.stderr.isatty()
    bar = tqdm(range(first_step, cfg.run.steps), desc="train", dynamic_ncols=True, disable=rank != 0 or lines)
    stop = StopSignal()
    try:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg.optim, cfg.run.steps)
            logged = {}
            for micro in range(cfg.optim.accumulate):
                epoch, position, batch = next(stream)
                batch = {k: batch[k].to(device, non_blocking=True) for k in ("global", "local", "captions")}
                with gradient_sync(model, micro == cfg.optim.accumulate - 1):
                    with autocast:
                        loss, parts = objective(model, teacher, batch, step, step * cfg.optim.accumulate + micro)
                    # a stop signal to any rank rides along with the loss: every rank then stops at the same step
                    values = mean_over_ranks(torch.stack([loss.detach().float(), *(p.float().to(device)
                                                                                   for p in parts.values()),
                                                          torch.tensor(float(stop.received is not None),
                                                                       device=device)]))
                    stop_requested = values[-1].item() > 0
                    if not torch.isfinite(values[0]):
                        print(f"step {step + 1}: loss is {values[0].item()}; stopping ({kept(good_step)})",
                              file=sys.stderr)
                        return 1
                    scaler.scale(loss / cfg.optim.accumulate).backward()
                for name, value in zip(["loss", *parts], values.tolist()):
                    logged[name] = logged.get(name, 0.0) + value / cfg.optim.accumulate
            if cfg.run.fsdp:  # the replicated temperatures and biases: FSDP leaves their gradients to us
                for p in scalar_parameters(raw):
                    if p.grad is not None:
                        p.grad.copy_(mean_over_ranks(p.grad))
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.optim.clip_grad)
            if cfg.teacher.update_before_step:  # upstream COSMOS's order
                update_teacher(teacher, raw, step, cfg)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            raw.clamp_logit_scales_()
            if not cfg.teacher.update_before_step:
                update_teacher(teacher, raw, step, cfg)
            param_norm = checkpoints.parameter_norm([local(p) for p in raw.parameters()], sharded=cfg.run.fsdp)
            if diverged := guard.diverged(param_norm):
                print(f"step {step + 1}: {diverged}; stopping ({kept(good_step)})", file=sys.stderr)
                return 1
            spike = guard.loss_spike_reason(logged["loss"])
            samples_per_s = ((step + 1 - first_step) * cfg.data.batch_size * cfg.optim.accumulate
                             / (time.time() - start))
            bar.set_postfix(loss=f"{logged['loss']:.3f}", samples_s=f"{samples_per_s:.0f}")
            if rank == 0 and (step % cfg.run.log_every == 0 or step == cfg.run.steps - 1):
                record = {"step": step, **logged, "lr": optimizer.param_groups[0]["lr"], "param_norm": param_norm,
                          "samples_per_s": samples_per_s}
                try:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                except OSError as exc:
                    raise checkpoints.RunError(f"could not write {log.name}: {exc.strerror or exc} "
                                               f"({kept(good_step)})") from exc
                if lines:
                    eta = (cfg.run.steps - step - 1) * (time.time() - start) / (step + 1 - first_step)
                    print(f"step {step + 1}/{cfg.run.steps} loss {logged['loss']:.4f} {samples_per_s:.0f} samples/s "
                          f"eta {int(eta // 60)}:{int(eta % 60):02d}", file=sys.stderr, flush=True)
                if writer is not None:
                    for name, value in record.items():
                        if name != "step":
                            writer.add_scalar(name, value, step)
            last = step + 1 == cfg.run.steps or step + 1 == cfg.run.stop_at or stop_requested
            if ((step + 1) % cfg.run.checkpoint_every == 0 or last) and spike:
                if rank == 0:
                    print(f"step {step + 1}: not checkpointed: {spike} ({kept(good_step)})", file=sys.stderr)
            elif (step + 1) % cfg.run.checkpoint_every == 0 or last:
                # gathering the full state dicts is collective under FSDP: every rank takes part, rank 0 writes
                state = {"model": get_model_state_dict(raw, options=FULL_STATE),
                         "teacher": get_model_state_dict(teacher, options=FULL_STATE),
                         "optimizer": get_optimizer_state_dict(raw, optimizer, options=FULL_STATE),
                         "loss_state": objective.state_dict(),
                         "scaler": scaler.state_dict(), "step": step + 1, "epoch": epoch, "position": position + 1,
                         "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                         "config": dataclasses.asdict(cfg)}  # plain values: loads without train/ on the path
                if rank == 0:
                    checkpoints.save_checkpoint(checkpoint_path, state, good_step,
                                                keep_previous=good_step is not None)
                good_step = step + 1
            if cfg.eval.every and (step + 1) % cfg.eval.every == 0 and not last:
                log_evaluation(held_out(raw, teacher, step), step, log, writer)
            if stop_requested:
                if rank == 0:
                    print(f"stopped after step {step + 1} (signal); continue with --resume", file=sys.stderr)
                return 128 + int(stop.received or signal.SIGTERM)
            if step + 1 == cfg.run.stop_at:
                if rank == 0:
                    print(f"stopped after step {step + 1} (run.stop_at); continue with --resume")
                return 0
        # the run is complete: its held-out evaluation, logged with the last step, reported, kept in eval.json
        results = held_out(raw, teacher, cfg.run.steps - 1) if held_out.configured else None
        if results is not None:
            log_evaluation(results, cfg.run.steps - 1, log, writer)
    finally:  # the curves so far, whether the run ended, stopped or failed (write_curves never raises)
        stop.restore()
        if rank == 0:
            log.close()
            write_curves(out_dir)
        if writer is not None:
            writer.close()
    if rank == 0 and results is not None:
        chance = evaluation.chance_levels(held_out)
        evaluation.print_report(results, chance)
        (out_dir / "eval.json").write_text(json.dumps({"step": cfg.run.steps, "metrics": {
            k: results[k] for k in ("student", "teacher")}, "val_loss": results.get("val_loss"), "chance": chance},
            indent=2) + "\n")
    return 0


def log_evaluation(results: dict, step: int, log, writer) -> None:
    """One metrics.jsonl record (the step's, with val_loss and eval/<model>/<set>/<metric> keys) and the same
    TensorBoard scalars, on rank 0."""
    if log is None:
        return
    record = evaluation.flat_record(results)
    log.write(json.dumps({"step": step, **record}) + "\n")
    log.flush()
    if writer is not None:
        for name, value in record.items():
            writer.add_scalar(name, value, step)


def kept(step: int | None) -> str:
    return f"the checkpoint of step {step} is kept" if step else "no checkpoint was written"


def cli(argv=None) -> int:
    """The command line: ``main``'s return code, or a refusal before training as one line on stderr (rc 2), or a
    run that ended on a failure as one line saying what happened and what is kept (rc 1)."""
    try:
        return main(argv)
    except config_lib.ConfigError as exc:  # refused before training: the message says it all, nothing was made
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except (checkpoints.RunError, UnusableShardsError) as exc:
        text = str(exc).strip()
        if "Original Traceback" in text:  # re-raised from a DataLoader worker: the worker's last line is the error
            last = text.splitlines()[-1]
            text = last.partition(f"{type(exc).__name__}: ")[2] or last
        print(f"train.py: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
