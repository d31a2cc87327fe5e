"""The MLP target of bench/plan_reuse.py by thread CPU time: steadier on a shared machine.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
          PYTHONPATH=<tree>/src .venv/bin/python bench/plan_reuse_cpu.py [--calls 400]

A 3-layer tanh MLP, D = 256, B = 128, H = 256, frozen and with trainable parameters: one
forward pass and ``divergence`` (its plan reused) alternated ``--calls`` times in one process
after 30 warm-up calls, each call timed by the thread's CPU time (one thread; with more, the
wall clock, as the other threads' work is not the calling thread's). Prints the 25th
percentile, median and IQR of each and the ratios divergence / forward pass. Alternate
``PYTHONPATH`` between two trees to compare them; other jobs on the machine still slow
everything (caches shared), so compare runs made close together.
"""

from __future__ import annotations

import argparse
import time

import torch
from divergence_exact import mlp

import torchdiv


def quantiles(times: list[int]) -> tuple[float, float, float]:
    """25th percentile, median and IQR, in ms."""
    ordered = sorted(times)

    def at(p: float) -> float:
        return ordered[int(len(ordered) * p)] / 1e6

    return at(0.25), at(0.5), at(0.75) - at(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    calls = parser.parse_args().calls
    clock = time.thread_time_ns if torch.get_num_threads() == 1 else time.perf_counter_ns
    for scenario in ("frozen", "train"):
        torch.manual_seed(0)
        net, x = mlp(256, 256).requires_grad_(scenario == "train"), torch.randn(128, 256)
        forward: list[int] = []
        divergence: list[int] = []
        for i in range(30 + calls):
            start = clock()
            net(x)
            middle = clock()
            torchdiv.divergence(net, x)
            if i >= 30:
                forward.append(middle - start)
                divergence.append(clock() - middle)
        (f25, f50, fiqr), (d25, d50, diqr) = quantiles(forward), quantiles(divergence)
        print(
            f"{scenario:6s} forward {f25:.3f} / {f50:.3f} ms (IQR {fiqr:.3f})  "
            f"divergence {d25:.3f} / {d50:.3f} ms (IQR {diqr:.3f})  "
            f"ratio {d25 / f25:.2f}x / {d50 / f50:.2f}x  (25th percentile / median)"
        )


if __name__ == "__main__":
    main()
