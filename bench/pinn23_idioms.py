"""PINN training steps with torchdiv against the grad-of-grad loop a PINN code writes (rev-pinn23).

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
          PYTHONPATH=src .venv/bin/python bench/pinn23_idioms.py [rounds]

float32, one step = residual + ``backward()`` of its mean square to the parameters; models of
width 32, depth 2 (tanh MLP, DeepXDE's LAAF-10 tanh, random Fourier features); cases: 1-D
Poisson ``u''`` (B = 256), 2-D heat ``u_t - 0.01 u_xx`` on ``(x, t)`` (``value_grad_laplacian``
with ``coordinates=[0]``, B = 1024), Navier-Stokes ``(u, v, p)(x, y, t)`` (``coordinates=[0, 1]``,
B = 1024). Both sides interleaved, median and range of per-step times over the rounds.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time

import torch
from torch import nn

import torchdiv


class Laaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(10 * self.a * z)


class Fourier(nn.Module):
    def __init__(self, d: int, m: int = 16) -> None:
        super().__init__()
        self.register_buffer("B", 2 * torch.randn(d, m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x @ self.B
        return torch.cat([torch.cos(z), torch.sin(z)], -1)


def net(kind: str, d: int, out: int = 1, width: int = 32) -> nn.Module:
    act = Laaf() if kind == "laaf" else nn.Tanh()
    first: list[nn.Module] = (
        [Fourier(d), nn.Linear(32, width)] if kind == "rff" else [nn.Linear(d, width)]
    )
    return nn.Sequential(*first, act, nn.Linear(width, width), act, nn.Linear(width, out))


def loop_parts(
    u: nn.Module, x: torch.Tensor, coords: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The user's loop: per output, one gradient pass and one per coordinate in ``coords``."""
    x = x.detach().requires_grad_(True)
    y = u(x)
    grads, laps = [], []
    for k in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, k].sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(g[:, j].sum(), x, create_graph=True)[0][:, j] for j in coords)
        grads.append(g)
        laps.append(lap)
    return torch.stack(grads, 1), torch.stack(laps, 1)


def residual(case: str, u: nn.Module, x: torch.Tensor, ours: bool) -> torch.Tensor:
    if case == "poisson1d":
        lap = torchdiv.laplacian(u, x) if ours else loop_parts(u, x, [0])[1]
        return lap + 1
    coords = [0] if case == "heat" else [0, 1]
    if ours:
        out = torchdiv.value_grad_laplacian(u, x, coordinates=coords)
        g, lap = out.gradient, out.laplacian
    else:
        g, lap = loop_parts(u, x, coords)
    if case == "heat":
        return g[:, 0, 1] - 0.01 * lap[:, 0]
    y = u(x) if not ours else out.value
    return g[:, 0, 2] + y[:, 0] * g[:, 0, 0] + y[:, 1] * g[:, 0, 1] + g[:, 2, 0] - 0.01 * lap[:, 0]


CASES = {"poisson1d": (1, 1, 256), "heat": (2, 1, 1024), "ns": (3, 3, 1024)}


def main(rounds: int = 15) -> None:
    torch.manual_seed(0)
    print("| case | model | torchdiv ms | loop ms | ratio |\n|---|---|---|---|---|")
    for case, (d, m, b) in CASES.items():
        for kind in ("tanh", "laaf", "rff"):
            u = net(kind, d, m)
            x = torch.rand(b, d)
            times: dict[bool, list[float]] = {True: [], False: []}
            steps = {ours: functools.partial(_step, case, u, x, ours) for ours in (True, False)}
            for ours in (True, False):  # warm-up, and the two agree
                steps[ours]()
            a, c = residual(case, u, x, True), residual(case, u, x, False)
            assert torch.allclose(a, c, rtol=1e-3, atol=1e-4), (case, kind)
            for _ in range(rounds):
                for ours in (True, False):
                    start = time.perf_counter()
                    for _ in range(5):
                        steps[ours]()
                    times[ours].append((time.perf_counter() - start) / 5 * 1e3)
            t, lp = statistics.median(times[True]), statistics.median(times[False])
            ours, loop = _summary(times[True]), _summary(times[False])
            print(f"| {case} B={b} | {kind} | {ours} | {loop} | {t / lp:.2f} |")


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def _step(case: str, u: nn.Module, x: torch.Tensor, ours: bool) -> None:
    residual(case, u, x, ours).square().mean().backward()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
