"""Where the time of a reused plan goes: the MLP target of bench/plan_reuse.py, part by part.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
          PYTHONPATH=<tree>/src .venv/bin/python bench/plan_reuse_parts.py [--calls 400]

A 3-layer tanh MLP, D = 256, B = 128, H = 256, frozen and with trainable parameters. Each
round times, by the thread's CPU time (one thread), one forward pass, one forward pass under a
dispatch mode that only passes every ATen call on (what any such mode costs), and one
``divergence`` call (its plan reused) with the parts inside it timed in place: the template
check (``f`` evaluated under ``torchdiv._taylor.cache``'s check), the chain's factors along
the kept routes, the cycle (``torchdiv._structured.cycle.trace``) and, inside it, the kept
products' lookups (``memcmp`` of the weights against their copies). "the rest" is the call
less these parts (the public entry, the structure key, the plan's own steps). Prints medians
and 25th percentiles in us and as multiples of the median forward pass.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from divergence_exact import mlp

import torchdiv
from torchdiv import _structured
from torchdiv._structured import cycle, products
from torchdiv._taylor import cache

capture = importlib.import_module("torchdiv._taylor.capture")  # (the package exports a function)
clock = time.thread_time_ns
spent: dict[str, int] = {}


def timed(module: Any, name: str, label: str) -> None:
    """Replace ``module.name`` by a wrapper adding its thread CPU time to ``spent[label]``."""
    original: Callable[..., Any] = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0) + clock() - start

    setattr(module, name, wrapper)


class PassThrough(capture.DispatchMode):
    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        return func(*args, **kwargs)


PARTS = ("template check", "chain factors", "cycle", "  of which kept-product lookups")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    calls = parser.parse_args().calls
    timed(cache, "checked", PARTS[0])
    timed(_structured, "_chain", PARTS[1])
    timed(cycle, "trace", PARTS[2])
    timed(products, "_found", PARTS[3])
    for scenario in ("frozen", "train"):
        torch.manual_seed(0)
        net, x = mlp(256, 256).requires_grad_(scenario == "train"), torch.randn(128, 256)
        rows: dict[str, list[int]] = {}
        for i in range(30 + calls):
            start = clock()
            net(x)
            middle = clock()
            with PassThrough():
                net(x)
            passed = clock()
            spent.clear()
            torchdiv.divergence(net, x)
            end = clock()
            if i < 30:
                continue
            times = {
                "forward pass": middle - start,
                "forward pass under a pass-through mode": passed - middle,
                "divergence": end - passed,
                **{part: spent.get(part, 0) for part in PARTS},
                "the rest": end - passed - sum(spent.get(p, 0) for p in PARTS[:3]),
            }
            for label, t in times.items():
                rows.setdefault(label, []).append(t)
        forward = statistics.median(rows["forward pass"])
        print(f"{scenario}: median us / 25th percentile us / median x forward pass")
        for label, times_ in rows.items():
            median, p25 = statistics.median(times_), statistics.quantiles(times_, n=4)[0]
            print(f"  {label:40s} {median / 1e3:8.1f} {p25 / 1e3:8.1f} {median / forward:6.3f}")


if __name__ == "__main__":
    main()
