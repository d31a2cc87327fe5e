"""Equivariant graph networks over molecules, written as their repositories write them.

- EDM's / E-NF's EGNN dynamics (Satorras, Hoogeboom & Welling 2021; Hoogeboom et al. 2022):
  a dense ``(B, N, 3 + F)`` batch of molecules padded to ``N`` atoms with node and edge masks,
  edges of a fully connected batch offset per molecule, messages summed by ``scatter_add_``
  (``unsorted_segment_sum``), the velocity projected to zero centre of mass
  (``remove_mean_with_mask``, which reads ``.item()`` of a sum over the whole batch for its
  assertion). The likelihood's divergence is the trace over the ``N (3 + F)`` inputs of a
  molecule: padding atoms are masked at the input, so their columns are 0; the projection
  ``P`` keeps the trace because the velocity does not change under a translation
  (``J P = J``, so ``tr(P J) = tr(P J P)``, the divergence on the zero-CoM subspace).
- The PyG layout: all atoms in one ``(total_atoms, 3)`` tensor with a ``batch`` vector. The
  leading axis is then atoms, which interact: the watch refuses it; the way out is
  ``jacobian_diagonal(..., batch_dims=0)`` summed per molecule.
- SchNet's continuous-filter convolutions on a dense layout (Schütt et al. 2018): distances
  of every pair, the diagonal included (``cdist``, ``norm``), Gaussian radial basis, cosine
  cutoff, the self-pairs masked after the filter. The Laplacian of the energy, and the
  divergence of the force field ``-∇E`` (computed inside ``f`` by ``autograd.grad``).
- PaiNN's equivariant messages (Schütt, Unke & Gastegger 2021) on padded molecules: vector
  features start at 0 and stay 0 on padding atoms, whose norms (``torch.linalg.norm`` over
  the spatial axis) are then norms of zero vectors that depend on the parameters.

References: per-molecule loops over plain ``autograd.grad`` in float64 (one molecule at a
time); for SchNet the same network with distances from a square root guarded off the
diagonal (``where``), whose PyTorch derivatives are right at every order. Tolerances:
float64, a few hundred flops deep: 1e-10 (``conftest.tolerances``); measured 1e-16-1e-14.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_close
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


def _segment_sum(data: torch.Tensor, segments: torch.Tensor, count: int) -> torch.Tensor:
    """EGNN's ``unsorted_segment_sum`` (``aggregation_method="sum"``, normalization 100)."""
    out = data.new_full((count, data.size(1)), 0)
    out.scatter_add_(0, segments.unsqueeze(-1).expand(-1, data.size(1)), data)
    return out / 100


class _Layer(nn.Module):
    """One EGNN layer: the edge MLP on ``(h_i, h_j, |x_i - x_j|^2, d0_ij)`` with attention, the
    node update, the coordinate update ``x_i + Σ_j (x_i - x_j) / (|x_i - x_j| + 1) φ_x``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        act = nn.SiLU()
        self.edge = nn.Sequential(
            nn.Linear(2 * hidden + 2, hidden), act, nn.Linear(hidden, hidden), act
        )
        self.attention = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())
        self.node = nn.Sequential(nn.Linear(2 * hidden, hidden), act, nn.Linear(hidden, hidden))
        self.coord = nn.Sequential(
            nn.Linear(2 * hidden + 2, hidden), act, nn.Linear(hidden, 1, bias=False)
        )

    def forward(self, h, x, edges, d0, node_mask, edge_mask):
        row, col = edges
        diff = x[row] - x[col]
        radial = (diff**2).sum(1, keepdim=True)
        diff = diff / (torch.sqrt(radial + 1e-8) + 1)
        attr = torch.cat([radial, d0], 1)
        m = self.edge(torch.cat([h[row], h[col], attr], 1))
        m = m * self.attention(m) * edge_mask
        h = (h + self.node(torch.cat([h, _segment_sum(m, row, len(h))], 1))) * node_mask
        trans = diff * torch.tanh(self.coord(torch.cat([h[row], h[col], attr], 1))) * 15.0
        x = (x + _segment_sum(trans * edge_mask, row, len(x))) * node_mask
        return h, x


class EDMDynamics(nn.Module):
    """``EGNN_dynamics_QM9._forward`` with ``condition_time``: ``xh`` of shape ``(B, N, 3 + F)``,
    ``t`` of shape ``(B,)``, masks ``(B, N, 1)`` and ``(B, N * N, 1)``; the edge indices of each
    batch size cached in ``self._edges_dict`` as the repository does."""

    def __init__(self, features: int, hidden: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Linear(features + 1, hidden)
        self.embedding_out = nn.Linear(hidden, features + 1)
        self.layers = nn.ModuleList(_Layer(hidden) for _ in range(layers))
        self._edges_dict: dict[int, dict[int, list[torch.Tensor]]] = {}

    def edges(self, n: int, b: int) -> list[torch.Tensor]:
        cache = self._edges_dict.setdefault(n, {})
        if b not in cache:
            rows = [i + k * n for k in range(b) for i in range(n) for j in range(n)]
            cols = [j + k * n for k in range(b) for i in range(n) for j in range(n)]
            cache[b] = [torch.LongTensor(rows), torch.LongTensor(cols)]
        return cache[b]

    def forward(self, t, xh, node_mask, edge_mask):
        b, n, _ = xh.shape
        edges = self.edges(n, b)
        node_mask = node_mask.view(b * n, 1)
        edge_mask = edge_mask.view(b * n * n, 1)
        xh = xh.view(b * n, -1).clone() * node_mask
        x, h = xh[:, :3].clone(), xh[:, 3:].clone()
        h = torch.cat([h, t.view(b, 1).repeat(1, n).view(b * n, 1)], 1)
        d0 = ((x[edges[0]] - x[edges[1]]) ** 2).sum(1, keepdim=True)
        h = self.embedding(h)
        x_in = x
        for layer in self.layers:
            h, x = layer(h, x, edges, d0, node_mask, edge_mask)
        h = self.embedding_out(h) * node_mask
        vel = ((x - x_in) * node_mask).view(b, n, 3)
        return torch.cat(
            [_remove_mean_with_mask(vel, node_mask.view(b, n, 1)), h[:, :-1].view(b, n, -1)], 2
        )


def _remove_mean_with_mask(x: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
    """EDM's: asserts (a number read from the whole batch) that padding is zero, then
    subtracts each molecule's mean over its atoms."""
    assert (x * (1 - node_mask)).abs().sum().item() < 1e-5
    mean = x.sum(1, keepdim=True) / node_mask.sum(1, keepdim=True)
    return x - mean * node_mask


def _molecules(atoms: list[int], n: int, features: int, seed: int = 0):
    """Padded molecules (zero centre of mass over their atoms), times and EDM's masks."""
    g = torch.Generator().manual_seed(seed)
    node_mask = (torch.arange(n) < torch.tensor(atoms)[:, None]).to(f64)[..., None]
    edge_mask = node_mask * node_mask.transpose(1, 2) * (1 - torch.eye(n, dtype=f64))
    xh = torch.randn(len(atoms), n, 3 + features, dtype=f64, generator=g)
    pos = xh[..., :3] - (xh[..., :3] * node_mask).sum(1, keepdim=True) / node_mask.sum(
        1, keepdim=True
    )
    xh = torch.cat([pos, xh[..., 3:]], -1) * node_mask
    t = torch.rand(len(atoms), dtype=f64, generator=g)
    return xh, t, node_mask, edge_mask.reshape(len(atoms), n * n, 1)


def _parameter_gradients(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


def _per_molecule_jacobians(dyn, xh, t, node_mask, edge_mask) -> torch.Tensor:
    """``(B, D, D)`` with their graphs: each molecule alone (a batch of one), row by row."""
    out = []
    for b in range(len(xh)):
        z = xh[b : b + 1].clone().requires_grad_()
        y = dyn(t[b : b + 1], z, node_mask[b : b + 1], edge_mask[b : b + 1]).reshape(-1)
        rows = [
            torch.autograd.grad(y[k], z, create_graph=True)[0].reshape(-1) for k in range(len(y))
        ]
        out.append(torch.stack(rows))
    return torch.stack(out)


def _edm_case():
    torch.manual_seed(0)
    dyn = EDMDynamics(features=1).to(f64)
    xh, t, node_mask, edge_mask = _molecules([3, 2, 3], 3, 1)
    return dyn, xh, t, node_mask, edge_mask


EDM_METHODS = ["auto", "reverse", "forward", "hutchinson", "hutch++", "xtrace"]


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=() if m == "auto" else pytest.mark.slow) for m in EDM_METHODS]
)
def test_edm_dynamics_divergence_and_its_parameter_gradients(method: str) -> None:
    """The divergence over each molecule's ``N (3 + F)`` inputs and the parameter gradients of
    a weighted sum of it, against each molecule alone. Stochastic methods: Hutchinson with
    given probes against ``v^T J v`` of the same probes; Hutch++ and XTrace (whose algebra
    ``tests/estimators`` checks) against the same estimator, same generator state, applied to
    the reference Jacobians as matrices (``z -> J z``, their graphs to the parameters). A
    second call (plans and caches) gives the same."""
    dyn, xh, t, node_mask, edge_mask = _edm_case()
    params = list(dyn.parameters())
    weights = torch.tensor([0.3, -1.2, 0.7], dtype=f64)
    jac = _per_molecule_jacobians(dyn, xh, t, node_mask, edge_mask)
    probes = torch.randn(3, *xh.shape, dtype=f64, generator=torch.Generator().manual_seed(1))
    if method == "hutchinson":
        v = probes.flatten(2)
        expected = torch.einsum("rbi,bij,rbj->b", v, jac, v) / 3
    elif method in ("hutch++", "xtrace"):
        matrices = lambda z: torch.einsum("bij,bj->bi", jac, z.flatten(1)).reshape(z.shape)  # noqa: E731
        generator = torch.Generator().manual_seed(2)
        expected = torchdiv.divergence(
            matrices, xh, method=method, num_probes=6, generator=generator
        )
    else:
        expected = jac.diagonal(0, 1, 2).sum(-1)
    grads = _parameter_gradients((weights * expected).sum(), params)

    def kwargs() -> dict:
        if method in ("hutch++", "xtrace"):
            return {"num_probes": 6, "generator": torch.Generator().manual_seed(2)}
        return {"probes": probes} if method == "hutchinson" else {}

    def f(z: torch.Tensor) -> torch.Tensor:
        return dyn(t, z, node_mask, edge_mask)

    for _ in range(2):
        got = torchdiv.divergence(f, xh, method=method, **kwargs())
        assert_close(got.detach(), expected.detach(), scale=10)
        for a, b in zip(_parameter_gradients((weights * got).sum(), params), grads, strict=True):
            assert_close(a, b, scale=10)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_edm_padding_atoms_and_other_molecules_change_nothing(method: str) -> None:
    """One molecule padded to 3, 5 or 8 atoms has one divergence; changing another molecule
    of the batch leaves it as it was (per-sample isolation); the batch-wide ``.item()`` of
    ``remove_mean_with_mask`` is not taken for sample mixing (no false refusal)."""
    torch.manual_seed(0)
    dyn = EDMDynamics(features=2).to(f64)
    values = []
    atoms, t, _, _ = _molecules([3, 3], 3, 2)
    atoms[1], t[1] = atoms[0] * 0.5, 0.9
    for n in (3, 5, 8):
        _, _, node_mask, edge_mask = _molecules([3, 3], n, 2)
        xh = torch.nn.functional.pad(atoms, (0, 0, 0, n - 3))  # padding atoms: zeros
        got = torchdiv.divergence(lambda z: dyn(t, z, node_mask, edge_mask), xh, method=method)  # noqa: B023
        values.append(got)
        other = xh.clone()
        other[1, :3] = torch.randn(3, 5, dtype=f64)
        moved = torchdiv.divergence(lambda z: dyn(t, z, node_mask, edge_mask), other, method=method)  # noqa: B023
        assert_close(moved[0], got[0])
        assert float((moved[1] - got[1]).abs().detach()) > 1e-3
    for got in values[1:]:
        assert_close(got, values[0])


class _PygLayer(nn.Module):
    """An EGNN coordinate update on PyG's layout: ``pos`` of shape ``(total_atoms, 3)``,
    ``edge_index`` within each molecule, messages ``index_add_``-ed at their targets."""

    def __init__(self) -> None:
        super().__init__()
        self.phi_e = nn.Sequential(nn.Linear(1, 8), nn.SiLU(), nn.Linear(8, 8), nn.SiLU())
        self.phi_x = nn.Sequential(nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 1))

    def forward(self, pos: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        row, col = edge_index
        diff = pos[row] - pos[col]
        m = self.phi_e((diff**2).sum(-1, keepdim=True))
        return pos + torch.zeros_like(pos).index_add_(0, row, diff * self.phi_x(m))


def test_pyg_concatenated_atoms_are_refused_and_the_way_out_is_per_molecule() -> None:
    """With all molecules' atoms in one ``(total_atoms, 3)`` tensor, ``batch_dims=1`` makes
    each atom a sample, and atoms of one molecule interact: ``"auto"`` and one-probe
    Hutchinson refuse it (the explicit ``"reverse"`` would return ``J^T`` of a summed probe:
    exactly 0 here, the pair forces cancel). The message names the ways out (a lower
    ``batch_dims``, a padded batch): the diagonal of the whole Jacobian (``batch_dims=0``)
    summed per molecule by ``batch`` is each molecule's divergence."""
    torch.manual_seed(0)
    layer = _PygLayer().to(f64)
    batch = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    same = (batch[:, None] == batch) & ~torch.eye(len(batch), dtype=torch.bool)
    edges = same.nonzero().T
    pos = torch.randn(len(batch), 3, dtype=f64)
    f = lambda p: layer(p, edges)  # noqa: E731
    for method, probes in (("auto", None), ("hutchinson", 1)):
        way_out = r"lower batch_dims.*padded batch .*jacobian_diagonal\(f, x, batch_dims=0\)"
        with pytest.raises(BatchInteractionError, match=way_out):
            torchdiv.divergence(f, pos, method=method, num_probes=probes)
    diagonal = torchdiv.jacobian_diagonal(f, pos, batch_dims=0)
    got = torch.zeros(3, dtype=f64).index_add(0, batch, diagonal.sum(-1))
    expected = []
    for k in range(3):
        atoms = pos[batch == k]
        local = (batch[batch == k, None] == batch[batch == k]) & ~torch.eye(
            len(atoms), dtype=torch.bool
        )
        jac = torch.autograd.functional.jacobian(lambda p: layer(p, local.nonzero().T), atoms)  # noqa: B023
        expected.append(jac.reshape(atoms.numel(), -1).trace())
    assert_close(got, torch.stack(expected))


class DenseSchNet(nn.Module):
    """SchNet on ``(B, N, 3)``: distances of every pair by ``distance``, Gaussian radial basis,
    cosine cutoff, filter network with shifted softplus, continuous-filter convolution with the
    self-pairs masked after the filter, an atomwise readout summed to the energy ``(B,)``."""

    def __init__(self, atoms: int, distance: str, features: int = 6, rbf: int = 5) -> None:
        super().__init__()
        self.distance, self.cutoff = distance, 5.0
        self.register_buffer("mu", torch.linspace(0, self.cutoff, rbf))
        self.embedding = nn.Parameter(torch.randn(atoms, features))
        self.filter = nn.Sequential(
            nn.Linear(rbf, features), nn.Softplus(), nn.Linear(features, features)
        )
        self.in2f = nn.Linear(features, features, bias=False)
        self.out = nn.Sequential(
            nn.Linear(features, features), nn.Softplus(), nn.Linear(features, 1)
        )

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        diff = x[:, :, None] - x[:, None, :]
        if self.distance == "cdist":
            return torch.cdist(x, x)
        if self.distance == "norm":
            return diff.norm(dim=-1)
        if self.distance == "vector_norm":
            return torch.linalg.vector_norm(diff, dim=-1)
        eye = torch.eye(x.shape[1], dtype=torch.bool)  # the reference: a guarded root
        return torch.where(eye, 0.0, torch.where(eye, 1.0, (diff**2).sum(-1)).sqrt())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.distances(x)
        rbf = torch.exp(-2.0 * (d[..., None] - self.mu) ** 2)
        cut = 0.5 * (torch.cos(d * math.pi / self.cutoff) + 1) * (d < self.cutoff)
        pairs = cut * (1 - torch.eye(x.shape[1], dtype=x.dtype))
        w = self.filter(rbf) * pairs[..., None]
        h = self.embedding + torch.einsum("bijf,jf->bif", w, self.in2f(self.embedding))
        return self.out(h).sum((1, 2))


def _schnet(distance: str) -> DenseSchNet:
    torch.manual_seed(0)
    return DenseSchNet(4, distance).to(f64)


def _schnet_reference(x: torch.Tensor, weights: torch.Tensor):
    """The guarded network's Laplacians, one molecule at a time, and their parameter grads."""
    model = _schnet("guarded")
    laplacians = []
    for b in range(len(x)):
        z = x[b : b + 1].clone().requires_grad_()
        (g,) = torch.autograd.grad(model(z).sum(), z, create_graph=True)
        g = g.reshape(-1)
        rows = [
            torch.autograd.grad(g[k], z, create_graph=True)[0].reshape(-1)[k] for k in range(len(g))
        ]
        laplacians.append(sum(rows))
    laplacian = torch.stack(laplacians)
    return laplacian, _parameter_gradients((weights * laplacian).sum(), list(model.parameters()))


LAPLACIAN_METHODS = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]
SCHNET_CASES = [(d, m) for d in ("cdist", "norm", "vector_norm") for m in LAPLACIAN_METHODS]


@pytest.mark.parametrize(
    ("distance", "method"),
    [
        pytest.param(d, m, marks=() if (d, m) == ("norm", "grad-of-grad") else pytest.mark.slow)
        for d, m in SCHNET_CASES
    ],
)
def test_schnet_laplacian_with_zero_distances_on_the_diagonal(distance: str, method: str) -> None:
    """The diagonal of ``cdist(x, x)`` or of the norms of ``x_i - x_j`` is 0 for every ``x``:
    its derivatives are 0 at every order. PyTorch's double backward of the 2-norm of a zero
    vector is ``nan`` (0/0), so the grad-of-grad Laplacian of a SchNet written with ``.norm()``
    was ``nan`` in every molecule (``"auto"`` and the forward-mode methods were right); the
    loop of backward passes now runs norms by ``SafeDerivatives``' composite."""
    x = torch.randn(3, 4, 3, dtype=f64, generator=torch.Generator().manual_seed(4))
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=f64)
    expected, grads = _schnet_reference(x, weights)
    model = _schnet(distance)
    got = torchdiv.laplacian(model, x, method=method)
    assert_close(got.detach(), expected.detach())
    for a, b in zip(
        _parameter_gradients((weights * got).sum(), list(model.parameters())), grads, strict=True
    ):
        assert_close(a, b)


@pytest.mark.parametrize("method", ["reverse", pytest.param("auto", marks=pytest.mark.slow)])
def test_schnet_force_field_divergence_with_zero_distances(method: str) -> None:
    """The divergence of the force field ``-∇E`` computed inside ``f`` (``autograd.grad``) is
    ``-ΔE``: it was ``nan`` by every method through ``.norm()``'s double backward at the
    diagonal (as PyTorch's own loop gives); with grad on (training) the engines of backward
    passes run norms by the composite."""
    x = torch.randn(3, 4, 3, dtype=f64, generator=torch.Generator().manual_seed(4))
    weights = torch.tensor([1.0, -0.5, 2.0], dtype=f64)
    expected, grads = _schnet_reference(x, weights)
    model = _schnet("norm")

    def force(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            return -torch.autograd.grad(model(z).sum(), z, create_graph=True)[0]

    got = -torchdiv.divergence(force, x, method=method)
    assert_close(got.detach(), expected.detach())
    for a, b in zip(
        _parameter_gradients((weights * got).sum(), list(model.parameters())), grads, strict=True
    ):
        assert_close(a, b)


@pytest.mark.parametrize("method", ["reverse", "auto"])
def test_schnet_force_field_divergence_under_no_grad(method: str) -> None:
    """The same divergence under ``torch.no_grad()`` (sampling, evaluation): the engines of
    backward passes took first derivatives only there (``SafeDerivatives`` of order 1), so the
    norms of ``x_i - x_i`` ran PyTorch's own, whose second derivative (the force field's
    first) is ``nan`` at the zero vector: ``nan`` in every molecule by ``"reverse"`` and
    ``"auto"``. The value is defined (those norms are 0 for every ``x``: derivatives 0, the
    guarded network's); ``f`` taking a backward pass with a graph is now evaluated again under
    the replacements of grad mode, what it writes put back (a buffer counting calls moves once)."""
    x = torch.randn(3, 4, 3, dtype=f64, generator=torch.Generator().manual_seed(4))
    expected, _ = _schnet_reference(x, torch.ones(3, dtype=f64))
    model = _schnet("norm")
    model.register_buffer("calls", torch.zeros((), dtype=f64))

    def force(z: torch.Tensor) -> torch.Tensor:
        model.calls += 1
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            return -torch.autograd.grad(model(z).sum(), z, create_graph=True)[0]

    with torch.no_grad():
        got = -torchdiv.divergence(force, x, method=method)
    assert_close(got, expected.detach())
    assert int(model.calls) == 1
    with torch.no_grad():
        again = -torchdiv.divergence(force, x, method=method)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


class _SpectralEnergy(nn.Module):
    """An energy whose first layer is spectrally normalised (train mode: one power iteration
    per forward, written into its ``u``) with dropout after it: state and random draws that
    one evaluation of its force field changes once."""

    def __init__(self, features: int) -> None:
        super().__init__()
        first = nn.Linear(features, 32).double()
        self.first = nn.utils.parametrizations.spectral_norm(first)
        self.drop = nn.Dropout(0.25)
        self.last = nn.Linear(32, 1).double()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.last(self.drop(torch.tanh(self.first(z)))).squeeze(-1)


def _force_of(energy: nn.Module):
    def force(z: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = z if z.requires_grad else z.requires_grad_(True)
            return -torch.autograd.grad(energy(z).sum(), z, create_graph=True)[0]

    return force


@pytest.mark.parametrize("shape", [(8, 3), (64, 16)])
def test_force_field_under_no_grad_changes_state_and_draws_once(shape) -> None:
    """A force field evaluated again at grad mode's replacements under ``torch.no_grad()``
    (an ``f`` taking a backward pass with a graph) starts from the caller's state: the value
    is the divergence of one evaluation (the spectral norm's power iteration run once, one
    dropout mask), and the call leaves ``u`` and the random generator as one evaluation does.
    The second evaluation started where the first left them: ``u`` iterated twice for the
    value (9e-4 off at (64, 16)), another mask drawn, the generator moved twice. (An explicit
    ``method="reverse"`` is unwatched: it still reads the first evaluation's writes,
    limitations.md.)
    Reference: one plain evaluation of a copy from the same generator state, its diagonal
    by backward passes over the batch (``f`` is per sample)."""
    x = torch.randn(*shape, dtype=f64, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(3)
    energy = _SpectralEnergy(shape[1])
    twin = copy.deepcopy(energy)
    for seed in (11, 12):  # (a tiny "auto" starts with plain autograd at its second call)
        torch.manual_seed(seed)
        with torch.no_grad():
            got = torchdiv.divergence(_force_of(energy), x)
        generator_after = torch.get_rng_state()

        torch.manual_seed(seed)
        z = x.clone().requires_grad_(True)
        y = _force_of(twin)(z)
        columns = [
            torch.autograd.grad(y[:, j].sum(), z, retain_graph=True)[0][:, j]
            for j in range(shape[1])
        ]
        assert_close(got, torch.stack(columns).sum(0).detach())
        assert torch.equal(torch.get_rng_state(), generator_after)
        for (name, mine), (_, theirs) in zip(
            energy.state_dict().items(), twin.state_dict().items(), strict=True
        ):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)


def test_a_graph_with_norms_keeps_pytorch_s_derivatives_and_is_not_refused() -> None:
    """Norms are replaced from the second order by backward passes (their PyTorch formula is
    ``nan`` at a zero vector only): ``graph_laplacian(..., create_graph=True)`` of a graph the
    caller built with them is not refused (as it is for ops wrong everywhere), and away from
    zero vectors it is the function form's."""
    reference = _schnet("guarded")
    off_diagonal = ~torch.eye(4, dtype=torch.bool)

    def energy(u: torch.Tensor) -> torch.Tensor:
        pairs = (u[:, :, None] - u[:, None, :])[:, off_diagonal]
        return torch.linalg.vector_norm(pairs, dim=-1).sin().sum(-1) + reference(u)

    x = torch.randn(2, 4, 3, dtype=f64, generator=torch.Generator().manual_seed(5))
    z = x.clone().requires_grad_(True)
    got = torchdiv.graph_laplacian(energy(z), z, create_graph=True)
    assert_close(got, torchdiv.laplacian(energy, x, method="grad-of-grad"))
    assert torch.autograd.grad(got.sum(), reference.embedding)[0].abs().sum() > 0


def _guarded_norm(v: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2-norm with right derivatives at every order, 0 at a zero vector (the reference)."""
    s = (v**2).sum(dim)
    return torch.where(s > 0, torch.where(s > 0, s, 1.0).sqrt(), 0.0)


class DensePaiNN(nn.Module):
    """PaiNN's message and update blocks on ``(B, N, 3)`` with a node mask: scalar features
    ``s`` ``(B, N, F)``, vector features ``v`` ``(B, N, 3, F)`` starting at 0; the update reads
    ``‖V v‖`` over the spatial axis by ``torch.linalg.norm`` (``guarded``: the reference)."""

    def __init__(self, atoms: int, guarded: bool, features: int = 4, cutoff: float = 4.0) -> None:
        super().__init__()
        self.features, self.cutoff, self.guarded = features, cutoff, guarded
        self.register_buffer("mu", torch.linspace(0, cutoff, 4))
        self.embedding = nn.Parameter(torch.randn(atoms, features))
        self.phi = nn.Sequential(
            nn.Linear(features, features), nn.SiLU(), nn.Linear(features, 3 * features)
        )
        self.filter = nn.Linear(4, 3 * features)
        self.U = nn.Linear(features, features, bias=False)
        self.V = nn.Linear(features, features, bias=False)
        self.update = nn.Sequential(
            nn.Linear(2 * features, features), nn.SiLU(), nn.Linear(features, 3 * features)
        )
        self.out = nn.Sequential(nn.Linear(features, features), nn.SiLU(), nn.Linear(features, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        pairs = mask[:, :, None] * mask[:, None, :] * (1 - torch.eye(n, dtype=x.dtype))
        diff = x[:, :, None] - x[:, None, :]
        d = _guarded_norm(diff, -1)
        unit = diff / torch.where(d > 0, d, 1.0)[..., None]
        cut = 0.5 * (torch.cos(d * math.pi / self.cutoff) + 1) * (d < self.cutoff) * pairs
        s = self.embedding * mask[..., None]
        v = x.new_zeros(b, n, 3, self.features)
        for _ in range(2):
            rbf = torch.exp(-((d[..., None] - self.mu) ** 2))
            a, c, e = (self.phi(s)[:, None] * self.filter(rbf) * cut[..., None]).split(
                self.features, -1
            )
            s = s + a.sum(2)
            v = (
                v
                + (c[:, :, :, None] * v[:, None]).sum(2)
                + (e[:, :, :, None] * unit[..., None]).sum(2)
            )
            uv, vv = self.U(v), self.V(v)
            norm = _guarded_norm(vv, -2) if self.guarded else torch.linalg.norm(vv, dim=-2)
            avv, asv, ass = self.update(torch.cat([s, norm], -1)).split(self.features, -1)
            v = (v + avv[:, :, None] * uv) * mask[..., None, None]
            s = (s + asv * (uv * vv).sum(-2) + ass) * mask[..., None]
        return self.out(s).sum((1, 2))


@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=() if m == "auto" else pytest.mark.slow) for m in LAPLACIAN_METHODS],
)
def test_painn_laplacian_with_padding_atoms(method: str) -> None:
    """Padding atoms keep zero vector features, whose norms depend on the parameters: the
    Taylor engine's norm rule took its value from ``sqrt(0)``, whose backward is ``0 / 0``,
    so the parameter gradients of ``"auto"``'s and ``"taylor"``'s Laplacians were ``nan``
    (values right); the grad-of-grad loop's were ``nan`` through PyTorch's double backward."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=f64)
    x = (
        torch.randn(3, 4, 3, dtype=f64, generator=torch.Generator().manual_seed(6))
        * mask[..., None]
    )
    torch.manual_seed(0)
    model = DensePaiNN(4, guarded=False).to(f64)
    reference = DensePaiNN(4, guarded=True).to(f64)
    reference.load_state_dict(model.state_dict())
    laplacians = []
    for b in range(3):
        z = x[b : b + 1].clone().requires_grad_()
        (g,) = torch.autograd.grad(reference(z, mask[b : b + 1]).sum(), z, create_graph=True)
        g = g.reshape(-1)
        rows = [
            torch.autograd.grad(g[k], z, create_graph=True)[0].reshape(-1)[k] for k in range(len(g))
        ]
        laplacians.append(sum(rows))
    expected = torch.stack(laplacians)
    grads = _parameter_gradients(expected.sum(), list(reference.parameters()))
    got = torchdiv.laplacian(lambda z: model(z, mask), x, method=method)
    assert_close(got.detach(), expected.detach())
    for a, b in zip(_parameter_gradients(got.sum(), list(model.parameters())), grads, strict=True):
        assert_close(a, b)
