"""One rank of test_reliability's 2-process gloo test: rank 1 passes tensors unlike rank 0's to the distributed ops;
each case records the ValueError message (or "ok") in a JSON file. Run as: RANK WORLD PORT OUT."""
import json
import sys

import torch
import torch.distributed as dist

import cosmos_fast

rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
n, d = (5 if rank else 4), 8


def attempt(fn):
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "ok"


queue = cosmos_fast.nn.FeatureQueue(dim=8, size=16)
errors = {
    "rows": attempt(lambda: cosmos_fast.contrastive_loss(torch.randn(n, d), torch.randn(n, d), 10.0)),
    "features": attempt(lambda: cosmos_fast.multiview_contrastive_loss(torch.randn(2, 4, 6 + rank), torch.randn(
        2, 4, 6 + rank), 10.0)),
    "dtype": attempt(lambda: cosmos_fast.contrastive_loss(*(torch.randn(4, d, dtype=torch.bfloat16 if rank else
                                                                        torch.float32) for _ in range(2)), 10.0)),
    "queue": attempt(lambda: queue.enqueue(torch.randn(n, d))),
    "equal": attempt(lambda: cosmos_fast.contrastive_loss(torch.randn(4, d), torch.randn(4, d), 10.0)),
}
with open(out, "w") as f:
    json.dump(errors, f)
dist.destroy_process_group()
