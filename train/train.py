"""Reference COSMOS trainer: one readable loop (nanoGPT/DINO style) on cosmos_fast's kernels.

Usage: python train/train.py [--config train/configs/tiny-cpu.yaml] [section.key=value ...]
       torchrun --nproc-per-node N train/train.py ...   (DDP, or FSDP2 with run.fsdp=true)

Student forward on 2 global + 6 local crops and 8 captions, teacher (EMA copy) forward on the 2 global crops
and the 2 global captions, CosmosLoss (or the CLIP or PSD loss), AdamW, temperature clamp, EMA update; a JSONL
log and a progress bar; zero-shot retrieval and classification on the held-out split at the end (shapes).
run.objective=simla trains SIMLA instead (train/simla.py), through the same loop.
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
import torch.nn.functional as F
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
import plot as plot_lib  # noqa: E402
import simla as simla_lib  # noqa: E402

import cosmos_fast  # noqa: E402
from cosmos_fast.data import CosmosTransform, ShapesDataset, collate_views, to_model_input  # noqa: E402
from cosmos_fast.data.shards import UnusableShardsError, check_shard, resolve_shards, shard_stream  # noqa: E402
from cosmos_fast.data.synthetic import COLORS  # noqa: E402
from cosmos_fast.distributed import all_gather_no_grad, all_gather_with_grad, world  # noqa: E402
from cosmos_fast.eval import (class_embeddings, classification_accuracy, encode_images, encode_texts,  # noqa: E402
                              retrieval_recall)
from cosmos_fast.eval.zero_shot import load_checkpoint  # noqa: E402
from cosmos_fast.models import (CosmosModel, Tokenizer, config_for_weights, load_weights,  # noqa: E402
                                state_dict_from_checkpoint, upstream_weight_decay)
from cosmos_fast.models import config as model_config  # noqa: E402
from cosmos_fast.ops.contrastive.reference import (contrastive_loss_reference,  # noqa: E402
                                                   multiview_contrastive_loss_reference)

# full (unsharded) state dicts on the CPU: a checkpoint loads into any world size, with or without FSDP
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Upstream COSMOS's rule: no weight decay on gains, biases, temperatures and the class embedding (fewer than 2
    dimensions, or ln/bn/bias/logit_scale in the name, judged on upstream's names and shapes)."""
    named = list(model.named_parameters())
    decay = [p for name, p in named if upstream_weight_decay(name, p)]
    no_decay = [p for name, p in named if not upstream_weight_decay(name, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# Prompt ensemble for the shapes' class names, worded as the captions are: the class shape's own sentence, and
# the raw caption in every colour (the class's colour varies: the average over colours leaves the shape).
SHAPE_TEMPLATES = ("the large shape is a {}", "a picture of a {}") + tuple(
    f"a picture of {'an' if c[0] in 'aeiou' else 'a'} {c} {{}}" for c in COLORS)


class Collate:
    """Transform each raw sample, then batch view-major (a class, not a lambda: workers pickle it).

    ``seeded``: each sample's image crops are drawn from its own seed (run seed, epoch, key), so a sample's views
    do not depend on which rank, worker or batch position handles it (what makes N ranks equal one process).
    Resampled webdataset streams repeat keys across epochs they do not count, so they draw from torch's RNG.
    """

    def __init__(self, transform: CosmosTransform, seeded: bool):
        self.transform, self.seeded = transform, seeded

    def _one(self, sample):
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
def teacher_embeddings(teacher, crops, captions, gather):
    """The EMA teacher's normalised embeddings of crops [G, B, 3, S, S] and captions [C, B, L]: ([G, B', E],
    [C, B', E]), B' = B, or the whole batch where ``gather`` collects the ranks' rows (dim 1)."""
    (G, B), C = crops.shape[:2], captions.shape[0]
    image = F.normalize(teacher.module.encode_image(crops.flatten(0, 1))[0], dim=-1).view(G, B, -1)
    text = F.normalize(teacher.module.encode_text(captions.flatten(0, 1))[0], dim=-1).view(C, B, -1)
    return gather(image, dim=1), gather(text, dim=1)


def losses(model, teacher, loss_fn, global_crops, local_crops, captions, step, micro_step, cfg):
    """(loss to backpropagate, {name: detached part}) of the configured objective on this rank's rows.

    kernels=fused: cosmos_fast's losses score the local rows against the gathered columns. kernels=reference:
    upstream's computation, full N x N logits per view pair and F.cross_entropy, on the whole batch gathered with
    its gradient; each rank then holds the global loss, and after DDP's averaging the towers get the exact global
    gradient, as the fused path does. (Upstream gathers without gradient, so there its towers get 1/world_size
    of it and only the temperatures the whole: the two agree on one process, not under DDP.)
    """
    if cfg.run.objective == "simla":  # one image (the first global crop) and one caption per sample
        return loss_fn(model, teacher, global_crops[0], captions[0], step)
    reference = cfg.run.kernels == "reference"
    if cfg.run.objective == "cosmos":
        out = model(global_crops, local_crops, captions, mask_padding=cfg.model.mask_padding,
                    reference_attention=reference)
    else:  # the towers alone: both global crops and every caption, the view pairs of COSMOS's CLIP term
        out = model(global_crops, local_crops[:0], captions, cross_attention=False)
    if reference:
        out = {k: all_gather_with_grad(v, dim=1) if v.ndim == 3 else v for k, v in out.items()}
    image, text, scale = out["image"], out["text"], out["logit_scale"]
    if cfg.run.objective == "clip":
        loss = (multiview_contrastive_loss_reference if reference else cosmos_fast.multiview_contrastive_loss)(
            image, text, scale)
        return loss, {}
    gather = all_gather_no_grad if reference else (lambda x, dim: x)
    if cfg.run.objective == "psd":  # PSD's soft targets on each of clip's view pairs: the same compute as clip
        ramp = cfg.psd.ramp_steps or cfg.run.steps
        alpha = cfg.psd.alpha_max * min(1.0, step / ramp)
        # the soft subset of the whole global batch, from (seed, micro-step): any number of ranks draws the same
        n, (rank, size) = image.shape[1], world()
        draw = torch.rand(n if reference else n * size, generator=torch.Generator().manual_seed(
            cfg.run.seed * 1_000_003 + micro_step))
        soft_mask = (draw < cfg.psd.subset).to(image.device)
        if not reference:
            soft_mask = soft_mask[rank * n:(rank + 1) * n]
        # targets softened by a detached similarity: the student's own (at half its temperature) or the teacher's
        if cfg.psd.source == "self":
            source_image, source_text, source_scale = image.detach(), text.detach(), 2 * scale.detach()
        else:
            source_image, source_text = teacher_embeddings(teacher, global_crops, captions, gather)
            source_scale = teacher.module.logit_scale.exp()
        contrastive = contrastive_loss_reference if reference else cosmos_fast.contrastive_loss
        pairs = [(p, q) for p in range(image.shape[0]) for q in range(text.shape[0])]
        loss = sum(contrastive(image[p], text[q], scale, teacher=(source_image[p], source_text[q], source_scale),
                               alpha=alpha, soft_mask=soft_mask) for p, q in pairs) / len(pairs)
        return loss, {"alpha": torch.tensor(alpha)}
    t_image, t_text = teacher_embeddings(teacher, global_crops, captions[:2], gather)
    if reference:
        distill = out["distill_logit_scale"]
        clip = multiview_contrastive_loss_reference(image[:2], text, scale)
        cosmos = sum(multiview_contrastive_loss_reference(x, t, distill)
                     for x in (out["cross_image"], out["cross_text"]) for t in (t_image, t_text)) / 4
    else:
        clip, cosmos = loss_fn(image[:2], text, out["cross_image"], out["cross_text"], t_image, t_text, scale,
                               out["distill_logit_scale"])[1:]
    return clip + cosmos, {"clip": clip.detach(), "cosmos": cosmos.detach()}


def build_cosmos(cfg) -> tuple[CosmosModel, dict | None]:
    """The student of config ``model.name`` at the data's sizes; with ``model.init``, holding those weights (any
    layout: upstream COSMOS, open_clip, this trainer's), at their image size and context length (other crop sizes
    interpolate the position embeddings), beside the teacher's weights where the checkpoint has them."""
    name, interpolation = cfg.model.name, cfg.model.pos_embed_interpolation
    if cfg.model.init is None:
        return CosmosModel(model_config(name, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                                        pos_embed_interpolation=interpolation)), None
    try:
        checkpoint = load_checkpoint(cfg.model.init)
        student = state_dict_from_checkpoint(checkpoint, "student")
        model = CosmosModel(dataclasses.replace(config_for_weights(student, name),
                                                pos_embed_interpolation=interpolation))
        if cfg.data.context_length > model.config.context_length:
            raise ValueError(f"data.context_length {cfg.data.context_length} exceeds the weights' "
                             f"{model.config.context_length} text positions")
        load_weights(model, student)
        teacher = state_dict_from_checkpoint(checkpoint, "teacher") if "teacher" in checkpoint else None
    except (KeyError, ValueError, TypeError) as exc:
        raise config_lib.ConfigError(f"model.init {cfg.model.init}: {exc.args[0] if isinstance(exc, KeyError) else exc}"
                                     ) from exc
    return model, teacher


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
    """FSDP2: each transformer block, then the rest. The two scalar temperatures stay replicated (fully_shard
    shards no 0-d parameter; their gradients are averaged by hand). The encode_* methods get FSDP's hooks too.
    The teacher reshards after every forward (nothing to backpropagate); the student's root keeps its
    parameters gathered for the backward, as FSDP2 does by default."""
    for block in list(model.visual.blocks) + list(model.text.transformer.resblocks):
        fully_shard(block)
    fully_shard(model, ignored_params={model.logit_scale, model.distill_logit_scale},
                reshard_after_forward=True if teacher_side else None)
    for name in ("encode_image", "encode_text"):
        register_fsdp_forward_method(model, name)


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


def check_shards(path: str) -> list[str]:
    """Before anything trains: the shards ``data.path`` names (a directory, a glob or a brace pattern) exist, and
    the first is a readable tar holding an image. Returns them."""
    try:
        shards = resolve_shards(path)
        if not shards[0].startswith("pipe:") and "://" not in shards[0]:
            check_shard(shards[0])
    except (FileNotFoundError, ValueError) as exc:
        raise config_lib.ConfigError(f"data.path: {exc}") from exc
    return shards


def epoch_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch: a function of (seed, epoch) alone, so a resumed run finds its place."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, size - batch_size + 1, batch_size)]


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


@torch.no_grad()
def evaluate(model: CosmosModel, tokenizer: Tokenizer, cfg, device) -> dict[str, float]:
    """Zero-shot retrieval (image vs its full description) and shape classification on the held-out split."""
    model.eval()
    dataset = ShapesDataset("heldout", size=cfg.data.eval_size, image_size=cfg.data.image_size, seed=cfg.run.seed)
    samples = [dataset[i] for i in range(len(dataset))]
    image_emb = encode_images(model, [s["image"] for s in samples], transform=to_model_input(), device=device)
    text_emb = encode_texts(model, tokenizer, [s["long_captions"][0] for s in samples], device=device)
    metrics = retrieval_recall(image_emb, text_emb, torch.arange(len(samples)))
    classes = class_embeddings(lambda texts: encode_texts(model, tokenizer, texts, device=device),
                               ShapesDataset.classes, templates=SHAPE_TEMPLATES)
    metrics.update(classification_accuracy(image_emb, torch.tensor([s["label"] for s in samples]), classes))
    model.train()
    return metrics


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

    tokenizer = Tokenizer(cfg.data.context_length)
    # only COSMOS trains on the local crops: the other objectives' samples skip drawing them
    transform = CosmosTransform(tokenizer, cfg.data.image_size, cfg.data.local_size,
                                n_local=6 if cfg.run.objective == "cosmos" else 0, seed=cfg.run.seed)
    collate = Collate(transform, seeded=cfg.data.source == "shapes")
    if cfg.data.source == "webdataset":
        shards = check_shards(cfg.data.path)
    else:
        train_set = ShapesDataset("train", size=cfg.data.train_size, image_size=cfg.data.image_size,
                                  seed=cfg.run.seed)
        if len(train_set) < cfg.data.batch_size:
            raise config_lib.ConfigError(f"the dataset has {len(train_set)} samples, fewer than one batch "
                                         f"({cfg.data.batch_size})")

    if cfg.run.objective == "simla":  # its visual-token codebook is fitted on training images before the EMA copy
        images = (shard_batches(shards, collate, cfg, 0) if cfg.data.source == "webdataset"
                  else batches(train_set, collate, cfg, 0, 0))
        raw = simla_lib.build_model(cfg, (batch["global"][0] for _, _, batch in images)).to(device)
        teacher_weights = None
    else:
        raw, teacher_weights = build_cosmos(cfg)
        raw = raw.to(device)
    teacher = cosmos_fast.EMATeacher(raw, momentum=cfg.teacher.momentum, schedule=cfg.teacher.schedule,
                                     final_momentum=cfg.teacher.final_momentum, total_steps=cfg.run.steps)
    if teacher_weights is not None:
        load_weights(teacher.module, teacher_weights)
    if cfg.run.fsdp:
        shard(raw, teacher_side=False)
        shard(teacher.module, teacher_side=True)
    prepare_towers(raw, teacher, cfg)
    # SIMLA's loss holds the momentum feature queues: its state is checkpointed
    loss_fn = (simla_lib.SIMLALoss(raw.config.embed_dim, cfg).to(device) if cfg.run.objective == "simla"
               else cosmos_fast.nn.CosmosLoss())
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  eps=cfg.optim.eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    first_step, epoch, position = 0, 0, 0
    checkpoint_path = out_dir / "checkpoint.pt"  # main() checked that it exists with --resume, or may be replaced
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)  # on every rank
        check_resume_config(state.get("config"), cfg)
        set_model_state_dict(raw, state["model"], options=StateDictOptions(full_state_dict=True))
        set_model_state_dict(teacher, state["teacher"], options=StateDictOptions(full_state_dict=True))
        set_optimizer_state_dict(raw, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        loss_fn.load_state_dict(state.get("loss_state", {}))
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        first_step, epoch, position = state["step"], state["epoch"], state["position"]
    model = raw
    if size > 1 and not cfg.run.fsdp:
        # the clip and psd objectives leave the cross-attention poolers out of the loss
        model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=cfg.run.objective != "cosmos")
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
                group["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.run.steps)
            logged = {}
            for micro in range(cfg.optim.accumulate):
                epoch, position, batch = next(stream)
                global_crops, local_crops, captions = (batch[k].to(device, non_blocking=True)
                                                       for k in ("global", "local", "captions"))
                with gradient_sync(model, micro == cfg.optim.accumulate - 1):
                    with autocast:
                        loss, parts = losses(model, teacher, loss_fn, global_crops, local_crops, captions, step,
                                             step * cfg.optim.accumulate + micro, cfg)
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
            if cfg.run.fsdp:  # the replicated temperatures: FSDP leaves their gradients to us
                for p in (raw.logit_scale, raw.distill_logit_scale):
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
                         "loss_state": loss_fn.state_dict(),
                         "scaler": scaler.state_dict(), "step": step + 1, "epoch": epoch, "position": position + 1,
                         "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                         "config": dataclasses.asdict(cfg)}  # plain values: loads without train/ on the path
                if rank == 0:
                    checkpoints.save_checkpoint(checkpoint_path, state, good_step,
                                                keep_previous=good_step is not None)
                good_step = step + 1
            if stop_requested:
                if rank == 0:
                    print(f"stopped after step {step + 1} (signal); continue with --resume", file=sys.stderr)
                return 128 + int(stop.received or signal.SIGTERM)
            if step + 1 == cfg.run.stop_at:
                if rank == 0:
                    print(f"stopped after step {step + 1} (run.stop_at); continue with --resume")
                return 0
    finally:  # the curves so far, whether the run ended, stopped or failed (write_curves never raises)
        stop.restore()
        if rank == 0:
            log.close()
            write_curves(out_dir)
        if writer is not None:
            writer.close()
    if cfg.data.source != "shapes":
        return 0  # the built-in zero-shot evaluation is on the shapes' held-out split
    # every rank evaluates (under FSDP the forward is collective); rank 0 reports
    metrics = {"student": evaluate(raw, tokenizer, cfg, device),
               "teacher": evaluate(teacher.module, tokenizer, cfg, device)}
    if rank != 0:
        return 0
    chance = {"R@1": 100 / cfg.data.eval_size, "top1": 100 / len(ShapesDataset.classes)}
    print(f"\nheld-out zero-shot ({cfg.data.eval_size} images; chance R@1 {chance['R@1']:.1f}%, "
          f"top-1 {chance['top1']:.0f}%)")
    print(f"{'':10}" + "".join(f"{k:>10}" for k in metrics["student"]))
    for who, m in metrics.items():
        print(f"{who:10}" + "".join(f"{v:10.1f}" for v in m.values()))
    (out_dir / "eval.json").write_text(json.dumps({"metrics": metrics, "chance": chance}, indent=2) + "\n")
    return 0


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
