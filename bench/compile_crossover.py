"""Where ``"auto"`` should trace its generic engine into a compiled training step, and where run
its recording engine eagerly (one graph break): both compiled, against the work of the products.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 .venv/bin/python
          bench/compile_crossover.py [--cases mlp,mlp512,wide,conv,lap,mid] [--rounds 5]
          [--min-run-time 0.4] [--json PATH | --update]

Each row: one net and batch, three steps (as ``bench/compile_step.py``: ``zero_grad``, loss =
operator squared and averaged, ``backward``, SGD), each warmed up by three calls:

- ``eager``: the eager step with ``method="auto"`` (the denominator of the targets);
- ``recorded``: ``torch.compile(step)`` with the recording engine run eagerly inside
  (``method="structured"``; the Laplacian: ``"taylor"``);
- ``traced``: ``torch.compile(step)`` with the generic engine traced into the graph
  (``"reverse"``, one chunk; the Laplacian: ``"forward-over-reverse"``), what ``"auto"``
  runs in a compiled region where it does not record.

``traced / recorded`` below 1: tracing is the faster choice inside a compiled step. ``work``:
n x samples x f's multiply-adds per sample as ``"auto"`` estimates them from f's parameters
(``torchdiv._core.crossover``); ``auto`` is what it chooses there (traced at most
``TRACED_WORK`` = 2**23).

Cases (tanh nets, float32, inductor):
  mlp:    MLP d-64-64-d, 64 samples, d in 8, 16, 32, 64
  mlp512: MLP d-64-64-d, 512 samples, d in 16, 32
  wide:   MLP d-256-256-d, 64 samples, d in 2, 16
  conv:   conv net 3-8-8-3 (3x3) on 8 images of 3 x s x s, s in 4, 5, 8
  lap:    PINN d-64-64-1, 256 samples, Laplacian, d in 2, 8, 16, 32
  mid:    near the crossover: MLP d-64-64-d, 64 samples, d in 20, 24
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
from _common import markdown, script, time_interleaved, timed_columns
from compile_step import pinn, training_step
from divergence_exact import convnet, mlp

import torchdiv
from torchdiv._core.crossover import TRACED_WORK, work_per_sample

Problem = tuple[torch.nn.Module, torch.Tensor]


def mlp_problem(d: int, width: int, batch: int) -> Problem:
    return mlp(d, width), torch.randn(batch, d)


def conv_problem(side: int) -> Problem:
    return convnet(8), torch.randn(8, 3, side, side)


def pinn_problem(d: int) -> Problem:
    return pinn(d, 64), torch.randn(256, d)


Sweep = list[tuple[str, int, Callable[[], Problem]]]  # (label, event size, problem maker)
SWEEPS: dict[str, tuple[str, Sweep]] = {  # case -> (operator, sweep)
    "mlp": (
        "divergence",
        [
            (f"MLP {d}-64-64-{d}, B=64", d, functools.partial(mlp_problem, d, 64, 64))
            for d in (8, 16, 32, 64)
        ],
    ),
    "mlp512": (
        "divergence",
        [
            (f"MLP {d}-64-64-{d}, B=512", d, functools.partial(mlp_problem, d, 64, 512))
            for d in (16, 32)
        ],
    ),
    "wide": (
        "divergence",
        [
            (f"MLP {d}-256-256-{d}, B=64", d, functools.partial(mlp_problem, d, 256, 64))
            for d in (2, 16)
        ],
    ),
    "conv": (
        "divergence",
        [
            (f"conv 3-8-8-3, 8x3x{s}x{s}", 3 * s * s, functools.partial(conv_problem, s))
            for s in (4, 5, 8)
        ],
    ),
    "lap": (
        "laplacian",
        [
            (f"PINN {d}-64-64-1, B=256", d, functools.partial(pinn_problem, d))
            for d in (2, 8, 16, 32)
        ],
    ),
    "mid": (
        "divergence",
        [
            (f"MLP {d}-64-64-{d}, B=64", d, functools.partial(mlp_problem, d, 64, 64))
            for d in (20, 24)
        ],
    ),
}
METHODS = {
    "divergence": {"recorded": "structured", "traced": "reverse"},
    "laplacian": {"recorded": "taylor", "traced": "forward-over-reverse"},
}


def run_case(case: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    name, sweep = SWEEPS[case]
    operator = getattr(torchdiv, name)
    rows = []
    for label, n, make in sweep:
        torch.manual_seed(0)
        net, x = make()
        steps = {
            "eager": training_step(copy.deepcopy(net), functools.partial(operator, method="auto"))
        }
        for kind, method in METHODS[name].items():
            torch._dynamo.reset()
            op = functools.partial(operator, method=method)
            steps[kind] = torch.compile(training_step(copy.deepcopy(net), op))
        for step in steps.values():
            for _ in range(3):
                step(x)
        times = time_interleaved(
            {k: functools.partial(s, x) for k, s in steps.items()}, rounds, min_run_time
        )
        work = n * len(x) * work_per_sample(net, n)
        row: dict[str, Any] = {"case": label, "event": n, "samples": len(x), "work": work}
        row["auto"] = "traced" if work <= TRACED_WORK else "recorded"
        timed_columns(row, times)
        row["traced_over_recorded"] = row["traced_ms"] / row["recorded_ms"]
        print(
            f"{label:30} n={n:4} eager {row['eager_ms']:7.2f} recorded {row['recorded_ms']:7.2f} "
            f"(IQR {row['recorded_iqr_ms']:.2f}) traced {row['traced_ms']:7.2f} "
            f"(IQR {row['traced_iqr_ms']:.2f}) traced/recorded {row['traced_over_recorded']:.2f} "
            f"work {work / 1e6:.1f}M auto {row['auto']}",
            flush=True,
        )
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    columns = [
        ("case", "case"),
        ("event", "event size"),
        ("work", "work"),
        ("eager_ms", "eager auto ms"),
        ("recorded_ms", "compiled, recorded ms"),
        ("traced_ms", "compiled, traced ms"),
        ("traced_over_recorded", "traced / recorded"),
        ("auto", "auto compiled"),
    ]
    print(markdown(rows, columns))


if __name__ == "__main__":
    script(__doc__, SWEEPS, run_case, "compile_crossover.json", tables)
