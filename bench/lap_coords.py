"""``value_grad_laplacian(coordinates=...)``'s ``"auto"`` with its choice counting the chosen
coordinates against the same call deciding on every input (as before lapcoords23) and the
user's grad-of-grad loop, in one process (lapcoords23).

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
          PYTHONPATH=src .venv/bin/python bench/lap_coords.py [rounds]

float32 PINN training steps of ``bench/pinn23_idioms.py`` (residual + ``backward()``), heat
``u_t - 0.01 u_xx`` on ``(x, t)`` (one coordinate of two) at B = 256, 1024, 2048 and
Navier-Stokes on ``(x, y, t)`` (two of three) at 1024. Thread CPU time per step, the three
ways alternated (order reversed every other round), median [min-max] over the rounds.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from collections.abc import Callable

import pinn23_idioms as idioms
import torch

from torchdiv._laplacian import methods

CASES = (("heat", 2, 1, 256), ("heat", 2, 1, 1024), ("heat", 2, 1, 2048), ("ns", 3, 3, 1024))


def _every_input(step: Callable[[], None]) -> None:
    """``step`` with ``"auto"`` deciding on every input, not the chosen coordinates."""
    counted = methods.recorded_or_loop
    methods.recorded_or_loop = lambda f, x, batch_dims, chain=False, chosen=None: counted(
        f, x, batch_dims, chain
    )
    try:
        step()
    finally:
        methods.recorded_or_loop = counted


def _ms(step: Callable[[], None], calls: int = 5) -> float:
    start = time.thread_time()
    for _ in range(calls):
        step()
    return (time.thread_time() - start) / calls * 1e3


def main(rounds: int = 11) -> None:
    torch.manual_seed(0)
    print("| case | model | counted ms | every input ms | loop ms | counted/every | counted/loop |")
    print("|---|---|---|---|---|---|---|")
    for case, d, m, b in CASES:
        for kind in ("tanh", "laaf", "rff"):
            u, x = idioms.net(kind, d, m), torch.rand(b, d)
            ours = functools.partial(idioms._step, case, u, x, True)
            ways = {
                "counted": ours,
                "every": functools.partial(_every_input, ours),
                "loop": functools.partial(idioms._step, case, u, x, False),
            }
            times: dict[str, list[float]] = {name: [] for name in ways}
            for step in ways.values():
                step()
                step()
            for r in range(rounds):
                for name in list(ways)[:: 1 if r % 2 else -1]:
                    times[name].append(_ms(ways[name]))
            med = {name: statistics.median(t) for name, t in times.items()}
            cells = " | ".join(
                f"{med[n]:.2f} [{min(t):.2f}-{max(t):.2f}]" for n, t in times.items()
            )
            ratios = f"{med['counted'] / med['every']:.2f} | {med['counted'] / med['loop']:.2f}"
            print(f"| {case} B={b} | {kind} | {cells} | {ratios} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 11)
