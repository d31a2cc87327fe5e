"""Shared benchmark plumbing for the scripts in bench/: the package's helpers, re-exported.

Timing (torch.utils.benchmark, interleaved rounds), peak memory, the machine description,
JSON and markdown tables live in ``torchdiv._bench`` (``python -m torchdiv bench`` uses them
too); the scripts here import them from this module by the names below.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from torchdiv._bench.cli import positive
from torchdiv._bench.memory import peak_memory_mb
from torchdiv._bench.report import machine, markdown, write_json
from torchdiv._bench.timing import time_interleaved

RESULTS = Path(__file__).parent / "results"  # the committed results behind the README's tables
LOCAL = RESULTS / "local"  # where new runs write (git-ignored), unless --update

__all__ = [
    "LOCAL",
    "RESULTS",
    "add_output_options",
    "output_path",
    "compare",
    "watches_in",
    "cpu_quantile_ms",
    "alike_rounds",
    "machine",
    "markdown",
    "peak_memory_mb",
    "script",
    "time_interleaved",
    "timed_columns",
    "write_json",
]

Times = dict[str, dict[str, float]]


def timed_columns(row: dict[str, Any], times: Any) -> None:
    """Copy each call's median and IQR from ``time_interleaved``'s ``times`` into ``row``, as
    ``{name}_ms`` and ``{name}_iqr_ms``."""
    for name, t in times.items():
        row[f"{name}_ms"] = t["median_ms"]
        row[f"{name}_iqr_ms"] = t["iqr_ms"]


def cpu_quantile_ms(step: Callable[[], Any], seconds: float, q: float = 0.2) -> float:
    """The ``q`` quantile of ``step``'s thread CPU times (ms) over the calls made in
    ``seconds`` of wall time (at least 5).

    Raises:
        RuntimeError: torch runs more than one thread: this thread's clock would miss the
            work of the others (run with ``OMP_NUM_THREADS=1``, as the scripts say).
    """
    if torch.get_num_threads() != 1:
        raise RuntimeError(
            f"thread CPU time counts this thread only, and torch runs {torch.get_num_threads()}: "
            "run with OMP_NUM_THREADS=1 (or torch.set_num_threads(1))"
        )
    times: list[int] = []
    stop = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < stop:
        start = time.thread_time_ns()
        step()
        times.append(time.thread_time_ns() - start)
    times.sort()
    return times[int(q * len(times))] / 1e6


def alike_rounds(
    calls: dict[str, Callable[[], Any]], rounds: int, measure: Callable[[Callable[[], Any]], float]
) -> dict[str, list[float]]:
    """``measure(call)`` for every call in each of ``rounds`` rounds, every call treated alike:
    each measurement starts right after one untimed call of the same ``call`` (what the call
    before left behind, the C allocator's mappings and free lists, the caches, is its own), and
    the order of the calls is reversed every other round (none always comes first, or always
    after the same other call). Where one call outlasts ``measure``'s budget, it is the
    measurement, and its time depended on its predecessor (issue 18)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for r in range(rounds):
        for k, call in list(calls.items())[:: 1 if r % 2 == 0 else -1]:
            call()
            times[k].append(measure(call))
    return times


def cpu_interleaved_ms(
    steps: dict[str, Callable[[], Any]], rounds: int, seconds: float
) -> dict[str, list[float]]:
    """Each step's ``cpu_quantile_ms`` per round, the steps alternated within every round
    (after three warm-up calls each: compilation, plans)."""
    for step in steps.values():
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            times[k].append(cpu_quantile_ms(step, seconds))
    return times


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


def add_output_options(parser: argparse.ArgumentParser, name: str) -> None:
    """``--json PATH`` and ``--update``: a run writes ``bench/results/local/NAME`` (git-ignored)
    unless told otherwise, so trying a command never replaces the committed results."""
    parser.add_argument(
        "--json", type=Path, help=f"write the results here (default: bench/results/local/{name})"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help=f"replace the committed bench/results/{name} (needs every case: no --cases)",
    )


def output_path(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str, cases: Iterable[str]
) -> Path:
    """Where this run's JSON goes (``add_output_options``); ``--update`` with a subset of the
    cases or with ``--json`` is an error."""
    if not args.update:
        return args.json or LOCAL / name
    if args.json is not None:
        parser.error(f"--update writes bench/results/{name}; drop --json {args.json}")
    if sorted(args.cases.split(",")) != sorted(cases):
        parser.error(
            f"--update replaces the committed results of every case; --cases {args.cases} "
            "would leave only those: run it without --update (it writes bench/results/local/)"
        )
    return RESULTS / name


def script(
    doc: str,
    cases: dict[str, Any],
    run_case: Callable[[str, int, float], list[dict[str, Any]]],
    name: str,
    tables: Callable[[list[dict[str, Any]]], None],
) -> None:
    """The command line every script in bench/ shares: run cases (or reread a JSON), write the
    JSON (``output_path``), print the tables."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=positive(int), default=5, help="round-robin timing rounds")
    parser.add_argument(
        "--min-run-time", type=positive(float), default=0.4, help="seconds per round"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short look: 2 rounds of 0.1 s (instead of --rounds, --min-run-time); noisier",
    )
    parser.add_argument("--cases", default=",".join(cases), help="comma-separated case names")
    parser.add_argument("--report", type=Path, help="print the tables of a saved JSON, run nothing")
    add_output_options(parser, name)
    args = parser.parse_args()
    if args.quick:
        if args.update:
            parser.error("--update keeps the committed results at full effort: drop --quick")
        args.rounds, args.min_run_time = 2, 0.1
    unknown = [c for c in args.cases.split(",") if c not in cases]
    if unknown:
        parser.error(f"--cases {unknown[0]!r} is unknown; choose from {', '.join(cases)}")
    if args.report:
        rows = json.loads(args.report.read_text())["rows"]
    else:
        path = output_path(parser, args, name, cases)
        rows = [
            row
            for case in args.cases.split(",")
            for row in run_case(case, args.rounds, args.min_run_time)
        ]
        write_json(path, rows)
        print(f"wrote {path}")
    tables(rows)


def watches_in(calls: dict[str, Callable[[], Any]], n: int = 10) -> dict[str, int]:
    """How many watches for sample mixing ``n`` calls of each of ``calls`` start (one
    ``torchdiv._core.mixing.tracker.BatchAxes`` each, counted where ``watch`` makes it; the
    count stays on for the rest of the process)."""
    from torchdiv._core.mixing import tracker, watch

    started: list[int] = []

    class Counted(tracker.BatchAxes):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            started.append(1)
            super().__init__(*args, **kwargs)

    watch.BatchAxes = Counted  # type: ignore[misc]
    counts = {}
    for name, call in calls.items():
        before = len(started)
        for _ in range(n):
            call()
        counts[name] = len(started) - before
    return counts
