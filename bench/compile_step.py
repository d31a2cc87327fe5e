"""Training-step time with torch.compile (inductor) against the same step run eagerly.

Run:  flock /tmp/torchdiv-bench.lock .venv/bin/python bench/compile_step.py
          [--cases mlp,conv,lap] [--rounds 5] [--min-run-time 0.4]
          [--json PATH | --update]
      .venv/bin/python bench/compile_step.py --report bench/results/compile_step.json

A step: ``zero_grad``, ``loss = op(net, x).square().mean()``, ``backward``, an SGD step.
Compiled: ``torch.compile(step)`` (inductor; the backward and the optimiser's ``zero_grad`` are
graph breaks of Dynamo's, not torchdiv's), warmed up by three steps; before timing, one compiled
step and one eager step from the same parameters must give the same loss and parameters
(float32, rtol 1e-4). ``ratio`` = compiled median / eager median (below 1: compiling helps).
Times are of whole steps in float32, interleaved rounds (``torch.utils.benchmark``).

Cases (divergence nets: auto, structured, reverse, forward, hutchinson with 2 probes drawn once;
the Laplacian MLP: auto, taylor, forward-over-reverse, grad-of-grad, hutchinson):
  mlp:  tanh MLP 16-64-64-16, 64 samples
  conv: conv net 3-8-8-3 (tanh, 3x3) on (8, 3, 8, 8) images
  lap:  tanh MLP 2-64-64-1 (a PINN), 256 samples, Laplacian

Writes bench/results/local/compile_step.json (git-ignored); --update replaces the committed
bench/results/compile_step.json (every case).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from _common import markdown, script, time_interleaved
from divergence_exact import convnet, mlp

import torchdiv

DIVERGENCE = ("auto", "structured", "reverse", "forward", "hutchinson")
LAPLACIAN = ("auto", "taylor", "forward-over-reverse", "grad-of-grad", "hutchinson")


def pinn(d: int, h: int) -> torch.nn.Module:
    layers = [torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, h), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(h, 1), torch.nn.Flatten(0))


CASES: dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]] = {
    "mlp": lambda: (mlp(16, 64), torch.randn(64, 16)),
    "conv": lambda: (convnet(8), torch.randn(8, 3, 8, 8)),
    "lap": lambda: (pinn(2, 64), torch.randn(256, 2)),
}


def operator(case: str, method: str, probes: torch.Tensor) -> Callable[..., torch.Tensor]:
    if case == "lap":
        if method == "hutchinson":
            return lambda f, x: torchdiv.laplacian(f, x, method=method, probes=probes)
        return lambda f, x: torchdiv.laplacian(f, x, method=method)
    if method == "hutchinson":
        return lambda f, x: torchdiv.divergence(f, x, method=method, probes=probes)
    return lambda f, x: torchdiv.divergence(f, x, method=method)


def training_step(
    net: torch.nn.Module, op: Callable[..., torch.Tensor]
) -> Callable[[torch.Tensor], torch.Tensor]:
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = op(net, x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def agree(net: torch.nn.Module, op: Callable[..., torch.Tensor], x: torch.Tensor) -> bool:
    """One compiled and one eager step from the same parameters: same loss and parameters."""
    eager, compiled = copy.deepcopy(net), copy.deepcopy(net)
    loss_e = training_step(eager, op)(x)
    loss_c = torch.compile(training_step(compiled, op))(x)
    same = [torch.allclose(loss_c, loss_e, rtol=1e-4, atol=1e-6)]
    same += [
        torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(compiled.parameters(), eager.parameters(), strict=True)
    ]
    return all(same)


def run_case(case: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    net, x = CASES[case]()
    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(1))
    rows = []
    for method in LAPLACIAN if case == "lap" else DIVERGENCE:
        torch._dynamo.reset()
        op = operator(case, method, probes)
        ok = agree(net, op, x)
        eager_step = training_step(copy.deepcopy(net), op)
        compiled_step = torch.compile(training_step(copy.deepcopy(net), op))
        for _ in range(3):
            eager_step(x)
            compiled_step(x)
        calls = {
            "eager": functools.partial(eager_step, x),
            "compiled": functools.partial(compiled_step, x),
        }
        times = time_interleaved(calls, rounds, min_run_time)
        row = {
            "case": case,
            "method": method,
            "correct": ok,
            "eager_ms": times["eager"]["median_ms"],
            "eager_iqr_ms": times["eager"]["iqr_ms"],
            "compiled_ms": times["compiled"]["median_ms"],
            "compiled_iqr_ms": times["compiled"]["iqr_ms"],
            "ratio": times["compiled"]["median_ms"] / times["eager"]["median_ms"],
        }
        print(
            f"{case:5} {method:22} eager {row['eager_ms']:8.2f} ms (IQR {row['eager_iqr_ms']:.2f}) "
            f"compiled {row['compiled_ms']:8.2f} ms (IQR {row['compiled_iqr_ms']:.2f}) "
            f"ratio {row['ratio']:.2f} correct={ok}",
            flush=True,
        )
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    columns = [
        ("case", "case"),
        ("method", "method"),
        ("eager_ms", "eager ms"),
        ("compiled_ms", "compiled ms"),
        ("ratio", "compiled / eager"),
        ("correct", "same step"),
    ]
    print(markdown(rows, columns))


if __name__ == "__main__":
    script(__doc__, CASES, run_case, "compile_step.json", tables)
