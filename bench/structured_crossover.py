"""Where ``method="auto"`` should start taking the structured engine for small-event MLPs:
``"structured"`` against ``"reverse"`` (and ``"auto"``) for the divergence (or Jacobian
diagonal) of tanh MLPs, timed by thread CPU time on one thread, interleaved and alike
(``_common.alike_rounds``), over event sizes D, widths, depths and batches, frozen or in a
training step (the divergence's ``sum().backward()`` into the parameters).

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        .venv/bin/python bench/structured_crossover.py [--dims 2,3,4] [--widths 64,512] \\
        [--depths 2,8] [--batches 256,4096] [--rounds 5] [--budget-ms 20] [--op divergence]

One line per cell: the median ms of each method, ``structured / reverse`` per round (median
and IQR), and what ``"auto"`` ran (``auto / reverse``, ``auto / structured``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
from collections.abc import Callable

import torch
from _common import alike_rounds
from entry_cpu import cpu_ms
from torch import nn

import torchdiv


def mlp(d: int, width: int, depth: int) -> nn.Module:
    """``depth`` hidden layers of ``width`` with tanh, as a CNF's dynamics (zuko, torchdyn)."""
    layers: list[nn.Module] = [nn.Linear(d, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, d))


def call(op: str, net: nn.Module, x: torch.Tensor, method: str, train: bool) -> Callable[[], None]:
    fn = getattr(torchdiv, op)

    def step() -> None:
        out = fn(net, x, method=method)
        if train:
            out.square().sum().backward()

    return step


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=ints, default=[2, 3, 4, 6, 8])
    parser.add_argument("--widths", type=ints, default=[64, 256, 512])
    parser.add_argument("--depths", type=ints, default=[2, 8])
    parser.add_argument("--batches", type=ints, default=[256, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-ms", type=float, default=20)
    parser.add_argument("--op", default="divergence", choices=("divergence", "jacobian_diagonal"))
    args = parser.parse_args()
    budget = int(args.budget_ms * 1e6)
    cells = itertools.product(args.dims, args.widths, args.depths, args.batches, (False, True))
    for d, width, depth, b, train in cells:
        torch.manual_seed(0)
        net = mlp(d, width, depth).requires_grad_(train)
        x = torch.randn(b, d)
        calls = {m: call(args.op, net, x, m, train) for m in ("reverse", "structured", "auto")}
        for c in calls.values():
            c(), c()
        times = alike_rounds(calls, args.rounds, functools.partial(cpu_ms, budget_ns=budget))
        ratios = [s / r for s, r in zip(times["structured"], times["reverse"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{args.op[:4]} D{d} w{width} L{depth} B{b} {'train ' if train else 'frozen'} "
            f"rev {med['reverse']:.3f} str {med['structured']:.3f} auto {med['auto']:.3f} ms  "
            f"str/rev {statistics.median(ratios):.2f} [{q1:.2f}-{q3:.2f}]  "
            f"auto/rev {med['auto'] / med['reverse']:.2f} auto/str "
            f"{med['auto'] / med['structured']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
