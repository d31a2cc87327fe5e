"""Neural fields read through feature planes, as tri-plane and K-planes codes write them: three
axis-aligned planes of learned features sampled by ``F.grid_sample`` at each point's pair of
coordinates (bilinear or bicubic), summed, then a small MLP; and a NeRF-style renderer over the
samples of each ray, whose transmittance is a cumulative product along them.

PyTorch has no forward-mode rule for ``grid_sample`` (its double backward is right), so the
Hessian-vector products of the Hutchinson Laplacian, taken by forward over reverse where the
Taylor engine has no rule, raised for the whole call: the stochastic Laplacian of such a field
was refused. It now takes them by backward passes there, which must give the per-sample
grad-of-grad loop's estimate with the same probes, values and parameter gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv
from tests.conftest import assert_same_parameter_gradients

f64 = torch.float64


class TriPlane(nn.Module):
    """Three ``(C, R, R)`` feature planes (xy, xz, yz) sampled at each point's coordinate pair
    by ``grid_sample`` with the points along the grid's height, features summed over the planes,
    then a softplus MLP to one value."""

    def __init__(self, mode: str, channels: int = 3, resolution: int = 5) -> None:
        super().__init__()
        self.planes = nn.Parameter(0.5 * torch.randn(3, channels, resolution, resolution))
        self.mode = mode
        self.mlp = nn.Sequential(nn.Linear(channels, 8), nn.Softplus(beta=10), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        points = x.reshape(-1, 3)
        features = 0
        for k, pair in enumerate([[0, 1], [0, 2], [1, 2]]):
            grid = points[:, pair].view(1, -1, 1, 2)
            plane = self.planes[k : k + 1]
            sampled = F.grid_sample(plane, grid, mode=self.mode, align_corners=False)
            features = features + sampled.view(self.planes.shape[1], -1).T
        return self.mlp(features).reshape(*x.shape[:-1], 1)


def _rendered(field: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """Each ray's colour from its ``S`` samples ``(..., S, 3)``: alpha compositing with the
    transmittance an exclusive cumulative product of ``1 - alpha`` along the samples."""
    alpha = 1 - torch.exp(-F.softplus(field(points)[..., 0]) * 0.3)
    ones = torch.ones_like(alpha[..., :1])
    transmittance = torch.cumprod(torch.cat([ones, 1 - alpha], -1), -1)[..., :-1]
    return ((alpha * transmittance)[..., None] * torch.sigmoid(points)).sum(-2)


def _probed_loop(f, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``(1/r) Σ_j v_jᵀ ∇²f_i v_j`` one sample at a time by plain autograd, graph kept."""
    rows = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].detach().requires_grad_(True)
        y = f(xb).reshape(-1)
        row = []
        for i in range(y.numel()):
            (g,) = torch.autograd.grad(y[i], xb, create_graph=True)
            total = 0
            for v in probes[:, b : b + 1]:
                (hv,) = torch.autograd.grad((g * v).sum(), xb, create_graph=True)
                total = total + (hv * v).sum()
            row.append(total / len(probes))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _assert_same_estimate(out: torch.Tensor, expected: torch.Tensor, field: nn.Module) -> None:
    """Values and the parameter gradients of a loss of them (float64: 1e-10 relative)."""
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(-1, 1, out.numel(), dtype=f64).reshape(out.shape)

    def loss(t: torch.Tensor) -> torch.Tensor:
        return (t * weights).sum() + 0.1 * (t**2).sum()

    assert_same_parameter_gradients(field, loss(out), loss(expected))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_hutchinson_laplacian_through_grid_sample(mode):
    torch.manual_seed(0)
    field = TriPlane(mode).to(f64)
    x = torch.rand(4, 3, dtype=f64) * 1.6 - 0.8
    probes = torch.randn(3, 4, 3, dtype=f64)
    for chunk_size in (None, 1):
        out = torchdiv.laplacian(
            field, x, method="hutchinson", probes=probes, chunk_size=chunk_size
        )
        expected = _probed_loop(field, x, probes)
        _assert_same_estimate(out, expected, field)


def test_hutchinson_laplacian_of_a_rendered_ray():
    """Per ray (``batch_dims=1``): the event is the ray's ``(S, 3)`` sample positions, the
    output its colour; the cumulative product runs along the event, not the batch."""
    torch.manual_seed(0)
    field = TriPlane("bilinear").to(f64)
    points = torch.rand(3, 4, 3, dtype=f64) * 1.6 - 0.8
    probes = torch.randn(2, 3, 4, 3, dtype=f64)

    def render(p):
        return _rendered(field, p)

    out = torchdiv.laplacian(render, points, method="hutchinson", probes=probes)
    expected = _probed_loop(render, points, probes)
    _assert_same_estimate(out, expected, field)
    with torch.no_grad():
        torch.testing.assert_close(
            torchdiv.laplacian(render, points, method="hutchinson", probes=probes), out.detach()
        )


class _DroppedTriPlane(TriPlane):
    """A tri-plane field with dropout on its features and a call counter, both changed by each
    plain call: once per call of torchdiv too."""

    def __init__(self) -> None:
        super().__init__("bilinear")
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        keep = (torch.rand(x.shape[:-1]) > 0.3).to(x.dtype)
        return super().forward(x) * keep[..., None] / 0.7


_EVALUATIONS: list[int] = []  # one entry per evaluation of a _CountedTriPlane (outside the
# module, whose state torchdiv puts back between its evaluations of one call)


class _CountedTriPlane(TriPlane):
    """A tri-plane field that counts its evaluations."""

    def __init__(self) -> None:
        super().__init__("bilinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _EVALUATIONS.append(1)
        return super().forward(x)


def _evaluations(f, x: torch.Tensor, probes: torch.Tensor, field: nn.Module) -> int:
    """How many times one Hutchinson call of ``f`` evaluates ``field``; checks its value and
    parameter gradients against the per-sample loop (float64: both sum the same products)."""
    before = len(_EVALUATIONS)
    out = torchdiv.laplacian(f, x, method="hutchinson", probes=probes)
    evaluations = len(_EVALUATIONS) - before
    expected = _probed_loop(f, x, probes)
    _assert_same_estimate(out, expected, field)
    return evaluations


def test_hutchinson_fallback_remembered_for_the_structure():
    """Recording, forward mode's failed attempt and the loop evaluate ``f`` three times; at the
    same structure later calls go to the loop at once: one evaluation, with the same values and
    parameter gradients (other probes too), and still watched: the index tensor ``f`` closes
    over (a value, not structure), changed in place to shuffle the samples, is refused, not
    read as a per-sample function."""
    torch.manual_seed(0)
    field = _CountedTriPlane().to(f64)
    order = torch.arange(4)

    def f(p: torch.Tensor) -> torch.Tensor:
        return field(p[order[: len(p)]])  # the per-sample reference evaluates one at a time

    x = torch.rand(4, 3, dtype=f64) * 1.6 - 0.8
    probes = torch.randn(3, 4, 3, dtype=f64)
    assert _evaluations(f, x, probes, field) == 3
    assert _evaluations(f, x, probes, field) == 1
    assert _evaluations(f, x + 0.1, torch.randn(2, 4, 3, dtype=f64), field) == 1
    with torch.no_grad():
        out = torchdiv.laplacian(f, x, method="hutchinson", probes=probes)
        shifted = x.index_add(0, torch.tensor([2]), x[:1])  # sample 2 moved
        moved = torchdiv.laplacian(f, shifted, method="hutchinson", probes=probes)
    torch.testing.assert_close(moved[[0, 1, 3]], out[[0, 1, 3]], rtol=0, atol=0)
    assert not torch.equal(moved[2], out[2])
    assert _evaluations(f, x[:3], probes[:, :3], field) == 3  # another shape: recorded again
    assert _evaluations(field, x, probes, field) == 3  # another f
    expected = _probed_loop(f, x, probes).detach()
    for _ in range(2):  # grad mode is part of the structure; the value is the same
        with torch.no_grad():
            out = torchdiv.laplacian(f, x, method="hutchinson", probes=probes)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    order.copy_(torch.tensor([1, 0, 2, 3]))
    with pytest.raises(torchdiv.BatchInteractionError, match="moved samples"):
        torchdiv.laplacian(f, x, method="hutchinson", probes=probes)


def test_hutchinson_fallback_remembered_changes_state_once():
    """The backward-pass fallback evaluates ``f`` again after forward mode failed (first
    call), or alone once remembered (second): each call changes the state as one plain call
    does (one dropout draw, the counter once)."""
    torch.manual_seed(0)
    field = _DroppedTriPlane().to(f64)
    x = torch.rand(4, 3, dtype=f64) * 1.6 - 0.8
    probes = torch.randn(2, 4, 3, dtype=f64)
    for calls in (2, 4):
        start = torch.get_rng_state()
        field(x)
        after_plain = torch.get_rng_state()
        torch.set_rng_state(start)
        torchdiv.laplacian(field, x, method="hutchinson", probes=probes)
        assert torch.equal(torch.get_rng_state(), after_plain)
        assert int(field.calls) == calls


class _Encoded(nn.Module):
    """An MLP over a swappable encoding of the points: a tri-plane's (``grid_sample``), or a
    smooth one that forward mode runs."""

    def __init__(self) -> None:
        super().__init__()
        self.encoding: nn.Module = TriPlane("bilinear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.encoding(x))


def test_hutchinson_fallback_forgotten_when_the_structure_changes(monkeypatch):
    """The memory is kept by ``f``'s structure: with the ``grid_sample`` encoding swapped for a
    smooth one, Hutchinson records ``f`` again (and the Taylor engine runs it), and the exact
    Laplacian ("auto", which the fallback also remembers) stays exact throughout."""
    from torchdiv._laplacian import methods

    looped = []
    probed = methods.probed
    monkeypatch.setattr(methods, "probed", lambda *a, **k: looped.append(1) or probed(*a, **k))
    torch.manual_seed(0)
    field = _Encoded().to(f64)
    x = torch.rand(4, 3, dtype=f64) * 1.6 - 0.8
    probes = torch.randn(3, 4, 3, dtype=f64)
    unit = torch.eye(3, dtype=f64)[:, None].expand(3, 4, 3)  # the exact Laplacian's probes
    for _ in range(2):
        out = torchdiv.laplacian(field, x, method="hutchinson", probes=probes)
        torch.testing.assert_close(out, _probed_loop(field, x, probes), rtol=1e-10, atol=1e-12)
        exact = torchdiv.laplacian(field, x)
        expected = 3 * _probed_loop(field, x, unit)  # the mean over the 3 unit probes
        torch.testing.assert_close(exact, expected, rtol=1e-10, atol=1e-12)
    assert len(looped) == 2
    field.encoding = nn.Sequential(nn.Linear(3, 3), nn.Softplus(), nn.Linear(3, 1)).to(f64)
    out = torchdiv.laplacian(field, x, method="hutchinson", probes=probes)
    torch.testing.assert_close(out, _probed_loop(field, x, probes), rtol=1e-10, atol=1e-12)
    assert len(looped) == 2
