"""Merge review of rev-numerics24 (825ca11): its float32 formulas attacked where they were not
measured (``NOTES_rev-merges24a.md``).

* The Taylor rule of ``det`` by the adjugate's grouping was measured with 4 electrons: with 8-16
  electrons, two of them 1e-3 apart, its float32 Laplacian was still up to 2000x the float32
  grad-of-grad loop's per-sample error (22 times the value itself), its parameter gradients
  3500x: ``A^-1 C_k`` amplifies ``C_k``'s round-off by ``sigma_{n-1} / sigma_min``. The rule
  now runs in float64 (its inputs' float32 round-off then dominates: 0.5-1.9x the loop).
* The Taylor rule of GELU(tanh) in float16: ``2 t du^2`` overflows from ``|x| = 41`` and
  ``sech^2 u`` (0 there) times it was ``nan``: the Laplacian of a float16 GELU(tanh) net whose
  pre-activations reach 41 was ``nan`` where the float16 loop's is finite (before the merge
  too, ``1 - t^2`` being 0 as well).

Tolerances: a multiple of the float32 loop's own error on the same rounded weights and inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchdiv
from tests.conftest import laplacian_by_grad_of_grad
from tests.stacks.test_numerics24 import _gelu_net

Tensor = torch.Tensor


class _Slater8(torch.nn.Module):
    """``psi = det[phi_j(r_i)]`` of 8 electrons in 3-D, orbitals from a two-layer tanh MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.orbitals = torch.nn.Sequential(
            torch.nn.Linear(3, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 32),
            torch.nn.Tanh(),
            torch.nn.Linear(32, 8),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.linalg.det(self.orbitals(x.reshape(-1, 8, 3)))


def _errors(net: torch.nn.Module, x: Tensor, lap: Tensor, truth: Tensor, grads: Tensor, w: Tensor):
    """(each sample's largest relative error, the parameter gradients' normwise error) of a
    float32 Laplacian ``lap`` of ``net`` against the float64 ``truth`` and ``grads``."""
    mine = torch.autograd.grad((w.float() * lap).sum(), list(net.parameters()))
    mine = torch.cat([g.flatten() for g in mine]).double()
    value = float(((lap.detach().double() - truth) / truth).abs().max())
    return value, float((mine - grads).abs().max() / grads.abs().max())


def test_determinant_laplacian_near_a_node_with_rows_moved_one_by_one() -> None:
    """``det(A0 + tanh(R P))``, row ``i`` moved by electron ``i`` only (a Slater matrix's
    structure), ``A0`` of 8 x 8 with singular values 1-0.1 and 1e-4. ``det`` is linear in
    each row: the Laplacian is ``sum_ij L_ij cof_ij`` (``L`` the rows' own Laplacians, ``cof``
    the cofactors, in float64), the rule's ``sum_k tr(A^-1 C_k Ȧ_k)`` exactly 0. Float32 per
    sample within 1e-3 (eps ``cond(A)``, 1.2e-3; measured 1.3e-6, the float32 grad-of-grad
    loop 5e-4; before, 0.37; 15 on 16 such matrices)."""
    torch.manual_seed(0)
    u, v = (torch.linalg.qr(torch.randn(4, 8, 8, dtype=torch.float64))[0] for _ in range(2))
    spectrum = torch.logspace(0, -1, 8, dtype=torch.float64)
    spectrum[-1] = 1e-4
    a0, p = (u * spectrum) @ v.mT, torch.randn(3, 8, dtype=torch.float64)
    x = 1e-3 * torch.randn(4, 24, dtype=torch.float64)

    def f(x: Tensor) -> Tensor:
        return torch.linalg.det(a0.to(x.dtype) + torch.tanh(x.reshape(-1, 8, 3) @ p.to(x.dtype)))

    t = torch.tanh(x.reshape(-1, 8, 3) @ p)
    rows = p.square().sum(0) * (-2 * t * (1 - t * t))  # each row's Laplacian in its electron
    a = a0 + t
    truth = (rows * torch.linalg.det(a)[:, None, None] * torch.linalg.inv(a).mT).sum((-2, -1))
    ours = torchdiv.laplacian(f, x.float(), method="taylor")
    assert ours.dtype == torch.float32
    assert float(((ours.detach().double() - truth) / truth).abs().max()) <= 1e-3


@pytest.mark.slow
def test_determinant_laplacian_of_eight_electrons_near_a_node() -> None:
    """Electrons 0 and 1 1e-3 apart: the Taylor sweep's float32 Laplacian and its parameter
    gradients within 3x the grad-of-grad loop's errors (measured 0.7x/0.8x; before, 2200x and
    3500x: 22 times the value itself)."""
    torch.manual_seed(2)
    net = _Slater8()
    torch.manual_seed(102)
    x = torch.randn(8, 24, dtype=torch.float64)
    x[:, 3:6] = x[:, 0:3] + 1e-3 * torch.randn(8, 3, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    wide = copy.deepcopy(net).double()
    truth = laplacian_by_grad_of_grad(wide, x)
    grads = torch.autograd.grad((w * truth).sum(), list(wide.parameters()))
    grads, truth = torch.cat([g.flatten() for g in grads]), truth.detach()
    loop = _errors(net, x, laplacian_by_grad_of_grad(net, x.float()), truth, grads, w)
    ours = torchdiv.laplacian(net, x.float(), method="taylor")
    assert ours.dtype == torch.float32
    value, gradient = _errors(net, x, ours, truth, grads, w)
    assert value <= 3 * loop[0], (value, loop)
    assert gradient <= 3 * loop[1], (gradient, loop)


def test_gelu_tanh_laplacian_in_float16_with_large_pre_activations() -> None:
    """A float16 GELU(tanh) net whose pre-activations reach |z| ~ 56: the Taylor sweep's
    Laplacian within 2x the float16 grad-of-grad loop's error of the float64 truth (measured
    0.04x; it was ``nan``)."""
    net = _gelu_net()
    torch.manual_seed(0)
    x = torch.randn(8, 3).half()
    half = copy.deepcopy(net).half()
    wide = copy.deepcopy(net).double()
    truth = laplacian_by_grad_of_grad(lambda z: wide(z)[:, 0], x.double()).detach()
    loop = laplacian_by_grad_of_grad(lambda z: half(z)[:, 0], x).detach()
    ours = torchdiv.laplacian(half, x, method="taylor").detach()[:, 0]
    assert ours.dtype == torch.float16
    loop_error = (loop.double() - truth).abs().max()
    assert (ours.double() - truth).abs().max() <= 2 * loop_error
