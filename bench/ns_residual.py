"""The incompressible Navier-Stokes residual of a PINN ``(x, y, t) -> (u, v, p)`` as torchdiv
computes it against the recipe physicsnemo/Modulus-style codes write by hand (one
``autograd.grad`` per output component and per first derivative to differentiate again,
``create_graph=True``), one training step each (the residual loss and its parameter
gradients), timed round-robin in one process.

    r_u = u_t + u u_x + v u_y + p_x - nu Δ_xy u,   r_v alike,   r_c = u_x + v_y

Routes: ``"autograd.grad recipe"`` (7 backward passes, then the loss's); ``"value_grad_laplacian"``
(one ``value_grad_laplacian(net, xyt, coordinates=[0, 1])``: values, the 3 x 3 Jacobian and the
spatial Laplacian of every output); ``"jacobian + laplacian"`` (two calls). Nets: a tanh MLP
3-64-64-64-64-3 and Wang et al.'s modified MLP (Fourier features, the two gates, Jagtap's
adaptive ``tanh(n a h)`` with a trainable ``a``, ``u, v`` times the distance to the walls).

Run:  flock /tmp/torchdiv-bench.lock env OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE \\
          .venv/bin/python bench/ns_residual.py [--points 4096] [--rounds 3]

``torch.utils.benchmark`` medians (``blocked_autorange``, 0.5 s per measurement, through
``torchdiv._bench.timing.time_interleaved``) and each route's time over the recipe's.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import nn

import torchdiv
from torchdiv._bench.timing import time_interleaved

NU = 0.01


class AdaptiveTanh(nn.Module):
    """Jagtap et al.'s layer-wise adaptive activation ``tanh(n a h)``, ``a`` trainable."""

    def __init__(self, n: float = 10.0) -> None:
        super().__init__()
        self.n = n
        self.a = nn.Parameter(torch.tensor(0.1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.n * self.a * h)


class ModifiedMLP(nn.Module):
    """Wang, Teng and Perdikaris's modified MLP on Fourier features of ``(x, y, t)``: gates
    ``U``, ``V`` and ``H <- (1 - Z) U + Z V``; ``u, v`` vanish on the walls of the unit square."""

    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(3, width // 2))
        self.gates = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.acts = nn.ModuleList(AdaptiveTanh() for _ in range(depth + 2))
        self.out = nn.Linear(width, 3)

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        z = 2 * math.pi * xyt @ self.freqs
        h = torch.cat([z.sin(), z.cos()], -1)
        u, v = (act(gate(h)) for act, gate in zip(self.acts, self.gates, strict=False))
        for act, layer in zip(self.acts[2:], self.layers, strict=True):
            gate = act(layer(h))
            h = (1 - gate) * u + gate * v
        o = self.out(h)
        x, y = xyt[:, :1], xyt[:, 1:2]
        return torch.cat([o[:, :2] * x * (1 - x) * y * (1 - y), o[:, 2:]], -1)


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for width_in in (3, 64, 64, 64):
        layers += [nn.Linear(width_in, 64), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(64, 3))


def _loss(y: torch.Tensor, jac: torch.Tensor, lap: torch.Tensor) -> torch.Tensor:
    """Mean squared residuals from ``(u, v, p)`` (N, 3), their Jacobian (N, 3, 3) with columns
    ``(x, y, t)`` and the spatial Laplacians of ``u, v`` (N, 2)."""
    u, v = y[:, 0], y[:, 1]
    momentum = [
        jac[:, i, 2] + u * jac[:, i, 0] + v * jac[:, i, 1] + jac[:, 2, i] - NU * lap[:, i]
        for i in (0, 1)
    ]
    continuity = jac[:, 0, 0] + jac[:, 1, 1]
    return sum(r.square().mean() for r in momentum) + continuity.square().mean()


def _routes(net: nn.Module, xyt: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The residual loss by each route (call ``.backward()`` on it for the training step)."""

    def recipe() -> torch.Tensor:
        x = xyt.detach().requires_grad_(True)
        y = net(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0] for i in range(3)]
        lap = [
            sum(
                torch.autograd.grad(rows[i][:, j].sum(), x, create_graph=True)[0][:, j]
                for j in (0, 1)
            )
            for i in (0, 1)
        ]
        return _loss(y, torch.stack(rows, 1), torch.stack(lap, 1))

    def one_call() -> torch.Tensor:
        out = torchdiv.value_grad_laplacian(net, xyt, coordinates=[0, 1])
        return _loss(out.value, out.gradient, out.laplacian[:, :2])

    def two_calls() -> torch.Tensor:
        lap = torchdiv.laplacian(lambda z: net(z)[:, :2], xyt, coordinates=[0, 1])
        return _loss(net(xyt), torchdiv.jacobian(net, xyt), lap)

    return {
        "autograd.grad recipe": recipe,
        "value_grad_laplacian": one_call,
        "jacobian + laplacian": two_calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, make in (("tanh MLP", _mlp), ("modified MLP", ModifiedMLP)):
        torch.manual_seed(0)
        net, xyt = make(), torch.rand(args.points, 3)
        routes = _routes(net, xyt)
        losses = {route: loss() for route, loss in routes.items()}  # (plans made once)
        first = losses["autograd.grad recipe"]
        for route, loss in losses.items():  # the same loss, to float32 rounding
            torch.testing.assert_close(loss, first, rtol=1e-4, atol=0.0, msg=route)
        steps = {route: (lambda loss=loss: loss().backward()) for route, loss in routes.items()}
        times = time_interleaved(steps, args.rounds, 0.5)
        base = times["autograd.grad recipe"]["median_ms"]
        cells = ", ".join(
            f"{route} {t['median_ms']:.1f} ms (IQR {t['iqr_ms']:.1f}, {t['median_ms'] / base:.2f}x)"
            for route, t in times.items()
        )
        print(f"{name}, {args.points} points: {cells}", flush=True)


if __name__ == "__main__":
    main()
