"""graph_jacobian and graph_divergence: from a graph the caller built."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, conv_net, reference_divergence, reference_jacobian, tanh_mlp

import torchdiv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_mlp_against_torch_func(dtype, chunk_size):
    net = tanh_mlp(6, 10, 6, dtype)
    x = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    y = net(x)
    assert_close(torchdiv.graph_jacobian(y, x, chunk_size=chunk_size), reference_jacobian(net, x))
    assert_close(
        torchdiv.graph_divergence(y, x, chunk_size=chunk_size), reference_divergence(net, x)
    )


@pytest.mark.parametrize("batch_dims", [0, 1, 2])
def test_batch_dims_and_image_events(batch_dims):
    net = conv_net(2)
    x = torch.randn(*(3, 2)[:batch_dims], 2, 3, 3, dtype=torch.float64)
    flat = x.reshape(-1, 2, 3, 3)

    def f(z):
        return net(z.reshape(-1, 2, 3, 3)).reshape(z.shape)

    xg = x.clone().requires_grad_(True)
    y = f(xg)
    jac = torchdiv.graph_jacobian(y, xg, batch_dims=batch_dims)
    assert jac.shape == (*x.shape[:batch_dims], 2, 3, 3, 2, 3, 3)
    assert_close(jac, reference_jacobian(f, x, batch_dims))
    div = torchdiv.graph_divergence(y, xg, batch_dims=batch_dims)
    assert_close(div, reference_divergence(f, x, batch_dims))
    assert flat.shape[0] == max(x.shape[:batch_dims].numel(), 1)


def test_non_square_graph_jacobian_and_intermediate_x():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    h = a * 2  # an intermediate tensor as x
    W = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tanh(h @ W.T)
    expected = (1 - y**2).unsqueeze(-1) * W
    assert_close(torchdiv.graph_jacobian(y, h), expected)


def test_create_graph_makes_result_differentiable():
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    div = torchdiv.graph_divergence(net(x), x, create_graph=True)
    got = torch.autograd.grad(div.sum(), [x, net[0].weight])
    ref = reference_divergence(net, x)
    want = torch.autograd.grad(ref.sum(), [x, net[0].weight])
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)
    assert not torchdiv.graph_divergence(net(x), x).requires_grad


def test_graph_is_kept_for_the_callers_backward():
    x = torch.randn(3, 2, requires_grad=True)
    y = x**3
    torchdiv.graph_divergence(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)  # would fail had we freed the graph
    assert_close(g, 3 * x.detach() ** 2)


def test_works_under_no_grad_and_restores_mode():
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = x.sin()
    with torch.no_grad():
        div = torchdiv.graph_divergence(y, x)
        assert not torch.is_grad_enabled()
    assert_close(div, x.detach().cos().sum(-1))


def test_the_seed_mistake_and_the_fix():
    """grad(y, x, ones_like(y)) sums columns; graph_divergence takes the trace."""
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = x @ A.T
    (wrong,) = torch.autograd.grad(y, x, torch.ones_like(y), retain_graph=True)
    assert_close(wrong.sum(-1), torch.full((3,), 10.0, dtype=torch.float64))  # sum of all A
    assert_close(torchdiv.graph_divergence(y, x), torch.full((3,), 5.0, dtype=torch.float64))
