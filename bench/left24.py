"""rev-left24's two timings, A/B in one process, one thread, 3 alternated rounds:

``chain``: a frozen D = 6 tanh / sigmoid chain at batch 256, plain calls after one call under
anomaly detection; the fix (the chain again) against the old rule (``loop._debugging`` patched
to ``False``: the chain off for good, the Taylor engine).

``gelu``: what a naive ``F.gelu`` entry from the third order would cost an exact-GELU net: the
loop at one input, batch 256, trained, with ``f`` plain against ``f`` under the modes (where
the loop's search would find ``GeluBackward`` guarded and keep ``f`` under them).

Run: ``flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
PYTHONPATH=src python bench/left24.py``
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch

import torchdiv
from torchdiv._laplacian import loop

ROUNDS = 3


def _timed(call: Callable[[], object], n: int) -> str:
    """Median and interquartile range of ``n`` calls, in microseconds."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    q = statistics.quantiles(times, n=4)
    return f"median {statistics.median(times) * 1e6:.0f} us, IQR {q[0] * 1e6:.0f}-{q[2] * 1e6:.0f}"


def chain(old: bool) -> str:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Sigmoid()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(64, 1)).requires_grad_(False)
    x = torch.randn(256, 6)
    saved = loop._debugging
    if old:
        loop._debugging = lambda x: False
    for _ in range(3):
        torchdiv.laplacian(net, x)
    with torch.autograd.detect_anomaly(check_nan=False):
        torchdiv.laplacian(net, x)
    loop._debugging = saved
    return _timed(lambda: torchdiv.laplacian(net, x), 200)


def gelu(plain: bool) -> str:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(64, 1))
    x = torch.randn(256, 1)

    def call() -> None:
        settings = loop.Settings(plain=plain, tried=True, chain=True)
        loop.grad_of_grad(net, x, 1, None, settings).sum().backward()

    return _timed(call, 300)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for r in range(ROUNDS):
        print(f"round {r} chain, old rule (Taylor): {chain(True)}")
        print(f"round {r} chain, fixed (chain):     {chain(False)}")
        print(f"round {r} exact GELU, plain (now):   {gelu(True)}")
        print(f"round {r} exact GELU, under modes:   {gelu(False)}")
