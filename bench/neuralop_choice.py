"""Which mode ``divergence(method="auto")`` takes on neuraloperator's FNO and TFNO, and its cost.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
          PYTHONPATH=src .venv/bin/python bench/neuralop_choice.py [--quick] [--cases ...]

Cases: ``fno`` / ``tfno`` (neuraloperator's FNO, and its Tucker TFNO at rank 0.5: 4 x 4
modes, width 6, 2 layers, 1 channel in and out, random init) in float32 and float64 (the
complex weights cast to complex128 by ``_apply``: ``Module.to`` drops their imaginary parts)
on (4, 1, 8, 8) and (4, 1, 16, 16); and, without neuraloperator, two kinds of convolution
the mode rule counts alike (``_exact.plan.OpSizes``): ``pointwise`` (a channel MLP of
kernel-size-1 ``Conv2d``\\ s, 1-16-16-1, tanh, the way FNO lifts and projects) and
``conv3x3`` (the same with 3 x 3 kernels, padding 1), float32 on (4, 1, 16, 16), where
``auto`` runs the structured engine and
the explicit methods compare the generic engines. Wall times on a loaded machine scatter, so
each case is also timed by thread CPU time (``_common.cpu_interleaved_ms``, needs one thread),
which gave the numbers in the limitations guide.

Methods: ``auto`` and the explicit ``reverse`` and ``forward``, checked against ``reverse``
(dtype tolerance), timed round-robin (``torch.utils.benchmark``, median and IQR); the ratio
is to the fastest explicit method. The neuraloperator cases are skipped when the package is
not installed. Writes bench/results/local/neuralop_choice.json.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
from collections.abc import Callable
from typing import Any

import torch
from _common import compare, cpu_interleaved_ms, markdown, script
from torch import nn

import torchdiv

Case = Callable[[], tuple[nn.Module, torch.Tensor]]


def _operator(kind: str, dtype: torch.dtype, n: int) -> tuple[nn.Module, torch.Tensor]:
    """neuraloperator's FNO (``kind="fno"``) or Tucker TFNO, and a (4, 1, n, n) input."""
    from neuralop.models import FNO, TFNO

    torch.manual_seed(0)
    shape = {"n_modes": (4, 4), "hidden_channels": 6, "in_channels": 1, "out_channels": 1}
    model = (
        FNO(**shape, n_layers=2)
        if kind == "fno"
        else TFNO(**shape, n_layers=2, factorization="tucker", rank=0.5)
    )
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    model._apply(lambda t: t.to(complex_dtype if t.is_complex() else dtype))
    return model.requires_grad_(False), torch.randn(4, 1, n, n, dtype=dtype)


def _channel_mlp(kernel: int) -> tuple[nn.Module, torch.Tensor]:
    """A 1-16-16-1 tanh net of ``kernel`` x ``kernel`` convolutions on (4, 1, 16, 16)."""
    torch.manual_seed(0)
    conv = functools.partial(nn.Conv2d, kernel_size=kernel, padding=kernel // 2)
    model = nn.Sequential(conv(1, 16), nn.Tanh(), conv(16, 16), nn.Tanh(), conv(16, 1))
    return model.requires_grad_(False), torch.randn(4, 1, 16, 16)


CASES: dict[str, Case] = {
    f"{kind}-{name}-{n}": functools.partial(_operator, kind, dtype, n)
    for kind in ("fno", "tfno")
    for name, dtype in (("f32", torch.float32), ("f64", torch.float64))
    for n in (8, 16)
}
CASES["pointwise"] = functools.partial(_channel_mlp, 1)
CASES["conv3x3"] = functools.partial(_channel_mlp, 3)


def run_case(name: str, rounds: int, min_run_time: float) -> list[dict[str, Any]]:
    """Time auto, reverse and forward on one case (nothing if it needs a missing package)."""
    if name.startswith(("fno", "tfno")) and importlib.util.find_spec("neuralop") is None:
        print(f"{name}: skipped (neuraloperator is not installed)")
        return []
    model, x = CASES[name]()
    calls = {
        m: functools.partial(torchdiv.divergence, model, x, method=m)
        for m in ("auto", "reverse", "forward")
    }
    rtol = 1e-4 if x.dtype == torch.float32 else 1e-6  # (the spectrum stays complex64: notes)
    best = lambda t: min(t["reverse"]["median_ms"], t["forward"]["median_ms"])  # noqa: E731
    rows = compare(
        {"case": name}, calls, calls["reverse"](), rtol, rounds, min_run_time, ("x_best", best)
    )
    rounds_ms = cpu_interleaved_ms(calls, rounds, min_run_time)
    cpu = {k: statistics.median(v) for k, v in rounds_ms.items()}
    for row in rows:
        row["cpu_ms"] = cpu[row["method"]]
        row["cpu_x_best"] = cpu[row["method"]] / min(cpu["reverse"], cpu["forward"])
    print(name, "thread CPU ms:", {k: round(v, 2) for k, v in cpu.items()}, flush=True)
    return rows


def tables(rows: list[dict[str, Any]]) -> None:
    """One line per case: each method's median (ms) and auto's ratio to the best explicit one."""
    by_case: dict[str, dict[str, Any]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {"case": row["case"]})[row["method"]] = row.get("median_ms")
        by_case[row["case"]][f"cpu_{row['method']}"] = row.get("cpu_ms")
        if row["method"] == "auto":
            by_case[row["case"]]["x_best"] = row.get("x_best")
            by_case[row["case"]]["cpu_x_best"] = row.get("cpu_x_best")
    columns = [("case", "case"), ("auto", "auto ms"), ("reverse", "reverse ms")]
    columns += [("forward", "forward ms"), ("x_best", "auto / best")]
    columns += [(f"cpu_{m}", f"{m} CPU ms") for m in ("auto", "reverse", "forward")]
    columns += [("cpu_x_best", "auto / best, CPU")]
    print(markdown(list(by_case.values()), columns))


if __name__ == "__main__":
    script(__doc__, CASES, run_case, "neuralop_choice.json", tables)
