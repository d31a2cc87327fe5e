"""Constants ``f`` builds per call and fills in place, replayed by the recording engines.

A Levi-Civita (or Clebsch-Gordan) tensor built inside ``forward`` (``eps = zeros(3, 3, 3);
eps[0, 1, 2] = 1; ...``), a hollow weight (``ones(n, n).fill_diagonal_(0)``), a mask written row
by row: the replay runs the allocation again without the writes, so the recorders refused every
read after a second write ("on a tensor f read before ... applied to a tensor that depends on
x", which it was not), and ``"taylor"``/``"structured"`` fell back to the generic engines. The
recording now reads a copy of such a constant's values where a call reads it (once per version).
References: per-sample grad-of-grad loops of plain autograd, float64.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
from torchdiv._taylor.capture import capture
from torchdiv._taylor.propagate import RULES

f64 = torch.float64
B, D = 4, 3
W = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(0)) / 2


def levi_civita(z: torch.Tensor) -> torch.Tensor:
    """``(tanh(z W) x z)_i = eps_ijk tanh(z W)_j z_k``, ``eps`` built per call by items."""
    eps = torch.zeros(3, 3, 3, dtype=z.dtype)
    eps[0, 1, 2] = eps[1, 2, 0] = eps[2, 0, 1] = 1
    eps[0, 2, 1] = eps[2, 1, 0] = eps[1, 0, 2] = -1
    return torch.einsum("ijk,bj,bk->bi", eps, torch.tanh(z @ W), z)


def hollow(z: torch.Tensor) -> torch.Tensor:
    """A hollow layer's weight, its diagonal zeroed and one entry set after a transpose."""
    m = torch.ones(D, D, dtype=z.dtype)
    m.fill_diagonal_(0)
    mt = m.t()
    m[0, 1] = 5
    return torch.tanh(z @ W) @ mt


def causal(z: torch.Tensor) -> torch.Tensor:
    """A mask written row by row, read twice (once transposed)."""
    mask = torch.zeros(D, D, dtype=z.dtype)
    for i in range(D):
        mask[i, :i] = -1.0
    h = torch.tanh(z @ W)
    return h @ mask + h.square() @ mask.T


def gated(z: torch.Tensor) -> torch.Tensor:
    """Constant columns, then values computed from ``x`` multiplied and added in place."""
    m = torch.zeros(len(z), D, dtype=z.dtype)
    m[:, 0] = 1
    m[:, 2] = -1
    m.mul_(torch.tanh(z @ W)).add_(z)
    return m * z


def through_a_view(z: torch.Tensor) -> torch.Tensor:
    """Values from ``x`` written through a view of a filled constant, its base read after
    (refused until inplacecache16; now the base reads the values scattered into it)."""
    m = torch.zeros(len(z), D, dtype=z.dtype)
    m[:, 1] = 1
    v = m[:, 0:2]
    m[:, 0] = 5
    v.mul_(torch.tanh(z @ W)[:, :2])
    return m * z


MODELS = {f.__name__: f for f in (levi_civita, hollow, causal, gated, through_a_view)}


def _per_sample(f, x: torch.Tensor, laplacian: bool) -> torch.Tensor:
    """Each sample's divergence or (per output) Laplacian, one sample at a time."""
    rows = []
    for sample in x:
        leaf = sample[None].clone().requires_grad_(True)
        y = f(leaf)[0]
        grads = [torch.autograd.grad(y[i], leaf, create_graph=True)[0][0] for i in range(D)]
        if not laplacian:
            rows.append(sum(g[i] for i, g in enumerate(grads)))
            continue
        second = [
            sum(torch.autograd.grad(g[j], leaf, create_graph=True)[0][0, j] for j in range(D))
            for g in grads
        ]
        rows.append(torch.stack(second))
    return torch.stack(rows)


def _assert_right(got: torch.Tensor, want: torch.Tensor, weight: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(got.square().sum(), weight)
    (h,) = torch.autograd.grad(want.square().sum(), weight)
    torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_constants_filled_in_place_are_replayed_right(name):
    f = MODELS[name]
    W.requires_grad_(True)
    try:
        x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
        assert capture(f, x, RULES).unsupported == []
        want = _per_sample(f, x, laplacian=True)
        got = torchdiv.laplacian(f, x, method="taylor")
        _assert_right(got, want, W)
        assert torch.equal(torchdiv.laplacian(f, x, method="taylor"), got.detach())
        got = torchdiv.divergence(f, x, method="structured")
        _assert_right(got, _per_sample(f, x, laplacian=False), W)
    finally:
        W.requires_grad_(False)


def under_no_grad(z: torch.Tensor) -> torch.Tensor:
    """A filled constant multiplied by values from ``x``, then written under ``no_grad``."""
    m = torch.zeros(len(z), D, dtype=z.dtype)
    m[:, 0] = 1
    m.mul_(torch.tanh(z @ W))
    with torch.no_grad():
        m[:, 1] = 7
    return m * z


@pytest.mark.parametrize(("f", "op"), [(under_no_grad, "no_grad")])
def test_what_a_copy_of_a_filled_constant_would_get_wrong_is_refused(f, op):
    """A write under ``no_grad`` into values from ``x`` is one autograd does not record.
    The recorders refuse it, naming the write, and ``"auto"`` gives the loop's values.
    (Values from ``x`` written through a view, which a copy of the base would hold as
    constants, are recorded as scattered into the base: ``through_a_view``.)"""
    x = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(2))
    with pytest.raises(NotImplementedError, match=op):
        torchdiv.laplacian(f, x, method="taylor")
    want = _per_sample(f, x, laplacian=True)
    torch.testing.assert_close(torchdiv.laplacian(f, x), want, rtol=1e-12, atol=1e-12)
