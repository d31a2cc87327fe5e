"""What recording and watching ``f`` cost per ATen op: the price of method="auto"'s plans.

Run:  .venv/bin/python bench/recording.py [--rounds 5] [--min-run-time 0.2]

For tanh MLPs of growing depth (batch 64, width 64, small enough that the ops themselves are
cheap), times side by side in interleaved rounds: one plain forward pass of ``f``; the same
pass watched by ``_plan.OpSizes`` (what the generic engines' ``"auto"`` plan runs); and
recorded by ``_taylor.capture`` (what ``method="structured"``, ``"auto"`` for divergences and
diagonals, and the Laplacian's ``"taylor"`` run before any derivative). Per op is the extra
time over the plain pass divided by the number of ATen ops ``f`` ran. Prints a markdown
table; writes nothing.
"""

from __future__ import annotations

import argparse

import torch
from _common import markdown, time_interleaved

from torchdiv._exact.plan import OpSizes
from torchdiv._taylor import RULES, capture


def mlp(depth: int, width: int = 64) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers).requires_grad_(False)


def watched(f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with OpSizes(x.shape[:1]):
        return f(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    args = parser.parse_args()
    rows = []
    for depth in (2, 8, 32):
        f, x = mlp(depth), torch.randn(64, 64)
        ops = len(capture(f, x, RULES).nodes)
        times = time_interleaved(
            {
                "plain": lambda f=f, x=x: f(x),
                "watched": lambda f=f, x=x: watched(f, x),
                "recorded": lambda f=f, x=x: capture(f, x, RULES),
            },
            args.rounds,
            args.min_run_time,
        )
        ms = {k: v["median_ms"] for k, v in times.items()}
        rows.append(
            {
                "depth": depth,
                "ops": ops,
                "plain": f"{ms['plain']:.3f}",
                "watched": f"{ms['watched']:.3f}",
                "recorded": f"{ms['recorded']:.3f}",
                "watch_us": 1e3 * (ms["watched"] - ms["plain"]) / ops,
                "record_us": 1e3 * (ms["recorded"] - ms["plain"]) / ops,
            }
        )
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    columns = [
        ("depth", "tanh layers"),
        ("ops", "ATen ops"),
        ("plain", "forward ms"),
        ("watched", "watched ms"),
        ("recorded", "recorded ms"),
        ("watch_us", "watching µs per op"),
        ("record_us", "recording µs per op"),
    ]
    print(markdown(rows, columns))


if __name__ == "__main__":
    main()
