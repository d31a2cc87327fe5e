"""Complex wavefunctions (periodic systems with a twist, spinful states): ``log ψ = log|ψ| + iθ``
from ``slogdet`` of a complex orbital matrix, the real and imaginary parts returned stacked.

The kinetic energy ``-(Δ log ψ + (∇ log ψ)²) / 2`` needs the Laplacian of both parts. The
forward-mode engines run ``f`` with ``torchdiv._core.linalg``'s determinants and solves in place
of PyTorch's, which were written for real matrices (``M^T`` for the gradient, a sign without
derivatives): on a complex matrix the Laplacian by ``"auto"`` (forward over reverse above ten
inputs), ``"forward-over-reverse"``, ``"hessian"`` and Hutchinson's HVPs was 240% off, and
``value_grad_laplacian``'s too. The reference is the per-sample loop of ``autograd.grad`` with
``create_graph`` (reverse over reverse, PyTorch's complex formulas, which are right).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_alone,
    laplacian_by_grad_of_grad,
)

import torchdiv

ELECTRONS, BOX = 3, 2.0


class TwistedSlater(torch.nn.Module):
    """Plane waves ``exp(i (k + twist)·r')`` at backflowed positions ``r'``, their moduli
    modulated by a network of periodic features, times complex orbital coefficients, and a
    periodic Jastrow factor; returns ``(log|ψ|, θ)`` per sample, ``(B, 2)``."""

    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        waves = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float64)
        twist = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
        self.register_buffer("k", waves * 2 * math.pi / BOX + twist)
        self.flow_in = torch.nn.Linear(6, hidden, dtype=torch.float64)
        self.flow_out = torch.nn.Linear(hidden, 3, dtype=torch.float64)
        self.envelope = torch.nn.Linear(6, ELECTRONS, dtype=torch.float64)
        mix = torch.eye(ELECTRONS) + 0.3 * torch.randn(ELECTRONS, ELECTRONS, dtype=torch.cdouble)
        self.mix = torch.nn.Parameter(mix)
        self.jastrow = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x.reshape(len(x), ELECTRONS, 3)
        angle = 2 * math.pi * r / BOX
        features = torch.cat([angle.cos(), angle.sin()], -1)
        flowed = r + 0.1 * self.flow_out(torch.tanh(self.flow_in(features)))
        phase = torch.einsum("bnd,kd->bnk", flowed, self.k)
        orbitals = torch.polar(1 + 0.2 * torch.tanh(self.envelope(features)), phase) @ self.mix
        sign, log_abs = torch.linalg.slogdet(orbitals)
        pairs = torch.cos(2 * math.pi * (r[:, :, None] - r[:, None]) / BOX).sum((-1, -2, -3))
        return torch.stack([log_abs - self.jastrow * pairs / 10, torch.angle(sign)], -1)


def _energy(gradient: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
    """The QMC loss's local kinetic energy, real and imaginary parts: with ``log ψ = A + iθ``,
    ``-(ΔA + |∇A|² - |∇θ|²) / 2`` and ``-(Δθ + 2 ∇A·∇θ) / 2``; a loss of both."""
    grad_a, grad_t = gradient[:, 0], gradient[:, 1]
    real = -0.5 * (laplacian[:, 0] + grad_a.square().sum(-1) - grad_t.square().sum(-1))
    imag = -0.5 * (laplacian[:, 1] + 2 * (grad_a * grad_t).sum(-1))
    return real.mean() + 0.3 * imag.square().mean()


def _reference(psi: TwistedSlater, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients ``(B, 2, D)`` and Laplacians ``(B, 2)`` by grad of grad."""
    gradients = []
    for part in range(2):
        leaf = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(psi(leaf)[:, part].sum(), leaf, create_graph=True)
        gradients.append(g)
    laplacians = [laplacian_alone(lambda z, p=part: psi(z)[:, p], x) for part in range(2)]
    return torch.stack(gradients, 1), torch.stack(laplacians, 1)


@pytest.mark.parametrize(
    "method",
    [
        "auto",
        *(pytest.param(m, marks=pytest.mark.slow) for m in ("forward-over-reverse", "hessian")),
    ],
)
def test_complex_slater_laplacian_and_energy_gradients(method: str) -> None:
    psi = TwistedSlater()
    x = torch.rand(3, 3 * ELECTRONS, dtype=torch.float64) * BOX
    gradient, expected = _reference(psi, x)
    got = torchdiv.laplacian(psi, x, method=method)
    assert_close(got, expected)
    ours = _energy(torchdiv.jacobian(psi, x), got)
    assert_same_parameter_gradients(psi, ours, _energy(gradient, expected))


@pytest.mark.slow
def test_complex_slater_value_grad_laplacian() -> None:
    psi = TwistedSlater()
    x = torch.rand(3, 3 * ELECTRONS, dtype=torch.float64) * BOX
    gradient, expected = _reference(psi, x)
    out = torchdiv.value_grad_laplacian(psi, x, method="forward-over-reverse")
    assert_close(out.gradient, gradient)
    assert_close(out.laplacian, expected)
    assert_same_parameter_gradients(
        psi, _energy(out.gradient, out.laplacian), _energy(gradient, expected)
    )


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """A complex ``(B, 3, 3)`` matrix of each sample's ``(B, 4)`` coordinates."""
    w = torch.linspace(-1, 1, 12, dtype=x.dtype).reshape(4, 3)
    shift = torch.eye(3, dtype=torch.cdouble) * (2 + 1j)
    return torch.polar(torch.ones(len(x), 3, 3, dtype=x.dtype), (x @ w)[:, :, None] * 1.5) + shift


@pytest.mark.parametrize(
    "f",
    [
        lambda x: torch.linalg.det(_matrix(x)).real,
        lambda x: torch.logdet(_matrix(x)).imag,
        lambda x: torch.linalg.solve(_matrix(x), torch.complex(x[:, :3], x[:, 1:])).imag.sum(-1),
        pytest.param(
            lambda x: torch.cholesky_inverse(
                torch.linalg.cholesky(_matrix(x) @ _matrix(x).mH)
            ).real.sum((-1, -2)),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["det", "logdet", "solve", "cholesky_inverse"],
)
def test_complex_linalg_under_forward_mode(f) -> None:
    """The replaced determinants and solves on complex matrices: the Laplacian by forward
    over reverse and its gradient in ``x`` (third derivatives) as grad of grad gives them."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    got = torchdiv.laplacian(f, x, method="forward-over-reverse")
    expected = laplacian_by_grad_of_grad(f, x)
    assert_close(got, expected)
    (grad_got,) = torch.autograd.grad(got.square().sum(), x)
    (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
    assert_close(grad_got, grad_expected)


def test_householder_product_tau_is_a_batch_of_vectors() -> None:
    """``householder_product(A, tau)``'s ``tau`` is ``(B, k)``: its last dimension, not
    dimension 0, is each sample's; the watch took it for a matrix and refused every batch."""
    w = torch.linspace(-1, 1, 36, dtype=torch.float64).reshape(4, 9)

    def f(x: torch.Tensor) -> torch.Tensor:
        q = torch.linalg.householder_product((x @ w).reshape(-1, 3, 3), 0.3 * x[:, :2])
        return q.sum((-1, -2))

    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(torchdiv.laplacian(f, x), laplacian_alone(f, x))

    def mixed(x: torch.Tensor) -> torch.Tensor:  # tau read across samples: still refused
        q = torch.linalg.householder_product((x @ w).reshape(-1, 3, 3), x.T[:3, :2])
        return q.sum((-1, -2))

    with pytest.raises(torchdiv.BatchInteractionError, match="householder_product"):
        torchdiv.laplacian(mixed, x)


@pytest.mark.parametrize("fn", ["divergence", "jacobian", "laplacian", "value_grad_laplacian"])
def test_complex_input_or_output_is_refused_with_the_way_out(fn: str) -> None:
    """A complex ``x`` or ``f(x)`` is refused naming the dtype and ``view_as_real``: the
    message for ``x`` said ``x.float()``, which drops the imaginary part."""
    op = getattr(torchdiv, fn)
    z = torch.randn(3, 4, dtype=torch.cdouble)
    with pytest.raises(TypeError, match=rf"{fn}: x .*complex128.*view_as_real\(x\)") as info:
        op(torch.exp, z)
    assert "x.float()" not in str(info.value)
    with pytest.raises(TypeError, match=rf"{fn}: f\(x\) .*complex128.*view_as_real\(f\(x\)\)"):
        op(lambda x: torch.exp(1j * x), z.real)
