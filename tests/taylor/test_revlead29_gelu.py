"""GELU's derivatives in float16 where a pre-activation is far out (rev-lead29); both are 1 or
0 there, and their derivatives 0, in every dtype:

- the structured engine's first derivative by PyTorch's ``gelu_backward`` (``FIRST``): its
  own derivative (``gelu_double_backward``, the second order of a divergence's parameter
  gradients) computes in float16, ``nan`` past |x| ~ 150 (the tanh form) or 256 (exact: ``x
  * x`` overflows float16, times a density that is 0);
- the Taylor engine's first and second derivatives (``DERIVATIVES``): the exact form's
  ``density * (2 - x * x)`` was ``nan`` from |x| = 256 (the Laplacian ``nan``), and the
  backward pass through the tanh form's (the Laplacian's parameter gradients) ``nan`` from
  |x| ~ 20 (its cotangents overflowed, times a sigmoid's 0 derivative).

Reference: float64 loops of ``autograd.grad`` on the same weights (conftest)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import laplacian_by_grad_of_grad, loop_diagonal
from torch import nn

import torchdiv


def _saturated(approximate: str, outputs: int, third: float) -> tuple[nn.Module, nn.Module]:
    """A GELU MLP 3 -> 8 -> ``outputs`` in float16 whose first four units are far out (biases
    300, -300, ``third``, -1000), and the same weights (rounded to float16) in float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.GELU(approximate=approximate), nn.Linear(8, outputs))
    with torch.no_grad():
        net[0].bias[:4] = torch.tensor([300.0, -300.0, third, -1000.0])  # saturated units
    half = copy.deepcopy(net).half()
    return half, copy.deepcopy(half).double()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_in_float16_far_out(approximate: str) -> None:
    half, exact = _saturated(approximate, 3, 170.0)
    x = torch.randn(4, 3)
    got = torchdiv.divergence(half, x.half(), method="structured")
    loss = got.float().square().sum()
    grads = torch.autograd.grad(loss, list(half.parameters()), materialize_grads=True)
    want = loop_diagonal(exact, x.double(), create_graph=True).sum(-1)
    wanted = torch.autograd.grad(
        want.square().sum(), list(exact.parameters()), materialize_grads=True
    )
    # float16: eps 1e-3, a loss of a few terms of products of three layers' weights: 2e-2
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-2, atol=2e-2)
    for g, w in zip(grads, wanted, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)


class _TanhGELU(nn.Module):
    """The tanh GELU written out: PyTorch's own third derivative of ``gelu(approximate="tanh")``
    (the reference Laplacian's parameter gradients) is ``nan`` at |x| = 300 in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_laplacian_in_float16_far_out(approximate: str) -> None:
    half, exact = _saturated(approximate, 1, 25.0)
    if approximate == "tanh":  # (PyTorch's third derivative of it is nan at |x| = 300)
        exact[1] = _TanhGELU()
    x = torch.randn(4, 3)
    got = torchdiv.laplacian(lambda z: half(z)[:, 0], x.half(), method="taylor")
    grads = torch.autograd.grad(
        got.float().square().sum(), list(half.parameters()), materialize_grads=True
    )
    want = laplacian_by_grad_of_grad(lambda z: exact(z)[:, 0], x.double())
    wanted = torch.autograd.grad(
        want.square().sum(), list(exact.parameters()), materialize_grads=True
    )
    # float16: eps 1e-3, sums of a few products of two layers' weights: 2e-2
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-2, atol=2e-2)
    for g, w in zip(grads, wanted, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2)
