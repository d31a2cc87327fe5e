"""The structured engine's first derivative of GELU by PyTorch's ``gelu_backward`` (``FIRST``,
rev-lead29): in float16 its derivative (``gelu_double_backward``, the second order of a
divergence's parameter gradients) is ``nan`` where a pre-activation is past ~150 (the tanh
approximation) or 256 (exact: ``x * x`` overflows float16 times a density that is 0). The
value there is 0 in every dtype. Reference: a float64 loop of ``autograd.grad`` on the same
weights (conftest)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import loop_diagonal
from torch import nn

import torchdiv


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_in_float16_far_out(approximate: str) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.GELU(approximate=approximate), nn.Linear(8, 3))
    with torch.no_grad():
        net[0].bias[:4] = torch.tensor([300.0, -300.0, 170.0, -1000.0])  # saturated units
    half = copy.deepcopy(net).half()
    exact = copy.deepcopy(half).double()  # (the same weights, rounded to float16)
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
