"""Two gloo processes on CPU: after DDP's averaging every rank holds the single-process gradient."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import GLOBAL_BATCH, TinyTowers, batch, loss_for

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["clip", "soft", "cosmos", "sigmoid", "siglip", "cosmos_sigmoid"])
def test_two_ranks_match_single_process(backend, case, tmp_path):
    model = TinyTowers()
    expected_loss = loss_for(case, model, batch(), slice(0, GLOBAL_BATCH))
    expected_loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    port, world = _free_port(), 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), "--rank", str(r), "--world", str(world), "--port", str(port),
                          "--case", case, "--out", str(outs[r])], env=os.environ.copy(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output
    results = [torch.load(o) for o in outs]
    torch.testing.assert_close(sum(r["loss"] for r in results) / world, expected_loss.detach(), rtol=1e-5, atol=1e-6)
    for r in results:
        assert r["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
