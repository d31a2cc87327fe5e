"""Per-particle sparse jets (``torchdiv._taylor.sparse``) in float64: the Laplacian of functions
of ``(B, N, 3)`` positions and its parameter and ``x`` gradients against the grad-of-grad loop
(reverse over reverse: an engine of its own), on functions built to catch particles mixed
wrongly: rows that depend on another particle, two rows on one particle, elementwise ops between
particles whose owners coincide somewhere, products and reductions along and across particles,
more owners than the sparse jets keep. Each also runs with chunked directions (dense jets).
"""

from __future__ import annotations

import pytest
import torch
from conftest import laplacian_by_grad_of_grad
from torch import nn

import torchdiv
from torchdiv._bench.wavefunctions import SlaterJastrow, pair_distances
from torchdiv._taylor import sparse

RTOL = 1e-10  # both engines are exact: float64 round-off through a 5x5 determinant
N = 5  # particles


class RowMLP(nn.Module):
    """An MLP on each row of ``(B, N, 3)``: ``(B, N, N)`` orbitals."""

    def __init__(self, n: int = N, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, n))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.net(r)


torch.manual_seed(0)
ORBITALS = RowMLP().double()
OFFSET = torch.randn(N, N, dtype=torch.float64)  # rows that share a particle still differ
W = torch.randn(N, N, dtype=torch.float64)


def _logdet(a: torch.Tensor) -> torch.Tensor:
    return torch.linalg.slogdet(a).logabsdet


FUNCTIONS = {
    # sparse all the way to the determinant
    "rows": lambda r: _logdet(ORBITALS(r)),
    # row i is the orbitals of particle i - 1
    "rolled rows": lambda r: _logdet(ORBITALS(r.roll(1, -2))),
    # rows 0 and 1 both depend on particle 0 (the determinant's cross terms within a particle)
    "shared rows": lambda r: _logdet(ORBITALS(r[:, [0, 0, 1, 2, 3]]) + OFFSET),
    # derivatives stored broadcast: along the rows (all owned by particle 0), along columns
    "broadcast rows": lambda r: _logdet(torch.tanh(r[:, 0] @ W[:3])[:, None, :] + OFFSET),
    "broadcast columns": lambda r: _logdet(
        torch.tanh(r @ W[:3]).sum(-1, keepdim=True) + OFFSET
    ).square(),
    # columns are particles: rows mix all of them
    "columns": lambda r: _logdet(ORBITALS(r).mT + OFFSET),
    # a product along the particle axis (left factor constant), and one along features
    "mixing product": lambda r: torch.tanh(W @ ORBITALS(r)).sum((-2, -1)),
    "feature product": lambda r: torch.tanh(ORBITALS(r) @ W).square().sum((-2, -1)),
    # elementwise between particles: two owners per element (rows i and i - 2 after a cat),
    # and owners that coincide on the middle row only (a flip of 5 rows: dense jets)
    "two owners": lambda r: (
        torch.tanh(r * torch.cat([r[:, :2], r[:, 2:]], -2).roll(2, -2)).sum((-2, -1))
        + torch.exp(r[:, 1] * r[:, 1]).sum(-1)
    ),
    "coinciding": lambda r: torch.sin(r * r.flip(-2)).sum((-2, -1)),
    # pairs of distinct particles (the Jastrow), and all pairs with the diagonal (FermiNet)
    "pairs": lambda r: (pair_distances(r) / (1 + pair_distances(r))).sum(-1),
    "all pairs": lambda r: ((r[:, :, None] - r[:, None]).square().sum(-1) + 0.1).sqrt().sum((1, 2)),
    # four owners per element, then five: more than sparse.MAX_TERMS
    "many owners": lambda r: (
        torch.tanh(sum(r.roll(k, -2) * (k + 1) for k in range(5))).square().sum((-2, -1))
    ),
    # reductions along features (sparse) and across particles (dense)
    "feature norm": lambda r: (
        torch.logsumexp(nn.functional.layer_norm(ORBITALS(r), (N,)), -1).sum(-1)
        * torch.linalg.vector_norm(r, dim=-1).prod(-1)
    ),
    "particle softmax": lambda r: (torch.softmax(ORBITALS(r), -2) * ORBITALS(r)).sum((-2, -1)),
    "mean field": lambda r: torch.tanh(ORBITALS(r) + ORBITALS(r).mean(-2, keepdim=True)).sum(
        (-2, -1)
    ),
    # moves: transposes, selections, unbind, views that merge particles
    "moves": lambda r: (
        sum(torch.tanh(p).sum(-1) for p in r.transpose(-1, -2).unbind(-1)) * r[:, 2, 1].exp()
        + torch.tanh(r.reshape(len(r), -1) @ torch.ones(3 * N, 2, dtype=r.dtype)).sum(-1)
    ),
}


def _x(samples: int = 3, electrons: int = N) -> torch.Tensor:
    return torch.randn(
        samples, electrons, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_laplacian_matches_grad_of_grad(name):
    f, r = FUNCTIONS[name], _x()
    expected = laplacian_by_grad_of_grad(f, r).detach()
    assert _relative(torchdiv.laplacian(f, r, method="taylor"), expected) < RTOL
    chunked = torchdiv.laplacian(f, r, method="taylor", chunk_size=5)  # dense jets
    assert _relative(chunked, expected) < RTOL


@pytest.mark.parametrize(
    "name", ["rows", "shared rows", "broadcast rows", "pairs", "feature norm", "moves"]
)
def test_gradients_of_the_laplacian(name):
    """Parameter and ``x`` gradients (third derivatives) through the sparse jets, against the
    grad-of-grad loop; for layer norm, whose third derivatives PyTorch gets wrong, against the
    dense jets (checked against differences in ``tests/laplacian``)."""
    f, r = FUNCTIONS[name], _x().requires_grad_()
    inputs = [r, *ORBITALS.parameters()]
    weights = torch.arange(1.0, len(r) + 1, dtype=r.dtype)

    def gradients(lap: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = (lap * weights).sum()
        return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)

    got = gradients(torchdiv.laplacian(f, r, method="taylor"))
    if name == "feature norm":
        expected = gradients(torchdiv.laplacian(f, r, method="taylor", chunk_size=5))
    else:
        expected = gradients(laplacian_by_grad_of_grad(f, r))
    for a, b in zip(got, expected, strict=True):
        if b.norm() > 0:
            assert _relative(a, b) < RTOL


def test_slater_jastrow_stays_sparse(monkeypatch):
    """The wavefunction runs on sparse jets from end to end (so the tests above reach the
    sparse rules): orbitals, determinant and the Jastrow's pairs, whose sum needs no ``jac``."""
    seen: list[object] = []
    dense: list[object] = []
    rule, densify = sparse._sparse, sparse.densify

    def spy(func, *args):
        out = rule(func, *args)
        (seen if out is not None else dense).append(func)
        return out

    def counted(a):
        dense.extend([a] if isinstance(a, sparse.Sparse) else [])
        return densify(a)

    monkeypatch.setattr(sparse, "_sparse", spy)
    monkeypatch.setattr(sparse, "densify", counted)
    model, r = SlaterJastrow(N).double(), _x()
    lap = torchdiv.laplacian(model, r, method="taylor")
    aten = torch.ops.aten
    assert {aten.addmm.default, aten.tanh.default, aten._linalg_slogdet.default} <= set(seen)
    assert aten.sub.Tensor in seen  # the pairs: two owners per element
    assert dense == []
    assert _relative(lap, laplacian_by_grad_of_grad(model, r).detach()) < RTOL


def test_densify_places_each_term():
    """Two owners per element: the dense jac is the sum of the terms at their particles."""
    value = torch.zeros(2, 3)
    owner = torch.tensor([[0, 1, 2], [2, 0, 1]]).reshape(2, 1, 3)
    jac = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(4, 1, 3) + 1  # T d = 2 * 2
    dense = sparse.densify(sparse.Sparse(value, jac, None, owner, 3)).jac  # (3 * 2, 1, 3)
    expected = torch.zeros(3, 2, 1, 3)
    for t in range(2):
        for s in range(3):
            expected[owner[t, 0, s], :, 0, s] += jac[2 * t : 2 * t + 2, 0, s]
    torch.testing.assert_close(dense, expected.flatten(0, 1))


def test_start_only_for_particles():
    assert sparse.per_particle(torch.zeros(5, 4, 3), 1) is not None
    assert sparse.per_particle(torch.zeros(5, 12), 1) is None  # a flat event
    assert sparse.per_particle(torch.zeros(5, 1, 3), 1) is None  # one particle
    assert sparse.per_particle(torch.zeros(5, 2, 3, 3), 1) is None
