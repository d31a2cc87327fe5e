"""Laplacians of VMC wavefunctions (``torchdiv._bench.wavefunctions``) in float64: values,
parameter gradients and ``x`` gradients of ``laplacian(log_psi, r)`` against central
differences of first-order gradients and of the grad-of-grad loop (within 1e-8 relative:
the differences are good to ~1e-10 here), and ``"auto"`` running ``"taylor"``.

Before the linalg rules, ``"auto"`` fell back to forward-over-reverse for these models and
their parameter gradients were off by 44-51% (issue 12).
"""

from __future__ import annotations

import pytest
import torch
from conftest import central_difference, directional_gradient, laplacian_by_grad_of_grad, shifted

import torchdiv
from torchdiv._bench.wavefunctions import FermiNetLike, SlaterJastrow
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
