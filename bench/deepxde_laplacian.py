"""A DeepXDE PDE residual's Laplacian: ``torchdiv.laplacian(net, x)`` vs ``dde.grad.hessian``.

Run:  DDE_BACKEND=pytorch OMP_WAIT_POLICY=PASSIVE flock /tmp/torchdiv-bench.lock \\
          .venv/bin/python bench/deepxde_laplacian.py [--rounds 5] [--min-run-time 0.4]

Needs ``pip install deepxde`` (not a dependency of torchdiv). The network is DeepXDE's own
``dde.nn.FNN([D] + [64] * 3 + [1], "tanh", "Glorot normal")`` in float32 (DeepXDE's default),
evaluated on a batch of collocation points that require grad, as ``dde.Model`` passes them to
``pde(x, y)``. Both sides first compute ``y = net(x)`` (DeepXDE does so before calling ``pde``),
then:

  dde.grad.hessian: ``sum_i dde.grad.hessian(y, x, i=i, j=i)``, then ``dde.grad.clear()``
                    (DeepXDE clears its cache after every step);
  torchdiv:         ``torchdiv.laplacian(net, x)`` (``"auto"``: the Taylor engine).

Two scenarios: *residual* (the Laplacian with its graph kept, what ``pde`` costs) and *step*
(plus ``backward()`` of the mean squared residual to the parameters, a training step's
derivative work). Every result is checked against a float64 copy of the network first.
Writes bench/results/deepxde_laplacian.json and prints a markdown table.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

os.environ.setdefault("DDE_BACKEND", "pytorch")

import deepxde as dde
import torch
from _common import compare, markdown, script

import torchdiv

WIDTH, DEPTH = 64, 3
CASES = {f"D{d}-B{b}": (d, b) for d in (2, 10) for b in (256, 2048)}


def _network(d: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return dde.nn.FNN([d] + [WIDTH] * DEPTH + [1], "tanh", "Glorot normal")


def _dde(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = net(x)
    lap = sum(dde.grad.hessian(y, x, i=i, j=i) for i in range(x.shape[1]))
    dde.grad.clear()
    return lap


def _torchdiv(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    net(x)  # the outputs DeepXDE computes before calling pde(x, y)
    return torchdiv.laplacian(net, x)


def _step(laplacian: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], net, x):
    def call() -> torch.Tensor:
        lap = laplacian(net, x)
        lap.square().mean().backward()
        net.zero_grad(set_to_none=True)
        return lap.detach()

    return call


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict]:
    d, b = CASES[name]
    net = _network(d)
    x = torch.rand(b, d, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    exact = copy.deepcopy(net).double()
    reference = _dde(exact, x.detach().double().requires_grad_(True)).detach().float()
    rows = []
    for scenario in ("residual", "step"):
        if scenario == "residual":
            calls = {
                "dde.grad.hessian": lambda: _dde(net, x),
                "torchdiv": lambda: _torchdiv(net, x),
            }
        else:
            calls = {"dde.grad.hessian": _step(_dde, net, x), "torchdiv": _step(_torchdiv, net, x)}
        rows += compare(
            {"case": name, "scenario": scenario},
            calls,
            reference,
            rtol=1e-4,  # float32 against float64: sums of D second derivatives
            rounds=rounds,
            min_run_time=min_run_time,
            ratio=("vs_dde", lambda t: t["dde.grad.hessian"]["median_ms"]),
        )
    return rows


def tables(rows: list[dict]) -> None:
    columns = [
        ("case", "case"),
        ("scenario", "scenario"),
        ("method", "method"),
        ("median_ms", "median ms"),
        ("iqr_ms", "IQR ms"),
        ("vs_dde", "time / dde.grad.hessian"),
        ("peak_mb", "peak MiB"),
    ]
    print(markdown(rows, columns))


if __name__ == "__main__":
    script(__doc__, CASES, run_case, "deepxde_laplacian.json", tables)
