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


class _Identity(torch.autograd.Function):
    """A custom ``Function`` with a differentiable backward: puts ``GraphJacobian`` on its
    watched path (``is_grads_batched`` under the custom-``Function`` watch)."""

    @staticmethod
    def forward(ctx, z):
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _channels_last_group_norm(custom: bool):
    """A float64 GroupNorm met by channels-last strides, as in diffusers' attention blocks: its
    backward raises ``NYI: querying is_contiguous inside of vmap`` in either batched pass."""
    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(2, 4).double()
    with torch.no_grad():
        gn.weight.copy_(torch.randn(4, dtype=torch.float64))
        gn.bias.copy_(torch.randn(4, dtype=torch.float64))

    def f(z):
        z = _Identity.apply(z) if custom else z
        return torch.tanh(gn(z.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)))

    return gn, f


def _rows_jacobian(y, x, create_graph=False):
    """Per-sample Jacobians ``(N, n, n)`` by one ``autograd.grad`` per output entry (the
    samples of ``y`` depend on their own ``x`` only)."""
    flat = y.reshape(len(y), -1)
    rows = [
        torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True, create_graph=create_graph)[0]
        for i in range(flat.shape[1])
    ]
    return torch.stack([r.reshape(len(x), -1) for r in rows], 1)


@pytest.mark.parametrize("custom", [False, True], ids=["plain", "custom-function"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_a_graph_that_vmap_cannot_batch_goes_one_pass_per_row(custom, chunk_size):
    """GroupNorm on channels-last strides (every diffusers U-Net with attention): both batched
    backward passes raise; the products go one backward pass each, with their graph."""
    gn, f = _channels_last_group_norm(custom)
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    y = f(x)
    want = _rows_jacobian(y, x, create_graph=True)
    jac = torchdiv.graph_jacobian(y, x, chunk_size=chunk_size)
    assert_close(jac.reshape(3, 16, 16), want.detach())
    div = torchdiv.graph_divergence(y, x, create_graph=True, chunk_size=chunk_size)
    trace = want.diagonal(dim1=1, dim2=2).sum(-1)
    assert_close(div, trace.detach())
    # create_graph kept: the gradient of the divergence's sum by GroupNorm's weight
    (got,) = torch.autograd.grad(div.sum(), gn.weight, retain_graph=True)
    (ref,) = torch.autograd.grad(trace.sum(), gn.weight)
    assert_close(got, ref)
