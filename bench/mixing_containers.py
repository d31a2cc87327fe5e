"""leftovers19: a divergence of ``f`` made anew at every call over a list, a dictionary or a
``functools.partial`` (watched at every call until leftovers19, once since).

Three ``f`` over a 3-layer 32-wide tanh MLP (float32, d = 4, B = 16), ``divergence(f, x)``
over a new ``x`` at every call: ``partial(field, net, t=t)`` over a new time tensor at every
call (an ODE step), ``lambda z: run(layers, z)`` over a plain list of layers, and ``lambda z:
blocks["out"](tanh(blocks["in"](z)))`` over a dictionary of modules. ``anew``: a new ``f``
object at every call; ``kept``: one object kept across calls (watched once before and since),
timed alternately in one process (``cpu_interleaved_ms``: the 0.2 quantile of one thread's
CPU time a call, per round; median and range of the rounds), each with its watches in 10 calls.
And modules kept across calls (keyattrs20): the MLP as a ``Sequential``, in a ``ModuleList``,
and with plain lists of floats and functions (each container in the structure key).
Run it against the tree before (``PYTHONPATH`` of the older ``src``) for the "before" numbers.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src .venv/bin/python bench/mixing_containers.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _common import cpu_interleaved_ms, watches_in

import torchdiv


def _field(net: torch.nn.Module, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return net(torch.cat([z, t.expand(len(z), 1)], 1))


def _run(layers: list[torch.nn.Module], z: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        z = layer(z)
    return z


def _makers(d: int, width: int) -> dict[str, Callable[[int], Callable[[torch.Tensor], Any]]]:
    """Each case's maker of ``f`` for call ``i``."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(d + 1, width), torch.nn.Tanh(), torch.nn.Linear(width, d)
    )
    layers = [torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, d)]
    blocks = {"in": torch.nn.Linear(d, width), "out": torch.nn.Linear(width, d)}
    times = [torch.tensor(0.1 * i) for i in range(8)]
    return {
        "partial": lambda i: functools.partial(_field, net, t=times[i % len(times)]),
        "list": lambda i: lambda z: _run(layers, z),
        "dict": lambda i: lambda z: blocks["out"](torch.tanh(blocks["in"](z))),
    }


class _Stack(torch.nn.Module):
    """The MLP's layers in a ``ModuleList``."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _run(list(self.layers), z)


class _Scaled(_Stack):
    """The same with a plain list of floats (per-layer scales) and one of functions."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__(layers)
        self.scales = [1.0, 0.5, 1.0]
        self.acts: list[Callable[[torch.Tensor], torch.Tensor]] = [torch.tanh]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        for layer, scale in zip(self.layers, self.scales, strict=True):
            z = layer(z) * scale
        return self.acts[0](z)


def _modules(d: int, width: int) -> dict[str, torch.nn.Module]:
    """Modules kept across calls (keyattrs20: a module's own containers in the key): the MLP
    as a ``Sequential``, in a ``ModuleList``, and with plain lists of floats and functions."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, d)]
    return {
        "module MLP": torch.nn.Sequential(*layers),
        "module list": _Stack(layers),
        "module floats": _Scaled(layers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5)
    args = parser.parse_args()
    xs = [torch.randn(args.batch, args.d) for _ in range(8)]
    at = iter(range(10**9))
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name, make in _makers(args.d, 32).items():
        kept = make(0)

        def anew(make: Any = make) -> torch.Tensor:
            i = next(at)
            return torchdiv.divergence(make(i), xs[i % len(xs)])

        def same(kept: Any = kept) -> torch.Tensor:
            return torchdiv.divergence(kept, xs[next(at) % len(xs)])

        calls[f"{name} anew"], calls[f"{name} kept"] = anew, same
    for name, module in _modules(args.d, 32).items():
        calls[name] = lambda m=module: torchdiv.divergence(m, xs[next(at) % len(xs)])
    counts = watches_in(calls)
    times = cpu_interleaved_ms(calls, args.rounds, args.seconds)
    print(f"d={args.d} B={args.batch}, torch {torch.__version__}, thread CPU time a call")
    for name, t in times.items():
        print(
            f"{name:14s} median {statistics.median(t):.3f} ms  range {min(t):.3f}-{max(t):.3f} ms"
            f"  watches in 10 calls: {counts[name]}"
        )


if __name__ == "__main__":
    main()
