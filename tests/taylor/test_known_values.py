"""The Taylor engine's replay taking the values ``f`` computed at capture (``propagate``'s
``known``, ``_laplacian.methods.reused_values``) instead of computing them again.

Each network mixes ops whose rule reads the kept output (``tanh``, ``softplus``, ``atan2``,
products of two jets, ``addmm`` with ``alpha`` and with a bias that depends on ``x``) with
ops that have no such rule (``log_softmax``, ``cumsum``; not layer norm, whose triple
backward in PyTorch disagrees with finite differences, which the engine matches): the
Laplacian and the
gradient of its square with respect to the parameters must equal a float64 grad-of-grad loop
(reverse over reverse, independent of the engine) to float64 round-off, frozen and in
training. ``REUSE_MEMORY`` is raised so that frozen calls reuse the values too.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, laplacian_by_grad_of_grad
from torch import nn

import torchdiv
from torchdiv._api import second_order
from torchdiv._laplacian import methods

f64 = torch.float64


class Mixed(nn.Module):
    """``tanh``, ``softplus``, ``atan2``, a product of two jets, ``addmm`` with ``alpha`` and
    with a bias computed from ``x``, then ops without a rule given their output."""

    def __init__(self, d: int, h: int = 6):
        super().__init__()
        self.first, self.second = nn.Linear(d, h), nn.Linear(h, h)
        self.w = nn.Parameter(torch.randn(h, h) / h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.first(x))
        b = nn.functional.softplus(self.second(a), beta=2.0)
        c = torch.addmm(a, b, self.w, alpha=0.7) * torch.atan2(a, b + 1)  # bias depends on x
        d = torch.addmm(self.second.bias, c, self.w, alpha=1.3)
        e = d.log_softmax(-1).cumsum(-1)
        return (e * a).sum(-1)


NETS = {
    "tanh": lambda d: nn.Sequential(nn.Linear(d, 5), nn.Tanh(), nn.Linear(5, 1)),
    "softplus": lambda d: nn.Sequential(nn.Linear(d, 5), nn.Softplus(beta=1.5), nn.Linear(5, 1)),
    "mixed": Mixed,
}


@pytest.fixture
def reused(monkeypatch):
    """Frozen calls reuse the kept values too; the list records, per replay, whether it did."""
    calls: list[bool] = []
    propagate = methods.propagate

    def spy(graph, x, ctx, constants=None, known=None):
        calls.append(known is not None)
        return propagate(graph, x, ctx, constants, known)

    monkeypatch.setattr(methods, "REUSE_MEMORY", math.inf)
    monkeypatch.setattr(methods, "propagate", spy)
    return calls


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("train", [False, True])
def test_reused_values_give_the_loops_laplacian_and_parameter_gradient(reused, name, train):
    torch.manual_seed(0)
    net = NETS[name](3).to(f64).requires_grad_(train)
    x = torch.randn(4, 3, dtype=f64)
    out = torchdiv.laplacian(net, x, method="taylor")
    expected = laplacian_by_grad_of_grad(lambda z: net(z).reshape(len(z)), x)
    assert reused == [True]
    assert_close(out.reshape(len(x)), expected)
    if train:
        params = list(net.parameters())
        got = torch.autograd.grad(out.square().sum(), params, allow_unused=True)
        want = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                assert_close(g, w)


def test_values_with_a_graph_are_not_reused_under_no_grad(reused):
    """Recorded with grad on, the values of a trained net carry a graph; under an outer
    ``no_grad`` the result must not, so they are computed again."""
    net = NETS["mixed"](3).to(f64)
    x = torch.randn(4, 3, dtype=f64)
    with torch.no_grad():
        out = torchdiv.laplacian(net, x, method="taylor")
    assert reused == [False] and not out.requires_grad
    assert_close(out.reshape(len(x)), laplacian_by_grad_of_grad(net, x))


def test_frozen_values_are_let_go_where_they_would_raise_peak_memory(monkeypatch):
    """At the default ``REUSE_MEMORY`` a frozen net of width 64 at 2 inputs (values: about
    twice one jet) computes its values again; trained, it reuses them (autograd keeps them)."""
    calls: list[bool] = []
    propagate = methods.propagate
    monkeypatch.setattr(
        methods,
        "propagate",
        lambda graph, x, ctx, constants=None, known=None: (
            calls.append(known is not None) or propagate(graph, x, ctx, constants, known)
        ),
    )
    net = NETS["tanh"](2)
    x = torch.randn(64, 2)
    torchdiv.laplacian(net.requires_grad_(False), x, method="taylor")
    torchdiv.laplacian(net.requires_grad_(True), x, method="taylor")
    assert calls == [False, True]


def test_the_one_sweep_reuses_them_too(monkeypatch):
    """``value_grad_laplacian``'s sweep: value, gradient and Laplacian (and the Laplacian's
    parameter gradient) as the loop gives them, with the kept values."""
    calls: list[bool] = []
    propagate = second_order.propagate

    def spy(graph, x, ctx, constants=None, known=None):
        calls.append(known is not None)
        return propagate(graph, x, ctx, constants, known)

    monkeypatch.setattr(second_order, "propagate", spy)
    torch.manual_seed(1)
    net = NETS["mixed"](3).to(f64)
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    out = torchdiv.value_grad_laplacian(net, x, method="taylor")
    assert calls == [True]
    (gradient,) = torch.autograd.grad(net(x).sum(), x)
    expected = laplacian_by_grad_of_grad(net, x)
    assert_close(out.value, net(x))
    assert_close(out.gradient, gradient)
    assert_close(out.laplacian, expected)
    params = list(net.parameters())
    got = torch.autograd.grad(out.laplacian.square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("x_grad", [False, True])
def test_a_no_grad_block_in_f_stays_a_constant_for_gradients(x_grad):
    """``with torch.no_grad(): c = h.exp()`` makes ``c`` a constant, as reverse mode sees it: the
    replay computed ``c`` again with grad on, so the Laplacian's weight and x gradients went
    through it (0.22 off on a gradient of 1.16), while its value was right."""
    torch.manual_seed(0)
    lin, out = nn.Linear(3, 5).double(), nn.Linear(5, 1).double()

    def f(z):
        h = lin(z)
        with torch.no_grad():
            c = h.exp()
        return out(torch.tanh(h) * c)[:, 0]

    x = torch.randn(4, 3, dtype=torch.float64).requires_grad_(x_grad)
    expected = laplacian_by_grad_of_grad(f, x)
    wrt = [lin.weight, x] if x_grad else [lin.weight]
    reference = torch.autograd.grad(expected.sum(), wrt)
    for lap in {
        "taylor": lambda: torchdiv.laplacian(f, x, method="taylor"),
        "auto": lambda: torchdiv.laplacian(f, x),
        "sweep": lambda: torchdiv.value_grad_laplacian(f, x).laplacian,
    }.values():
        value = lap()
        assert_close(value, expected)
        for got, want in zip(torch.autograd.grad(value.sum(), wrt), reference, strict=True):
            assert_close(got, want)
