"""The seed threads' recipes (the demo's and benchmark's baselines) against torchdiv."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, reference_divergence, tanh_mlp

from torchdiv._bench import recipes as _recipes


@pytest.mark.parametrize("name", [n for n in _recipes.RECIPES if "wrong" not in n])
def test_correct_recipes_agree_with_the_reference(name):
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(_recipes.RECIPES[name](net, x), reference_divergence(net, x))


@pytest.mark.parametrize("name", ["loop of autograd.grad", "autograd.grad(is_grads_batched)"])
def test_create_graph_recipes_are_differentiable(name):
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert _recipes.RECIPES[name](net, x, create_graph=True).requires_grad
    assert not _recipes.RECIPES[name](net, x).requires_grad


def test_ones_vjp_is_the_column_sum_not_the_trace():
    A = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    assert_close(_recipes.ones_vjp(lambda z: z @ A.T, x), torch.full((5,), 10.0).double())


@pytest.mark.parametrize("recipe", [_recipes.zuko_trace, _recipes.torchdyn_trace])
def test_the_flow_libraries_traces_agree_with_the_reference(recipe):
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(3, 4, dtype=torch.float64)
    assert_close(recipe(net, x), reference_divergence(net, x))
    images = torch.randn(2, 1, 2, 2, dtype=torch.float64)  # events of any shape, flattened
    conv = torch.nn.Conv2d(1, 1, 3, padding=1).double()
    assert_close(recipe(conv, images), reference_divergence(conv, images))


@pytest.mark.parametrize("name", list(_recipes.LAPLACIAN_RECIPES))
def test_laplacian_recipes_agree_with_the_closed_form(name):
    # f(x) = sum_i x_i^3 + prod_i x_i per sample: Laplacian 6 sum_i x_i (the product is linear
    # in each coordinate: no second derivative on the diagonal)
    x = torch.randn(3, 4, dtype=torch.float64)
    got = _recipes.LAPLACIAN_RECIPES[name](lambda z: (z**3).sum(-1) + z.prod(-1), x)
    assert_close(got, 6 * x.sum(-1))
