"""Where a compiled training step spends the time it loses when torchdiv records ``f`` (one
graph break at the call): the torchdiv call itself against the rest of the step.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
          .venv/bin/python bench/compile_overhead.py [--cases mlp,conv,lap] [--rounds 7]
          [--min-run-time 0.5] [--json PATH | --update]

The steps of ``bench/compile_step.py`` (inductor, float32), for the methods that record ``f``
(divergence: ``"structured"``; Laplacian: ``"taylor"``, ``"grad-of-grad"``) and for two
stand-ins of the same net without torchdiv, whose operator is ``f(x).sum(-1)``:

- ``break``: run eagerly behind ``torch.compiler.disable`` (the break a recording call makes);
- ``traced``: traced into the graph (no break of its own).

Each step runs eagerly and ``torch.compile``d in interleaved rounds. The operator's own time
inside each step is measured by a timer around it (the timer sits inside the break, so the
compiled step's structure is that of the recording call: one break at the operator); the
rest of the step is the step's median minus the operator's mean. Per compiled step,
``torch._dynamo.explain`` counts the graphs and graph breaks (Dynamo breaks a step at
``zero_grad`` and ``backward`` itself, 2 breaks and 3 graphs without an operator's break).
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import markdown, script, time_interleaved, timed_columns
from compile_step import CASES, training_step

import torchdiv

Op = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def stand_in(f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return f(x).reshape(len(x), -1).sum(-1)


def operators(case: str) -> dict[str, tuple[Op, bool]]:
    """name -> (operator, whether it runs eagerly behind a break)."""
    name = "laplacian" if case == "lap" else "divergence"
    methods = ("taylor", "grad-of-grad") if case == "lap" else ("structured",)
    ops: dict[str, tuple[Op, bool]] = {
        m: (functools.partial(getattr(torchdiv, name), method=m), True) for m in methods
    }
    ops["stand-in, break"] = (stand_in, True)
    ops["stand-in, traced"] = (stand_in, False)
    return ops


class Timed:
    """``op`` with the seconds spent in it summed over its calls."""

    def __init__(self, op: Op) -> None:
        self.op, self.seconds, self.calls = op, 0.0, 0

    def __call__(self, f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.op(f, x)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def mean_ms(self) -> float:
        return 1e3 * self.seconds / max(self.calls, 1)


def graphs(step: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[int, int]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x)
    torch._dynamo.reset()
    return explained.graph_count, explained.graph_break_count


def run_case(case: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    net, x = CASES[case]()
    rows = []
    for method, (op, breaks) in operators(case).items():
        timers = {"eager": Timed(op), "compiled": Timed(op)}
        inner: dict[str, Op] = {  # a timer is Python Dynamo cannot trace: only behind a break
            k: torch.compiler.disable(t) if breaks else op for k, t in timers.items()
        }
        count, broken = graphs(training_step(copy.deepcopy(net), inner["compiled"]), x)
        steps = {
            "eager": training_step(copy.deepcopy(net), inner["eager"]),
            "compiled": torch.compile(training_step(copy.deepcopy(net), inner["compiled"])),
        }
        for step in steps.values():
            for _ in range(3):
                step(x)
        for t in timers.values():
            t.seconds, t.calls = 0.0, 0
        times = time_interleaved(
            {k: functools.partial(s, x) for k, s in steps.items()}, rounds, min_run_time
        )
        row: dict[str, Any] = {"case": case, "method": method, "graphs": count, "breaks": broken}
        timed_columns(row, times)
        for kind in steps:
            row[f"{kind}_op_ms"] = timers[kind].mean_ms() if breaks else float("nan")
            row[f"{kind}_rest_ms"] = row[f"{kind}_ms"] - row[f"{kind}_op_ms"]
        row["ratio"] = row["compiled_ms"] / row["eager_ms"]
        print(
            f"{case:5} {method:18} eager {row['eager_ms']:6.3f} (op {row['eager_op_ms']:6.3f}) "
            f"compiled {row['compiled_ms']:6.3f} (op {row['compiled_op_ms']:6.3f}) "
            f"ratio {row['ratio']:.2f} graphs {count} breaks {broken}",
            flush=True,
        )
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    columns = [
        ("case", "case"),
        ("method", "operator"),
        ("eager_ms", "eager step ms"),
        ("compiled_ms", "compiled step ms"),
        ("ratio", "compiled / eager"),
        ("eager_op_ms", "operator, eager step"),
        ("compiled_op_ms", "operator, compiled step"),
        ("eager_rest_ms", "rest, eager"),
        ("compiled_rest_ms", "rest, compiled"),
        ("graphs", "graphs"),
        ("breaks", "breaks"),
    ]
    print(markdown(rows, columns))


if __name__ == "__main__":
    script(__doc__, CASES, run_case, "compile_overhead.json", tables)
