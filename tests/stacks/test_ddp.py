"""Operators inside a DistributedDataParallel training loss: gradients equal to one process.

Two gloo processes on localhost, spawned here, each with half of the batch; DDP averages
their gradients, which must equal the average of the two halves' gradients computed in this
process (float64). Bounded: the workers are joined with a timeout and killed if they hang.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket

import pytest
import torch

import torchdiv

WORLD = 2
TIMEOUT_S = 90


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
    ).double()


def _batch() -> torch.Tensor:
    return torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _loss(f, x: torch.Tensor, case: str) -> torch.Tensor:
    """A training loss of one operator and ``f(x)`` (so that every parameter is used)."""
    generator = torch.Generator().manual_seed(2)
    if case == "graph":
        x = x.detach().requires_grad_(True)
        y = f(x)
        div = torchdiv.graph_divergence(y, x, create_graph=True)
        return div.square().mean() + y.square().mean()
    if case.startswith("hutchinson"):
        probes = int(case.split("-")[1])
        div = torchdiv.divergence(f, x, method="hutchinson", num_probes=probes, generator=generator)
    else:
        div = torchdiv.divergence(f, x, method=case)
    return div.square().mean() + f(x).square().mean()


CASES = ("auto", "hutchinson-1", "hutchinson-2", "graph")


def _worker(rank: int, port: int, results: multiprocessing.Queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = DistributedDataParallel(_model(), static_graph=True)
        x = _batch().chunk(WORLD)[rank]
        for case in CASES:
            for step in range(2):  # static_graph treats the first iteration specially
                model.zero_grad()
                _loss(model, x, case).backward()
                if rank == 0:
                    grads = [p.grad.tolist() for p in model.parameters()]
                    results.put((case, step, grads))
        torchdiv.check_batch_independence(model, x)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(case: str) -> list[torch.Tensor]:
    model = _model()
    halves = []
    for x in _batch().chunk(WORLD):
        model.zero_grad()
        _loss(model, x, case).backward()
        halves.append([p.grad.clone() for p in model.parameters()])
    return [sum(g) / WORLD for g in zip(*halves, strict=True)]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_static_graph_gradients_equal_one_process():
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    workers = [context.Process(target=_worker, args=(r, port, results)) for r in range(WORLD)]
    for w in workers:
        w.start()
    try:
        got = {}
        for _ in range(len(CASES) * 2):
            case, step, grads = results.get(timeout=TIMEOUT_S)
            got[case, step] = grads
    except queue.Empty:
        pytest.fail("DDP workers did not report within the time limit")
    finally:
        for w in workers:
            w.join(timeout=TIMEOUT_S)
            if w.is_alive():
                w.kill()
    assert all(w.exitcode == 0 for w in workers), [w.exitcode for w in workers]
    for case in CASES:
        expected = _reference(case)
        for step in range(2):
            for grad, ref in zip(got[case, step], expected, strict=True):
                torch.testing.assert_close(
                    torch.tensor(grad, dtype=torch.float64), ref, rtol=1e-10, atol=1e-12
                )
