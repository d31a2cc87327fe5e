"""Exact divergence of one batch of images shared out across 2 processes vs 1 process.

Run:  flock /tmp/torchdiv-bench.lock .venv/bin/python bench/distributed_divergence.py
          [--rounds 7] [--number 3] [--batch 4] [--methods auto,forward]

A conv net (3 -> 32 -> 32 -> 3 channels, 3x3 kernels, tanh) on 3 x 32 x 32 images (D = 3072),
float32, parameters frozen (an evaluation: the exact likelihood's divergence). Two gloo
processes on localhost with one thread each: in every round, rank 0 first times
``torchdiv.divergence`` alone (1 process x 1 thread; rank 1 waits at a barrier), then both time
``torchdiv.distributed.divergence`` (2 processes x 1 thread; each call ends with the all-reduce,
so the slower rank sets the time). Rounds interleave the two, so drifts of a shared machine
spread over both. ``Timer.timeit(number)`` per round (a fixed count: the ranks must make the same
calls); median and interquartile range over rounds. Needs 2 free cores to mean anything.

Amdahl's law from the two times: the part of one process's time ``T1`` that the second process
did not halve, ``s = 2 T2 - T1`` (per-rank fixed costs: evaluating and recording ``f``, the
colouring, the all-reduce), predicts ``T(R) = s + (T1 - s) / R`` on ``R`` ranks.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import socket
import statistics

import torch
from torch import nn
from torch.utils.benchmark import Timer

import torchdiv

WORLD = 2


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(32, 3, 3, padding=1),
    ).requires_grad_(False)


def _summary(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times) * 1e3, "iqr_ms": (q[2] - q[0]) * 1e3}


def _worker(rank: int, port: int, args: argparse.Namespace, results) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=600)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timeout)
    f = model()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = {}
    for method in args.methods.split(","):
        one = Timer("f()", globals={"f": lambda m=method: torchdiv.divergence(f, x, method=m)})
        two = Timer(
            "f()", globals={"f": lambda m=method: torchdiv.distributed.divergence(f, x, method=m)}
        )
        check = torchdiv.distributed.divergence(f, x, method=method)  # warm-up, and equal:
        if rank == 0:
            torch.testing.assert_close(check, torchdiv.divergence(f, x, method=method))
        single, shared = [], []
        for _ in range(args.rounds):
            if rank == 0:
                single.append(one.timeit(args.number).mean)
            dist.barrier()
            shared.append(two.timeit(args.number).mean)
            dist.barrier()
        if rank == 0:
            out[method] = {"1 process": _summary(single), "2 processes": _summary(shared)}
    if rank == 0:
        results.put(out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=3, help="calls per round")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", default="auto,forward")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [context.Process(target=_worker, args=(r, port, args, results)) for r in range(2)]
    for w in workers:
        w.start()
    out = results.get(timeout=3600)
    for w in workers:
        w.join(timeout=60)
    print("| method | 1 process x 1 thread (ms) | 2 processes x 1 thread (ms) | ratio | "
          "predicted 8 ranks / 1 |")  # fmt: skip
    print("|---|---|---|---|---|")
    for method, times in out.items():
        t1, t2 = times["1 process"]["median_ms"], times["2 processes"]["median_ms"]
        serial = max(2 * t2 - t1, 0.0)
        eight = (serial + (t1 - serial) / 8) / t1
        iqr1, iqr2 = times["1 process"]["iqr_ms"], times["2 processes"]["iqr_ms"]
        print(f"| {method} | {t1:.1f} (IQR {iqr1:.1f}) | {t2:.1f} (IQR {iqr2:.1f}) | "
              f"{t2 / t1:.2f} | {eight:.2f} |")  # fmt: skip
    print(json.dumps({"batch": args.batch, "threads": 1, "results": out}, indent=1))


if __name__ == "__main__":
    main()
