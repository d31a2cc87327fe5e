"""Run one case of one operator: check every method against the exact reference, then measure.

A method is first called once and compared with the reference (float64 where the model allows):
an exact method off by more than its dtype's tolerance is WRONG and is neither measured nor
timed; one that raises is reported with its error; one that would not fit is skipped with the
reason. The rest get their peak memory from one call and are then timed side by side.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from torchdiv import _structured
from torchdiv._bench.memory import peak_memory_mb
from torchdiv._bench.operators import Operator, relative_error, tolerance
from torchdiv._bench.suite import Case
from torchdiv._bench.timing import OverTime, deadline, time_interleaved

Progress = Callable[[str, int], None]  # (what is running, steps done)


def steps(methods: list[str], rounds: int) -> int:
    """Progress steps of one case: the reference, one check per method, the timing rounds."""
    return 1 + len(methods) * (1 + rounds)


def run_case(
    operator: Operator,
    case: Case,
    methods: list[str],
    rounds: int,
    min_run_time: float,
    progress: Progress = lambda what, n: None,
    time_limit: float | None = None,
) -> list[dict[str, Any]]:
    """One row per method: status, relative error, peak MiB, median and IQR ms.

    ``time_limit`` (seconds) bounds each method: its checking call is stopped there, and a
    method whose one call, repeated for the memory measurement and every timing round, would
    take longer is skipped (status ``skipped``, ``limit_s`` set).
    """
    problem = case.make()
    progress(f"{case.title}: exact reference", 0)
    try:
        reference = operator.reference(problem.f64, problem.x64).detach()
    except Exception as exc:
        raise ValueError(
            f"{operator.name} on {case.title}: the exact reference failed: {_first_line(exc)}. "
            "It runs torch.func on one sample at a time: is the model batch-independent, "
            "and free of data-dependent Python control flow?"
        ) from exc
    y = problem.f(problem.x)
    check_shapes(operator, case, problem.x, y, reference)
    # what method="structured" does with f: a chain, how many colours, or every column
    plan = _structured.describe(problem.f, problem.x) if "structured" in methods else None
    device = problem.x.device
    progress(f"{case.title}: checking", 1)
    rows, calls = [], {}
    for key in methods:
        method = operator.methods[key]
        row: dict[str, Any] = {
            "operator": operator.name,
            "family": case.family,
            "case": case.title,
            "dim": case.dim,
            "batch": case.batch,
            "setting": case.setting,
            "dtype": str(problem.x.dtype).removeprefix("torch."),
            "method": key,
            "label": method.label,
            "baseline": method.baseline,
            "stochastic": method.stochastic,
        }
        if key == "structured" and plan is not None:
            row["plan"] = plan
        call = functools.partial(method.call, problem.f, problem.x)
        with deadline(time_limit):
            checked = _check(call, method.skip, problem.x, y, reference, method.stochastic)
        row.update(checked)
        row.update(_over_time(row, time_limit, rounds, min_run_time))
        if row["status"] == "ok":
            row["peak_mb"] = peak_memory_mb(call, device)
            calls[key] = call
        rows.append(row)
        progress(f"{case.title}: checked {method.label}", 1)
    progress(f"{case.title}: timing", rounds * (len(methods) - len(calls)))
    times = time_interleaved(
        calls, rounds, min_run_time, on_round=lambda key: progress(f"{case.title}: {key}", 1)
    )
    for row in rows:
        row.update(times.get(row["method"], {}))
    _ratios(rows)
    return rows


def _check(
    call: Callable[[], torch.Tensor],
    skip: Callable[[torch.Tensor, torch.Tensor], str | None] | None,
    x: torch.Tensor,
    y: torch.Tensor,
    reference: torch.Tensor,
    stochastic: bool,
) -> dict[str, Any]:
    reason = skip(x, y) if skip is not None else None
    if reason is not None:
        return {"status": "skipped", "note": reason}
    start = time.perf_counter()
    try:
        out = call()
        seconds = time.perf_counter() - start
        err = relative_error(out, reference)
    except OverTime as exc:
        return {"status": "skipped", "note": str(exc), "call_s": time.perf_counter() - start}
    except Exception as exc:
        return {"status": "error", "note": _first_line(exc)}
    # judged at the precision of the coarser of x and f(x) (a float32 model fed float64)
    limit = max(tolerance(x.dtype), tolerance(y.dtype))
    if stochastic or err <= limit:
        return {"status": "ok", "rel_err": err, "call_s": seconds}
    return {
        "status": "WRONG",
        "rel_err": err,
        "note": f"relative error {err:.2g} > {limit:.0e}; not timed",
    }


def _over_time(
    row: dict[str, Any], limit: float | None, rounds: int, min_run_time: float
) -> dict[str, Any]:
    """``row``'s update if the method does not fit in ``limit`` seconds: stopped while checked,
    or one call (``call_s``) times the memory call and every timing round (each at least
    ``min_run_time``) beyond it."""
    if limit is None or "call_s" not in row:
        return {}
    call = row["call_s"]
    if row["status"] == "skipped":  # stopped by the deadline
        note = f"over {limit:g} s: stopped after {call:.1f} s while checking it; not timed"
        return {"limit_s": limit, "note": note}
    needed = 2 * call + rounds * max(call, min_run_time)
    if row["status"] != "ok" or needed <= limit:
        return {}
    return {
        "status": "skipped",
        "limit_s": limit,
        "note": f"over {limit:g} s: one call took {call:.1f} s, so measuring and timing it "
        f"would take about {needed:.0f} s; not timed (raise --time-limit)",
    }


def check_shapes(
    operator: Operator, case: Case, x: torch.Tensor, y: torch.Tensor, reference: torch.Tensor
) -> None:
    """A model the operator does not apply to is an error, not a table of meaningless timings:
    square operators need as many outputs as inputs per sample, and the reference must have
    one entry per element of the operator (a Laplacian per output component)."""
    n, m = x[0].numel(), y[0].numel()
    if operator.square and n != m:
        raise ValueError(
            f"{operator.name} on {case.title}: needs f(x) with as many elements per sample as x, "
            f"got f(x) of shape {tuple(y.shape)} for x of shape {tuple(x.shape)}; try "
            "--operator jacobian (or laplacian for one scalar per sample)"
        )
    if operator.name == "laplacian" and reference.numel() != y.numel():
        raise ValueError(
            f"laplacian on {case.title}: the baselines compute one scalar per sample, but f(x) "
            f"has shape {tuple(y.shape)}; benchmark a model with one output per sample (of the "
            "built-in nets: --family scalar)"
        )


def _ratios(rows: list[dict[str, Any]]) -> None:
    """``vs_best_baseline``: median over the fastest correct exact baseline's median."""
    timed = [
        r["median_ms"] for r in rows if r["baseline"] and not r["stochastic"] and "median_ms" in r
    ]
    if not timed:
        return
    for row in rows:
        if "median_ms" in row:
            row["vs_best_baseline"] = row["median_ms"] / min(timed)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
