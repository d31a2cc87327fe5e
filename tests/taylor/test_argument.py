"""What the recording engines call ``f`` on: a new alias of ``x``, so that a tensor ``f``
reads from outside (the caller's own ``x`` object in a closure) is a constant of ``f``, as
every other method sees it. References: per-sample ``autograd.grad`` loops (conftest)."""

from __future__ import annotations

import pytest
import torch

import torchdiv
from tests.conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal, tanh_mlp


def _bc(p: torch.Tensor) -> torch.Tensor:
    """A hard boundary factor, ``1 - |p|^2`` per sample, kept as a column."""
    return 1 - (p * p).sum(-1, keepdim=True)


@pytest.mark.parametrize("method", ["auto", "taylor"])
def test_laplacian_of_a_closure_over_the_callers_x(method: str) -> None:
    """``lambda z: bc(x) * net(z)``: ``bc(x)`` is a constant factor, ``Δf = bc(x) Δnet``
    (the product-rule terms of a ``bc(z)`` are not there); twice, the second call checked
    against the kept recording."""
    net = tanh_mlp(3, 6, 1)
    x = torch.randn(4, 3, dtype=torch.float64)
    want = _bc(x)[:, 0] * laplacian_by_grad_of_grad(lambda z: net(z)[:, 0], x)
    f = lambda z: (_bc(x) * net(z))[:, 0]  # noqa: E731
    for _ in range(2):
        assert_close(torchdiv.laplacian(f, x, method=method), want)


@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_structured_closure_over_the_callers_x(op: str) -> None:
    """``lambda z: vnet(z) + x``: ``x`` added as a constant, no identity in the Jacobian."""
    vnet = tanh_mlp(3, 6, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    diagonal = loop_diagonal(vnet, x)
    want = diagonal.sum(-1) if op == "divergence" else diagonal
    f = lambda z: vnet(z) + x  # noqa: E731
    for _ in range(2):
        assert_close(getattr(torchdiv, op)(f, x, method="structured"), want)
