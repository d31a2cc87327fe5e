"""A custom ``autograd.Function`` whose ``backward`` is ``@once_differentiable``: its backward
returns constants when given gradients that do not require grad (torchdiv's basis vectors), so
a Laplacian through it came back 0 and a divergence's parameter gradients lacked its part.
Refused where such a derivative is needed; no error where none goes through it. References:
the same function with ``torch.tanh``, by per-sample ``autograd.grad`` loops (conftest)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.function import once_differentiable

import torchdiv
from tests.conftest import assert_close, laplacian_by_grad_of_grad, loop_diagonal
from torchdiv._exact.autograd import UndifferentiableBackward


class OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


@pytest.mark.parametrize("method", ["auto", "grad-of-grad"])
def test_laplacian_through_once_differentiable_is_refused(method: str) -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    # raised at the call: the public function's name in front, as every error of it
    with pytest.raises(UndifferentiableBackward, match=r"^laplacian: .*OnceTanh.*once_diff"):
        torchdiv.laplacian(lambda z: OnceTanh.apply(z).sum(-1), x, method=method)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_divergence_values_kept_gradients_refused(method: str) -> None:
    """The divergence's values are right (first derivatives); its parameter gradients, which
    would go through the backward a second time, raise when asked for."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    options = {"probes": torch.eye(3, dtype=torch.float64)[:, None].expand(3, 4, 3)}
    options = options if method == "hutchinson" else {}
    got = torchdiv.divergence(lambda z: lin(OnceTanh.apply(z)), x, method=method, **options)
    want = loop_diagonal(lambda z: lin(torch.tanh(z)), x).sum(-1)
    scale = 3.0 if method == "hutchinson" else 1.0  # the mean of 3 unit probes' terms
    assert_close(got.detach() * scale, want)
    with pytest.raises(UndifferentiableBackward, match=r"OnceTanh.*once_differentiable"):
        got.sum().backward()
    with torch.no_grad():  # nothing differentiated a second time: no error
        assert_close(torchdiv.divergence(lambda z: lin(OnceTanh.apply(z)), x), want)


def test_once_differentiable_off_the_path_to_x() -> None:
    """Applied to a parameter only, the Function's backward is no part of derivatives with
    respect to ``x``, and once of the parameter gradient: no error, right values."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    net = net.double()
    w = torch.randn(1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    u = lambda z: (net(z) * OnceTanh.apply(w))[:, 0]  # noqa: E731
    want = laplacian_by_grad_of_grad(lambda z: (net(z) * torch.tanh(w))[:, 0], x)
    got = torchdiv.laplacian(u, x)
    assert_close(got, want)
    (grad,) = torch.autograd.grad(got.sum(), w)
    (expected,) = torch.autograd.grad(want.sum(), w)
    assert_close(grad, expected)
