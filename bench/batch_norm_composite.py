"""What running a batch norm by its input's statistics as its composite costs
(``torchdiv._core.modes._batch_norm``, used where a derivative of order 3 by backward passes,
or 2 through forward mode, is taken: PyTorch's own are wrong there): the divergence of a small
conv net with a ``BatchNorm2d`` keeping no running statistics, then its parameter gradients,
timed with the composite and with PyTorch's fused op (the entry taken out of
``REPLACEMENTS``), alternated round by round in one process.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 \\
          .venv/bin/python bench/batch_norm_composite.py [--rounds 5]

``torch.utils.benchmark`` medians (``blocked_autorange``, 0.5 s per measurement); per method
the median over rounds of composite / fused and the range of those ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics as stats
from collections.abc import Iterator

import torch
import torch.utils.benchmark as tb
from torch import nn

import torchdiv
from torchdiv._core import modes
from torchdiv._exact import autograd

METHODS = ("reverse", "forward", "auto")


@contextlib.contextmanager
def fused() -> Iterator[None]:
    """PyTorch's own batch norm under every engine (its third derivative wrong: timing only)."""
    entry = modes.REPLACEMENTS.pop(torch.nn.functional.batch_norm)
    _forget()
    try:
        yield
    finally:
        modes.REPLACEMENTS[torch.nn.functional.batch_norm] = entry
        _forget()


def _forget() -> None:
    """The node searches cached per order, made again from ``REPLACEMENTS``."""
    modes.changed_nodes.cache_clear()
    autograd._changed.cache_clear()


def _median_s(net: nn.Module, x: torch.Tensor, method: str) -> float:
    params = list(net.parameters())

    def step() -> None:
        with torchdiv.allow_batch_interaction():
            d = torchdiv.divergence(net, x, batch_dims=0, method=method)
        torch.autograd.grad(d.sum(), params, materialize_grads=True)

    step()  # (untimed: plans, caches)
    return tb.Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=0.5).median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.BatchNorm2d(8, track_running_stats=False),
        nn.Tanh(),
        nn.Conv2d(8, 2, 3, padding=1),
    )
    x = torch.randn(8, 2, 6, 6)
    for method in METHODS:
        ratios, times = [], []
        for _ in range(rounds):
            composite = _median_s(net, x, method)
            with fused():
                plain = _median_s(net, x, method)
            ratios.append(composite / plain)
            times.append((composite, plain))
        median = stats.median(ratios)
        ms = [f"{c * 1e3:.1f}/{p * 1e3:.1f}" for c, p in times]
        print(
            f"{method:8s} composite/fused {median:.3f} [{min(ratios):.3f}-{max(ratios):.3f}]"
            f"  ms per round (composite/fused): {' '.join(ms)}"
        )


if __name__ == "__main__":
    main()
