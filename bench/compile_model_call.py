"""One torchdiv call with ``torch.compile(net)`` as ``f`` against the same call with ``net``.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
          .venv/bin/python bench/compile_model_call.py [--cases mlp,conv,lap] [--rounds 7]
          [--min-run-time 0.3] [--json PATH | --update]

The nets of ``bench/compile_step.py`` (float32, parameters trainable), every method; a call is
the operator and the backward pass of its mean square (``x`` does not require grad). The
compiled model uses inductor; ``ratio`` = compiled-model median / eager-model median, both
timed in the same interleaved rounds (``torch.utils.benchmark``). The engines that record
``f`` run the model's original module eagerly (``ratio`` about 1); the others run torchdiv's
call compiled around the model (``torchdiv._core.modes.compiled_like_f``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from _common import markdown, script, time_interleaved, timed_columns
from compile_step import CASES, case_operators


def call(op: Any, f: torch.nn.Module, x: torch.Tensor) -> None:
    op(f, x).square().mean().backward()


def run_case(case: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    rows = []
    for net, x, method, op in case_operators(case):
        calls = {
            "eager": functools.partial(call, op, net, x),
            "compiled": functools.partial(call, op, torch.compile(net), x),
        }
        for _ in range(3):
            for fn in calls.values():
                fn()
        times = time_interleaved(calls, rounds, min_run_time)
        row: dict[str, Any] = {"case": case, "method": method}
        timed_columns(row, times)
        row["ratio"] = row["compiled_ms"] / row["eager_ms"]
        print(
            f"{case:5} {method:22} eager {row['eager_ms']:7.3f} ({row['eager_iqr_ms']:.3f}) "
            f"compiled model {row['compiled_ms']:7.3f} ({row['compiled_iqr_ms']:.3f}) "
            f"ratio {row['ratio']:.3f}",
            flush=True,
        )
        rows.append(row)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    columns = [
        ("case", "case"),
        ("method", "method"),
        ("eager_ms", "net ms"),
        ("eager_iqr_ms", "IQR"),
        ("compiled_ms", "torch.compile(net) ms"),
        ("compiled_iqr_ms", "IQR"),
        ("ratio", "ratio"),
    ]
    print(markdown(rows, columns))


if __name__ == "__main__":
    script(__doc__, CASES, run_case, "compile_model_call.json", tables)
