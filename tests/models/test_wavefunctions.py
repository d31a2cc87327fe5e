"""Laplacians of VMC wavefunctions (``torchdiv._bench.wavefunctions``) in float64: values,
parameter gradients and ``x`` gradients of ``laplacian(log_psi, r)`` against central
differences of first-order gradients and of the grad-of-grad loop (within 1e-8 relative:
the differences are good to ~1e-10 here), and ``"auto"`` running ``"taylor"``.

A Psiformer (attention, LayerNorm, ``slogdet``, envelopes) through ``value_grad_laplacian``:
the local energy and the parameter gradients of the VMC loss and of the mean local energy.

Before the linalg rules, ``"auto"`` fell back to forward-over-reverse for these models and
their parameter gradients were off by 44-51% (issue 12).
"""

from __future__ import annotations

import pytest
import torch
from conftest import central_difference, directional_gradient, laplacian_by_grad_of_grad, shifted
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchdiv
from torchdiv._bench.wavefunctions import FermiNetLike, SlaterJastrow
from torchdiv._core.modes import SafeDerivatives
from torchdiv._taylor import RULES, capture

RTOL = 1e-8
# steps for the differences of the Laplacian: near the determinant's nodes its derivatives grow
# fast (|d lap / d theta| ~ 3e5 at N = 8), so h = 3e-4 left 3e-7; 3e-5 measured 5e-11
H = 3e-5
MODELS = {"slater-jastrow": SlaterJastrow, "ferminet-like": FermiNetLike}
SIZES = [(4, 3), (8, 2)]  # electrons, samples


def _problem(name: str, electrons: int, samples: int):
    model = MODELS[name](electrons).double()
    r = torch.randn(samples, electrons, 3, dtype=torch.float64)
    return model, r


def _relative(actual, expected) -> float:
    actual = torch.as_tensor(actual, dtype=torch.float64).detach()
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    return ((actual - expected).norm() / expected.norm()).item()


def _laplacian_by_differences(model, r: torch.Tensor) -> torch.Tensor:
    def grad(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_()
        return torch.autograd.grad(model(z).sum(), z)[0].flatten(1)

    total = torch.zeros(len(r), dtype=r.dtype)
    for i in range(r[0].numel()):
        e = torch.zeros_like(r).flatten(1)
        e[:, i] = 1
        total += central_difference(lambda t, e=e, i=i: grad(r + t * e.view_as(r))[:, i])
    return total


@pytest.mark.parametrize(("electrons", "samples"), SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_laplacian_values_run_on_taylor(name, electrons, samples):
    model, r = _problem(name, electrons, samples)
    assert capture(model, r, RULES).unsupported == []  # "auto" runs "taylor", no fallback
    lap = torchdiv.laplacian(model, r)
    torch.testing.assert_close(lap, torchdiv.laplacian(model, r, method="taylor"))
    assert _relative(lap, _laplacian_by_differences(model, r)) < RTOL


@pytest.mark.parametrize(("electrons", "samples"), SIZES)
@pytest.mark.parametrize("name", MODELS)
def test_gradients_of_the_laplacian(name, electrons, samples):
    """Parameter gradients (the VMC training signal) and ``r`` gradients: third derivatives."""
    model, r = _problem(name, electrons, samples)
    params = list(model.parameters())
    directions = [torch.randn_like(p) for p in params]
    dr = torch.randn_like(r)
    weights = torch.arange(1.0, samples + 1, dtype=r.dtype)

    def reference(z: torch.Tensor) -> torch.Tensor:
        return (laplacian_by_grad_of_grad(model, z).detach() * weights).sum()

    def moved(t: float) -> torch.Tensor:
        with shifted(params, directions, t):
            return reference(r)

    by_params = central_difference(moved, H)
    lap = torchdiv.laplacian(model, r) * weights
    assert _relative(directional_gradient(lap, params, directions), by_params) < RTOL
    nested = laplacian_by_grad_of_grad(model, r) * weights
    assert _relative(directional_gradient(nested, params, directions), by_params) < RTOL
    by_r = central_difference(lambda t: reference(r + t * dr), H)
    z = r.clone().requires_grad_()
    lap = torchdiv.laplacian(model, z) * weights
    assert _relative(directional_gradient(lap, [z], [dr]), by_r) < RTOL


def test_nested_autodiff_agrees_on_the_parameter_gradients():
    method = "forward-over-reverse"
    model, r = _problem("slater-jastrow", 4, 3)
    params = list(model.parameters())
    directions = [torch.randn_like(p) for p in params]
    expected = directional_gradient(torchdiv.laplacian(model, r), params, directions)
    actual = directional_gradient(torchdiv.laplacian(model, r, method=method), params, directions)
    assert _relative(actual, expected) < RTOL


def test_local_kinetic_energy_recipe():
    """The README's recipe: ``-(Δ log ψ + |∇ log ψ|²) / 2``, against the definition
    ``-Δψ / (2ψ)`` for ``ψ = exp(log ψ)`` by the grad-of-grad loop."""
    model, r = _problem("slater-jastrow", 4, 3)
    r = r.requires_grad_()
    (grad,) = torch.autograd.grad(model(r).sum(), r, create_graph=True)
    kinetic = -(torchdiv.laplacian(model, r) + grad.square().sum((-2, -1))) / 2
    psi = lambda z: torch.exp(model(z))  # noqa: E731
    expected = -laplacian_by_grad_of_grad(psi, r) / (2 * psi(r))
    assert _relative(kinetic, expected) < RTOL


class Psiformer(nn.Module):
    """A small Psiformer (von Glehn, Spencer & Pfau 2023): per-electron features from the
    electron-nucleus vectors (rescaled by ``log(1 + |r - R|) / |r - R|``) and the spin,
    self-attention layers with residuals and LayerNorm, orbitals times envelopes
    ``Σ_I pi_I exp(-sigma_I |r_i - R_I|)``, and ``log|Σ_k det Φ_k|`` from ``slogdet`` (the largest
    log-determinant taken out, detached, as FermiNet codes do)."""

    def __init__(self, electrons: int = 4, width: int = 8, layers: int = 1, dets: int = 2):
        super().__init__()
        self.register_buffer("nuclei", torch.tensor([[0.0, 0.0, -0.7], [0.0, 0.0, 0.7]]))
        half = electrons // 2
        self.register_buffer("spins", torch.tensor([1.0] * half + [-1.0] * (electrons - half)))
        atoms, self.dets = len(self.nuclei), dets
        self.embed = nn.Linear(4 * atoms + 1, width)
        self.attention = nn.ModuleList(
            nn.MultiheadAttention(width, 2, batch_first=True) for _ in range(layers)
        )
        self.mlp = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2 * layers))
        self.orbitals = nn.Linear(width, electrons * dets)
        self.sigma = nn.Parameter(1 + 0.1 * torch.rand(dets, electrons, atoms))
        self.pi = nn.Parameter(1 + 0.1 * torch.rand(dets, electrons, atoms))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        samples, n, _ = r.shape
        vectors = r[:, :, None] - self.nuclei  # (B, n, atoms, 3)
        d = torch.linalg.norm(vectors, dim=-1)
        scaled = vectors * (torch.log1p(d) / d)[..., None]
        spins = self.spins.expand(samples, n)[..., None]
        h = self.embed(torch.cat([scaled.flatten(2), torch.log1p(d), spins], -1))
        for i, (attention, mlp) in enumerate(zip(self.attention, self.mlp, strict=True)):
            h = self.norms[2 * i](h + attention(h, h, h, need_weights=False)[0])
            h = self.norms[2 * i + 1](h + torch.tanh(mlp(h)))
        phi = self.orbitals(h).reshape(samples, n, self.dets, n).transpose(1, 2)  # (B, k, i, j)
        decay = torch.exp(-self.sigma[:, None] * d[:, None, :, None, :])  # (B, k, i, j, atoms)
        sign, logdet = torch.linalg.slogdet(phi * (self.pi[:, None] * decay).sum(-1))
        top = logdet.max(1, keepdim=True).values.detach()
        return torch.log(torch.abs((sign * torch.exp(logdet - top)).sum(1))) + top[:, 0]


def _psiformer() -> tuple[Psiformer, torch.Tensor]:
    torch.manual_seed(0)
    model = Psiformer().double()
    r = 0.8 * torch.randn(3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, r


def _local_energy(log_psi, r: torch.Tensor) -> torch.Tensor:
    """``-(Δ log ψ + |∇ log ψ|²) / 2`` (kinetic part) by the grad-of-grad loop."""
    z = r.detach().requires_grad_()
    (grad,) = torch.autograd.grad(log_psi(z).sum(), z, create_graph=True)
    return -(laplacian_by_grad_of_grad(log_psi, z) + grad.square().sum((-2, -1))) / 2


def _energy(out: torchdiv.ValueGradLaplacian) -> torch.Tensor:
    return -(out.laplacian + out.gradient.square().sum((-2, -1))) / 2


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
def test_psiformer_local_energy_and_vmc_gradients(method):
    """``value_grad_laplacian`` of a Psiformer: ``log|ψ|``, ``∇ log|ψ|`` and the local
    energy against the loop within 1e-10 (second derivatives: right in PyTorch); the
    parameter gradients of the VMC loss ``mean((E_L - mean E_L).detach() log|ψ|)`` against
    autograd of ``log|ψ|``, and of ``mean E_L`` (third derivatives) against the loop's, run
    with layer norm from means and a root (the fused kernel's third derivative is wrong,
    pytorch#175754; the slow test below checks against central differences)."""
    model, r = _psiformer()
    out = torchdiv.value_grad_laplacian(model, r, method=method)
    energy = _energy(out)
    with sdpa_kernel([SDPBackend.MATH]), SafeDerivatives(3, ""):
        z = r.clone().requires_grad_()
        value = model(z)
        (grad,) = torch.autograd.grad(value.sum(), z, retain_graph=True)
        expected = _local_energy(model, r)
    assert _relative(out.value, value) < 1e-12
    assert _relative(out.gradient, grad) < 1e-10
    assert _relative(energy, expected) < 1e-10

    params = list(model.parameters())
    weights = (energy - energy.mean()).detach()
    surrogate = torch.autograd.grad((weights * out.value).mean(), params, retain_graph=True)
    wanted = torch.autograd.grad((weights * value).mean(), params)
    for got, want in zip(surrogate, wanted, strict=True):
        assert _relative(got, want) < 1e-12
    got = torch.autograd.grad(energy.mean(), params)
    want = torch.autograd.grad(expected.mean(), params)
    for name, a, b in zip(dict(model.named_parameters()), got, want, strict=True):
        assert _relative(a, b) < 1e-9, name


@pytest.mark.slow
def test_psiformer_energy_gradient_matches_central_differences():
    """``d mean E_L / dθ`` along a random direction against central differences of the
    loop's ``mean E_L`` (PyTorch's own second derivatives only)."""
    model, r = _psiformer()
    params = list(model.parameters())
    directions = [torch.randn_like(p) for p in params]
    slope = directional_gradient(
        _energy(torchdiv.value_grad_laplacian(model, r)).mean(), params, directions
    )

    def moved(t: float) -> torch.Tensor:
        with shifted(params, directions, t), sdpa_kernel([SDPBackend.MATH]):
            return _local_energy(model, r).detach().mean()

    assert _relative(slope, central_difference(moved, H)) < RTOL


class PadeJastrow(nn.Module):
    """``log J = Σ_{i<j} a r_ij / (1 + b r_ij)`` over each configuration's electron pairs,
    with ``torch.pdist`` per configuration (``pairs``) or from differences (the reference)."""

    def __init__(self, pairs: bool):
        super().__init__()
        self.pairs = pairs
        self.a, self.b = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(0.8))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        if self.pairs:
            d = torch.stack([torch.pdist(config) for config in r.unbind(0)])
        else:
            i, j = torch.triu_indices(r.shape[1], r.shape[1], 1)
            d = (r[:, i] - r[:, j]).square().sum(-1).sqrt()
        return (self.a * d / (1 + self.b * d)).sum(-1)


@pytest.mark.parametrize(
    "method", ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]
)
def test_a_jastrow_over_pdist_in_every_method(method):
    """``torch.pdist`` has no forward-mode derivative and no double backward in PyTorch: every
    method raised (``"grad-of-grad"``: "the derivative for '_pdist_backward' is not
    implemented"). Now the Laplacian and its parameter gradients match the same factor
    from differences."""
    model, reference = PadeJastrow(pairs=True).double(), PadeJastrow(pairs=False).double()
    r = torch.randn(3, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lap = torchdiv.laplacian(model, r, method=method)
    want = laplacian_by_grad_of_grad(reference, r)
    assert _relative(lap, want) < 1e-12
    got = torch.autograd.grad(lap.sum(), list(model.parameters()))
    expected = torch.autograd.grad(want.sum(), list(reference.parameters()))
    for a, b in zip(got, expected, strict=True):
        assert _relative(a, b) < 1e-12


@pytest.mark.parametrize(
    ("method", "evaluations"),
    [("auto", 1), ("taylor", 1), ("forward-over-reverse", 2)],
)
def test_kfac_forward_hooks_see_the_whole_batch_once_per_evaluation(method, evaluations):
    """What docs/guide/limitations.md tells a K-FAC user: a forward pre-hook that accumulates
    the covariance of a layer's inputs runs once per evaluation of ``f`` (two under
    ``value_grad_laplacian``'s forward over reverse: value, then the Hessian products with
    the gradient their primal; three until qmc27), always on the
    whole batch, with the values of a plain forward (first and later calls alike)."""
    torch.manual_seed(0)
    model, r = _problem("ferminet-like", 4, 5)
    seen: list[tuple[int, ...]] = []
    stats: dict[str, torch.Tensor] = {}

    def capture_inputs(module, args) -> None:
        a = args[0].detach().flatten(0, -2)
        seen.append(tuple(args[0].shape))
        stats["A"] = stats.get("A", 0) + a.T @ a / len(a)

    model.orbitals.register_forward_pre_hook(capture_inputs)
    with torch.no_grad():
        model(r)
    plain, shape = stats.pop("A").clone(), seen.pop()
    for _ in range(2):
        seen.clear()
        torchdiv.value_grad_laplacian(model, r, method=method)
        assert seen == [shape] * evaluations
        torch.testing.assert_close(stats.pop("A") / evaluations, plain)
