"""Compiled PINN and VMC training with torchdiv inside the compiled loss (rev-pinncompile21):
each step's loss and parameter gradients equal to eager float64, a bounded number of graphs
while the collocation points are resampled at new batch sizes, and the Taylor engine's call
replayed in the graph (``_laplacian.traced``) where the PINN's and the wavefunction's usual
code (a space-time residual's ``coordinates=``, a Jastrow's pair index) had made it run
eagerly behind a break."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import assert_close
from test_compiled_losses import (
    Counting,
    _fresh_dynamo,  # noqa: F401  (autouse: Dynamo reset per test)
    assert_compiled_matches,
)

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


class FNN(torch.nn.Module):
    """A PINN's network as DeepXDE writes it: a list of layers, ``tanh`` as a function,
    Glorot-normal weights, zero biases."""

    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linears = torch.nn.ModuleList()
        for d_in, d_out in itertools.pairwise(sizes):
            layer = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
            torch.nn.init.xavier_normal_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
            self.linears.append(layer)
        self.activation = torch.tanh

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.linears[:-1]:
            x = self.activation(layer(x))
        return self.linears[-1](x)


class SlaterJastrow(torch.nn.Module):
    """``log|ψ|`` of 3 particles in 2-d: ``slogdet`` of MLP orbitals with a Gaussian
    envelope plus a Padé pair Jastrow ``Σ_{i<j} a r_ij / (1 + b r_ij)``, the pairs taken
    by ``triu_indices`` (``r[:, i, j]``: an index call with a ``None`` for the batch)."""

    def __init__(self, n: int = 3, d: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.n, self.d = n, d
        self.orbitals = torch.nn.Sequential(
            torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, n)
        ).double()
        self.a = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("pairs", torch.triu_indices(n, n, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x.view(x.shape[0], self.n, self.d)
        phi = self.orbitals(r) * torch.exp(-0.5 * r.square().sum(-1, keepdim=True))
        diff = r.unsqueeze(1) - r.unsqueeze(2)
        distances = (diff.square().sum(-1) + 1e-12).sqrt()[:, self.pairs[0], self.pairs[1]]
        jastrow = (self.a * distances / (1 + self.b.abs() * distances)).sum(-1)
        return torch.linalg.slogdet(phi)[1] + jastrow


def heat_residual(f: torch.nn.Module, x: torch.Tensor, p: object = None) -> torch.Tensor:
    """``u_t - 0.1 Δ_x u`` at ``(x, y, t)``: ``u``'s gradient and its Laplacian in space
    from one call."""
    out = torchdiv.value_grad_laplacian(f, x, coordinates=[0, 1])
    return out.gradient[:, 0, 2] - 0.1 * out.laplacian[:, 0]


def local_energy(f: torch.nn.Module, x: torch.Tensor, p: object = None) -> torch.Tensor:
    """``-(Δ log ψ + |∇ log ψ|²) / 2 + |x|² / 2`` (a harmonic trap)."""
    out = torchdiv.value_grad_laplacian(f, x, method="taylor")
    kinetic = -0.5 * (out.laplacian + out.gradient.square().sum(-1))
    return kinetic + 0.5 * x.square().sum(-1)


def test_a_space_time_residual_is_one_graph_under_dynamic_shapes():
    """``coordinates=`` put the other inputs after the chosen ones by a mask's ``nonzero``:
    a data-dependent size, so under dynamic shapes (``dynamic=True``, or Dynamo's automatic
    dynamic once the collocation batch changed) the replay broke at it, twice per call."""
    x = torch.rand(10, 3, dtype=torch.float64)
    backend = assert_compiled_matches(
        FNN([3, 8, 8, 1]), heat_residual, x, fullgraph=True, dynamic=True
    )
    assert backend.compiled == 1


def test_a_wavefunction_indexing_pairs_is_replayed():
    """``r[:, i, j]`` passes ``[None, i, j]`` to ``aten.index``: the recorder took the
    ``None`` for a tensor it does not know and refused, so the local energy ran eagerly."""
    x = torch.randn(5, 6, dtype=torch.float64)
    backend = assert_compiled_matches(SlaterJastrow(), local_energy, x, fullgraph=True)
    assert backend.compiled == 1


@pytest.mark.slow
def test_a_heat_pinn_trained_on_resampled_batches():
    """Adam on the compiled residual loss, new collocation points every step at a curriculum
    of batch sizes: every step's loss and parameter gradients equal eager's (float64, a copy
    of the model at the step's parameters), one graph per range of sizes served (the replay
    serves ``N`` to ``2N + 5``), none per step, no break."""
    net, backend = FNN([3, 8, 8, 1]), Counting()
    reference = copy.deepcopy(net)
    compiled = torch.compile(
        lambda x: heat_residual(net, x).square().mean(), backend=backend, fullgraph=True
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for n in (8, 8, 11, 11, 30):
        x = torch.rand(n, 3, dtype=torch.float64, generator=generator)
        reference.load_state_dict(net.state_dict())
        optimizer.zero_grad()
        loss = compiled(x)
        loss.backward()
        expected = heat_residual(reference, x).square().mean()
        assert_close(loss, expected)
        params = list(reference.parameters())
        grads = torch.autograd.grad(expected, params, allow_unused=True, materialize_grads=True)
        for p, want in zip(net.parameters(), grads, strict=True):
            assert_close(torch.zeros_like(p) if p.grad is None else p.grad, want)
        optimizer.step()
    assert backend.runs == 5 and backend.compiled <= 3
