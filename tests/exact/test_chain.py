"""Backward passes of a chain graph without the autograd engine (``_exact.chain``): values,
parameter gradients and second derivatives against float64 per-sample loops of
``autograd.grad``, and the graphs it must leave to the engine."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import (
    answers,
    assert_close,
    assert_same_parameter_gradients,
    loop_diagonal,
    reference_jacobian,
)

import torchdiv
from torchdiv._core import walk
from torchdiv._exact import autograd, chain

ACTIVATIONS = {
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "relu": torch.nn.ReLU,
    "gelu": torch.nn.GELU,
    "gelu-tanh": lambda: torch.nn.GELU("tanh"),
    "elu": lambda: torch.nn.ELU(0.7),
    "softplus": lambda: torch.nn.Softplus(2.0, 3.0),
    "leaky-relu": lambda: torch.nn.LeakyReLU(0.2),
}


def _mlp(d: int, activation) -> torch.nn.Module:
    """``d -> 8 -> 8 -> d``, the middle layer without bias (an ``mm`` node, not ``addmm``)."""
    return torch.nn.Sequential(
        torch.nn.Linear(d, 8),
        activation(),
        torch.nn.Linear(8, 8, bias=False),
        activation(),
        torch.nn.Linear(8, d),
    ).double()


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_chain_gives_the_loop_s_values_and_parameter_gradients(
    chained, chain_traced, unit_rows, activation, train
):
    """The three operators at D = 2 (one pass per row before) and D = 3 (batched passes), on
    a later call (the first is watched for sample mixing): the chain is taken (the
    divergence by its cyclicity: two activations; the diagonal and the Jacobian from the top
    layer's rows, no basis, no products of one), and values and parameter gradients equal a
    loop of ``autograd.grad`` per row (diagonals) and ``jacrev`` of the whole batch (the
    Jacobian), float64."""
    for d in (2, 3):
        torch.manual_seed(0)
        net = _mlp(d, ACTIVATIONS[activation]).requires_grad_(train)
        x = torch.randn(16, d, dtype=torch.float64)
        want = loop_diagonal(net, x, create_graph=train)
        want_jac = reference_jacobian(net, x)
        for operator in ("divergence", "jacobian_diagonal", "jacobian"):
            getattr(torchdiv, operator)(net, x)
        del chained[:], chain_traced[:], unit_rows[:]
        got = {op: getattr(torchdiv, op)(net, x) for op in ("divergence", "jacobian_diagonal")}
        got_jac = torchdiv.jacobian(net, x)
        assert chain_traced == [True] and unit_rows == [True, True], (d, chain_traced, unit_rows)
        assert not chained, (d, chained)
        assert_close(got["divergence"], want.sum(-1))
        assert_close(got["jacobian_diagonal"], want)
        assert_close(got_jac, want_jac)
        if train:
            weights = torch.randn_like(want)
            for ours, theirs in (
                (got["divergence"], want.sum(-1)),
                (got["jacobian_diagonal"] * weights, want * weights),
                (got_jac.diagonal(dim1=1, dim2=2) * weights, want * weights),
                (got_jac[:, 0, 1], want_jac[:, 0, 1]),
            ):
                assert_same_parameter_gradients(net, ours.sum(), theirs.sum())


@pytest.mark.parametrize("operator", ["divergence", "jacobian_diagonal"])
def test_second_derivatives_go_through_the_chain(chain_traced, unit_rows, operator):
    """With ``x`` requiring grad the products (and the trace by cyclicity) keep their graph
    in ``x`` as the engine's do: the gradient of the divergence (the diagonal's sum) in ``x``
    and in the parameters equals that of the loop (a third derivative of ``f``), float64."""
    torch.manual_seed(0)
    net = _mlp(3, torch.nn.Tanh)
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    getattr(torchdiv, operator)(net, x)
    del chain_traced[:], unit_rows[:]
    ours = getattr(torchdiv, operator)(net, x).reshape(8, -1).sum(-1)
    # (the diagonal at D = 3: a block of rows from the top layer's)
    assert chain_traced == [True] if operator == "divergence" else unit_rows == [True]
    z = x.view_as(x)  # the loop on x's own graph, so that its products depend on x
    y = net(z)
    rows = [torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(3)]
    theirs = sum(rows)
    params = [x, *net.parameters()]
    for a, b in zip(
        torch.autograd.grad(ours.sum(), params, allow_unused=True),
        torch.autograd.grad(theirs.sum(), params, allow_unused=True),
        strict=True,
    ):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b)


class _ScaledLinear(torch.nn.Linear):
    """A linear layer as ``addmm(bias, h, W^T, alpha=0.5)``: a step whose ``alpha`` is not 1."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, h, self.weight.t(), alpha=0.5)


_L, _T, _S = torch.nn.Linear, torch.nn.Tanh, torch.nn.Sigmoid
# chains of linear steps and activations, D -> ... -> D; whether the trace comes by cyclicity
# (at most two activations once adjacent ones are merged, adjacent linears too)
TRACE_LAYOUTS = {
    "one activation": (lambda d: [_L(d, 8), _T(), _L(8, d)], True),
    "two, alpha": (lambda d: [_L(d, 8), torch.nn.ELU(), _ScaledLinear(8, 8), _T(), _L(8, d)], True),
    "adjacent activations": (
        lambda d: [_L(d, 8), _T(), _S(), _L(8, 8, bias=False), torch.nn.Softplus(), _L(8, d)],
        True,
    ),
    "adjacent linears": (
        lambda d: [_L(d, 8), _L(8, 8), _T(), _L(8, 8, bias=False), _T(), _L(8, 5), _L(5, d)],
        True,
    ),
    "activations at both ends": (lambda d: [_T(), _L(d, d), _S()], True),
    "activation on top": (lambda d: [_L(d, 8), _L(8, d), _T()], True),
    "activation alone": (lambda d: [_T()], True),
    "alpha on top": (lambda d: [_L(d, 8), _T(), _ScaledLinear(8, d)], True),
    "three activations": (
        lambda d: [_L(d, 8), _T(), _L(8, 8), _T(), _L(8, 8), _T(), _L(8, d)],
        False,
    ),
}


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
@pytest.mark.parametrize("layout", list(TRACE_LAYOUTS))
def test_the_trace_by_cyclicity_gives_the_loop_s_values_and_parameter_gradients(
    chained, chain_traced, unit_rows, layout, train
):
    """``tr(A D2 M D1 B) = sum_ab d2_a M_ab d1_b (BA)_ba`` (``_exact.chain.trace``) for every
    arrangement of linear steps and activations it takes (adjacent ones merged, either end
    without a linear step, ``addmm``'s ``alpha``), at D = 2 and 3 on a later call: values and
    parameter gradients equal the float64 loop of ``autograd.grad``; three activations take
    the rows instead. The diagonal too; rows from the top linear step's rows where an
    activation follows it (``unit_products``), else from a basis (``products``)."""
    build, traced = TRACE_LAYOUTS[layout]
    for d in (2, 3):
        torch.manual_seed(0)
        net = torch.nn.Sequential(*build(d)).double().requires_grad_(train)
        x = torch.randn(16, d, dtype=torch.float64)
        want = loop_diagonal(net, x, create_graph=train)
        torchdiv.divergence(net, x)
        torchdiv.jacobian_diagonal(net, x)
        top = isinstance(net[-1], torch.nn.Linear) and not isinstance(net[-2], torch.nn.Linear)
        rows = [top]  # (whether unit_products gave the rows: D = 2's entries, D = 3's block)
        del chained[:], chain_traced[:], unit_rows[:]
        got = torchdiv.divergence(net, x)
        assert chain_traced == [traced] and unit_rows == ([] if traced else rows)
        got_diagonal = torchdiv.jacobian_diagonal(net, x)
        assert unit_rows == ([] if traced else rows) + rows, (d, unit_rows)
        from_basis = not top  # (rows by ``products``: one each)
        assert len(chained) == (not traced and from_basis) + from_basis, (d, chained)
        assert_close(got, want.sum(-1))
        assert_close(got_diagonal, want)
        if train and list(net.parameters()):
            weights = torch.randn_like(want)
            for ours, theirs in ((got, want.sum(-1)), (got_diagonal * weights, want * weights)):
                assert_same_parameter_gradients(net, ours.square().sum(), theirs.square().sum())


def test_an_off_chain_input_that_reaches_x_takes_the_engine(chain_taken):
    """``addmm``'s bias computed from ``x`` (``sin(x) + x @ W``, Jacobian ``W^T + diag(cos
    x)``): the walk along ``mat1`` alone would miss ``diag(cos x)``; the engine runs."""
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64)

    def f(z):
        return torch.addmm(torch.sin(z), z, w)

    x = torch.randn(8, 3, dtype=torch.float64)
    want = w.t().expand(8, 3, 3) + torch.diag_embed(torch.cos(x))
    for _ in range(2):
        assert_close(torchdiv.jacobian(f, x), want)
        assert_close(torchdiv.divergence(f, x), want.diagonal(dim1=1, dim2=2).sum(-1))
    assert not chain_taken()


@pytest.mark.parametrize("activation", [torch.nn.SiLU, torch.nn.Mish])
def test_nodes_not_listed_take_the_engine(chain_taken, activation):
    """SiLU's and Mish's nodes call another function under grad mode than ``silu_backward``
    (which has no derivative): not listed, the engine runs them, values and parameter
    gradients right."""
    torch.manual_seed(0)
    net = _mlp(2, activation)
    x = torch.randn(8, 2, dtype=torch.float64)
    want = loop_diagonal(net, x, create_graph=True)
    for _ in range(2):
        got = torchdiv.jacobian_diagonal(net, x)
        assert_close(got, want)
    assert_same_parameter_gradients(net, got.sum(), want.sum())
    assert not chain_taken()


def test_the_graph_form_runs_the_caller_s_hooks(chain_taken):
    """A caller's graph (``graph_divergence``) may hold gradient hooks torchdiv never saw
    registered (here one halving the gradient through the hidden layer): the engine runs
    them, as the graph form always did, and the chain is not taken."""
    torch.manual_seed(0)
    net = _mlp(2, torch.nn.Tanh)
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    y = net(x)
    hidden = net[:2](x)
    hidden.register_hook(lambda g: g / 2)
    y = net[2:](hidden)
    rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0][:, i] for i in range(2)]
    assert_close(torchdiv.graph_divergence(y, x), sum(rows))
    assert not chain_taken()


def test_search_tells_every_chain_node() -> None:
    """``walk.CHAIN_NODES`` (search's skip of the chain check) names every formula's node."""
    nodes = {"AccumulateGrad", "TBackward0", "CatBackward0", "ExpandBackward0"}
    assert set(chain._FORMULAS) | nodes == walk.CHAIN_NODES


@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_a_graph_that_is_no_chain_is_walked_once(monkeypatch, op):
    """perfcheck21: the chain's walk of a graph that is not a chain (here a layer norm) cost
    15-20 us a call on a ~350 us call (the fresh graph's Python node objects), after
    ``search`` had seen it. The chain's walk now comes first (it finds what the search would
    where it holds), and stops at the first node no chain holds: the layer norm's last op,
    below the top layer's node, bias, weight and transpose (5 types looked up, none below
    it); the search then walks the graph once."""
    looked_up: list[type] = []
    searched: list[int] = []
    kind, search = chain._kind, autograd.search

    def spy_kind(cls):
        looked_up.append(cls)
        return kind(cls)

    def spy_search(*args):
        searched.append(1)
        return search(*args)

    monkeypatch.setattr(chain, "_kind", spy_kind)
    monkeypatch.setattr(autograd, "search", spy_search)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    x = torch.randn(8, 2)
    getattr(torchdiv, op)(net, x)  # (the first call: watched)
    del looked_up[:], searched[:]
    getattr(torchdiv, op)(net, x)
    assert searched == [1]
    assert len(looked_up) <= 5 and looked_up[-1].__name__ not in walk.CHAIN_NODES


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
def test_each_share_s_part_of_a_chain_s_trace_is_its_own_rows_entries(unit_rows, train):
    """A share of the rows (``torchdiv.distributed``: one rank's unit vectors) at D = 2 takes
    the chain's rows from the top layer (``unit_products``, not the whole trace): rank ``i``'s
    part is entry ``(i, i)`` of every sample's Jacobian, read off its one row's block at the
    share's offset (entry ``(0, 0)`` twice made the parts' sum ``2 J_00``); values and
    parameter gradients of each part equal the float64 loop's."""
    from torchdiv._core.basis import Share
    from torchdiv._exact.dispatch import diagonal_and_output

    torch.manual_seed(0)
    net = _mlp(2, torch.nn.Tanh).requires_grad_(train)
    x = torch.randn(16, 2, dtype=torch.float64)
    want = loop_diagonal(net, x, create_graph=train)
    torchdiv.divergence(net, x)  # (the first call: watched)
    del unit_rows[:]
    for i in range(2):
        part = diagonal_and_output("divergence", net, x, 1, "auto", None, True, Share(i, 2))[0]
        assert_close(part, want[:, i])
        if train:
            weights = torch.randn_like(part)
            theirs = (want[:, i] * weights).sum()
            assert_same_parameter_gradients(net, (part * weights).sum(), theirs)
    assert unit_rows == [True, True]


@pytest.mark.parametrize("guarded", [(), ("TanhBackward",), ("AccumulateGrad",), ("TBackward",)])
@pytest.mark.parametrize("x_grad", [False, True], ids=["leaf", "view"])
@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
def test_a_chain_s_walk_finds_what_the_search_finds(guarded, x_grad, train):
    """``GraphJacobian.of_function`` takes the chain's walk for ``walk.search`` where the graph
    is a chain: what it notes (a leaf other than ``x``, ``x``'s history below the view the
    engine differentiates by, nodes of the guarded types, the weight's transpose and the
    leaves included) equals the search's ``Found`` field by field."""
    torch.manual_seed(0)
    net = _mlp(3, torch.nn.Tanh).requires_grad_(train)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=x_grad)
    x_in = x.view_as(x) if x_grad else x.detach().requires_grad_(True)
    y = net(x_in)
    found = walk.Found()
    assert chain.chain(y, x_in, found, guarded)
    assert found == walk.search(y, x_in, guarded)
    assert found.others == (train or x_grad)


def _tanh_mlp_jacobian(net: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Every sample's Jacobian of ``Linear, Tanh, Linear, Tanh, Linear`` in closed form:
    ``W3 diag(1 - h2^2) W2 diag(1 - h1^2) W1``, ``(N, D, D)``."""
    w1, w2, w3 = net[0].weight, net[2].weight, net[4].weight
    h1 = torch.tanh(x @ w1.t() + net[0].bias)
    h2 = torch.tanh(h1 @ w2.t() + net[2].bias)
    return w3 @ ((1 - h2**2)[:, :, None] * w2) @ ((1 - h1**2)[:, :, None] * w1)


@pytest.mark.parametrize(
    ("width", "train"),
    [(8, False), (8, True), (512, False), pytest.param(512, True, marks=pytest.mark.slow)],
    ids=["8-frozen", "8-train", "512-frozen", "512-train"],
)
def test_a_larger_chain_goes_by_the_top_layer_s_rows_after_its_first_call(unit_rows, width, train):
    """A square problem above ``crossover.ROWS_PROBLEM`` (D = 64, N = 128: 2**19) whose graph is
    a chain: the first two calls are watched (``torch.func``'s reverse mode, no rows: the
    first tells the call site that the output is square, the second's watch passes), the
    later ones go by the chain's rows from the top layer's (``unit_products``), in chunks
    where a layer is wide (width 512: 32 rows at once, ``_plan.CHUNK_ELEMENTS``); values and
    parameter gradients equal the closed form, float64."""
    from torchdiv._core import crossover

    d, n = 64, 128
    assert crossover.ROWS_PROBLEM < d * n * d <= crossover.CHAIN_ROWS_PROBLEM
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(),
        torch.nn.Linear(width, d),
    ).double().requires_grad_(train)  # fmt: skip
    x = torch.randn(n, d, dtype=torch.float64)
    want = _tanh_mlp_jacobian(net, x)
    for _ in range(2):
        assert_close(torchdiv.jacobian(net, x), want)
    assert not unit_rows
    got = torchdiv.jacobian(net, x)
    assert unit_rows == [True] * (1 if width == 8 else 2)
    assert_close(got, want)
    if train:
        weights = torch.randn_like(want)
        assert_same_parameter_gradients(net, (got * weights).sum(), (want * weights).sum())


def test_a_larger_graph_that_is_not_a_chain_goes_by_rows_once(monkeypatch):
    """A residual MLP (``x + net(x)``: not a chain) above ``crossover.ROWS_PROBLEM``: its third
    call (the first after a watch passed) tries plain autograd's rows, finds no chain and
    tells the structure's pass (``Passed.chain``); the later calls are planned and watched as
    before (no plain evaluation); every call's values equal the closed form ``I + J``,
    float64."""
    from torchdiv._exact import dispatch

    plain = answers(monkeypatch, dispatch, "unwatched")  # (one entry per plain evaluation)
    torch.manual_seed(0)
    d, n = 64, 128
    net = torch.nn.Sequential(
        torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(),
        torch.nn.Linear(8, d),
    ).double()  # fmt: skip

    def f(z):
        return z + net(z)

    x = torch.randn(n, d, dtype=torch.float64)
    want = _tanh_mlp_jacobian(net, x) + torch.eye(d, dtype=torch.float64)
    for count in (0, 0, 1, 1, 1):
        assert_close(torchdiv.jacobian(f, x), want)
        assert len(plain) == count


class _TimeFirst(torch.nn.Module):
    """FFJORD's ``ConcatLinear`` at every layer: ``Linear(cat([t, h]))``, the time first."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            [torch.nn.Linear(1 + d, width), torch.nn.Linear(1 + width, d)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.full_like(x[:, :1], 0.3)
        h = torch.tanh(self.layers[0](torch.cat([t, x], 1)))
        return self.layers[1](torch.cat([t[:, :1].expand(len(h), 1), h], -1))


class _TimeLast(torch.nn.Module):
    """torchdyn's ``DepthCat``: ``cat([x, t])`` (the time last, a learned embedding of it:
    a parameter's leaf beside ``x``), then an MLP."""

    def __init__(self, d: int, width: int) -> None:
        super().__init__()
        self.time = torch.nn.Parameter(torch.randn(1, 2))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(d + 2, width), torch.nn.Softplus(), torch.nn.Linear(width, d)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, self.time.expand(len(x), 2)], 1))


def _zuko_velocity(d: int) -> tuple[torch.nn.Module, Callable]:
    zuko = pytest.importorskip("zuko")
    transform = zuko.flows.continuous.FFJTransform(d).double()
    return transform, lambda z: transform.f(torch.tensor(0.3, dtype=torch.float64), z)


TIME_INPUTS = {
    "zuko": _zuko_velocity,
    "time first": lambda d: (net := _TimeFirst(d, 8).double(), net),
    "time last": lambda d: (net := _TimeLast(d, 8).double(), net),
}


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
@pytest.mark.parametrize("case", list(TIME_INPUTS))
def test_a_time_input_concatenated_to_x_keeps_the_chain(chain_traced, unit_rows, case, train):
    """A time input's features concatenated beside ``x`` (zuko's CNF velocity, FFJORD's
    ``ConcatLinear``, torchdyn's ``DepthCat``; zuko broadcasts ``x`` to its own shape first):
    the chain holds the concatenation as a slice of its products, so the divergence comes by
    the trace's cyclicity and the rows from the top layer's; divergence, diagonal and
    Jacobian at D = 2 and 3 equal the float64 loop of ``autograd.grad`` and ``jacrev``, and
    so do their parameter gradients."""
    for d in (2, 3):
        torch.manual_seed(0)
        module, f = TIME_INPUTS[case](d)
        module.requires_grad_(train)
        x = torch.randn(16, d, dtype=torch.float64)
        want = loop_diagonal(f, x, create_graph=train)
        want_jac = reference_jacobian(f, x)
        for operator in ("divergence", "jacobian_diagonal", "jacobian"):
            getattr(torchdiv, operator)(f, x)
        del chain_traced[:], unit_rows[:]
        got = torchdiv.divergence(f, x)
        got_diagonal = torchdiv.jacobian_diagonal(f, x)
        got_jac = torchdiv.jacobian(f, x)
        assert chain_traced == [True] and unit_rows == [True, True], (d, chain_traced, unit_rows)
        assert_close(got, want.sum(-1))
        assert_close(got_diagonal, want)
        assert_close(got_jac, want_jac)
        if train:
            weights = torch.randn_like(want)
            for ours, theirs in (
                (got, want.sum(-1)),
                (got_diagonal * weights, want * weights),
                (got_jac[:, -1, 0], want_jac[:, -1, 0]),
            ):
                assert_same_parameter_gradients(module, ours.square().sum(), theirs.square().sum())


NOT_CHAINS = {  # a concatenation or expand the chain cannot place, and x's event size
    "x in the middle": (lambda z: torch.cat([z[:, :1].detach(), z, z[:, :1].detach()], 1), 2),
    "two in a row": (lambda z: torch.cat([torch.cat([z, z.detach()], 1)], 1), 2),
    "x twice": (lambda z: torch.cat([z, z], 1), 2),
    "expanded from one column": (lambda z: z.expand(len(z), 4), 1),
}


@pytest.mark.parametrize("case", list(NOT_CHAINS))
def test_a_concatenation_the_chain_cannot_place_takes_the_engine(chain_traced, case):
    """``x`` between two constants (the inputs' sizes are not on the node), a concatenation
    of a concatenation, ``x`` twice, and an expand that grows a column of ``x``: not a chain
    (the trace by cyclicity never ran: the engine did), below an MLP; values equal the
    float64 loop of ``autograd.grad``."""
    inputs, d = NOT_CHAINS[case]
    torch.manual_seed(0)
    x = torch.randn(16, d, dtype=torch.float64)
    width = inputs(x).shape[1]
    net = torch.nn.Sequential(
        torch.nn.Linear(width, 8), torch.nn.Tanh(), torch.nn.Linear(8, d)
    ).double()

    def f(z):
        return net(inputs(z))

    want = loop_diagonal(f, x)
    for _ in range(2):
        assert_close(torchdiv.divergence(f, x), want.sum(-1))
        assert_close(torchdiv.jacobian_diagonal(f, x), want)
    assert not chain_traced, chain_traced
