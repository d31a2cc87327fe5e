"""What a compiled training step around a recording torchdiv call costs over the eager step, in
parts: Dynamo's handling of a small compiled step at all, the graph break, torchdiv's own frame.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 .venv/bin/python
          bench/compile_break_cost.py [--cases mlp,conv,lap] [--rounds 7] [--min-run-time 0.3]
          [--json PATH | --update]

Thread CPU time, not wall time: on a shared machine the wall time of a 1 ms step varied by
0.3-4.6x between rounds, its CPU time by far less. Per round and step, the 20 % quantile of the
CPU times of the calls made in ``--min-run-time`` seconds (the least disturbed calls; a step's
own cost, not the machine's load), steps interleaved, the median over rounds; ``+us``: the
compiled step's CPU time minus the eager one's, round by round, median. The steps are those of
``bench/compile_step.py`` (inductor, float32), ``torch.compile``d as a whole (``step``) or the
loss only (``loss``), each against the same eager step:

- ``torchdiv``: the recording method (``"structured"``; the Laplacian: ``"taylor"``) as a user
  calls it, ``lambda f, x: torchdiv.divergence(f, x, method=...)``: one break, at torchdiv's
  call (Dynamo compiles the public function's wrapper as a frame of its own, which breaks at
  once);
- ``torchdiv behind disable``: the same lambda behind ``torch.compiler.disable``: the break at
  the user's call, no frame of torchdiv's or of the lambda;
- ``loss term behind disable``: the whole loss term, ``op(f, x).square().mean()``, behind one
  ``torch.compiler.disable`` (the training guide's advice): no graph of the loss's last ops
  after the break (its ``loss`` column is the eager loss inside a compiled nothing);
- ``eager against itself``: the recording method's eager step timed against a second copy
  of itself in both columns, a control: what the timing reports for two equal steps (this
  machine's noise and the order of the steps within a round), the least difference the
  other rows resolve;
- ``stand-in, break``: an operator of almost no work, ``f(x).sum(-1)``, behind
  ``torch.compiler.disable``: the break alone;
- ``stand-in, torchdiv's entry``: the same operator behind torchdiv's entry wrapper
  (``torchdiv._core.modes.eager_when``, told that it records): the break of a recording call,
  frame for frame, around almost no work (minus the ``stand-in, break`` row: torchdiv's own
  frame);
- ``stand-in, traced``: the same operator traced into the graph: no break at all.
"""

from __future__ import annotations

import copy
import functools
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _common import cpu_interleaved_ms, markdown, script
from compile_step import CASES, training_step

import torchdiv
from torchdiv._core.modes import eager_when

Op = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def stand_in(f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return f(x).reshape(len(x), -1).sum(-1)


def operators(case: str) -> dict[str, Op]:
    if case == "lap":

        def recorded(f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return torchdiv.laplacian(f, x, method="taylor")
    else:

        def recorded(f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
            return torchdiv.divergence(f, x, method="structured")

    return {
        "torchdiv": recorded,
        "torchdiv behind disable": torch.compiler.disable(recorded),
        "loss term behind disable": recorded,
        "eager against itself": recorded,
        "stand-in, break": torch.compiler.disable(stand_in),
        "stand-in, torchdiv's entry": eager_when(lambda *_, **__: True)(stand_in),
        "stand-in, traced": stand_in,
    }


def run_case(case: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    net, x = CASES[case]()
    rows = []
    for name, op in operators(case).items():
        torch._dynamo.reset()
        eager_op = stand_in if name.startswith("stand-in") else operators(case)["torchdiv"]
        steps = {"eager": training_step(copy.deepcopy(net), eager_op)}
        whole = name == "loss term behind disable"
        for mode in ("step", "loss"):
            compiled = "eager" if name == "eager against itself" else mode
            steps[mode] = training_step(copy.deepcopy(net), op, compiled, whole)
        calls = {k: functools.partial(step, x) for k, step in steps.items()}
        times = cpu_interleaved_ms(calls, rounds, min_run_time)
        row: dict[str, Any] = {"case": case, "operator": name}
        row["eager_ms"] = statistics.median(times["eager"])
        line = f"{case:5} {name:24} eager {row['eager_ms']:6.3f}"
        for mode in ("step", "loss"):
            pairs = list(zip(times[mode], times["eager"], strict=True))
            ratios = [c / e for c, e in pairs]
            row[f"{mode}_ms"] = statistics.median(times[mode])
            row[f"{mode}_ratio"] = statistics.median(ratios)
            row[f"{mode}_ratio_min"], row[f"{mode}_ratio_max"] = min(ratios), max(ratios)
            row[f"{mode}_extra_us"] = statistics.median(1e3 * (c - e) for c, e in pairs)
            line += (
                f"  {mode} {row[f'{mode}_ms']:6.3f} = {row[f'{mode}_ratio']:.3f} "
                f"[{min(ratios):.2f}-{max(ratios):.2f}] {row[f'{mode}_extra_us']:+.0f} us"
            )
        print(line, flush=True)
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    columns = [("case", "net"), ("operator", "operator"), ("eager_ms", "eager step ms")]
    for mode, title in (("step", "compiled step"), ("loss", "compiled loss")):
        columns += [(f"{mode}_ratio", f"{title} / eager"), (f"{mode}_ratio_min", "min")]
        columns += [(f"{mode}_ratio_max", "max"), (f"{mode}_extra_us", "+us")]
    print(markdown(rows, columns))


if __name__ == "__main__":
    script(__doc__, CASES, run_case, "compile_break_cost.json", tables)
