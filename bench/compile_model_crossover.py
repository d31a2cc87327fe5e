"""Where ``"auto"`` with a ``torch.compile``d model as ``f`` (called from eager code) should trace
its generic engine into a compiled call, and where run its recording engine eagerly with the
model's original module: no graph break is at stake there, unlike in a compiled step.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 .venv/bin/python
          bench/compile_model_crossover.py [--cases mlp,mlp512,wide,conv,lap,mid] [--rounds 5]
          [--min-run-time 0.4] [--json PATH | --update]

Each row: one net and batch (the sweeps of ``bench/compile_crossover.py``), three eager
training steps (``zero_grad``, loss = operator squared and averaged, ``backward``, SGD), each
warmed up by three calls:

- ``eager``: ``method="auto"`` with the net (what a recording ``"auto"`` runs with a compiled
  model: its original module, eagerly);
- ``traced``: ``f = torch.compile(net)`` (inductor) with the generic engine traced into
  torchdiv's compiled call (``"reverse"``; the Laplacian: ``"forward-over-reverse"``), what
  ``"auto"`` runs with a compiled model where it traces;
- ``auto``: ``f = torch.compile(net)`` with ``method="auto"``: its choice.

``traced / eager`` below 1: tracing is the faster choice for a compiled model as ``f``. Thread
CPU time (``_common.cpu_quantile_ms``: per round and step the 20 % quantile of the calls made
in ``--min-run-time`` seconds, steps interleaved; the ratio is the median over rounds of the
rounds' ratios, with their range): wall times on the shared machine varied by 0.5-2.7x
between rounds.
``work``: n x samples x f's multiply-adds per sample (``torchdiv._core.crossover``).
"""

from __future__ import annotations

import copy
import functools
import statistics
from typing import Any

import torch
from _common import cpu_interleaved_ms, markdown, script
from compile_crossover import METHODS, SWEEPS
from compile_step import training_step

import torchdiv
from torchdiv._core.crossover import COMPILED_F_WORK, work_per_sample


def run_case(case: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    name, sweep = SWEEPS[case]
    operator = getattr(torchdiv, name)
    traced_method = METHODS[name]["traced"]
    rows = []
    for label, n, make in sweep:
        torch.manual_seed(0)
        net, x = make()
        torch._dynamo.reset()
        auto = functools.partial(operator, method="auto")
        steps = {
            "eager": training_step(copy.deepcopy(net), auto),
            "traced": training_step(
                copy.deepcopy(net), functools.partial(operator, method=traced_method), "model"
            ),
            "auto": training_step(copy.deepcopy(net), auto, "model"),
        }
        calls = {k: functools.partial(step, x) for k, step in steps.items()}
        times = cpu_interleaved_ms(calls, rounds, min_run_time)
        work = n * len(x) * work_per_sample(net, n)
        row: dict[str, Any] = {"case": label, "event": n, "samples": len(x), "work": work}
        row["choice"] = "traced" if work <= COMPILED_F_WORK else "recorded"
        for k, ms in times.items():
            row[f"{k}_ms"] = statistics.median(ms)
        ratios = [t / e for t, e in zip(times["traced"], times["eager"], strict=True)]
        row["traced_over_eager"] = statistics.median(ratios)
        row["traced_over_eager_min"], row["traced_over_eager_max"] = min(ratios), max(ratios)
        autos = [a / e for a, e in zip(times["auto"], times["eager"], strict=True)]
        row["auto_over_eager"] = statistics.median(autos)
        print(
            f"{label:30} n={n:4} work {work / 1e6:5.1f}M eager {row['eager_ms']:7.2f} "
            f"traced {row['traced_ms']:7.2f} auto {row['auto_ms']:7.2f} traced/eager "
            f"{row['traced_over_eager']:.2f} [{min(ratios):.2f}-{max(ratios):.2f}] "
            f"auto/eager {row['auto_over_eager']:.2f} ({row['choice']})",
            flush=True,
        )
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    columns = [
        ("case", "case"),
        ("event", "n"),
        ("work", "work"),
        ("eager_ms", "eager auto ms"),
        ("traced_ms", "compiled f, traced ms"),
        ("traced_over_eager", "traced / eager"),
        ("traced_over_eager_min", "min"),
        ("traced_over_eager_max", "max"),
        ("auto_over_eager", "compiled f, auto / eager"),
        ("choice", "auto with a compiled f"),
    ]
    print(markdown(rows, columns))


if __name__ == "__main__":
    script(__doc__, SWEEPS, run_case, "compile_model_crossover.json", tables)
