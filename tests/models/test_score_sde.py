"""A score network in the layout of score_sde's NCSN++ (Song et al. 2021), small: a Gaussian
Fourier projection of ``log sigma(t)``, GroupNorm, SiLU, residual blocks with the time embedding
added in place (``h += dense(temb)``), an attention block over pixels by einsums, average
pooling down and nearest upsampling back with a skip, and the output divided by ``sigma(t)``.

The divergence of ``x -> s(x, t)`` (the probability-flow ODE's likelihood term) per sample,
``t`` closed over: every exact method and ``jacobian_diagonal`` against a loop of backward
passes, with the gradient of a loss of it with respect to every parameter; Hutchinson and
Hutch++ with given probes against their formulas on the loop's dense Jacobians, and the
estimates unchanged (permuted) when the batch is permuted. float64, 2 x 4 x 4 images.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import central_difference, directional_gradient, shifted
from torch import nn

import torchdiv

f64 = torch.float64


class FourierTime(nn.Module):
    """``[sin 2 pi W s, cos 2 pi W s]`` with a fixed Gaussian ``W`` (scale 16)."""

    def __init__(self, size: int):
        super().__init__()
        self.W = nn.Parameter(16 * torch.randn(size // 2), requires_grad=False)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * s[:, None] * self.W
        return torch.cat([torch.sin(angles), torch.cos(angles)], -1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, embedding: int):
        super().__init__()
        self.norm0, self.norm1 = nn.GroupNorm(2, channels), nn.GroupNorm(2, channels)
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.dense = nn.Linear(embedding, channels)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        h += self.dense(F.silu(temb))[:, :, None, None]
        h = self.conv1(F.silu(self.norm1(h)))
        return (x + h) / math.sqrt(2)


class Attention(nn.Module):
    """NCSN++'s ``AttnBlockpp``: 1x1 projections (NIN) by einsum, softmax over pixels."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(2, channels)
        self.q, self.k, self.v, self.o = (
            nn.Parameter(torch.randn(channels, channels) / math.sqrt(channels)) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (torch.einsum("bchw,cd->bdhw", h, w) for w in (self.q, self.k, self.v))
        logits = torch.einsum("bchw,bcij->bhwij", q, k).reshape(b, height, width, -1)
        weights = F.softmax(logits / math.sqrt(c), -1).reshape(b, height, width, height, width)
        h = torch.einsum("bhwij,bcij->bchw", weights, v)
        return (x + torch.einsum("bchw,cd->bdhw", h, self.o)) / math.sqrt(2)


class ScoreNet(nn.Module):
    """``s(x, t) = net(x, log sigma(t)) / sigma(t)``, ``sigma(t) = 0.01 * 500^t``."""

    def __init__(self, channels: int = 2, width: int = 4, embedding: int = 8):
        super().__init__()
        self.time = FourierTime(embedding)
        self.embed = nn.Sequential(
            nn.Linear(embedding, embedding), nn.SiLU(), nn.Linear(embedding, embedding)
        )
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down, self.up = ResBlock(width, embedding), ResBlock(width, embedding)
        self.attention = Attention(width)
        self.norm = nn.GroupNorm(2, width)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = 0.01 * 500**t
        temb = self.embed(self.time(torch.log(sigma)))
        skip = self.down(self.inp(x), temb)
        h = self.attention(F.avg_pool2d(skip, 2))
        h = self.up(F.interpolate(h, scale_factor=2, mode="nearest") + skip, temb)
        return self.out(F.silu(self.norm(h))) / sigma[:, None, None, None]


def _problem() -> tuple[ScoreNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = ScoreNet().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 4, dtype=f64, generator=g)
    t = 0.05 + 0.9 * torch.rand(3, dtype=f64, generator=g)
    return net, x, t


def _jacobians(net: ScoreNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Every sample's Jacobian ``(B, n, n)``: one backward pass per output element (batched
    by autograd's ``is_grads_batched``), no graph."""
    z = x.detach().requires_grad_(True)
    y = net(z, t).flatten(1)
    n = y.shape[1]
    eye = torch.eye(n, dtype=f64)[:, None].expand(n, len(x), n)
    (rows,) = torch.autograd.grad(y, z, eye, is_grads_batched=True)
    return rows.flatten(2).transpose(0, 1)


def _check(got: torch.Tensor, reference, net: ScoreNet) -> None:
    """``got`` against ``reference()`` (from ``_jacobians``, no graph) within 1e-10, and the
    gradient of ``Σ c·got`` along a random direction of the parameters against central
    differences of ``Σ c·reference()`` (with Richardson extrapolation)."""
    want = reference()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
    params = [p for p in net.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    directions = [torch.randn(p.shape, dtype=f64, generator=g) for p in params]
    c = torch.linspace(-1, 1, want.numel(), dtype=f64).reshape(want.shape)
    slope = directional_gradient(c * got, params, directions)

    def moved(step: float) -> torch.Tensor:
        with shifted(params, directions, step):
            return (c * reference()).sum()

    expected = central_difference(moved).item()
    assert abs(slope - expected) <= 1e-8 * abs(expected), (slope, expected)


@pytest.mark.parametrize(
    "method",
    [
        "auto",
        *(pytest.param(m, marks=pytest.mark.slow) for m in ("structured", "forward", "reverse")),
    ],
)
def test_exact_divergence_and_diagonal_per_sample(method):
    net, x, t = _problem()
    f = lambda z: net(z, t)  # noqa: E731
    diagonal = lambda: torch.diagonal(_jacobians(net, x, t), dim1=1, dim2=2)  # noqa: E731
    _check(torchdiv.divergence(f, x, method=method), lambda: diagonal().sum(1), net)
    got = torchdiv.jacobian_diagonal(f, x, method=method)
    _check(got, lambda: diagonal().reshape(x.shape), net)


def test_hutchinson_and_hutch_plus_plus_with_given_probes():
    """Hutchinson: ``mean_k v_k^T J v_k``; Hutch++ (``torchdiv._estimators.hutchpp``):
    ``Q = orth(A S)`` (held constant), ``tr(Q^T A Q) + mean_j (P g_j)^T A (P g_j)`` with
    ``A = J^T`` (the divergence's products are VJPs; ``tr J^T = tr J``), sketch ``S`` the
    first half of the probes and ``G`` the rest; and both follow a permuted batch."""
    net, x, t = _problem()
    f = lambda z: net(z, t)  # noqa: E731
    g = torch.Generator().manual_seed(2)
    probes = torchdiv.draw_probes(x, 4, generator=g)
    v = probes.flatten(2)  # (r, B, n)

    def hutchinson() -> torch.Tensor:
        return torch.einsum("rbi,bij,rbj->rb", v, _jacobians(net, x, t), v).mean(0)

    _check(torchdiv.divergence(f, x, method="hutchinson", probes=probes), hutchinson, net)

    probes = torchdiv.draw_probes(x, 6, method="hutch++", generator=g)  # 2 sketch + 2 probes
    sketch, rest = probes.flatten(2).transpose(0, 1).mT.chunk(2, -1)  # (B, n, 2) each
    q_held: list[torch.Tensor] = []

    def hutch_plus_plus() -> torch.Tensor:
        a = _jacobians(net, x, t).mT
        q = q_held[0] if q_held else torch.linalg.qr(a @ sketch)[0]
        deflated = rest - q @ (q.mT @ rest)
        low_rank = torch.diagonal(q.mT @ a @ q, dim1=1, dim2=2).sum(1)
        return low_rank + (deflated * (a @ deflated)).sum(1).mean(1)

    q_held.append(torch.linalg.qr(_jacobians(net, x, t).mT @ sketch)[0])  # the basis held
    got = torchdiv.divergence(f, x, method="hutch++", probes=probes)
    _check(got, hutch_plus_plus, net)

    order = torch.tensor([2, 0, 1])
    moved = torchdiv.divergence(
        lambda z: net(z, t[order]), x[order], method="hutch++", probes=probes[:, order]
    )
    torch.testing.assert_close(moved, got[order], rtol=1e-12, atol=1e-12 * got.abs().max().item())
