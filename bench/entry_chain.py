"""The chain's products (``torchdiv._exact.chain``) against the autograd engine's passes, in one
process: the D = 2, B = 256 cells of ``entry_cpu.py`` (and ``--dims``), ``"auto"`` with the
chain, ``"auto"`` with it switched off (``chain`` patched to find none: the engine's passes,
as before), and the best recipe, called in turn call by call, thread CPU time per call, one
thread; medians, IQR, and the ratio of the medians over the recipe's.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        PYTHONPATH=src .venv/bin/python bench/entry_chain.py [--calls 600] [--dims 2 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import small_events
import torch

import torchdiv
from torchdiv._exact import autograd


def _timed(call: Callable[[], object]) -> int:
    start = time.thread_time_ns()
    call()
    return time.thread_time_ns() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600, help="calls of each, in turn")
    parser.add_argument("--dims", type=int, nargs="+", default=[2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    chain = autograd.chain
    for d in args.dims:
        for op in ("divergence", "jacobian_diagonal", "jacobian"):
            for train in (False, True):
                torch.manual_seed(0)
                net = small_events.mlp(d, torch.nn.Tanh).requires_grad_(train)
                x = torch.randn(256, d)
                name = "loop of autograd.grad" if op != "jacobian" else "is_grads_batched (zuko)"
                recipe, operator = small_events.recipes(op, train)[name], getattr(torchdiv, op)

                def engine(operator=operator, net=net, x=x):
                    autograd.chain = lambda y, x: None
                    try:
                        return operator(net, x)
                    finally:
                        autograd.chain = chain

                calls = {
                    "chain": lambda operator=operator, net=net, x=x: operator(net, x),
                    "engine": engine,
                    "recipe": lambda recipe=recipe, net=net, x=x: recipe(net, x),
                }
                for _ in range(20):
                    for call in calls.values():
                        call()
                times: dict[str, list[float]] = {k: [] for k in calls}
                for i in range(args.calls):
                    order = list(calls) if i % 2 else list(calls)[::-1]
                    for k in order:
                        times[k].append(_timed(calls[k]) / 1e3)
                med = {k: statistics.median(v) for k, v in times.items()}
                spread = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
                cells = "  ".join(
                    f"{k} {med[k]:6.1f} us [{spread[k][0]:.0f}-{spread[k][2]:.0f}]" for k in calls
                )
                print(
                    f"{op:18s} D{d} {'train' if train else 'frozen':6s} {cells}  "
                    f"chain/recipe {med['chain'] / med['recipe']:.3f}  "
                    f"engine/recipe {med['engine'] / med['recipe']:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
