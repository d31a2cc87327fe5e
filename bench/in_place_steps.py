"""Training steps of nets with in-place activations against the same nets out of place.

A SiLU MLP 16-64-64-16 (divergence by ``"structured"``) and 16-64-64-1 (Laplacian by
``"taylor"``), ``nn.SiLU(inplace=True)`` or not, one loss ``.square().mean().backward()`` a
step, B = 64: the recorders keep a recording with in-place writes across calls (only the
values a write changes recomputed), so the in-place step should cost about what the
out-of-place one does. Timed round-robin (``time_interleaved``: median and IQR of
``torch.utils.benchmark`` blocks), the ratio in-place / out-of-place per method.

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        .venv/bin/python bench/in_place_steps.py [--rounds 5] [--min-run-time 0.5]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import time_interleaved

import torchdiv


def mlp(d_out: int, inplace: bool) -> torch.nn.Module:
    """SiLU MLP ``16 -> 64 -> 64 -> d_out``, its activations in place or not."""
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 64),
        torch.nn.SiLU(inplace=inplace),
        torch.nn.Linear(64, 64),
        torch.nn.SiLU(inplace=inplace),
        torch.nn.Linear(64, d_out),
    )


def steps(x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """One training step per method and activation form."""
    calls: dict[str, Callable[[], None]] = {}
    for inplace in (False, True):
        form = "in place" if inplace else "out of place"
        field, scalar = mlp(16, inplace), mlp(1, inplace)

        def divergence(net: torch.nn.Module = field) -> None:
            torchdiv.divergence(net, x, method="structured").square().mean().backward()

        def laplacian(net: torch.nn.Module = scalar) -> None:
            f = lambda z: net(z).squeeze(-1)  # noqa: E731
            torchdiv.laplacian(f, x, method="taylor").square().mean().backward()

        calls[f"structured divergence, {form}"] = divergence
        calls[f"taylor laplacian, {form}"] = laplacian
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    args = parser.parse_args()
    calls = steps(torch.randn(64, 16))
    for call in calls.values():  # recorded (and watched) before timing
        call()
    times = time_interleaved(calls, args.rounds, args.min_run_time)
    for name, t in times.items():
        print(f"{name:36s} median {t['median_ms']:7.3f} ms  IQR {t['iqr_ms']:6.3f} ms")
    for method in ("structured divergence", "taylor laplacian"):
        ratio = (
            times[f"{method}, in place"]["median_ms"]
            / times[f"{method}, out of place"]["median_ms"]
        )
        print(f"{method}: in place / out of place = {ratio:.2f}")


if __name__ == "__main__":
    main()
