"""A VMC training loop as FermiNet's PyTorch ports write it, against references that see one
walker at a time (``conftest.laplacian_alone``: grad of grad per walker, float64).

The wavefunction has what ``tests/models/test_wavefunctions.py``'s do not: spin-split
determinants (``slogdet`` of the up and down blocks, signs multiplied, several determinants
combined by a max-shifted signed sum), electron-electron distances by FermiNet's trick
``|r_i - r_j + δ_ij| (1 - δ_ij)`` (finite derivatives on the diagonal), spin-split means
in each layer, and isotropic envelopes ``Σ_I π_I exp(-|s_I| |r - R_I|)``.

The loop: local energy ``-(Δ log|ψ| + |∇ log|ψ||²) / 2 + V`` by ``value_grad_laplacian``, the
gradient estimator ``mean((E_L - mean E_L).detach() log|ψ|)``, Adam steps, walkers moved by
Metropolis in place (the same tensor, new values, between calls), the model trained in
float32 and evaluated in float64 on the same module object (``model.double()``: the
second engine call must not reuse the float32 recording).
"""

from __future__ import annotations

import pytest
import torch
from conftest import laplacian_alone
from torch import nn

import torchdiv

METHODS = ["auto", "taylor", "forward-over-reverse"]
# the default run keeps "auto"; the methods it does not choose here run with the slow tests
SLOW_METHODS = ["auto", *(pytest.param(m, marks=pytest.mark.slow) for m in METHODS[1:])]


class SpinFermiNet(nn.Module):
    """FermiNet (Pfau et al. 2020) with ``up`` spin-up electrons first, then ``down``; one
    nucleus at the origin (charge ``charge`` for the potential). ``(B, N, 3) -> (B,)``."""

    def __init__(self, up: int = 2, down: int = 2, width: int = 8, pair: int = 4, dets: int = 2):
        super().__init__()
        self.up, self.dets, self.charge = up, dets, 4.0
        self.register_buffer("nuclei", torch.zeros(1, 3))
        first, second = nn.Linear(3 * 4 + 2 * 4, width), nn.Linear(3 * width + 2 * pair, width)
        self.one = nn.ModuleList([first, second])
        self.two = nn.Linear(4, pair)  # the last layer's pair stream is not read
        self.orbitals_up = nn.Linear(width, dets * up)
        self.orbitals_down = nn.Linear(width, dets * down)
        electrons = up + down
        self.sigma = nn.Parameter(1 + 0.1 * torch.rand(dets, electrons, 1))
        self.pi = nn.Parameter(1 + 0.1 * torch.rand(dets, electrons, 1))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        walkers, n, _ = r.shape
        ae = r[:, :, None] - self.nuclei  # (B, N, atoms, 3)
        r_ae = ae.norm(dim=-1)  # (B, N, atoms)
        ee = r[:, :, None] - r[:, None]  # (B, N, N, 3)
        eye = torch.eye(n, dtype=r.dtype)
        r_ee = (ee + eye[..., None]).norm(dim=-1) * (1 - eye)
        h1 = torch.cat([ae, r_ae[..., None]], -1).flatten(2)
        h2 = torch.cat([ee, r_ee[..., None]], -1)
        up = self.up
        for i, one in enumerate(self.one):
            means = [h1[:, :up].mean(1, keepdim=True), h1[:, up:].mean(1, keepdim=True)]
            pairs = [h2[:, :, :up].mean(2), h2[:, :, up:].mean(2)]
            f = torch.cat([h1, *(m.expand(-1, n, -1) for m in means), *pairs], -1)
            new = torch.tanh(one(f))
            h1 = new + h1 if new.shape == h1.shape else new
            if i == 0:
                h2 = torch.tanh(self.two(h2))
        envelope = (self.pi * torch.exp(-(self.sigma * r_ae[:, None]).abs())).sum(-1)  # (B, K, N)
        signs, logdets = [], []
        for layer, rows in ((self.orbitals_up, slice(0, up)), (self.orbitals_down, slice(up, n))):
            m = rows.stop - rows.start
            phi = layer(h1[:, rows]).reshape(walkers, m, self.dets, m).transpose(1, 2)
            sign, logdet = torch.linalg.slogdet(phi * envelope[:, :, rows, None])
            signs.append(sign)
            logdets.append(logdet)
        sign, logdet = signs[0] * signs[1], logdets[0] + logdets[1]  # (B, K)
        top = logdet.max(-1, keepdim=True).values.detach()
        return torch.log(torch.abs((sign * torch.exp(logdet - top)).sum(-1))) + top[:, 0]

    def potential(self, r: torch.Tensor) -> torch.Tensor:
        """Coulomb energy of each walker, ``(B,)``."""
        i, j = torch.triu_indices(r.shape[1], r.shape[1], 1)
        ee = (r[:, i] - r[:, j]).norm(dim=-1).reciprocal().sum(-1)
        ae = (r[:, :, None] - self.nuclei).norm(dim=-1).reciprocal().sum((1, 2))
        return ee - self.charge * ae


def _reference_energy(model: SpinFermiNet, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log|ψ|, E_L)`` with the Laplacian by grad of grad per walker alone."""
    z = r.detach().requires_grad_()
    value = model(z)
    (grad,) = torch.autograd.grad(value.sum(), z, create_graph=True)
    kinetic = -(laplacian_alone(model, r) + grad.square().sum((1, 2))) / 2
    return value, kinetic + model.potential(r)


def _energy(model: SpinFermiNet, r: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    out = torchdiv.value_grad_laplacian(model, r, method=method)
    kinetic = -(out.laplacian + out.gradient.square().sum((1, 2))) / 2
    return out.value, kinetic + model.potential(r)


def _vmc_loss(value: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    return ((energy - energy.mean()).detach() * value).mean()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("walkers", [3, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", SLOW_METHODS)
def test_spin_split_ferminet_local_energy_and_gradients(method, walkers):
    """E_L within 1e-11 of the per-walker loop (float64; second derivatives through
    ``slogdet`` cancel ~3 digits), the parameter gradients of the VMC loss and of ``mean E_L``
    (third derivatives) within 1e-9."""
    torch.manual_seed(0)
    model = SpinFermiNet().double()
    r = torch.randn(walkers, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    value, energy = _energy(model, r, method)
    want_value, want_energy = _reference_energy(model, r)
    assert _relative(energy, want_energy) < 1e-11
    params = list(model.parameters())
    for loss, want in ((_vmc_loss, _vmc_loss), (lambda v, e: e.mean(), lambda v, e: e.mean())):
        got = torch.autograd.grad(loss(value, energy), params, retain_graph=True)
        expected = torch.autograd.grad(want(want_value, want_energy), params, retain_graph=True)
        for name, a, b in zip(dict(model.named_parameters()), got, expected, strict=True):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item()), name


@pytest.mark.parametrize("method", SLOW_METHODS)
def test_walkers_moved_in_place_then_the_float32_model_doubled(method):
    """Two Adam steps in float32 with the walkers (3, odd) moved in place between calls, the
    last step's E_L within float32's reach of the float64 per-walker loop (1e-4: a Laplacian of
    ``slogdet`` loses ~3 digits of 2^-24); then ``model.double()`` on the same object: two
    float64 calls at 1e-11 (the float32 recording must not serve them), and back to float32."""
    torch.manual_seed(0)
    model = SpinFermiNet()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(2)
    r = torch.randn(3, 4, 3, generator=generator)
    for step in range(2):
        with torch.no_grad():
            proposal = r + 0.2 * torch.randn(r.shape, generator=generator)
            accept = torch.rand(len(r), generator=generator) < 0.6
            r[accept] = proposal[accept]  # the same walker tensor, new values
        value, energy = _energy(model, r, method)
        if step == 1:
            double = SpinFermiNet().double()
            double.load_state_dict(model.state_dict())
            assert _relative(energy, _reference_energy(double, r.double())[1]) < 1e-4
        optimiser.zero_grad()
        _vmc_loss(value, energy).backward()
        optimiser.step()
    model.double()
    want = _reference_energy(model, r.double())[1]
    for _ in range(2):
        energy = _energy(model, r.double(), method)[1]
        assert energy.dtype == torch.float64
        assert _relative(energy, want) < 1e-11
    model.float()
    assert _relative(_energy(model, r, method)[1], want) < 1e-4


@pytest.mark.parametrize("method", ["auto", "taylor", "hutchinson"])
def test_centring_over_walkers_is_refused_and_per_walker_centring_is_not(method):
    """``r - 0.3 r.mean(0)`` (a mean over walkers where one over electrons was meant) mixes
    walkers: refused by the watching methods and ``value_grad_laplacian``; centring each
    walker on its own centre of mass (``r.mean(1)``) is valid: passed by every method,
    matching the loop."""
    torch.manual_seed(0)
    model = SpinFermiNet().double()
    r = torch.randn(3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    extra = {"num_probes": 2, "generator": torch.Generator()} if method == "hutchinson" else {}
    wrong = lambda z: model(z - 0.3 * z.mean(0, keepdim=True))  # noqa: E731
    with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
        torchdiv.laplacian(wrong, r, method=method, **extra)
    with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
        torchdiv.value_grad_laplacian(wrong, r)
    centred = lambda z: model(z - z.mean(1, keepdim=True))  # noqa: E731
    lap = torchdiv.laplacian(centred, r, method=method, **extra)
    if method == "auto":  # (the passes of the others: laplacian_alone is the costly part)
        assert _relative(lap, laplacian_alone(centred, r)) < 1e-12
