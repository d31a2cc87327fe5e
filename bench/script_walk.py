"""The TorchScript walk's cost per call: ``torchdiv._core.script.scripted(f)`` (run at the start
of every public call) for five typical ``f``s, microseconds per call, one thread.

- ``sequential``: a plain ``nn.Sequential`` MLP (PyTorch's layers: children only);
- ``zuko``: ``functools.partial(FFJTransform(2).f, torch.tensor(0.3))``, zuko's CNF velocity
  (a bound method's module, the partial's argument); skipped without zuko;
- ``lambda``: ``lambda z: net(z)`` over a global module (the function's globals);
- ``trainer``: a trainer's bound ``step``, whose ``self`` holds the model, an optimizer, a
  loader and a scheduler (the method's ``self`` and the attributes it reads);
- ``unet``: a U-Net of the user's classes, ~100 modules (each own module's ``forward`` and
  attributes).

``--against FILE``: another version of ``script.py`` (``git show main:src/torchdiv/_core/script.py
> /tmp/script_main.py``), loaded as its own module and timed alternately with the installed
one, round by round in the same process (medians of the rounds):

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        .venv/bin/python bench/script_walk.py [--against /tmp/script_main.py] [--rounds 15]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import benchmark

from torchdiv._core import script


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )


NET = _mlp()


class Trainer:
    """A training loop's object: ``step`` reads the model off ``self``."""

    def __init__(self) -> None:
        self.model = _mlp()
        self.optimizer = torch.optim.Adam(self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 10)
        self.loader = torch.utils.data.DataLoader(torch.zeros(64, 2), batch_size=8)
        self.history: list[float] = []
        self.epoch = 0

    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = (
            nn.Conv2d(c_in, c_out, 3, padding=1),
            nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.norm1, self.norm2 = nn.GroupNorm(4, c_out), nn.GroupNorm(4, c_out)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(z)))
        return self.act(self.norm2(self.conv2(h))) + self.skip(z)


class UNet(nn.Module):
    """Three levels down and up of two ``Block``s each (~100 modules)."""

    def __init__(self, c: int = 8, levels: int = 3) -> None:
        super().__init__()
        widths = [c * 2**i for i in range(levels)]
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(Block(w, w), Block(w, w), nn.Conv2d(w, 2 * w, 2, stride=2))
            for w in widths
        )
        self.mid = Block(2 * widths[-1], 2 * widths[-1])
        self.up = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(2 * w, w, 2, stride=2), Block(2 * w, w), Block(w, w))
            for w in reversed(widths)
        )
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, skips = self.stem(z), []
        for level in self.down:
            h = level[1](level[0](h))
            skips.append(h)
            h = level[2](h)
        h = self.mid(h)
        for level, skip in zip(self.up, reversed(skips), strict=True):
            h = level[2](level[1](torch.cat([level[0](h), skip], 1)))
        return self.head(h)


def cases() -> dict[str, Any]:
    out: dict[str, Any] = {"sequential": _mlp()}
    try:
        from zuko.flows.continuous import FFJTransform
    except ImportError:
        pass
    else:
        out["zuko"] = functools.partial(FFJTransform(2).f, torch.tensor(0.3))
    out["lambda"] = lambda z: NET(z)
    out["trainer"] = Trainer().step
    unet = UNet()
    assert 80 <= len(list(unet.modules())) <= 130, len(list(unet.modules()))
    out["unet"] = unet
    return out


def _load(path: str) -> Callable[[Any], list[Any]]:
    spec = importlib.util.spec_from_file_location("script_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.scripted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", help="another script.py, timed alternately")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=2000, help="calls per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    walks = {"installed": script.scripted}
    if args.against:
        walks["against"] = _load(args.against)
    print(f"torch {torch.__version__}, {args.rounds} rounds of {args.number} calls, us per call")
    for name, f in cases().items():
        times: dict[str, list[float]] = {k: [] for k in walks}
        for walk in walks.values():
            walk(f)  # (each type's kind and each code's names read once)
        for r in range(args.rounds):
            order = list(walks.items()) if r % 2 == 0 else list(reversed(walks.items()))
            for label, walk in order:
                timer = benchmark.Timer("walk(f)", globals={"walk": walk, "f": f})
                times[label].append(timer.timeit(args.number).median * 1e6)
        row = "  ".join(f"{k} {statistics.median(v):7.2f}" for k, v in times.items())
        print(f"{name:>10}: {row}")


if __name__ == "__main__":
    main()
