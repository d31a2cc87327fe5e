"""Where ``"auto"`` switches from a watched, planned evaluation to plain autograd rows
(``torchdiv._core.crossover.ROWS_PROBLEM``): the same call timed at two thresholds, alternated round
by round in one process, against the recipes of ``small_events.py``.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
          .venv/bin/python bench/rows_threshold.py [--operator jacobian] [--dim 32] \
          [--batch 256] [--train] [--rounds 15] [--low 16] [--high 18]

Thread CPU time (one thread; wall-clock medians move too much on a shared 2-core machine), the
median of 30 calls per round; per round each time over the fastest recipe's; the median and
interquartile range of those ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import small_events
import torch

import torchdiv
from torchdiv._core import crossover


def cpu_ms(call: Callable[[], object], n: int = 30) -> float:
    """The median thread CPU time of ``n`` calls, after two warm-up calls."""
    call(), call()
    times = []
    for _ in range(n):
        start = time.thread_time_ns()
        call()
        times.append(time.thread_time_ns() - start)
    return statistics.median(times) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operator", default="jacobian", choices=small_events.OPERATORS)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--low", type=int, default=16, help="log2 of the first threshold")
    parser.add_argument("--high", type=int, default=18, help="log2 of the second threshold")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = small_events.mlp(args.dim, torch.nn.Tanh).requires_grad_(args.train)
    x = torch.randn(args.batch, args.dim)
    op = getattr(torchdiv, args.operator)
    recipes = small_events.recipes(args.operator, args.train)
    calls = {f"auto, threshold 2**{e}": e for e in (args.low, args.high)}
    times: dict[str, list[float]] = {name: [] for name in [*calls, *recipes]}
    for _ in range(args.rounds):
        for name, exponent in calls.items():
            crossover.ROWS_PROBLEM = 1 << exponent
            times[name].append(cpu_ms(lambda: op(net, x)))
        for name, recipe in recipes.items():
            times[name].append(cpu_ms(lambda recipe=recipe: recipe(net, x)))
    best = [min(times[name][i] for name in recipes) for i in range(args.rounds)]
    print(f"{args.operator}, D={args.dim}, B={args.batch}, {'train' if args.train else 'frozen'}")
    for name, measured in times.items():
        ratios = [t / b for t, b in zip(measured, best, strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(
            f"  {name:26s} {statistics.median(measured):8.3f} ms   x best recipe "
            f"{statistics.median(ratios):.3f} [{q1:.3f}-{q3:.3f}]"
        )


if __name__ == "__main__":
    main()
