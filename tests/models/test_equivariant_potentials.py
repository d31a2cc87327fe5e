"""Equivariant interatomic potentials as NequIP, MACE and Allegro write them (after the papers,
not their code): a Bessel radial basis ``sqrt(2/r_c) sin(w_n r / r_c) / r`` with trainable
frequencies times the polynomial envelope of DimeNet (``p = 6``: value and first two
derivatives 0 at ``r_c``), real spherical harmonics ``l = 1, 2`` of ``F.normalize(r_ij)``,
Clebsch-Gordan products as ``einsum`` over constant coupling tensors held as buffers, messages
``index_add``-ed over an edge list from a radius graph built under ``no_grad`` (``cdist`` of
the flattened batch, same-structure and node masks, ``nonzero``) with the vectors gathered
again with grad, a body-order-3 product basis, gated vector features, and per-species
energy shifts. Structures of different sizes are padded to ``(B, N, 3)`` with node masks;
periodic cells by minimum image (``torch.round``). Also a dense all-pairs form (no edge list,
``where``-guarded self pairs) that the Taylor engine runs.

References, float64: each structure alone (a batch of one) through plain ``autograd.grad``
loops (gradient, then each Hessian row with ``create_graph``); the Hessian also against
central differences of the forces.

Found here: ``torch.sinc`` at an exact 0 (sinc interpolation ``sinc(a (x - k))`` at a grid
point) had second derivatives 0 in every engine through forward mode (``"taylor"``,
``"auto"``, forward over reverse, Hessian: Laplacians silently off by ``pi^2/3`` per zero) and
``nan`` by backward passes: now run by ``_core.modes._sinc``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchdiv

f64 = torch.float64
RC = 2.5  # cutoff radius


def _l2_basis() -> torch.Tensor:
    """Five orthonormal symmetric traceless 3x3 matrices: the ``l = 2`` components."""
    e = torch.eye(3, dtype=f64)

    def sym(i: int, j: int) -> torch.Tensor:
        return (torch.outer(e[i], e[j]) + torch.outer(e[j], e[i])) / math.sqrt(2)

    zz = 2 * torch.outer(e[2], e[2]) - torch.outer(e[0], e[0]) - torch.outer(e[1], e[1])
    xx_yy = (torch.outer(e[0], e[0]) - torch.outer(e[1], e[1])) / math.sqrt(2)
    return torch.stack([sym(0, 1), sym(1, 2), sym(0, 2), xx_yy, zz / math.sqrt(6)])


def _levi_civita() -> torch.Tensor:
    eps = torch.zeros(3, 3, 3, dtype=f64)
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        eps[i, j, k], eps[j, i, k] = 1.0, -1.0
    return eps


class Interaction(nn.Module):
    """One convolution: edge weights from a bias-free radial MLP (as e3nn's
    ``FullyConnectedNet``: 0 where the basis is 0), paths ``0x0->0``, ``1x1->0``,
    ``0x1->1``, ``1x0->1``, ``1x1->1``, ``1x2->1``, a product basis ``A0 + c A0^2 + A1.A1``,
    SiLU on scalars and sigmoid gates on vectors, residual updates."""

    PATHS = 6

    def __init__(self, channels: int, basis: int, hidden: int = 12):
        super().__init__()
        self.c = channels
        self.radial = nn.Sequential(
            nn.Linear(basis, hidden, bias=False),
            nn.SiLU(),
            nn.Linear(hidden, self.PATHS * channels, bias=False),
        )
        self.scalars = nn.Linear(channels, 2 * channels)
        self.vectors = nn.Parameter(torch.randn(channels, channels) / math.sqrt(channels))
        self.square = nn.Parameter(0.3 * torch.randn(channels))

    def forward(self, h0, h1, src, dst, radial, y1, y2, couplings, n: int):
        w = self.radial(radial).view(len(src), self.PATHS, self.c)
        a0, a1 = h0[src], h1[src]
        c110, c111, c121 = couplings
        m0 = w[:, 0] * a0 + w[:, 1] * torch.einsum("eci,ej,ij->ec", a1, y1, c110)
        m1 = (
            w[:, 2, :, None] * a0[:, :, None] * y1[:, None, :]
            + w[:, 3, :, None] * a1
            + w[:, 4, :, None] * torch.einsum("eci,ej,ijk->eck", a1, y1, c111)
            + w[:, 5, :, None] * torch.einsum("eci,em,imk->eck", a1, y2, c121)
        )
        if dst is None:  # dense: every atom's N pairs in order
            big0, big1 = m0.view(n, -1, self.c).sum(1), m1.view(n, -1, self.c, 3).sum(1)
        else:
            big0 = h0.new_zeros(n, self.c).index_add(0, dst, m0)
            big1 = h0.new_zeros(n, self.c, 3).index_add(0, dst, m1)
        big0, big1 = big0 / 3.0, big1 / 3.0  # average number of neighbours
        b0 = big0 + self.square * big0 * big0 + torch.einsum("nci,ncj,ij->nc", big1, big1, c110)
        s, gate = self.scalars(b0).chunk(2, dim=-1)
        vectors = torch.einsum("nci,dc->ndi", big1, self.vectors)
        return h0 + F.silu(s), h1 + vectors * torch.sigmoid(gate)[:, :, None]


class Potential(nn.Module):
    """``E(pos)``, one energy per structure: ``pos`` ``(B, N, 3)``, ``species`` ``(B, N)``,
    ``mask`` ``(B, N)`` (real atoms), ``box`` ``(B, 3)`` orthorhombic cell edges or None;
    or packed (``batch``: each atom's structure, ``graphs`` of them).
    ``dense``: all pairs of a structure, self pairs and padding by ``where``."""

    def __init__(self, dense: bool = False, channels: int = 4, basis: int = 6, layers: int = 2):
        super().__init__()
        self.dense = dense
        self.embed = nn.Embedding(3, channels)
        self.frequencies = nn.Parameter(math.pi * torch.arange(1.0, basis + 1))
        self.layers = nn.ModuleList(Interaction(channels, basis) for _ in range(layers))
        self.readout = nn.Sequential(nn.Linear(channels, 8), nn.SiLU(), nn.Linear(8, 1))
        self.shift = nn.Parameter(torch.randn(3))
        self.register_buffer("l2", _l2_basis())
        self.register_buffer("c110", torch.eye(3, dtype=f64) / math.sqrt(3))
        self.register_buffer("c111", _levi_civita() / math.sqrt(2))
        self.register_buffer("c121", torch.einsum("mik->imk", _l2_basis()) * math.sqrt(0.6))

    def radius_graph(self, flat, structure, mask, box):
        """Edges ``src -> dst`` within ``RC`` inside each structure, without gradients."""
        with torch.no_grad():
            if box is None:
                d = torch.cdist(flat, flat)
            else:
                diff = flat[None] - flat[:, None]
                d = (diff - box[:, None] * torch.round(diff / box[:, None])).norm(dim=-1)
            same = structure[:, None] == structure[None]
            ok = (d < RC) & same & mask[:, None] & mask[None]
            ok.fill_diagonal_(False)
            src, dst = torch.nonzero(ok, as_tuple=True)
        return src, dst

    def forward(self, pos, species, mask, box=None, batch=None, graphs=0):
        if batch is None:
            b, atoms, _ = pos.shape
            structure = torch.arange(b).repeat_interleave(atoms)
        else:  # PyTorch Geometric's layout: pos (T, 3), species and mask (T,), batch (T,)
            b, atoms, structure = graphs, 0, batch
        n = len(structure)
        flat, mflat = pos.reshape(n, 3), mask.reshape(n)
        cell = None if box is None else box[structure]
        if self.dense:
            vec = (pos[:, None] - pos[:, :, None]).reshape(-1, 3)  # r_j - r_i
            src = (torch.arange(b)[:, None, None] * atoms + torch.arange(atoms)).expand(
                b, atoms, atoms
            )
            src, dst = src.reshape(-1), None
            pair = mask[:, :, None] & mask[:, None] & ~torch.eye(atoms, dtype=torch.bool)
            pair = pair.reshape(-1, 1)
        else:
            src, dst = self.radius_graph(flat, structure, mflat, cell)
            vec = flat[dst] - flat[src]
        if cell is not None:  # minimum image
            vec = vec - cell[src] * torch.round(vec / cell[src])
        if self.dense:
            vec = torch.where(pair, vec, vec.new_tensor([1.0, 0.0, 0.0]))
        r = vec.norm(dim=-1, keepdim=True)
        u = F.normalize(vec, dim=-1)
        y1 = math.sqrt(3) * u
        y2 = math.sqrt(7.5) * torch.einsum("mij,ei,ej->em", self.l2, u, u)
        x = r / RC
        envelope = (1 - 28 * x**6 + 48 * x**7 - 21 * x**8) * (x < 1)
        radial = math.sqrt(2 / RC) * torch.sin(self.frequencies * x) / r * envelope
        if self.dense:
            radial = radial * pair
        h0 = self.embed(species.reshape(n)) * mflat[:, None]
        h1 = h0.new_zeros(n, h0.shape[1], 3)
        couplings = (self.c110, self.c111, self.c121)
        for layer in self.layers:
            h0, h1 = layer(h0, h1, src, dst, radial, y1, y2, couplings, n)
        energy = (self.readout(h0).squeeze(-1) + self.shift[species.reshape(n)]) * mflat
        if self.dense:
            return energy.view(b, atoms).sum(1)
        return energy.new_zeros(b).index_add(0, structure, energy)


ATOMS = (3, 5, 4)  # real atoms per structure, padded to 5


def _structures(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.zeros(len(ATOMS), 5, 3, dtype=f64)
    mask = torch.zeros(len(ATOMS), 5, dtype=torch.bool)
    species = torch.zeros(len(ATOMS), 5, dtype=torch.long)
    for i, k in enumerate(ATOMS):
        pos[i, :k] = 2.2 * torch.rand(k, 3, generator=g, dtype=f64)
        mask[i, :k] = True
        species[i, :k] = torch.randint(0, 3, (k,), generator=g)
    return pos, species, mask


def _model(dense: bool = False) -> Potential:
    torch.manual_seed(0)
    return Potential(dense).to(f64)


def _forces(model, species, mask, box=None):
    """``F = -dE/dpos`` inside ``f``, as MACE and NequIP compute forces (``create_graph``)."""

    def f(pos):
        with torch.enable_grad():
            pos = pos if pos.requires_grad else pos.requires_grad_(True)
            (g,) = torch.autograd.grad(model(pos, species, mask, box).sum(), pos, create_graph=True)
        return -g

    return f


def _alone(model, pos, species, mask, box=None):
    """Each structure alone: energies ``(B,)``, gradients ``(B, N, 3)``, Hessians
    ``(B, 3N, 3N)``, all differentiable with respect to the parameters."""
    energies, gradients, hessians = [], [], []
    for b in range(len(pos)):
        leaf = pos[b : b + 1].detach().requires_grad_(True)
        one = None if box is None else box[b : b + 1]
        e = model(leaf, species[b : b + 1], mask[b : b + 1], one).sum()
        (g,) = torch.autograd.grad(e, leaf, create_graph=True)
        g = g.flatten()
        rows = [torch.autograd.grad(g[i], leaf, create_graph=True)[0].flatten() for i in range(15)]
        energies.append(e)
        gradients.append(g.view(5, 3))
        hessians.append(torch.stack(rows))
    return torch.stack(energies), torch.stack(gradients), torch.stack(hessians)


def _assert_same(model, got, want, rtol=1e-11):
    """Values, and the gradients of a random weighting of them with respect to every
    parameter (random: a Hessian's entries summed are 0 by translation invariance)."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale)
    c = torch.randn(want.shape, dtype=f64, generator=torch.Generator().manual_seed(7))
    params = list(model.parameters())
    kept = {"retain_graph": True, "materialize_grads": True}
    ours = torch.autograd.grad((c * got).sum(), params, **kept)
    theirs = torch.autograd.grad((c * want).sum(), params, **kept)
    for (name, _), a, b in zip(model.named_parameters(), ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), msg=name)


LAPLACIAN = ["auto", "forward-over-reverse", "hessian", "grad-of-grad"]
SWEEPS = ["auto", "forward-over-reverse"]  # value_grad_laplacian's, besides "taylor"


@pytest.mark.slow
@pytest.mark.parametrize("method", LAPLACIAN)
def test_laplacian_of_the_energy_with_a_radius_graph(method):
    """``Δ E`` per structure (the trace of the force constants) with padded structures of 3, 5
    and 4 atoms. ``"taylor"`` refuses the in-place ``fill_diagonal_`` on ``cdist``'s result:
    ``"auto"`` falls back to forward over reverse."""
    model, (pos, species, mask) = _model(), _structures()
    _, _, hessians = _alone(model, pos, species, mask)
    got = torchdiv.laplacian(lambda p: model(p, species, mask), pos, method=method)
    _assert_same(model, got, hessians.diagonal(dim1=1, dim2=2).sum(-1))


@pytest.mark.parametrize(
    "method", ["taylor", *(pytest.param(m, marks=pytest.mark.slow) for m in SWEEPS)]
)
def test_energy_forces_and_laplacian_of_a_periodic_dense_model(method):
    """``value_grad_laplacian`` of the dense all-pairs model in a periodic box (minimum image by
    ``torch.round``, self pairs and padding by ``where``): the Taylor engine runs it."""
    model, (pos, species, mask) = _model(dense=True), _structures()
    box = torch.full((3, 3), 2.0, dtype=f64)
    energies, gradients, hessians = _alone(model, pos, species, mask, box)
    value, gradient, laplacian = torchdiv.value_grad_laplacian(
        lambda p: model(p, species, mask, box), pos, method=method
    )
    _assert_same(model, value, energies)
    _assert_same(model, gradient, gradients)
    _assert_same(model, laplacian, hessians.diagonal(dim1=1, dim2=2).sum(-1))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["auto", "reverse"])
def test_force_field_divergence_and_hessian(method):
    """The divergence of ``F = -∇E`` (``= -ΔE``), its Jacobian (minus the Hessian: phonons) and
    diagonal, with forces computed inside ``f``; the Hessian also against central differences
    of the forces."""
    model, (pos, species, mask) = _model(), _structures()
    forces = _forces(model, species, mask)
    _, _, hessians = _alone(model, pos, species, mask)
    jacobian = torchdiv.jacobian(forces, pos, method=method)
    _assert_same(model, jacobian.reshape(3, 15, 15), -hessians)
    diagonal = torchdiv.jacobian_diagonal(forces, pos, method=method)
    _assert_same(model, diagonal.reshape(3, 15), -hessians.diagonal(dim1=1, dim2=2))
    divergence = torchdiv.divergence(forces, pos, method=method)
    _assert_same(model, divergence, -hessians.diagonal(dim1=1, dim2=2).sum(-1))
    h = 1e-4  # Richardson-extrapolated central differences: O(h^4) ~ 1e-16, round-off ~1e-12
    columns = []
    for k in range(15):
        step = torch.zeros(15, dtype=f64)
        step[k] = 1.0
        step = step.view(1, 5, 3)
        c1 = (forces(pos + h * step) - forces(pos - h * step)) / (2 * h)
        c2 = (forces(pos + h / 2 * step) - forces(pos - h / 2 * step)) / h
        columns.append(((4 * c2 - c1) / 3).detach().reshape(3, 15))
    central = torch.stack(columns, -1)
    torch.testing.assert_close(jacobian.detach().reshape(3, 15, 15), central, rtol=0, atol=1e-9)


@pytest.mark.slow
def test_hutchinson_on_forces_and_energy_with_given_probes():
    """One probe set through both forms: ``-vᵀ H v`` (divergence of the forces) and ``vᵀ H v``
    (Laplacian of the energy), means over 4 probes, parameter gradients included."""
    model, (pos, species, mask) = _model(), _structures()
    _, _, hessians = _alone(model, pos, species, mask)
    probes = torch.randn(4, 3, 5, 3, dtype=f64, generator=torch.Generator().manual_seed(3))
    v = probes.flatten(2)
    want = torch.einsum("kbi,bij,kbj->b", v, hessians, v) / 4
    forces = _forces(model, species, mask)
    got = torchdiv.divergence(forces, pos, method="hutchinson", probes=probes)
    _assert_same(model, got, -want)
    energy = torchdiv.laplacian(
        lambda p: model(p, species, mask), pos, method="hutchinson", probes=probes
    )
    _assert_same(model, energy, want)


def test_structures_stay_apart_and_real_cross_edges_are_refused():
    """Moving one structure's atoms changes no other structure's Laplacian or force
    divergence (exactly), and a second call equals the first; a radius graph that forgets
    the same-structure mask (edges between structures: real mixing) is refused."""
    model, (pos, species, mask) = _model(), _structures()
    energy = lambda p: model(p, species, mask)  # noqa: E731
    forces = _forces(model, species, mask)
    moved = pos.clone()
    moved[2, :4] += 0.3
    for op in (
        lambda p: torchdiv.laplacian(energy, p),
        lambda p: torchdiv.divergence(forces, p),
    ):
        first = op(pos)
        assert torch.equal(op(moved)[:2], first[:2])
        assert torch.equal(op(pos), first)

    model.radius_graph = _mixing_radius_graph  # type: ignore[method-assign]
    with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
        torchdiv.laplacian(energy, pos)
    with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(forces, pos)


def _mixing_radius_graph(flat, structure, mask, box):
    """A radius graph over the flattened batch without the same-structure mask."""
    with torch.no_grad():
        ok = (torch.cdist(flat, flat) < RC) & mask[:, None] & mask[None]
        ok.fill_diagonal_(False)
        return torch.nonzero(ok, as_tuple=True)


def test_packed_structures_take_batch_dims_0_for_the_energy_laplacian():
    """PyTorch Geometric's layout: every structure's atoms in one ``(T, 3)`` tensor with a
    ``batch`` vector, an energy per structure ``(B,)``. ``batch_dims=1`` is refused (the
    output has no ``T`` rows) with the way out in the message; ``batch_dims=0`` (the whole
    packed batch one sample) gives each structure's Laplacian, since ``E_b`` depends on its
    own atoms only: the padded batch's values and parameter gradients."""
    model, (pos, species, mask) = _model(), _structures()
    packed, kinds = pos[mask], species[mask]
    batch = torch.arange(len(ATOMS)).repeat_interleave(torch.tensor(ATOMS))
    real = torch.ones(len(batch), dtype=torch.bool)

    def energy(p):
        return model(p, kinds, real, batch=batch, graphs=len(ATOMS))

    with pytest.raises(ValueError, match="batch_dims=0"):
        torchdiv.laplacian(energy, packed)
    got = torchdiv.laplacian(energy, packed, batch_dims=0)
    _assert_same(model, got, torchdiv.laplacian(lambda p: model(p, species, mask), pos))


def _sinc_second(u: torch.Tensor) -> torch.Tensor:
    """``sinc''(u)`` in closed form (``z = pi u``): ``pi^2 (2 sin z - 2 z cos z - z^2 sin z)
    / z^3``, ``-pi^2/3`` at 0 (its derivative there is 0: sinc is even)."""
    zero = u == 0
    z = math.pi * torch.where(zero, torch.ones_like(u), u)
    general = math.pi**2 * (2 * torch.sin(z) - 2 * z * torch.cos(z) - z * z * torch.sin(z)) / z**3
    return torch.where(zero, torch.full_like(u, -(math.pi**2) / 3), general)


@pytest.mark.parametrize(
    "method", ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]
)
def test_sinc_at_zero_has_its_second_derivative(method):
    """A band-limited field ``Σ_k c_k sinc(a (x - k))`` (sinc interpolation) at grid points,
    where the argument is an exact 0: the Laplacian
    ``Σ_k c_k a^2 sinc''(a (x - k))`` and its gradients in ``c`` and ``a``. Before: the
    zeros' ``-pi^2/3`` was missing through forward mode (0) and ``nan`` by backward passes."""
    grid = torch.arange(4.0, dtype=f64)
    c = torch.tensor([0.8, -1.1, 0.5, 1.3], dtype=f64, requires_grad=True)
    a = torch.tensor(0.9, dtype=f64, requires_grad=True)
    x = torch.tensor([[0.0, 2.0], [1.0, 0.4], [2.7, 3.0]], dtype=f64)

    def f(x):
        return (c * torch.sinc(a * (x[..., None] - grid))).sum((-1, -2))

    want = (c * a**2 * _sinc_second(a * (x[..., None] - grid))).sum((-1, -2))
    got = torchdiv.laplacian(f, x, method=method)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.tensor([0.3, -0.7, 1.1], dtype=f64)
    ours = torch.autograd.grad((weights * got).sum(), (c, a))
    theirs = torch.autograd.grad((weights * want).sum(), (c, a))
    for g, w in zip(ours, theirs, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "reverse"])
def test_sinc_at_zero_in_a_force_field(method):
    """The divergence of ``∇ Σ sinc(x)`` (a gradient computed inside ``f``) at exact zeros."""
    x = torch.tensor([[0.0, 0.3], [0.0, 0.0], [-1.7, 2.0]], dtype=f64)

    def field(x):
        with torch.enable_grad():
            x = x if x.requires_grad else x.requires_grad_(True)
            return torch.autograd.grad(torch.sinc(x).sum(), x, create_graph=True)[0]

    got = torchdiv.divergence(field, x, method=method)
    torch.testing.assert_close(got, _sinc_second(x).sum(-1), rtol=1e-12, atol=1e-12)


def test_sinc_keeps_pytorch_s_values():
    """The replacement's values are PyTorch's (also in place, float32, ``out=``, integers)."""
    from torchdiv._core.modes import SafeDerivatives

    x = torch.tensor([0.0, -0.0, 1e-30, 0.25, -3.0, 7.5, math.inf], requires_grad=True)
    ints, out = torch.arange(-2, 3), torch.empty(7)
    with SafeDerivatives(3, ""):
        got = [torch.sinc(x), torch.special.sinc(x.double()), x.sinc(), torch.sinc(ints)]
        got.append(x.clone().sinc_())
        torch.sinc(x.detach(), out=out)
    x = x.detach()
    want = [torch.sinc(x), torch.sinc(x.double()), torch.sinc(x), torch.sinc(ints)]
    want.append(torch.sinc(x))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g.detach(), w, equal_nan=True)  # (a rounding: the series)
    torch.testing.assert_close(out, torch.sinc(x), rtol=0, atol=0, equal_nan=True)


def test_a_graph_with_sinc_keeps_pytorch_s_derivatives():
    """``graph_laplacian`` cannot replace ops in the caller's graph: with ``create_graph`` a
    graph holding ``sinc`` is not refused (PyTorch's derivatives differ only at an exact 0,
    where they are ``nan``: documented), and away from 0 they are right."""
    x = torch.tensor([[0.3, -1.7], [2.2, 0.6]], dtype=f64, requires_grad=True)
    lap = torchdiv.graph_laplacian(torch.sinc(x).sum(-1), x, create_graph=True)
    torch.testing.assert_close(lap, _sinc_second(x.detach()).sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("buffer", ["type_as", "clone", "to"])
def test_messages_summed_into_a_copied_zero_buffer(buffer):
    """Message sums into a buffer made by a factory and then copied, as older message-passing
    code writes it (``torch.zeros(n, d).type_as(h)``; ``.to(device)`` is such a copy on a
    GPU): per structure, as into ``new_zeros`` (they were refused as sums into a tensor
    whose places are not followed); an edge into another structure is refused."""
    structures, atoms, width = 3, 4, 2
    w = torch.randn(width, width, dtype=f64, generator=torch.Generator().manual_seed(0))
    offsets = (torch.arange(structures) * atoms)[:, None]
    one_src, one_dst = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([1, 0, 3, 2, 2])
    src, dst = (one_src + offsets).reshape(-1), (one_dst + offsets).reshape(-1)

    def field(src, dst):
        def f(x):
            h = torch.tanh(x.reshape(-1, width) @ w)
            if buffer == "type_as":
                out = torch.zeros(h.shape).type_as(h)
            elif buffer == "clone":
                out = torch.zeros_like(h).clone()
            else:
                out = torch.zeros(h.shape, dtype=torch.float32).to(h.dtype)
            return out.index_add_(0, dst, h[src] * h[dst]).view(x.shape)

        return f

    x = torch.randn(structures, atoms, width, dtype=f64, generator=torch.Generator().manual_seed(1))
    want = torch.stack(
        [
            torch.autograd.functional.jacobian(field(one_src, one_dst), x[b : b + 1])
            .reshape(8, 8)
            .trace()
            for b in range(structures)
        ]
    )
    got = torchdiv.divergence(field(src, dst), x)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    crossing = dst.clone()
    crossing[0] = 5  # an edge from structure 0 into structure 1
    with pytest.raises(torchdiv.BatchInteractionError, match="mixes samples"):
        torchdiv.divergence(field(src, crossing), x)


def _sinc_derivative_series(u: float, k: int) -> float:
    """``d^k/du^k sinc(u)`` from ``sin(z)/z = sum_n (-1)^n z^(2n) / (2n + 1)!``, ``z = pi u``
    (40 terms: exact to a float64 rounding for ``|u| < 1``), free of the cancellation of
    ``sin(z)/z``'s closed-form derivatives near 0."""
    z = math.pi * u
    total = sum(
        (-1) ** n / math.factorial(2 * n + 1) * math.perm(2 * n, k) * z ** (2 * n - k)
        for n in range(40)
        if 2 * n >= k
    )
    return math.pi**k * total


@pytest.mark.parametrize("dtype", [f64, torch.float32])
@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
def test_sinc_near_zero_has_its_second_derivative(method, dtype):
    """``sinc(w x)`` at ``x`` near 0 (not exactly 0) and around the series' switch
    ``|pi w x| = 1/2``: the Laplacian ``w^2 sinc''(w x)`` and its gradient in ``w``
    (``2 w sinc'' + w^2 x sinc'''``). Before, ``sin(t)/t``'s derivatives cancelled: -8 for
    -5.56 at ``x = 1e-8`` in float64, about 2e9 in float32."""
    w = 1.3
    points = [1e-8, -1e-6, 1e-4, 1e-2, 0.499 / (math.pi * w), 0.501 / (math.pi * w), 0.7]
    x = torch.tensor(points, dtype=dtype)[:, None]
    weight = torch.tensor(w, dtype=dtype, requires_grad=True)
    got = torchdiv.laplacian(lambda x: torch.sinc(weight * x).sum(-1), x, method=method)
    want = [w**2 * _sinc_derivative_series(w * p, 2) for p in points]
    tol = 1e-12 if dtype == f64 else 2e-5  # (float32: a few roundings of O(1) terms)
    torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), rtol=tol, atol=tol)
    (grad,) = torch.autograd.grad(got.sum(), weight)
    want_grad = sum(
        2 * w * _sinc_derivative_series(w * p, 2) + w**2 * p * _sinc_derivative_series(w * p, 3)
        for p in points
    )
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [f64, torch.float32])
def test_sinc_near_zero_has_its_fourth_derivative(dtype):
    """The biharmonic ``w^4 sinc''''(w x)`` of ``sinc(w x)`` near 0 and its gradient in
    ``w`` (a fifth derivative). Before: 0 at ``x = 1e-8`` and a gradient of 1.9e17 for 735 in
    float64; ``inf`` and ``nan`` in float32."""
    w = 1.3
    points = [0.0, 1e-8, 1e-4, 1e-2, 0.3]
    x = torch.tensor(points, dtype=dtype)[:, None]
    weight = torch.tensor(w, dtype=dtype, requires_grad=True)
    got = torchdiv.biharmonic(lambda x: torch.sinc(weight * x).sum(-1), x)
    want = [w**4 * _sinc_derivative_series(w * p, 4) for p in points]
    tol = 1e-11 if dtype == f64 else 1e-4  # (float32: roundings of terms of order 100)
    torch.testing.assert_close(got, torch.tensor(want, dtype=dtype), rtol=tol, atol=tol)
    (grad,) = torch.autograd.grad(got.sum(), weight)
    want_grad = sum(
        4 * w**3 * _sinc_derivative_series(w * p, 4) + w**4 * p * _sinc_derivative_series(w * p, 5)
        for p in points
    )
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=dtype), rtol=tol, atol=tol)
