"""perfcheck24: the reach of rev-fuzz24's ``_core.modes`` change (2-norms replaced from the
second order through forward mode; ``std``/``std_mean`` recorded as the masked root of ``var``
and replaced from the second order by backward passes) on small nets that hold a norm.

Nets (D = 12, width 32, B = 256, float32): ``nn.LayerNorm``; the Annotated Transformer's hand
LayerNorm (``x.std(-1)``); an RMSNorm by ``F.normalize``; a normalised embedding; a
SchNet-style distance net (``(r_i - r_j).norm(dim=-1)``, RBF, MLP); rev-fuzz24's case, a tanh
MLP's output over ``1 + ||y||``. Each frozen and trained (a ``backward()`` of the result),
``divergence`` auto/forward/reverse and ``laplacian`` auto of ``net(z).sum(-1)``. Thread CPU
time a call, median of 5 calls a round, median and IQR of the rounds. Run under each tree's
``src`` in turn, alternated, for an A/B:

    flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
        PYTHONPATH=src .venv/bin/python bench/norm_reach.py [rounds] [label filter]
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import torchdiv

D, B, H = 12, 256, 32


class StdLayerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm: ``a (x - mean) / (std + eps) + b``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = x.mean(-1, keepdim=True), x.std(-1, keepdim=True)
        return self.a * (x - mean) / (std + 1e-6) + self.b


class NormRMS(nn.Module):
    """An RMSNorm written with ``F.normalize`` (``x / ||x|| * sqrt(n) * g``)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.g, self.scale = nn.Parameter(torch.ones(n)), n**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.g


class Normed(nn.Module):
    """A normalised embedding between two linear maps."""

    def __init__(self) -> None:
        super().__init__()
        self.i, self.o = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(F.normalize(self.i(x), dim=-1)))


class Distances(nn.Module):
    """SchNet-style: 4 atoms' pairwise distances (``x`` is (B, 12)), RBF features, an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.mu = torch.linspace(0, 4, 8)
        self.m = nn.Sequential(nn.Linear(6 * 8, H), nn.Tanh(), nn.Linear(H, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x.view(-1, 4, 3)
        i, j = torch.triu_indices(4, 4, 1)
        d = (r[:, i] - r[:, j]).norm(dim=-1)
        return self.m(torch.exp(-((d[..., None] - self.mu) ** 2)).flatten(1))


class OutNorm(nn.Module):
    """rev-fuzz24's case: a tanh MLP's output ``y`` over ``1 + ||y||``."""

    def __init__(self) -> None:
        super().__init__()
        self.m = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.m(x)
        return y / (1 + y.norm(dim=-1, keepdim=True))


def mlp(norm: nn.Module) -> nn.Module:
    """``Linear, norm, tanh, Linear``."""
    return nn.Sequential(nn.Linear(D, H), norm, nn.Tanh(), nn.Linear(H, D))


NETS: dict[str, Callable[[], nn.Module]] = {
    "LayerNorm": lambda: mlp(nn.LayerNorm(H)),
    "StdLN": lambda: mlp(StdLayerNorm(H)),
    "NormRMS": lambda: mlp(NormRMS(H)),
    "Normed": Normed,
    "Dist": Distances,
    "OutNorm": OutNorm,
}
CALLS = (("div", "auto"), ("div", "forward"), ("div", "reverse"), ("lap", "auto"))


def _call(net: nn.Module, x: torch.Tensor, op: str, method: str, train: bool) -> None:
    """One call (and, trained, the backward pass of its result's sum)."""
    if op == "div":
        out = torchdiv.divergence(net, x, method=method)
    else:
        out = torchdiv.laplacian(lambda z: net(z).sum(-1), x)
    if train:
        out.sum().backward()


def cases() -> Iterator[tuple[str, Callable[[], None]]]:
    """``(label, call)`` of every net, frozen and trained, and call."""
    for name, make in NETS.items():
        for train in (False, True):
            torch.manual_seed(0)
            net, x = make().requires_grad_(train), torch.randn(B, D)
            for op, method in CALLS:
                label = f"{name:9s} {'trained' if train else 'frozen ':7s} {op} {method:8s}"
                yield label, lambda n=net, x=x, o=op, m=method, t=train: _call(n, x, o, m, t)


def main() -> None:
    torch.set_num_threads(1)
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    only = sys.argv[2] if len(sys.argv) > 2 else ""
    for label, call in cases():
        if only not in label:
            continue
        for _ in range(3):
            call()
        medians = []
        for _ in range(rounds):
            times = []
            for _ in range(5):
                start = time.thread_time()
                call()
                times.append(time.thread_time() - start)
            medians.append(statistics.median(times) * 1e3)
        q = statistics.quantiles(medians, n=4)
        print(f"{label}  {statistics.median(medians):8.3f} ms  IQR {q[2] - q[0]:.3f}", flush=True)


if __name__ == "__main__":
    main()
