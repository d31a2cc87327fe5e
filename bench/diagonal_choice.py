"""Which engine ``"auto"``'s Jacobian diagonal should take for small MLPs: the structured
engine's chain (``method="structured"``) against the generic engines' plain-autograd rows
(``"auto"`` with the structured engine turned off), side by side in one process, with the
work estimate ``n x B x W`` that decides between them (``torchdiv._structured.rows_diagonal``).

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src .venv/bin/python bench/diagonal_choice.py [--dims 8,16] \\
        [--batches 128,256,512] [--width 64] [--scenarios frozen,train] [--rounds 7]

Per cell: thread CPU time per call (``entry_cpu.cpu_ms``, 20 ms per measurement), the methods
treated alike (``_common.alike_rounds``), medians over the rounds; ``"auto"`` as it decides,
the two engines it decides between, and zuko's recipe (one batched backward pass over the
one-hot cotangents) for scale. ``choice`` is what ``rows_diagonal`` says.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
from collections.abc import Callable

import small_events
import torch
from _common import alike_rounds
from entry_cpu import cpu_ms
from torch import nn

import torchdiv
from torchdiv import _structured
from torchdiv._core import crossover


def mlp(d: int, width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, d)
    )


def rows(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with the structured engine left out of ``"auto"`` (every problem "tiny")."""

    def run() -> object:
        tiny = _structured.TINY_PROBLEM
        _structured.TINY_PROBLEM = 1 << 62
        try:
            return call()
        finally:
            _structured.TINY_PROBLEM = tiny

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--dims", type=ints, default=[8, 16])
    parser.add_argument("--batches", type=ints, default=[128, 256, 512])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--scenarios", default="frozen,train")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    for d, b, scenario in itertools.product(args.dims, args.batches, scenarios):
        train = scenario == "train"
        torch.manual_seed(0)
        net = mlp(d, args.width).requires_grad_(train)
        x = torch.randn(b, d)
        auto = functools.partial(torchdiv.jacobian_diagonal, net, x)
        zuko = small_events.recipes("jacobian_diagonal", train)["is_grads_batched (zuko)"]
        calls = {
            "auto": auto,
            "structured": functools.partial(auto, method="structured"),
            "rows": rows(auto),
            "zuko": functools.partial(zuko, net, x),
        }
        for call in calls.values():
            call(), call()
        times = alike_rounds(calls, args.rounds, functools.partial(cpu_ms, budget_ns=20_000_000))
        med = {k: statistics.median(v) for k, v in times.items()}
        work = crossover.work(net, x, 1) / (1 << 20)
        with torch.set_grad_enabled(True):
            choice = "rows" if _structured.rows_diagonal(net, x, 1) else "structured"
        cells = "  ".join(f"{k} {v:.3f}" for k, v in med.items())
        print(
            f"D{d}-B{b}-w{args.width}-{scenario:6s} work {work:7.1f}M  choice {choice:10s} "
            f"{cells} ms  structured/rows {med['structured'] / med['rows']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
