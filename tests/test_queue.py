"""FeatureQueue: ring-buffer order and wrap-around, state_dict round trip, errors, and the all-gather."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cosmos_fast.nn import FeatureQueue


def rows(start, stop, dim=3):
    """Row i holds the value i everywhere: where each row landed is readable."""
    return torch.arange(start, stop, dtype=torch.float32)[:, None].expand(-1, dim).clone()


def test_fills_in_order_then_wraps_around():
    queue = FeatureQueue(dim=3, size=5)
    assert queue.features.shape == (0, 3)
    queue.enqueue(rows(0, 2))
    torch.testing.assert_close(queue.features, rows(0, 2))
    queue.enqueue(rows(2, 4))
    torch.testing.assert_close(queue.features, rows(0, 4))
    queue.enqueue(rows(4, 7))  # 4 -> slot 4, 5 -> slot 0, 6 -> slot 1
    torch.testing.assert_close(queue.features, torch.cat([rows(5, 7), rows(2, 5)]))
    assert int(queue.pointer) == 2 and int(queue.filled) == 5


def test_a_batch_larger_than_the_queue_keeps_its_last_rows():
    queue = FeatureQueue(dim=3, size=4)
    queue.enqueue(rows(0, 1))
    queue.enqueue(rows(1, 11))  # ten rows: 7..10 survive, 10 is the last written, at slot (1 + 10 - 1) % 4 = 2
    torch.testing.assert_close(queue.features, torch.cat([rows(8, 11), rows(7, 8)]))
    assert int(queue.pointer) == 3 and int(queue.filled) == 4


def test_casts_to_its_dtype_and_stores_no_graph():
    queue = FeatureQueue(dim=3, size=4, dtype=torch.bfloat16)
    x = rows(0, 2).requires_grad_()
    queue.enqueue(x * 2)
    assert queue.features.dtype == torch.bfloat16 and not queue.features.requires_grad
    torch.testing.assert_close(queue.features.float(), rows(0, 2) * 2)


def test_state_dict_round_trip():
    queue = FeatureQueue(dim=3, size=5)
    queue.enqueue(rows(0, 3))
    queue.enqueue(rows(3, 6))
    state = queue.state_dict()
    assert set(state) == {"queue", "pointer", "filled"}
    restored = FeatureQueue(dim=3, size=5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.features, queue.features)
    restored.enqueue(rows(6, 7))
    queue.enqueue(rows(6, 7))
    torch.testing.assert_close(restored.features, queue.features)
    assert int(restored.pointer) == int(queue.pointer) == 2
    with pytest.raises(RuntimeError, match="size mismatch"):
        FeatureQueue(dim=3, size=6).load_state_dict(state)


@pytest.mark.parametrize("call,error,words", [
    (lambda: FeatureQueue(dim=0, size=4), ValueError, "dim must be a positive int"),
    (lambda: FeatureQueue(dim=3, size=2.5), ValueError, "size must be a positive int"),
    (lambda: FeatureQueue(dim=3, size=4, dtype=torch.int64), TypeError, "dtype must be a floating-point"),
    (lambda: FeatureQueue(3, 4).enqueue(torch.zeros(2, 4)), ValueError, "features must have shape [batch, 3]"),
    (lambda: FeatureQueue(3, 4).enqueue(torch.zeros(3)), ValueError, "features must have shape [batch, 3]"),
    (lambda: FeatureQueue(3, 4).enqueue(torch.zeros(2, 3, dtype=torch.int64)), TypeError, "floating-point"),
    (lambda: FeatureQueue(3, 4).enqueue(torch.zeros(2, 3, device="meta")), ValueError, "features are on meta"),
    (lambda: FeatureQueue(3, 4).enqueue([[0.0, 0.0, 0.0]]), TypeError, "features must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)


def _rank_enqueues(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    queue = FeatureQueue(dim=3, size=6)
    queue.enqueue(rows(10 * rank, 10 * rank + 2))  # each rank brings two rows
    queue.enqueue(rows(10 * rank + 2, 10 * rank + 4))
    out[rank] = queue.features.clone()
    dist.destroy_process_group()


def test_two_ranks_hold_the_same_gathered_queue():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_rank_enqueues, args=(2, port, out), nprocs=2)
    # step 1 writes rank 0's rows 0, 1 then rank 1's 10, 11 (slots 0-3); step 2 writes 2, 3 (slots 4, 5) then
    # 12, 13, wrapping around to slots 0, 1
    expected = torch.cat([rows(12, 14), rows(10, 12), rows(2, 4)])
    for rank in range(2):
        torch.testing.assert_close(out[rank], expected)
