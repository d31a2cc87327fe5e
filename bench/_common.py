"""Shared benchmark plumbing for the scripts in bench/: the package's helpers, re-exported.

Timing (torch.utils.benchmark, interleaved rounds), peak memory, the machine description,
JSON and markdown tables live in ``torchdiv._bench`` (``python -m torchdiv bench`` uses them
too); the scripts here import them from this module by the names below.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torchdiv._bench.memory import peak_memory_mb
from torchdiv._bench.report import machine, markdown, write_json
from torchdiv._bench.timing import time_interleaved

RESULTS = Path(__file__).parent / "results"

__all__ = [
    "RESULTS",
    "compare",
    "machine",
    "markdown",
    "peak_memory_mb",
    "script",
    "time_interleaved",
    "write_json",
]

Times = dict[str, dict[str, float]]


def compare(
    fields: dict[str, Any],
    calls: dict[str, Callable[[], torch.Tensor]],
    reference: torch.Tensor,
    rtol: float,
    rounds: int,
    min_run_time: float,
    ratio: tuple[str, Callable[[Times], float]],
    unchecked: dict[str, Callable[[], Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per call: agreement with ``reference`` (``allclose`` at ``rtol``, ``atol`` =
    ``rtol`` times its largest entry), peak memory, and, for the calls that agree, interleaved
    times and ``ratio = (key, denominator(times))``. ``unchecked`` calls (a forward pass of
    ``f``, for scale) are timed in the same rounds without a check. Each row starts with
    ``fields`` and is printed as it is done."""
    atol = rtol * reference.abs().max().item()
    rows, timed = [], {}
    for method, call in (unchecked or {}).items():
        rows.append({**fields, "method": method, "correct": None, "peak_mb": peak_memory_mb(call)})
        timed[method] = call
    for method, call in calls.items():
        out = call()
        ok = torch.allclose(out.reshape(reference.shape), reference, rtol=rtol, atol=atol)
        rows.append(
            {
                **fields,
                "method": method,
                "correct": ok,
                "differentiable": out.requires_grad,
                "peak_mb": peak_memory_mb(call),
            }
        )
        if ok:  # a method that disagrees with the reference is reported, not timed
            timed[method] = call
    times = time_interleaved(timed, rounds, min_run_time)
    key, denominator = ratio
    for row in rows:
        row.update(times.get(row["method"], {}))
        if "median_ms" in row:
            row[key] = row["median_ms"] / denominator(times)
        print(
            " ".join(f"{v}" for v in fields.values()),
            f"{row['method']:32s} {row.get('median_ms', float('nan')):8.2f} ms "
            f"(IQR {row.get('iqr_ms', float('nan')):6.2f})  x{row.get(key, float('nan')):5.2f}  "
            f"peak {row['peak_mb']:7.1f} MiB  correct={row['correct']}",
            flush=True,
        )
    return rows


def script(
    doc: str,
    cases: dict[str, Any],
    run_case: Callable[[str, int, float], list[dict[str, Any]]],
    default_json: Path,
    tables: Callable[[list[dict[str, Any]]], None],
) -> None:
    """The command line every script in bench/ shares: run cases (or reread a JSON), write the
    JSON, print the tables."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="round-robin timing rounds")
    parser.add_argument("--min-run-time", type=float, default=0.4, help="seconds per round")
    parser.add_argument("--cases", default=",".join(cases), help="comma-separated case names")
    parser.add_argument("--json", type=Path, default=default_json)
    parser.add_argument("--report", type=Path, help="print the tables of a saved JSON, run nothing")
    args = parser.parse_args()
    if args.report:
        rows = json.loads(args.report.read_text())["rows"]
    else:
        rows = [
            row
            for name in args.cases.split(",")
            for row in run_case(name, args.rounds, args.min_run_time)
        ]
        write_json(args.json, rows)
    tables(rows)
