"""One rank of the 2-process gloo tests (run as a script by test_contrastive_distributed.py).

The model, the data and the loss cases live here so that the single-process reference in the test and
every rank compute exactly the same thing.
"""
import argparse
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cosmos_fast

GLOBAL_BATCH, IN_IMG, IN_TXT, D = 12, 10, 7, 16


class TinyTowers(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(IN_IMG, D)
        self.txt = nn.Linear(IN_TXT, D)
        self.cross = nn.Linear(D, D)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.distill_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.1)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.distill_logit_bias = nn.Parameter(torch.tensor(-5.0))

    def forward(self, x, y):
        """Everything a loss needs, inside forward so that DDP sees every parameter use."""
        img, txt = F.normalize(self.img(x), dim=-1), F.normalize(self.txt(y), dim=-1)
        cross_img = F.normalize(img + self.cross(txt), dim=-1)
        cross_txt = F.normalize(txt + self.cross(img), dim=-1)
        # the biases as results of an op, like the scales: DDP must not meet a parameter itself among the outputs
        return (img, txt, cross_img, cross_txt, self.logit_scale.exp(), self.distill_logit_scale.exp(),
                self.logit_bias * 1, self.distill_logit_bias * 1)


def batch():
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(8, GLOBAL_BATCH, IN_IMG, generator=g),
        y=torch.randn(8, GLOBAL_BATCH, IN_TXT, generator=g),
        teacher_img=F.normalize(torch.randn(2, GLOBAL_BATCH, D, generator=g), dim=-1),
        teacher_txt=F.normalize(torch.randn(2, GLOBAL_BATCH, D, generator=g), dim=-1),
        queue_img=F.normalize(torch.randn(9, D, generator=g), dim=-1),
        queue_txt=F.normalize(torch.randn(11, D, generator=g), dim=-1),
        soft_mask=torch.arange(GLOBAL_BATCH) % 3 != 0,
    )


def loss_for(case, model, data, rows):
    """The loss of ``case`` on the rows ``rows`` of the global batch (all of them on one process)."""
    img, txt, cross_img, cross_txt, scale, distill_scale, bias, distill_bias = model(data["x"][:, rows],
                                                                                     data["y"][:, rows])
    if case == "clip":
        return cosmos_fast.nn.ContrastiveLoss(local_loss=True)(img[0], txt[0], scale)
    if case == "soft":
        teacher = (data["teacher_img"][0, rows], data["teacher_txt"][0, rows], torch.tensor(20.0))
        return cosmos_fast.contrastive_loss(img[0], txt[0], scale, teacher=teacher, alpha=0.4,
                                            soft_mask=data["soft_mask"][rows], extra_a=data["queue_img"],
                                            extra_b=data["queue_txt"])
    if case == "cosmos":
        return cosmos_fast.nn.CosmosLoss()(img[:2], txt, cross_img, cross_txt, data["teacher_img"][:, rows],
                                           data["teacher_txt"][:, rows], scale, distill_scale).total
    if case == "sigmoid":  # soft labels on some rows, queue columns, the bias learnt
        teacher = (data["teacher_img"][0, rows], data["teacher_txt"][0, rows], torch.tensor(20.0), torch.tensor(-4.0))
        return cosmos_fast.sigmoid_loss(img[0], txt[0], scale, bias, teacher=teacher, alpha=0.4,
                                        soft_mask=data["soft_mask"][rows], extra_b=data["queue_img"])
    if case == "siglip":  # open_clip's module, built as open_clip's training script builds it
        rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return cosmos_fast.nn.SigLipLoss(rank=rank, world_size=size)(img[1], txt[2], scale, bias)
    if case == "cosmos_sigmoid":
        return cosmos_fast.nn.CosmosLoss(loss="sigmoid")(
            img[:2], txt, cross_img, cross_txt, data["teacher_img"][:, rows], data["teacher_txt"][:, rows], scale,
            distill_scale, bias, distill_bias).total
    raise ValueError(f"unknown case {case!r}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world)
    # not every case uses every output (cross, distill_logit_scale)
    model = DistributedDataParallel(TinyTowers(), find_unused_parameters=True)
    n = GLOBAL_BATCH // args.world
    loss = loss_for(args.case, model, batch(), slice(args.rank * n, (args.rank + 1) * n))
    loss.backward()  # DDP averages the parameter gradients over the ranks here
    grads = {name: p.grad for name, p in model.module.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "grads": grads}, args.out)
    dist.barrier()
    dist.destroy_process_group()
    # Rarely (about one run in a hundred under pytest) a rank aborted after this point, in C++ teardown at
    # interpreter exit ("terminate called without an active exception"); the results are on disk, so leave
    # without running the destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
