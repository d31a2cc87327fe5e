"""VMC wavefunctions end to end after det26 (qmc27): FermiNet-style Slater determinants near
their nodes through every Laplacian route, against float64 per-walker loops of
``autograd.grad`` (``conftest.laplacian_alone``).

Float32 tolerances are relative to the plain float32 per-walker loop's own error against the
float64 loop (as ``tests/core/test_det26.py``): near a node the Laplacian of ``log|psi|`` and
its parameter gradients lose digits as ``1 / sigma_min^2`` whatever computes them, so a
route is right when it loses no more than the loop does (2x: the spread of round-off
between two float32 evaluations of the same formulas, measured 0.6-1.3x).
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchdiv
from tests.conftest import laplacian_alone
from tests.stacks.test_numerics24 import _per_sample_error, _SlaterDeterminant

f64 = torch.float64


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest relative 2-norm error over the parameter tensors."""
    return max(float((g.double() - w).norm() / w.norm()) for g, w in zip(got, want, strict=True))


def _near_a_node(gap: float) -> torch.Tensor:
    """8 walkers of 4 electrons (numerics24's draw), electrons 0 and 1 ``gap`` apart."""
    torch.manual_seed(100)
    x = torch.randn(8, 12, dtype=f64)
    x[:, 3:6] = x[:, 0:3] + gap * torch.randn(8, 3, dtype=f64)
    return x


@pytest.mark.parametrize("gap", [1e-1, 1e-2, 1e-4])
def test_graph_laplacian_of_a_determinant_near_a_node(gap: float) -> None:
    """``graph_laplacian(y, x, create_graph=True)`` of a caller's graph through ``det``
    (``psi = det``, a Slater determinant written without the log), float32: its second-level
    passes were batched by ``vmap``, where PyTorch takes ``det``'s backward formula for
    tensor subclasses, whose derivative gave ``nan`` parameter gradients (electrons 1e-2 to
    1e-4 apart) and values 26x the loop's error (0.1 apart). Now within 2x the float32 loop's
    error, values and parameter gradients (measured 1.0x)."""
    torch.manual_seed(3)
    net = _SlaterDeterminant()
    net64 = copy.deepcopy(net).double()
    x = _near_a_node(gap)
    truth = laplacian_alone(net64, x)
    truth_grads = torch.autograd.grad(truth.sum(), list(net64.parameters()))
    plain = laplacian_alone(net, x.float())
    plain_grads = torch.autograd.grad(plain.sum(), list(net.parameters()))
    leaf = x.float().requires_grad_(True)
    ours = torchdiv.graph_laplacian(net(leaf), leaf, create_graph=True)
    ours_grads = torch.autograd.grad(ours.sum(), list(net.parameters()))
    loop_error = _per_sample_error(plain.detach(), truth.detach())
    assert _per_sample_error(ours.detach(), truth.detach()) <= 2 * loop_error
    assert _relative(ours_grads, truth_grads) <= 2 * _relative(plain_grads, truth_grads)
