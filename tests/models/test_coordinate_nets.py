"""Coordinate networks as graphics codes write them: a multiresolution hash-grid encoding
(instant-NGP) in pure PyTorch, its cell corners taken by ``floor`` and ``ceil`` and hashed
by integer products and xors into a learned table, trilinear weights from the fractional
part, then a small MLP.

The encoding is piecewise polynomial in ``x`` with integer indexing computed from ``x``: away
from cell boundaries every engine must give the per-sample grad-of-grad loop's values and
parameter gradients (into the table through the gather, inside a second-order computation),
also where two samples share table entries; and the recording engines (``"structured"``,
``"taylor"``, ``"auto"``'s first choices) must run it without falling back, which they did not
where the corners came from ``ceil`` (nerfstudio's PyTorch encoding) or from ``div`` with a
rounding mode: no rule for ``aten.ceil``, ``aten.div.Tensor_mode``, ``aten.round.decimals``,
``aten.remainder.Tensor``, ``aten.fmod.Tensor``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchdiv

f64 = torch.float64
PRIMES = (1, 2654435761, 805459861)


class HashEncoding(nn.Module):
    """A multiresolution hash encoding with one ``(levels * T, F)`` table (nerfstudio's
    PyTorch fallback): corners by ``ceil`` and ``floor``, hashed by xor of prime products
    modulo ``T`` plus each level's offset, interpolated trilinearly."""

    def __init__(self, levels: int = 3, log2_t: int = 5, features: int = 2) -> None:
        super().__init__()
        self.size = 2**log2_t
        growth = math.exp((math.log(16) - math.log(4)) / (levels - 1))
        self.register_buffer("scalings", torch.floor(4 * growth ** torch.arange(levels)))
        self.register_buffer("offsets", torch.arange(levels) * self.size)
        self.table = nn.Parameter(torch.rand(self.size * levels, features) * 2 - 1)

    def hash(self, corner: torch.Tensor) -> torch.Tensor:
        h = corner * torch.tensor(PRIMES, device=corner.device)
        h = torch.bitwise_xor(torch.bitwise_xor(h[..., 0], h[..., 1]), h[..., 2])
        return h % self.size + self.offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x[..., None, :] * self.scalings[:, None]  # (B, levels, 3)
        up, down = torch.ceil(scaled).long(), torch.floor(scaled).long()
        w = scaled - down
        out = 0
        for corner in range(8):
            bits = [(corner >> k) & 1 for k in range(3)]
            c = torch.stack([(up if b else down)[..., k] for k, b in enumerate(bits)], -1)
            weight = math.prod(w[..., k] if b else 1 - w[..., k] for k, b in enumerate(bits))
            out = out + weight[..., None] * self.table[self.hash(c)]
        return out.flatten(-2)


def _net(out: int) -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.Softplus(), nn.Linear(16, out))
    return nn.Sequential(HashEncoding(), mlp).to(f64)


def _points() -> torch.Tensor:
    x = torch.rand(5, 3, dtype=f64, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    x[1] = x[0] + 1e-4  # in sample 0's cells at every level: the same table rows
    return x


def _loop(f, x: torch.Tensor, second: bool) -> torch.Tensor:
    """Per sample, by plain autograd: the Jacobian's trace, or (``second``) the Laplacian of
    each output, differentiable."""
    rows = []
    for b in range(len(x)):
        xb = x[b : b + 1].detach().requires_grad_(True)
        y = f(xb).reshape(-1)
        total = []
        for k in range(len(y)):
            (g,) = torch.autograd.grad(y[k], xb, create_graph=True)
            if not second:
                total.append(g[0, k])
                continue
            hess = [
                torch.autograd.grad(g[0, i], xb, create_graph=True)[0][0, i]
                for i in range(xb.shape[1])
            ]
            total.append(sum(hess))
        rows.append(torch.stack(total).sum() if not second else torch.stack(total))
    return torch.stack(rows)


def _assert_same_with_gradients(model: nn.Module, got: torch.Tensor, want: torch.Tensor):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    c = torch.linspace(-1, 2, want.numel(), dtype=f64).reshape(want.shape)
    params = list(model.parameters())
    grads = torch.autograd.grad((c * got + got**2).sum(), params, materialize_grads=True)
    expected = torch.autograd.grad((c * want + want**2).sum(), params, materialize_grads=True)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "structured", "forward", "reverse"])
def test_hash_grid_divergence_and_table_gradients(method):
    model, x = _net(3), _points()
    for _ in range(2):  # the second call reuses what the first kept
        got = torchdiv.divergence(model, x, method=method)
        _assert_same_with_gradients(model, got, _loop(model, x, second=False))


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse", "grad-of-grad"])
def test_hash_grid_laplacian_and_table_gradients(method):
    model, x = _net(1), _points()
    got = torchdiv.laplacian(model, x, method=method)
    _assert_same_with_gradients(model, got, _loop(model, x, second=True))


W = torch.tensor([[0.7, -1.1, 0.4], [0.2, 0.9, -0.6], [-1.3, 0.5, 0.8]], dtype=f64)
ROUNDING = {
    "ceil": lambda s: torch.ceil(s) - s,
    "round_decimals": lambda s: s - torch.round(s, decimals=1),
    "div_floor": lambda s: s - torch.div(s, 1.0, rounding_mode="floor"),
    "div_trunc_tensor": lambda s: s - torch.div(s, torch.ones(3, dtype=f64), rounding_mode="trunc"),
    "remainder_tensor": lambda s: torch.remainder(s, torch.tensor([0.7, 1.0, 1.3], dtype=f64)),
    "fmod_tensor": lambda s: torch.fmod(s, torch.tensor([0.7, 1.0, 1.3], dtype=f64)),
}


@pytest.mark.parametrize("name", sorted(ROUNDING))
def test_rounding_ops_run_in_the_recording_engines(name):
    """Piecewise constant (or linear) in ``x`` almost everywhere, with PyTorch's derivatives
    there; a divisor that carries the derivatives gets ``-floor(a / b)`` (``-trunc`` for
    ``fmod``)."""
    g = ROUNDING[name]
    weight = W.clone().requires_grad_(True)
    x = torch.rand(4, 3, dtype=f64, generator=torch.Generator().manual_seed(3)) * 3 + 0.1

    def f(z):
        return torch.tanh(g(4 * z) @ weight) * z

    def scalar(z):
        return f(z).sum(-1, keepdim=True)

    for got, want in [
        (torchdiv.divergence(f, x, method="structured"), _loop(f, x, second=False)),
        (torchdiv.laplacian(scalar, x, method="taylor"), _loop(scalar, x, second=True)),
    ]:
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        (gg,) = torch.autograd.grad(got.sum(), weight)
        (gw,) = torch.autograd.grad(want.sum(), weight)
        torch.testing.assert_close(gg, gw, rtol=1e-10, atol=1e-12)


def test_a_divisor_that_carries_derivatives():
    """``remainder(a, b)`` with ``b`` computed from ``x``: ``d/db = -floor(a / b)``."""
    x = torch.rand(4, 2, dtype=f64, generator=torch.Generator().manual_seed(4)) + 0.5

    def f(z):
        a, b = 5 * z[:, :1], z[:, 1:] + 0.2
        return torch.cat([torch.remainder(a, b), torch.fmod(a, b)], -1) ** 2

    torch.testing.assert_close(
        torchdiv.divergence(f, x, method="structured"), _loop(f, x, second=False)
    )
    torch.testing.assert_close(torchdiv.laplacian(f, x, method="taylor"), _loop(f, x, second=True))


class InPlaceXorHashEncoding(HashEncoding):
    """HashNeRF-pytorch's hash: an in-place ``^=`` on a view of a fresh tensor."""

    def hash(self, corner: torch.Tensor) -> torch.Tensor:
        h = torch.zeros_like(corner)[..., 0]
        for k in range(3):
            h ^= corner[..., k] * PRIMES[k]
        return h % self.size + self.offsets


def test_an_in_place_hash_on_a_view_of_a_fresh_tensor_is_recorded():
    """The ``^=`` writes into a view of a tensor nothing reads again: the Taylor engine
    records it (it refused any in-place write into memory shared with another recorded
    tensor; ``tests/models/test_recurrent.py``), right against the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(
        InPlaceXorHashEncoding(), nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 1)
    ).to(f64)
    x = _points()
    got = torchdiv.laplacian(model, x, method="taylor")
    _assert_same_with_gradients(model, got, _loop(model, x, second=True))


class XorHashEncoding(HashEncoding):
    """HashNeRF-pytorch's hash with its result read back through the fresh tensor it was
    written into (``table[..., 0]``: the Taylor engine refused it until rev-leftovers14, a
    replay reading the table's old values; it reads a copy of them now), counting its
    evaluations; ``perm`` reorders the batch of the output (the identity: per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.perm: torch.Tensor | None = None

    def hash_table(self, corner: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(corner)

    def hash(self, corner: torch.Tensor) -> torch.Tensor:
        table = self.hash_table(corner)
        h = table[..., 0]
        for k in range(3):
            h ^= corner[..., k] * PRIMES[k]
        return table[..., 0] % self.size + self.offsets

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = super().forward(x)
        return out if self.perm is None else out[self.perm]


class DrawnTableHash(XorHashEncoding):
    """The same hash into a table drawn at random (zeros: ``randint_like(corner, 1)``), whose
    draw a replay keeps as it was: a write into it read after is refused by the Taylor
    engine."""

    def hash_table(self, corner: torch.Tensor) -> torch.Tensor:
        return torch.randint_like(corner, 1)


def test_a_hash_read_back_through_its_table_runs_the_taylor_engine():
    torch.manual_seed(0)
    model = nn.Sequential(XorHashEncoding(), nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 1))
    model = model.to(f64)
    x = _points()
    got = torchdiv.laplacian(model, x, method="taylor")
    _assert_same_with_gradients(model, got, _loop(model, x, second=True))


def test_a_refused_recording_is_not_repeated_and_still_watched():
    """At up to three inputs the Laplacian's ``"auto"`` falls back to the loop of backward
    passes where the Taylor engine refuses ``f``; it recorded ``f`` again at every call (two
    evaluations a call), now once per structure, each later call watching the loop's own
    evaluation for sample mixing."""
    torch.manual_seed(0)
    encoding = DrawnTableHash()
    model = nn.Sequential(encoding, nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 1)).to(f64)
    x = _points()
    with pytest.raises(torchdiv._taylor.UnsupportedOp, match="read before"):
        torchdiv.laplacian(model, x, method="taylor")
    calls = []
    for _ in range(3):
        encoding.calls = 0
        got = torchdiv.laplacian(model, x)
        calls.append(encoding.calls)
        _assert_same_with_gradients(model, got, _loop(model, x, second=True))
    assert calls[1:] == [1, 1], calls
    encoding.perm = torch.arange(len(x))
    torchdiv.laplacian(model, x)
    encoding.perm.copy_(encoding.perm.roll(1))  # another sample's features: mixed
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.laplacian(model, x)


def test_value_grad_laplacian_after_a_refused_recording():
    """``value_grad_laplacian`` shares the remembered fallback: the loop's three results,
    without recording ``f`` again."""
    torch.manual_seed(0)
    encoding = DrawnTableHash()
    model = nn.Sequential(encoding, nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 1)).to(f64)
    x = _points()
    torchdiv.laplacian(model, x)
    encoding.calls = 0
    got = torchdiv.value_grad_laplacian(model, x)
    assert encoding.calls == 1
    _assert_same_with_gradients(model, got.laplacian, _loop(model, x, second=True))
    torch.testing.assert_close(got.value, model(x))
