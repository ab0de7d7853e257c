"""Reference COSMOS trainer: one readable loop (nanoGPT/DINO style) on cosmos_fast's kernels.

Usage: python train/train.py [--config train/configs/tiny-cpu.yaml] [section.key=value ...]

Student forward on 2 global + 6 local crops and 8 captions, teacher (EMA copy) forward on the 2 global crops
and the 2 global captions, CosmosLoss (or the CLIP loss alone), AdamW, temperature clamp, EMA update; a JSONL
log and a progress bar; zero-shot retrieval and classification on the held-out split at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import config as config_lib  # noqa: E402

import cosmos_fast  # noqa: E402
from cosmos_fast.data import CosmosTransform, ShapesDataset, collate_views, to_model_input  # noqa: E402
from cosmos_fast.data.synthetic import COLORS  # noqa: E402
from cosmos_fast.eval import (class_embeddings, classification_accuracy, encode_images, encode_texts,  # noqa: E402
                              retrieval_recall)
from cosmos_fast.models import CosmosModel, Tokenizer  # noqa: E402
from cosmos_fast.models import config as model_config  # noqa: E402


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases and temperatures (1-d and 0-d tensors), as upstream."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# Prompt ensemble for the shapes' class names: the class is a shape; its colour varies, so average over colours.
SHAPE_TEMPLATES = tuple(f"a picture of {'an' if c[0] in 'aeiou' else 'a'} {c} {{}}" for c in COLORS) + (
    "a picture of a {}", "a large {}")


class Collate:
    """Transform each raw sample, then batch view-major (a class, not a lambda: workers pickle it)."""

    def __init__(self, transform: CosmosTransform):
        self.transform = transform

    def __call__(self, samples):
        return collate_views([self.transform(s) for s in samples])


def psd_loss(out, teacher, global_crops, captions, step, cfg):
    """PSD: the CLIP loss on the first global crop and caption with targets softened, on a fresh random subset
    of rows, by a detached similarity: the student's own (at half its temperature) or the EMA teacher's."""
    image, text, scale = out["image"][0], out["text"][0], out["logit_scale"]
    ramp = cfg.psd.ramp_steps or cfg.run.steps
    alpha = cfg.psd.alpha_max * min(1.0, step / ramp)
    soft_mask = torch.rand(image.shape[0], device=image.device) < cfg.psd.subset
    if cfg.psd.source == "self":
        source = (image.detach(), text.detach(), 2 * scale.detach())
    else:
        with torch.no_grad():
            source = (F.normalize(teacher.module.encode_image(global_crops[0])[0], dim=-1),
                      F.normalize(teacher.module.encode_text(captions[0])[0], dim=-1),
                      teacher.module.logit_scale.exp())
    loss = cosmos_fast.contrastive_loss(image, text, scale, teacher=source, alpha=alpha, soft_mask=soft_mask)
    return loss, {"alpha": alpha}


def epoch_batches(size: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch: a function of (seed, epoch) alone, so a resumed run finds its place."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, size - batch_size + 1, batch_size)]


def batches(dataset, collate, cfg, epoch: int, position: int):
    """(epoch, position, batch) forever, starting at batch ``position`` of ``epoch``."""
    while True:
        collate.transform.set_epoch(epoch)  # fresh text crops every epoch
        plan = epoch_batches(len(dataset), cfg.data.batch_size, cfg.run.seed, epoch)[position:]
        if plan:
            # the loader's own generator: starting one must not draw from torch's RNG, which the (main-process)
            # augmentations use and a checkpoint restores
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=plan, collate_fn=collate, num_workers=cfg.data.workers,
                generator=torch.Generator().manual_seed(cfg.run.seed * 100_003 + epoch))
            for offset, batch in enumerate(loader):
                yield epoch, position + offset, batch
        epoch, position = epoch + 1, 0


def save_checkpoint(path: Path, state: dict) -> None:
    """Write, then rename: a crash mid-write never leaves a broken checkpoint in place of a good one."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).parent / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--resume", action="store_true", help="continue from <run.out_dir>/checkpoint.pt")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    cfg = config_lib.load(args.config, args.overrides)
    device = torch.device("cuda" if cfg.run.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.run.device == "auto" else cfg.run.device))
    torch.manual_seed(cfg.run.seed)
    out_dir = Path(cfg.run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = CosmosModel(model_config(cfg.model.name, image_size=cfg.data.image_size,
                                     context_length=cfg.data.context_length)).to(device)
    teacher = cosmos_fast.EMATeacher(model, momentum=cfg.teacher.momentum, schedule=cfg.teacher.schedule,
                                     final_momentum=cfg.teacher.final_momentum, total_steps=cfg.run.steps)
    loss_fn = cosmos_fast.nn.CosmosLoss()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    tokenizer = Tokenizer(cfg.data.context_length)
    transform = CosmosTransform(tokenizer, cfg.data.image_size, cfg.data.local_size, seed=cfg.run.seed)
    train_set = ShapesDataset("train", size=cfg.data.train_size, image_size=cfg.data.image_size, seed=cfg.run.seed)
    if len(train_set) < cfg.data.batch_size:
        raise ValueError(f"the dataset has {len(train_set)} samples, fewer than one batch ({cfg.data.batch_size})")
    first_step, epoch, position = 0, 0, 0
    checkpoint_path = out_dir / "checkpoint.pt"
    if args.resume:
        if not checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        first_step, epoch, position = state["step"], state["epoch"], state["position"]
    stream = batches(train_set, Collate(transform), cfg, epoch, position)
    log = (out_dir / "metrics.jsonl").open("a" if args.resume else "w")
    start = time.time()
    bar = tqdm(range(first_step, cfg.run.steps), desc="train", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.run.steps)
        epoch, position, batch = next(stream)
        global_crops, local_crops, captions = (batch[k].to(device) for k in ("global", "local", "captions"))
        out = model(global_crops, local_crops, captions, mask_padding=cfg.model.mask_padding)
        if cfg.run.objective == "cosmos":
            with torch.no_grad():
                B = global_crops.shape[1]
                t_image = F.normalize(teacher.module.encode_image(global_crops.flatten(0, 1))[0], dim=-1)
                t_text = F.normalize(teacher.module.encode_text(captions[:2].flatten(0, 1))[0], dim=-1)
            losses = loss_fn(out["image"][:2], out["text"], out["cross_image"], out["cross_text"],
                             t_image.view(2, B, -1), t_text.view(2, B, -1), out["logit_scale"],
                             out["distill_logit_scale"])
            loss, parts = losses.total, {"clip": losses.clip.item(), "cosmos": losses.cosmos.item()}
        elif cfg.run.objective == "psd":
            loss, parts = psd_loss(out, teacher, global_crops, captions, step, cfg)
        else:
            loss = cosmos_fast.multiview_contrastive_loss(out["image"][:2], out["text"], out["logit_scale"])
            parts = {}
        if not torch.isfinite(loss):
            print(f"step {step}: loss is {loss.item()}; stopping (the last checkpoint is kept)", file=sys.stderr)
            return 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        model.clamp_logit_scales_()
        teacher.update(step)
        samples_per_s = (step + 1 - first_step) * cfg.data.batch_size / (time.time() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{samples_per_s:.0f}")
        if step % cfg.run.log_every == 0 or step == cfg.run.steps - 1:
            log.write(json.dumps({"step": step, "loss": loss.item(), **parts, "lr": optimizer.param_groups[0]["lr"],
                                  "samples_per_s": samples_per_s}) + "\n")
            log.flush()
        last = step + 1 == cfg.run.steps or step + 1 == cfg.run.stop_at
        if (step + 1) % cfg.run.checkpoint_every == 0 or last:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                print(f"step {step}: parameters are no longer finite; stopping (the last checkpoint is kept)",
                      file=sys.stderr)
                return 1
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step + 1, "epoch": epoch, "position": position + 1, "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "config": cfg})
        if step + 1 == cfg.run.stop_at:
            print(f"stopped after step {step + 1} (run.stop_at); continue with --resume")
            return 0
    metrics = {"student": evaluate(model, tokenizer, cfg, device),
               "teacher": evaluate(teacher.module, tokenizer, cfg, device)}
    chance = {"R@1": 100 / cfg.data.eval_size, "top1": 100 / len(ShapesDataset.classes)}
    print(f"\nheld-out zero-shot ({cfg.data.eval_size} images; chance R@1 {chance['R@1']:.1f}%, "
          f"top-1 {chance['top1']:.0f}%)")
    print(f"{'':10}" + "".join(f"{k:>10}" for k in metrics["student"]))
    for who, m in metrics.items():
        print(f"{who:10}" + "".join(f"{v:10.1f}" for v in m.values()))
    (out_dir / "eval.json").write_text(json.dumps({"metrics": metrics, "chance": chance}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
