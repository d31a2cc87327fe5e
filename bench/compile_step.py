"""Training-step time with torch.compile (inductor), three ways, against the same eager step.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 .venv/bin/python bench/compile_step.py
          [--cases mlp,conv,lap] [--rounds 5] [--min-run-time 0.4]
          [--json PATH | --update]
      .venv/bin/python bench/compile_step.py --report bench/results/compile_step.json

A step: ``zero_grad``, ``loss = op(f, x).square().mean()``, ``backward``, an SGD step. Compiled
(inductor), each timed against the eager step in the same interleaved rounds
(``torch.utils.benchmark``): ``model``, ``f = torch.compile(net)`` in an eager step; ``loss``,
``torch.compile`` of the loss function; ``step``, ``torch.compile(step)`` (the backward and the
optimiser's ``zero_grad`` are graph breaks of Dynamo's, not torchdiv's). Each is warmed up by
three steps; one compiled step and one eager step from the same parameters must give the same
loss and parameters (float32, rtol 1e-4: ``*_correct``). ``*_ratio`` = compiled median / eager
median, round by round: the median of the rounds' ratios and their range (``_min``, ``_max``;
below 1: compiling helps). Times are of whole steps in float32.

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
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _common import markdown, script, time_interleaved, timed_columns
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


MODES = ("model", "loss", "step")  # what is compiled; "eager": nothing


def training_step(
    net: torch.nn.Module,
    op: Callable[..., torch.Tensor],
    mode: str = "eager",
    loss_behind_disable: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """One SGD step on ``op(f, x).square().mean()``, with ``mode`` compiled: ``"model"``,
    ``f = torch.compile(net)``; ``"loss"``, the loss function; ``"step"``, the whole step;
    ``"eager"``, nothing. ``loss_behind_disable``: that loss term behind one
    ``torch.compiler.disable`` (the training guide's advice for the recording methods: no
    graph of the loss's last ops after the break)."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    f = torch.compile(net) if mode == "model" else net

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return op(f, x).square().mean()

    if loss_behind_disable:
        loss_of = torch.compiler.disable(loss_of)

    loss_fn = torch.compile(loss_of) if mode == "loss" else loss_of

    def step(x: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        return loss.detach()

    return torch.compile(step) if mode == "step" else step


def agree(
    net: torch.nn.Module, op: Callable[..., torch.Tensor], x: torch.Tensor, mode: str
) -> bool:
    """One compiled and one eager step from the same parameters: same loss and parameters."""
    eager, compiled = copy.deepcopy(net), copy.deepcopy(net)
    loss_e = training_step(eager, op)(x)
    loss_c = training_step(compiled, op, mode)(x)
    same = [torch.allclose(loss_c, loss_e, rtol=1e-4, atol=1e-6)]
    same += [
        torch.allclose(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(compiled.parameters(), eager.parameters(), strict=True)
    ]
    return all(same)


def case_operators(case: str) -> Iterator[tuple[torch.nn.Module, torch.Tensor, str, Any]]:
    """The case's net and ``x`` with each method's operator (probes drawn once), Dynamo's
    caches reset before each method."""
    torch.manual_seed(0)
    net, x = CASES[case]()
    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(1))
    for method in LAPLACIAN if case == "lap" else DIVERGENCE:
        torch._dynamo.reset()
        yield net, x, method, operator(case, method, probes)


def run_case(case: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    rows = []
    for net, x, method, op in case_operators(case):
        row: dict[str, Any] = {"case": case, "method": method}
        steps = {mode: training_step(copy.deepcopy(net), op, mode) for mode in ("eager", *MODES)}
        for mode in MODES:
            row[f"{mode}_correct"] = agree(net, op, x, mode)
        for _ in range(3):
            for step in steps.values():
                step(x)
        times = time_interleaved(
            {mode: functools.partial(step, x) for mode, step in steps.items()},
            rounds,
            min_run_time,
        )
        timed_columns(row, times)
        line = f"{case:5} {method:22} eager {row['eager_ms']:7.2f} ({row['eager_iqr_ms']:.2f})"
        eager_rounds = times["eager"]["rounds_ms"]
        for mode in MODES:
            ratios = [a / b for a, b in zip(times[mode]["rounds_ms"], eager_rounds, strict=True)]
            row[f"{mode}_ratio"] = statistics.median(ratios)
            row[f"{mode}_ratio_min"], row[f"{mode}_ratio_max"] = min(ratios), max(ratios)
            line += (
                f"  {mode} {row[f'{mode}_ms']:7.2f} ({row[f'{mode}_iqr_ms']:.2f}) "
                f"= {row[f'{mode}_ratio']:.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
                f"{'' if row[f'{mode}_correct'] else ' WRONG'}"
            )
        print(line, flush=True)
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    columns = [("case", "case"), ("method", "method"), ("eager_ms", "eager ms")]
    titles = ("compiled model as f", "compiled loss", "compiled step")
    for mode, title in zip(MODES, titles, strict=True):
        columns += [(f"{mode}_ms", f"{title} ms"), (f"{mode}_ratio", "/ eager")]
        columns += [(f"{mode}_ratio_min", "min"), (f"{mode}_ratio_max", "max")]
    print(markdown(rows, columns))
    wrong = [
        f"{row['case']} {row['method']} {mode}"
        for row in rows
        for mode in MODES
        if not row[f"{mode}_correct"]
    ]
    print("steps unlike eager:", ", ".join(wrong) or "none")


if __name__ == "__main__":
    script(__doc__, CASES, run_case, "compile_step.json", tables)
