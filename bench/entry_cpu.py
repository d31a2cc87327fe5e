"""The small cases of issues 18 and 19 timed by thread CPU time, one thread: ``"auto"`` against
the fastest recipe of the same round, where wall-clock medians on a loaded machine move too much.

Divergence, Jacobian diagonal and Jacobian of a tanh MLP at D = 2, B = 256, and the Laplacian of
the FNN and KAN cases of ``laplacian_small.py``, frozen and in training. Per case: interleaved
rounds of ~50 ms per method, the ratio ``auto / fastest other`` per round, median and IQR, and
the ratio of medians (``auto``'s median time over the fastest other median): the per-round
ratio divides by the minimum of several noisy times, which biases it upwards where the
fastest methods are within the noise of each other (``"auto"`` running the same engine as
one of them). Every method is treated alike (``_common.alike_rounds``): each measurement
starts after one untimed call of the same method, and the order of the methods is reversed
every other round. A call that takes longer than the budget is a measurement on its own, so
before this its time depended on the method before it: ``"auto"``, first in every round,
always came after the previous round's ``vmap(hessian)`` (gigabytes at D = 100), and
``"taylor"`` timed in ``"auto"``'s place read 1.44x and 1.51x ``"taylor"`` in two of three
runs (medians of 11 rounds, a loaded machine; 1.00 in the third) at D = 100, B = 2048,
trained; 1.00 and 0.99 timed alike (issue 18).

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        DDE_BACKEND=pytorch .venv/bin/python bench/entry_cpu.py [--rounds 11] [--only NAME] \
        [--matrix] [--budget-ms 50]

``--matrix`` times every cell of the issues' targets instead (issue 19: D = 2, 8, 16, 32, 64 x
batch 256, 4096; issue 18: tanh FNNs at D = 2, 3, 10, 100 x batch 256, 2048 and KANs at
D = 2, 3), a few minutes at ``--rounds 3 --budget-ms 20``, and the divergence of zuko's own
CNF velocity at D = 2, 8, 16 (``zuko-cnf-``, where zuko is installed).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("DDE_BACKEND", "pytorch")

import laplacian_small
import small_events
import torch
from _common import alike_rounds

import torchdiv

LAPLACIAN_BASELINES = (
    "loop of grad-of-grad",
    "deepxde hessian sum",
    "torchdiv taylor",
    "torch.func vmap(hessian)",
)


Calls = dict[str, Callable[[], object]]


def cases(matrix: bool = False) -> list[tuple[str, Calls]]:
    """``(name, {method: call})`` for every case; ``"auto"`` is torchdiv's call. ``matrix``:
    every cell of the issues' targets (``small_events.py``'s D x B for the three operators,
    ``laplacian_small.py``'s FNN and KAN cases), not only the D = 2-3, B = 256 ones."""
    out = []
    dims, batches = (small_events.DIMS, small_events.BATCHES) if matrix else ((2,), (256,))
    for op in ("divergence", "jacobian_diagonal", "jacobian"):
        for d, b, train in itertools.product(dims, batches, (False, True)):
            torch.manual_seed(0)
            net = small_events.mlp(d, torch.nn.Tanh).requires_grad_(train)
            x = torch.randn(b, d)
            calls = {"auto": functools.partial(getattr(torchdiv, op), net, x)}
            recipes = small_events.recipes(op, train).items()
            calls |= {k: functools.partial(r, net, x) for k, r in recipes}
            out.append((f"{op}-D{d}-B{b}-{'train' if train else 'frozen'}", calls))
    if matrix:
        out += _zuko_cases()
    names = [c for c in laplacian_small.CASES if not c.startswith("biharmonic")]
    for name in names if matrix else ("fnn2-256", "fnn3-256", "kan2-256"):
        for train in (False, True):
            methods = laplacian_small.methods(train)
            torch.manual_seed(0)
            net, x = laplacian_small.CASES[name]()
            net.requires_grad_(train)
            step = functools.partial(laplacian_small._step, net=net, x=x, train=train)
            calls = {"auto": functools.partial(step, methods["torchdiv auto"])}
            calls |= {
                k: functools.partial(step, methods[k]) for k in LAPLACIAN_BASELINES if k in methods
            }
            out.append((f"lap-{name}-{'train' if train else 'frozen'}", calls))
    return out


def _zuko_cases() -> list[tuple[str, Calls]]:
    """The divergence of zuko's own CNF velocity (``FFJTransform.f`` at a fixed time: the
    time's features concatenated to ``x``, an ELU MLP of two hidden layers of 64), which the
    tanh MLP of issue 19's cells stands for, at D = 2, 8, 16, batch 256; none without zuko."""
    try:
        from zuko.flows.continuous import FFJTransform
    except ImportError:
        return []
    out = []
    for d, train in itertools.product((2, 8, 16), (False, True)):
        torch.manual_seed(0)
        transform = FFJTransform(d).requires_grad_(train)
        velocity = functools.partial(transform.f, torch.tensor(0.3))
        x = torch.randn(256, d)
        calls = {"auto": functools.partial(torchdiv.divergence, velocity, x)}
        recipes = small_events.recipes("divergence", train).items()
        calls |= {k: functools.partial(r, velocity, x) for k, r in recipes}
        out.append((f"zuko-cnf-divergence-D{d}-B256-{'train' if train else 'frozen'}", calls))
    return out


def cpu_ms(call: Callable[[], object], budget_ns: int = 50_000_000) -> float:
    """Thread CPU time per call in ms, over calls adding up to ``budget_ns`` (at least one)."""
    reps, spent = 0, 0
    while spent < budget_ns:
        start = time.thread_time_ns()
        call()
        spent += time.thread_time_ns() - start
        reps += 1
    return spent / reps / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    parser.add_argument("--matrix", action="store_true", help="every cell of issues 18 and 19")
    parser.add_argument("--budget-ms", type=float, default=50, help="CPU time per measurement")
    args = parser.parse_args()
    budget = int(args.budget_ms * 1e6)
    for name, calls in cases(args.matrix):
        if args.only not in name:
            continue
        for call in calls.values():
            call(), call()
        times = alike_rounds(calls, args.rounds, functools.partial(cpu_ms, budget_ns=budget))
        ratios = [
            times["auto"][r] / min(v[r] for k, v in times.items() if k != "auto")
            for r in range(args.rounds)
        ]
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = min((k for k in med if k != "auto"), key=med.__getitem__)
        print(
            f"{name:34s} auto {med['auto']:.3f} ms  best {best} {med[best]:.3f} ms  "
            f"ratio {statistics.median(ratios):.3f} [{q1:.3f}-{q3:.3f}]  "
            f"of medians {med['auto'] / med[best]:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
