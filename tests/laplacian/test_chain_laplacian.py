"""The forward Laplacian along a chain graph (``_laplacian.chain``), which ``"auto"``'s remembered
loop runs instead of its backward passes: values, parameter gradients and derivatives in ``x``
against float64 grad-of-grad loops, and the graphs it must leave to the loop."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_by_grad_of_grad,
    laplacians_by_grad_of_grad,
)

import torchdiv
from torchdiv._laplacian.chain import chain_laplacian

f64 = torch.float64
ACTIVATIONS = {
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "leaky-relu": lambda: torch.nn.LeakyReLU(0.2),  # (piecewise linear after a tanh: curved)
}


def _mlp(d: int, activation, outputs: int = 2) -> torch.nn.Module:
    """``d -> 8 -> 8 -> outputs``, tanh first, the middle layer without bias (an ``mm`` node)."""
    return torch.nn.Sequential(
        torch.nn.Linear(d, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8, bias=False),
        activation(),
        torch.nn.Linear(8, outputs),
    ).to(f64)


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("d", [2, 3])
def test_auto_s_loop_takes_the_chain_with_the_loop_s_values_and_gradients(
    laplacian_chained, activation, train, d
):
    """Decided (by the Taylor engine from the deciding call's recording: ``f`` evaluated
    once), then remembered: the later calls take the chain, and at every call values and
    parameter gradients equal the float64 loop's, two output components."""
    torch.manual_seed(0)
    net = _mlp(d, ACTIVATIONS[activation]).requires_grad_(train)
    x = torch.randn(16, d, dtype=f64)
    want = laplacians_by_grad_of_grad(net, x)
    for call in range(3):
        laplacian_chained.clear()
        got = torchdiv.laplacian(net, x)
        assert laplacian_chained == ([True] if call else [])
        assert_close(got, want)
        assert got.requires_grad == train
        if train:
            weights = torch.randn_like(want)
            assert_same_parameter_gradients(net, (got * weights).sum(), (want * weights).sum())


def test_the_chain_keeps_the_graph_in_x(laplacian_chained):
    """With ``x`` requiring grad the Laplacian's gradient in ``x`` (a third derivative of
    ``f``) and in the parameters equals the loop's."""
    torch.manual_seed(0)
    net = _mlp(3, torch.nn.Tanh, outputs=1)
    x = torch.randn(16, 3, dtype=f64, requires_grad=True)
    torchdiv.laplacian(net, x)  # the deciding call (the Taylor engine)
    got = torchdiv.laplacian(net, x).reshape(-1)
    assert laplacian_chained == [True]
    want = laplacian_by_grad_of_grad(net, x)
    assert_close(got, want)
    (got_x,) = torch.autograd.grad(got.square().sum(), x, retain_graph=True)
    (want_x,) = torch.autograd.grad(want.square().sum(), x, retain_graph=True)
    assert_close(got_x, want_x)
    assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())


def test_scaled_products_of_tensors_that_require_no_grad():
    """``addmm`` with ``alpha`` and ``mm`` of plain tensors (no parameters): scaled as the
    nodes saved them."""
    torch.manual_seed(0)
    w1, w2 = torch.randn(3, 5, dtype=f64), torch.randn(5, 2, dtype=f64)
    b = torch.randn(5, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.mm(torch.sigmoid(torch.addmm(b, z, w1, alpha=0.5)), w2)

    x = torch.randn(8, 3, dtype=f64)
    leaf = x.clone().requires_grad_(True)
    got = chain_laplacian(f(leaf), leaf, create_graph=False)
    assert got is not None and not got.requires_grad
    assert_close(got, laplacians_by_grad_of_grad(f, x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1)),
        lambda: torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.GELU(), torch.nn.Linear(4, 1)),
        lambda: torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(2, 1)),
    ],
    ids=["relu-piecewise-linear", "gelu-not-listed", "activation-of-x-first"],
)
def test_other_graphs_are_left_to_the_loop(laplacian_chained, make):
    """A piecewise-linear net (its Laplacian's graph is the loop's), an activation without a
    second derivative here, a chain not starting with a product of ``x``: no chain, and
    ``"auto"``'s loop gives the reference."""
    torch.manual_seed(0)
    net = make().to(f64)
    x = torch.randn(16, 2, dtype=f64)
    torchdiv.laplacian(net, x)  # the deciding call (the Taylor engine)
    got = torchdiv.laplacian(net, x).reshape(-1)
    assert laplacian_chained == [False]
    assert_close(got, laplacian_by_grad_of_grad(net, x))


def test_a_residual_graph_is_not_a_chain(laplacian_chained):
    """``x`` reached twice (a skip connection): the loop."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 2).to(f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(layer(z)) + z

    x = torch.randn(16, 2, dtype=f64)
    got = torchdiv.laplacian(f, x)
    assert not any(laplacian_chained)
    assert_close(got, laplacians_by_grad_of_grad(f, x))


def _calls(monkeypatch) -> tuple[list[bool], list[int]]:
    """Spies on ``"auto"``'s decisions forgotten first: one entry per chain attempt (whether it
    gave the Laplacian), one per recording of ``f``."""
    from torchdiv._laplacian import loop
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    chained, recorded = [], []

    def spy(*args):
        out = chain_laplacian(*args)
        chained.append(out is not None)
        return out

    capture = _laplacian.capture
    monkeypatch.setattr(loop, "chain_laplacian", spy)
    monkeypatch.setattr(
        _laplacian, "capture", lambda *a, **k: recorded.append(1) or capture(*a, **k)
    )
    return chained, recorded


@pytest.mark.parametrize("d", [4, 10])
def test_a_frozen_chain_beyond_the_loop_rule_takes_the_chain(monkeypatch, d):
    """A frozen tanh/sigmoid MLP at more inputs than the loop's rule allows: decided by the
    Taylor engine from its recording, then the chain without recording, values equal to the
    float64 loop's at every call; ``value_grad_laplacian`` at the same structure does not take
    that plan (its Jacobian: the Taylor engine's sweep, recorded, right values)."""
    chained, recorded = _calls(monkeypatch)
    torch.manual_seed(0)
    net = _mlp(d, torch.nn.Sigmoid).requires_grad_(False)
    x = torch.randn(8, d, dtype=f64)
    want = laplacians_by_grad_of_grad(net, x)
    for call in range(3):
        chained.clear(), recorded.clear()
        assert_close(torchdiv.laplacian(net, x), want)
        assert (chained, len(recorded)) == (([], 1) if call == 0 else ([True], 0)), call
    chained.clear(), recorded.clear()
    out = torchdiv.value_grad_laplacian(net, x)
    assert_close(out.laplacian, want)
    assert (chained, len(recorded)) == ([], 1)


@pytest.mark.parametrize(
    "case",
    ["trained", "x-requires-grad", "relu", "gelu", "residual", "activation-first", "chunked"],
)
def test_other_functions_beyond_the_loop_rule_keep_the_taylor_engine(monkeypatch, case):
    """Not a frozen chain of listed products and curved activations at 4 inputs (the result
    differentiated, a piecewise-linear or unlisted activation, ``x`` reached twice, ``x``
    itself activated first), or a chain whose block is too large (CHAIN_ELEMENTS): every
    call records ``f`` (the Taylor engine), nothing looped."""
    from torchdiv._laplacian import methods as _laplacian

    chained, recorded = _calls(monkeypatch)
    if case == "chunked":  # the (n + 1, 8, 8) block: 320 elements
        monkeypatch.setattr(_laplacian, "CHAIN_ELEMENTS", 256)
    torch.manual_seed(0)
    net = _mlp(4, torch.nn.GELU if case == "gelu" else torch.nn.Tanh, outputs=1)
    if case == "relu":  # (ReLU alone: _mlp's first activation is a tanh)
        layers = torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)
        net = torch.nn.Sequential(*layers).to(f64)
    net.requires_grad_(case == "trained")
    f = {
        "residual": lambda z: net(z) + z[:, :1],
        "activation-first": lambda z: net(torch.tanh(z)),
    }.get(case, net)
    x = torch.randn(8, 4, dtype=f64, requires_grad=case == "x-requires-grad")
    want = laplacians_by_grad_of_grad(f, x)
    for _ in range(2):
        recorded.clear()
        assert_close(torchdiv.laplacian(f, x), want)
        assert len(recorded) == 1
    assert not chained


def test_a_chain_that_gives_way_goes_back_to_the_taylor_engine(monkeypatch):
    """The frozen chain's plan, then ``f`` adds a skip connection (a flag it reads, outside
    the structure): that call's chain gives way and the loop's backward passes give its
    Laplacian; later calls record ``f`` again (the Taylor engine), not the loop at 6 inputs.
    Values equal the float64 loop's at every call."""
    from torchdiv._laplacian import methods as _laplacian

    chained, recorded = _calls(monkeypatch)
    looped = []
    grad_of_grad = _laplacian.grad_of_grad
    monkeypatch.setattr(_laplacian, "grad_of_grad", lambda *a: looped.append(1) or grad_of_grad(*a))
    torch.manual_seed(0)
    net = _mlp(6, torch.nn.Tanh, outputs=1).requires_grad_(False)
    skip = [False]

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z) + z[:, :1].square() if skip[0] else net(z)

    x = torch.randn(8, 6, dtype=f64)
    for call, (flag, chain, loops, records) in enumerate(
        [(False, [], 0, 1), (False, [True], 1, 0), (True, [], 1, 0), (True, [], 0, 1)]
    ):
        skip[0] = flag
        chained.clear(), recorded.clear(), looped.clear()
        assert_close(torchdiv.laplacian(f, x), laplacians_by_grad_of_grad(f, x))
        assert (chained, len(looped), len(recorded)) == (chain, loops, records), call
