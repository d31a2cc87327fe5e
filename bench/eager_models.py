"""perfcheck20: the eager per-call cost of ``divergence(f, x)`` (``method="auto"``) on a small
conv net and on a tiny diffusers ``UNet2DModel``, and the structure key's cost on each
(``_taylor.cache.structure_key``, paid at every call of a kept module).

Conv net: three 3x3 convolutions 3 -> 8 -> 8 -> 3 with SiLU, ``x`` (4, 3, 8, 8). UNet:
``UNet2DModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
norm_num_groups=4)`` with two ``DownBlock2D``/``UpBlock2D``, ``f = lambda z: unet(z, t).sample``,
``x`` (2, 3, 8, 8). Three untimed calls, then rounds of calls; thread CPU time a call, one
thread; median and IQR of the rounds' medians. Run it under each tree's ``src`` in turn,
alternated (``PYTHONPATH``), for an A/B:

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \
        PYTHONPATH=src .venv/bin/python bench/eager_models.py [--rounds 7] [--key]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import torchdiv
from torchdiv._taylor import cache


def conv() -> tuple[torch.nn.Module, torch.Tensor]:
    """The small conv net and its ``x``."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(8, 3, 3, padding=1),
    )
    return net, torch.randn(4, 3, 8, 8)


def unet() -> tuple[torch.nn.Module, torch.Tensor]:
    """The tiny ``UNet2DModel`` and its ``x``."""
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    return model, torch.randn(2, 3, 8, 8)


def rounds_ms(call: Callable[[], Any], rounds: int, per: int) -> list[float]:
    """Each round's median thread CPU time of ``per`` calls, ms."""
    out = []
    for _ in range(rounds):
        times = []
        for _ in range(per):
            start = time.thread_time_ns()
            call()
            times.append(time.thread_time_ns() - start)
        out.append(statistics.median(times) / 1e6)
    return out


def _keys(model: torch.nn.Module, x: torch.Tensor) -> None:
    """100 structure keys of ``model`` at ``x`` (one batch dimension)."""
    for _ in range(100):
        cache.structure_key(model, x, 1)


def summary(times: list[float], unit: str = "ms") -> str:
    """``median [IQR]`` of ``times``."""
    q = statistics.quantiles(times, n=4)
    return f"{statistics.median(times):.3f} {unit} [{q[0]:.3f}-{q[2]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--key", action="store_true", help="time the structure key alone too")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    t = torch.tensor(10)
    for name, make, per in (("conv net", conv, 15), ("UNet2DModel tiny", unet, 5)):
        model, x = make()
        f = model if name == "conv net" else (lambda z, m=model: m(z, t).sample)
        for _ in range(3):
            torchdiv.divergence(f, x)
        calls = rounds_ms(functools.partial(torchdiv.divergence, f, x), args.rounds, per)
        line = f"{name:17s} divergence {summary(calls)}"
        if args.key:
            keys = rounds_ms(functools.partial(_keys, model, x), 7, 3)
            line += f"  key {summary([k * 10 for k in keys], 'us')}"  # (ms per 100 = us x 10)
        print(line, flush=True)


if __name__ == "__main__":
    main()
