"""Where ``value_grad_laplacian(coordinates=...)``'s ``"auto"`` takes the gradient by
``jacobian`` instead of the Taylor sweep's first-order terms
(``torchdiv._api.second_order.SPLIT_OUTSIDE``): scalar tanh MLPs D-64-64-64-1 with the
Laplacian over a few coordinates, the one sweep (every input's direction) against the split
(the sweep along the coordinates, the gradient by ``jacobian``) and the two-call recipe
(``jacobian`` + ``laplacian(coordinates=)``), frozen and with a residual loss's backward pass,
timed round-robin in one process.

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 \\
          .venv/bin/python bench/vgl_coordinates.py [--rounds 5]

``torch.utils.benchmark`` medians (``blocked_autorange``, 0.3 s per measurement, through
``torchdiv._bench.timing.time_interleaved``); per case the median and IQR of each route and the
ratios sweep / split round by round. Inputs left out of the coordinates: D - k.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import torchdiv
from torchdiv._api import second_order
from torchdiv._bench.timing import time_interleaved

CASES = [(3, 2, 256), (6, 2, 256), (10, 2, 256), (10, 2, 2048), (16, 2, 256), (32, 3, 1024)]
NEVER, ALWAYS = 1 << 30, 0  # SPLIT_OUTSIDE forcing the one sweep / the split


def _mlp(d: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for width_in, width_out in ((d, 64), (64, 64), (64, 64)):
        layers += [nn.Linear(width_in, width_out), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 1))


def _routes(net: nn.Module, x: torch.Tensor, k: int, train: bool) -> dict[str, Callable[[], None]]:
    """The three routes to ``u``, ``∇u`` and ``Δ_S u`` (S: the first ``k`` coordinates)."""
    f = lambda z: net(z).squeeze(-1)  # noqa: E731
    coordinates = list(range(k))

    def finish(gradient: torch.Tensor, laplacian: torch.Tensor) -> None:
        if train:  # a space-time residual: u_t - Δ_x u, t the last input
            (gradient[:, -1] - laplacian).square().mean().backward()

    def one_call(split_outside: int) -> Callable[[], None]:
        def run() -> None:
            second_order.SPLIT_OUTSIDE = split_outside
            out = torchdiv.value_grad_laplacian(f, x, coordinates=coordinates)
            finish(out.gradient, out.laplacian)

        return run

    def two_calls() -> None:
        gradient = torchdiv.jacobian(f, x)
        finish(gradient, torchdiv.laplacian(f, x, coordinates=coordinates))

    return {"sweep": one_call(NEVER), "split": one_call(ALWAYS), "two calls": two_calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kept = second_order.SPLIT_OUTSIDE
    try:
        for d, k, batch in CASES:
            net, x = _mlp(d), torch.randn(batch, d)
            for train in (False, True):
                net.requires_grad_(train)
                calls = _routes(net, x, k, train)
                for call in calls.values():  # (recordings and plans made once)
                    call()
                times = time_interleaved(calls, args.rounds, 0.3)
                pairs = zip(times["sweep"]["rounds_ms"], times["split"]["rounds_ms"], strict=True)
                ratios = sorted(a / b for a, b in pairs)
                cells = ", ".join(
                    f"{name} {t['median_ms']:.2f} ms (IQR {t['iqr_ms']:.2f})"
                    for name, t in times.items()
                )
                print(
                    f"D={d} out={d - k} B={batch} {'train' if train else 'frozen'}: {cells}; "
                    f"sweep/split per round {[round(r, 2) for r in ratios]}",
                    flush=True,
                )
    finally:
        second_order.SPLIT_OUTSIDE = kept


if __name__ == "__main__":
    main()
