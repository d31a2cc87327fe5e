"""Exact divergence of one batch of images shared out across 2 processes vs 1 process.

Run:  flock /tmp/torchdiv-bench.lock .venv/bin/python bench/distributed_divergence.py
          [--rounds 7] [--number 3] [--batch 4] [--methods auto,forward]

A conv net (3 -> 32 -> 32 -> 3 channels, 3x3 kernels, tanh) on 3 x 32 x 32 images (D = 3072),
float32, parameters frozen (an evaluation: the exact likelihood's divergence). Two gloo
processes on localhost with one thread each: in every round, rank 0 first times
``torchdiv.divergence`` alone (1 process x 1 thread; rank 1 waits at a barrier), then both time
``torchdiv.distributed.divergence`` (2 processes x 1 thread; each call ends with the all-reduce,
so the slower rank sets the time). Rounds interleave the two, so drifts of a shared machine
spread over both. Rank 0 also times each rank's work alone in its own process (its share of
the directions, ``Share``): on a machine whose cores other work takes, the two processes'
wall time says more about the load than about the split, and that column does not.
``Timer.timeit(number)`` per round (a fixed count: the ranks must make the same
calls); median and interquartile range over rounds. Needs 2 free cores to mean anything.

Amdahl's law from the larger share's time ``Th``: the part of one process's time ``T1`` that
sharing did not halve, ``s = 2 Th - T1`` (per-rank fixed costs: recording ``f``, the
colouring), predicts ``T(R) = s + (T1 - s) / R`` on ``R`` ranks (plus an all-reduce of ``B``
numbers).
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
from torchdiv._core.basis import Share
from torchdiv._exact import dispatch as _exact

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


def _share_timer(f: nn.Module, x: torch.Tensor, method: str, index: int) -> Timer:
    """A timer of one rank's work alone, in this process: its share of the directions."""

    def work() -> object:
        share = Share(index, WORLD)
        return _exact.diagonal_and_output("divergence", f, x, 1, method, None, True, share)

    return Timer("f()", globals={"f": work})


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
        halves = [_share_timer(f, x, method, i) for i in range(WORLD)]  # one rank's work
        single, shared, work = [], [], []
        for _ in range(args.rounds):
            if rank == 0:
                single.append(one.timeit(args.number).mean)
                work.append(max(h.timeit(args.number).mean for h in halves))
            dist.barrier()
            shared.append(two.timeit(args.number).mean)
            dist.barrier()
        if rank == 0:
            out[method] = {"1 process": _summary(single), "2 processes": _summary(shared),
                           "larger share alone": _summary(work)}  # fmt: skip
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
    print(f"batch {args.batch}, load average (1 min) at the end {os.getloadavg()[0]:.1f}")
    print("| method | 1 process x 1 thread (ms) | 2 processes x 1 thread (ms) | ratio | "
          "larger share alone, 1 thread (ms) | its ratio | predicted 8 ranks / 1 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for method, times in out.items():
        t1, t2 = times["1 process"]["median_ms"], times["2 processes"]["median_ms"]
        th = times["larger share alone"]["median_ms"]
        serial = max(2 * th - t1, 0.0)  # from the work per rank, not the contended wall time
        eight = (serial + (t1 - serial) / 8) / t1
        iqr1, iqr2 = times["1 process"]["iqr_ms"], times["2 processes"]["iqr_ms"]
        iqrh = times["larger share alone"]["iqr_ms"]
        row = [f"{t1:.1f} (IQR {iqr1:.1f})", f"{t2:.1f} (IQR {iqr2:.1f})", f"{t2 / t1:.2f}"]
        row += [f"{th:.1f} (IQR {iqrh:.1f})", f"{th / t1:.2f}", f"{eight:.2f}"]
        print(f"| {method} | " + " | ".join(row) + " |")
    print(json.dumps({"batch": args.batch, "threads": 1, "results": out}, indent=1))


if __name__ == "__main__":
    main()
