"""The chain's products (``torchdiv._exact.chain``) against the autograd engine's passes, in one
process: the D = 2, B = 256 cells of ``entry_cpu.py``, ``"auto"`` with the
chain, ``"auto"`` with it switched off (``chain`` patched to find none: the engine's passes,
as before), and the best recipe, called in turn call by call, thread CPU time per call, one
thread; medians, IQR, and the ratio of the medians over the recipe's. (The Laplacian's loop
took the chain for its first level too, for a while: the same time as the engine's pass in
the ``fnn2-256`` and ``fnn3-256`` cells, one pass's set-up in 1-3 ms; not kept.)

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        PYTHONPATH=src .venv/bin/python bench/entry_chain.py [--calls 600] [--only NAME]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import entry_cpu
import torch

from torchdiv._exact import autograd


def _timed(call: Callable[[], object]) -> int:
    start = time.thread_time_ns()
    call()
    return time.thread_time_ns() - start


def _compared(name: str, auto: Callable[[], object], recipe: Callable[[], object], n: int) -> None:
    """Time ``auto`` with the chain, without it and ``recipe``, in turn; print one line."""

    def engine() -> object:
        autograd.chain = lambda y, x: None
        try:
            return auto()
        finally:
            autograd.chain = CHAIN

    calls = {"chain": auto, "engine": engine, "recipe": recipe}
    for _ in range(20):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(n):
        for k in list(calls) if i % 2 else list(calls)[::-1]:
            times[k].append(_timed(calls[k]) / 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: statistics.quantiles(v, n=4) for k, v in times.items()}
    cells = "  ".join(
        f"{k} {med[k]:6.1f} us [{spread[k][0]:.0f}-{spread[k][2]:.0f}]" for k in calls
    )
    print(
        f"{name:30s} {cells}  chain/recipe {med['chain'] / med['recipe']:.3f}  "
        f"engine/recipe {med['engine'] / med['recipe']:.3f}",
        flush=True,
    )


CHAIN = autograd.chain
# the recipe timed against, per case: the loop of ``autograd.grad`` (diagonals), zuko's batched
# rows (the Jacobian)
RECIPES = ("loop of autograd.grad", "is_grads_batched (zuko)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=600, help="calls of each, in turn")
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, calls in entry_cpu.cases():
        if args.only in name and not name.startswith("lap-"):
            recipe = next(c for k, c in calls.items() if k in RECIPES)
            _compared(name, calls["auto"], recipe, args.calls)


if __name__ == "__main__":
    main()
