"""Overhead of sample-mixing detection (``torchdiv._core.mixing``) on small problems.

Each case is timed with detection on (the default) and off (inside
``torchdiv.allow_batch_interaction()``, where no batch axes are followed: the code path of
torchdiv before detection existed), interleaved in the same rounds, so the ratio is the
detection's cost on this machine. Run it alone (flock) on an idle machine:

    flock /tmp/torchdiv-bench.lock env OMP_WAIT_POLICY=PASSIVE python bench/sample_mixing.py

Prints a markdown table (median and IQR in ms, ratio on/off; and the best of many short
repeats, which resists a loaded machine better); writes nothing.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from typing import Any

import torch
from _common import markdown, time_interleaved

import torchdiv


def _mlp(dim: int, width: int, out: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, width),
        torch.nn.Tanh(),
        torch.nn.Linear(width, out),
    )


def _cases() -> dict[str, tuple[str, Callable[[], Any]]]:
    """name -> (the path it takes, the call)."""
    torch.manual_seed(0)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 2, 3, padding=1)
    )
    mlp8, mlp32, scalar = _mlp(8, 64, 8), _mlp(32, 64, 32), _mlp(8, 64, 1)
    x8, x32 = torch.randn(64, 8), torch.randn(64, 32)
    x128, images, line = torch.randn(128, 32), torch.randn(8, 2, 4, 4), torch.randn(4096)
    return {
        "divergence D=8 B=64": ("tiny: unwatched", lambda: torchdiv.divergence(mlp8, x8)),
        "divergence D=32 B=64": ("structured recorder", lambda: torchdiv.divergence(mlp32, x32)),
        "jacobian D=32 B=64": ("OpSizes (watched plan)", lambda: torchdiv.jacobian(mlp32, x32)),
        "divergence conv 2x4x4 B=8": (
            "structured recorder",
            lambda: torchdiv.divergence(conv, images),
        ),
        "hutchinson r=1 D=32 B=128": (
            "one probe: graph walk",
            lambda: torchdiv.divergence(mlp32, x128, method="hutchinson", num_probes=1),
        ),
        "laplacian D=8 B=64": ("Taylor recorder", lambda: torchdiv.laplacian(scalar, x8)),
        "divergence sin, empty event B=4096": (
            "tiny, empty event: watched",
            lambda: torchdiv.divergence(torch.sin, line),
        ),
    }


def _off(call: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torchdiv.allow_batch_interaction():
            return call()

    return run


def _best(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` interleaved runs of 5 calls each, in ms per call."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            best[name] = min(best[name], timeit.timeit(call, number=5) / 5 * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args()
    rows = []
    for name, (path, call) in _cases().items():
        times = time_interleaved({"on": call, "off": _off(call)}, args.rounds, args.min_run_time)
        on, off = times["on"], times["off"]
        best = _best({"on": call, "off": _off(call)}, args.rounds * 4)
        rows.append(
            {
                "case": name,
                "path": path,
                "on_ms": round(on["median_ms"], 3),
                "on_iqr": round(on["iqr_ms"], 3),
                "off_ms": round(off["median_ms"], 3),
                "off_iqr": round(off["iqr_ms"], 3),
                "on/off": round(on["median_ms"] / off["median_ms"], 3),
                "best_on_ms": round(best["on"], 3),
                "best_off_ms": round(best["off"], 3),
                "best on/off": round(best["on"] / best["off"], 3),
            }
        )
        print(rows[-1], flush=True)
    columns = [(k, k) for k in rows[0]]
    print(markdown(rows, columns))


if __name__ == "__main__":
    main()
