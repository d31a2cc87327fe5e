"""Second adversarial review of the chain engine (``_exact.chain``, rev-chain28): its ATen
formulas on pre-activations that sit exactly on their kinks (integer weights and inputs:
ReLU and its in-place form, LeakyReLU with slopes 0, negative and above 1, ELU with alpha 0
and negative, SELU, Softplus with ``beta != 1`` at its threshold) with second and third
derivatives; the routing across the calls of a training loop that changes ``f`` between
them (an activation swapped, a forward hook, train mode with a dropout, a frozen layer, a
parametrization, a LoRA-wrapped layer, parameters of another width, float32); and the top
layer's rows of a non-square chain in chunks, ``x`` made by the caller's graph.
References: float64 loops of ``torch.autograd.grad`` (one pass per output component over the
batch: ``f`` does not mix samples), with ``create_graph`` for parameter gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import answers, assert_close, assert_same_parameter_gradients

import torchdiv
from torchdiv._exact import autograd
from torchdiv._exact.dispatch import dense

f64 = torch.float64


@pytest.fixture
def from_chain(monkeypatch: pytest.MonkeyPatch) -> list[list[bool]]:
    """Whether each of the chain's ways (the top layer's rows, the trace by cyclicity, a
    basis's products) answered, per call since the lists were last cleared."""
    names = ("unit_products", "chain_trace", "chain_products")
    return [answers(monkeypatch, autograd, name) for name in names]


def _taken(from_chain: list[list[bool]]) -> bool:
    taken = any(any(calls) for calls in from_chain)
    for calls in from_chain:
        calls.clear()
    return taken


def _jacobian(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``(N, m, n)``: one ``autograd.grad`` per output component, with a graph."""
    leaf = x.detach().requires_grad_(True)
    y = f(leaf)
    rows = [
        torch.autograd.grad(y[:, i].sum(), leaf, create_graph=True)[0] for i in range(y.shape[1])
    ]
    return torch.stack(rows, 1)


# (the activation, its kink)
KINKED = {
    "relu": (F.relu, 0.0),
    "relu_ in place": (F.relu_, 0.0),  # (on addmm's fresh output: ReluBackward0 as relu's)
    "leaky_relu slope 0": (lambda z: F.leaky_relu(z, 0.0), 0.0),
    "leaky_relu slope -0.5": (lambda z: F.leaky_relu(z, -0.5), 0.0),
    "leaky_relu slope 3": (lambda z: F.leaky_relu(z, 3.0), 0.0),
    "elu alpha 0": (lambda z: F.elu(z, 0.0), 0.0),
    "elu alpha -1.5": (lambda z: F.elu(z, -1.5), 0.0),
    "selu": (torch.selu, 0.0),
    "softplus threshold 0": (lambda z: F.softplus(z, 0.5, 0.0), 0.0),
    "softplus beta 2 threshold 2": (lambda z: F.softplus(z, 2.0, 2.0), 1.0),
}
X = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, -1.0], [-1.0, 2.0], [2.0, 1.0]], dtype=f64)


class _Kinked(torch.nn.Module):
    """``2 -> 3 -> 3 -> 2`` with integer weights, the middle layer without bias (``mm``)."""

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.activation = activation
        self.a = torch.nn.Linear(2, 3, dtype=f64)
        self.b = torch.nn.Linear(3, 3, bias=False, dtype=f64)
        self.c = torch.nn.Linear(3, 2, dtype=f64)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, -1.0], [1.0, 0.0], [2.0, 1.0]]))
            self.a.bias.zero_()
            self.b.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, 1.0], [-1.0, 0.0, 2.0]]))
            self.c.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]))
            self.c.bias.copy_(torch.tensor([0.5, -1.0]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.c(self.activation(self.b(self.activation(self.a(z)))))


@pytest.mark.parametrize("name", KINKED)
def test_the_chain_at_kinks_gives_autograds_derivatives_to_the_third_order(from_chain, name):
    """The chain's formulas are the nodes' own ATen calls: at exact kinks its values, their
    parameter gradients (second derivatives) and the gradient in ``x`` of the divergence's
    parameter gradient-free loss (third) equal autograd's loop, at a later call (the first
    is watched), with the chain taken (the trace by cyclicity, the top layer's rows)."""
    activation, kink = KINKED[name]
    net = _Kinked(activation)
    assert ((X @ net.a.weight.detach().t()) == kink).any(-1).sum() >= 2  # (the premise)
    want = _jacobian(net, X)
    for operator in ("divergence", "jacobian_diagonal", "jacobian"):
        getattr(torchdiv, operator)(net, X)  # (watched)
    _taken(from_chain)
    diagonal = want.diagonal(dim1=1, dim2=2)
    weights = torch.linspace(-1.0, 1.0, diagonal.numel(), dtype=f64).reshape(diagonal.shape)
    got_trace = torchdiv.divergence(net, X)
    got_diagonal = torchdiv.jacobian_diagonal(net, X)
    got_jacobian = torchdiv.jacobian(net, X)
    assert _taken(from_chain)
    assert_close(got_trace, diagonal.sum(-1))
    assert_close(got_diagonal, diagonal)
    assert_close(got_jacobian, want)
    for ours, theirs in (
        (got_trace @ weights[:, 0], diagonal.sum(-1) @ weights[:, 0]),
        ((got_diagonal * weights).sum(), (diagonal * weights).sum()),
        ((got_jacobian[:, 1, 0] * weights[:, 1]).sum(), (want[:, 1, 0] * weights[:, 1]).sum()),
    ):
        assert_same_parameter_gradients(net, ours, theirs)
    # third order: the gradient in x of the divergence (0 where the net is piecewise linear)
    leaf = X.clone().requires_grad_(True)
    ours = _gradient(torchdiv.divergence(net, leaf) @ weights[:, 0], leaf)
    y = net(leaf)
    trace = sum(
        torch.autograd.grad(y[:, i].sum(), leaf, create_graph=True)[0][:, i] for i in range(2)
    )
    assert_close(ours, _gradient(trace @ weights[:, 0], leaf))


def _gradient(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d loss / d x``, zeros where ``loss`` does not reach ``x``."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (out,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if out is None else out


class _Lora(torch.nn.Module):
    """A LoRA-wrapped linear layer: ``base(z) + B(A(z)) / 2`` (a sum: no chain)."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, 2, bias=False, dtype=f64)
        self.up = torch.nn.Linear(2, base.out_features, bias=False, dtype=f64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.base(z) + self.up(self.down(z)) / 2


class _Doubled(torch.nn.Module):
    """A parametrization: the weight twice (a non-leaf weight: no chain)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2 * weight


def _parametrized(net: torch.nn.Sequential, on: bool = True) -> None:
    """The weight of ``net[2]`` parametrized (``_Doubled``), or the parametrization removed."""
    if on:
        torch.nn.utils.parametrize.register_parametrization(net[2], "weight", _Doubled())
    else:
        torch.nn.utils.parametrize.remove_parametrizations(net[2], "weight")


def _widened(net: torch.nn.Sequential, width: int) -> None:
    """New parameters of another hidden width in place of the old (a checkpoint of another
    model loaded by assignment)."""
    d = net[0].in_features
    other = torch.nn.Sequential(
        torch.nn.Linear(d, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
        torch.nn.Dropout(0.25), torch.nn.Tanh(), torch.nn.Linear(width, d),
    ).to(f64)  # fmt: skip
    for name, p in other.named_parameters():
        module, attribute = name.rsplit(".", 1)
        setattr(net.get_submodule(module), attribute, torch.nn.Parameter(p.detach().clone()))


# each stage changes f between calls, and says whether its graph is a chain
STAGES: list[tuple[str, Callable[[torch.nn.Sequential], object], bool]] = [
    ("eval", lambda net: net.eval(), True),
    ("train: dropout", lambda net: net.train(), False),
    ("eval again", lambda net: net.eval(), True),
    ("relu6 swapped in", lambda net: net.__setitem__(1, torch.nn.ReLU6()), False),
    ("softplus swapped in", lambda net: net.__setitem__(1, torch.nn.Softplus(2.0, 1.0)), True),
    ("forward hook", lambda net: net[2].register_forward_hook(lambda m, a, out: out * 2), False),
    ("hook removed", lambda net: net[2]._forward_hooks.clear(), True),
    ("parametrized", lambda net: _parametrized(net), False),
    ("unparametrized", lambda net: _parametrized(net, False), True),
    ("lora", lambda net: net.__setitem__(2, _Lora(net[2])), False),
    ("lora merged back", lambda net: net.__setitem__(2, net[2].base), True),
    ("layer frozen", lambda net: net[2].requires_grad_(False), True),
    # (the parametrization of a frozen weight is a constant: a chain)
    ("parametrized, frozen", lambda net: _parametrized(net), True),
    ("unparametrized again", lambda net: _parametrized(net, False), True),
    ("another width", lambda net: _widened(net, 20), True),
]


@pytest.mark.slow
def test_a_training_loop_that_changes_f_takes_the_chain_only_where_it_is_one(from_chain):
    """At a size where only a chain goes by plain rows (``crossover.CHAIN_ROWS_PROBLEM``,
    ``Passed.chain``), two calls per stage: the Jacobian, its diagonal and trace, and their
    parameter gradients equal the loop's, and the chain answers only where the graph is one
    (the dropout's mask drawn alike: the same seed before each evaluation)."""
    torch.manual_seed(0)
    d, n = 24, 480  # (24 * 480 * 24 = 276480: above ROWS_PROBLEM)
    net = torch.nn.Sequential(
        torch.nn.Linear(d, 12), torch.nn.Tanh(), torch.nn.Linear(12, 12),
        torch.nn.Dropout(0.25), torch.nn.Tanh(), torch.nn.Linear(12, d),
    ).to(f64)  # fmt: skip
    x = torch.randn(n, d, dtype=f64)
    for _ in range(3):  # (watched, then plain rows)
        torchdiv.jacobian_diagonal(net.eval(), x)
    for stage, change, chain in STAGES:
        change(net)
        for call in range(2):
            torch.manual_seed(call)
            want = _jacobian(net, x)
            diagonal = want.diagonal(dim1=1, dim2=2)
            _taken(from_chain)
            torch.manual_seed(call)
            got = torchdiv.jacobian(net, x)
            torch.manual_seed(call)
            got_diagonal = torchdiv.jacobian_diagonal(net, x)
            taken = _taken(from_chain)
            assert not taken or chain, stage  # (never a chain's answer for another graph)
            assert_close(got, want)
            assert_close(got_diagonal, diagonal)
            weights = torch.linspace(-1.0, 1.0, n, dtype=f64)
            trained = [p for p in net.parameters() if p.requires_grad]
            ours = _gradients(got[:, 0, 1] @ weights + got_diagonal[:, 2] @ weights, trained)
            theirs = _gradients(want[:, 0, 1] @ weights + diagonal[:, 2] @ weights, trained)
            for a, b in zip(ours, theirs, strict=True):
                assert_close(a, b)
    x32 = x.float()
    net.float()
    assert_close(torchdiv.jacobian(net, x32), _jacobian(net, x32))


@pytest.mark.parametrize("sizes", [(3, 7), (7, 3)], ids=["wider out", "narrower out"])
def test_a_non_square_chain_s_rows_in_chunks_pass_gradients_to_what_made_x(from_chain, sizes):
    """``unit_rows`` of a non-square chain (``n -> 5 -> 6 -> m``), one, three or all rows a
    block, ``x`` the caller's ``sin(z)``: the rows and their gradients in ``z`` and every
    parameter equal the loop's."""
    n, m = sizes
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(n, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6), torch.nn.ELU(),
        torch.nn.Linear(6, m),
    ).to(f64)  # fmt: skip
    z = torch.randn(4, n, dtype=f64, requires_grad=True)
    x = torch.sin(z)
    y = net(x)
    want = torch.stack(
        [torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0] for i in range(m)], 1
    )
    weights = torch.linspace(-1.0, 1.0, want.numel(), dtype=f64).reshape(want.shape)
    inputs = [z, *net.parameters()]
    expected = _gradients((want * weights).sum(), inputs)
    for chunk in (1, 3, m):
        got = dense(autograd.GraphJacobian.of_function(net, x, 1), chunk)
        assert _taken(from_chain)
        assert_close(got, want)
        for a, b in zip(_gradients((got * weights).sum(), inputs), expected, strict=True):
            assert_close(a, b)


def _gradients(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``d loss / d input`` for each input, zeros where unused (the output bias)."""
    found = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, found, strict=True)]
