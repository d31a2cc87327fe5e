"""percall31: the chain's trace by cyclicity (``_exact.chain.trace``) with ELU's derivative
as ``exp(min(x, 0))`` where ``alpha = scale = input_scale = 1`` and ``K^T`` as ``A^T B^T``:
values, parameter gradients and second derivatives in ``x`` against float64 loops of
``autograd.grad`` (PyTorch's own ``elu_backward`` and its double backward), ELU with other
``alpha``, SELU and CELU too, and pre-activations exactly at the kink ``x = 0``."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, loop_diagonal

import torchdiv

ACTIVATIONS = {
    "elu": torch.nn.ELU,  # alpha = scale = input_scale = 1: exp(min(x, 0))
    "celu-1": lambda: torch.nn.CELU(1.0),  # input_scale = 1 / alpha = 1: the same
    "elu-0.7": lambda: torch.nn.ELU(0.7),
    "selu": torch.nn.SELU,
    "celu-2": lambda: torch.nn.CELU(2.0),
}


class _Timed(torch.nn.Module):
    """zuko's velocity's layout: ``x`` broadcast beside a time's features, concatenated
    (``cat((features, x), -1)``), through ``8 -> 16 -> 16 -> 2`` with ``activation``; the
    second layer's first four rows zero and its bias's too, so those units' pre-activations
    are exactly 0 (the kink) for every sample."""

    def __init__(self, activation) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), activation(), torch.nn.Linear(16, 16), activation()
        )
        self.net.append(torch.nn.Linear(16, 2))
        self.features = torch.nn.Parameter(torch.randn(6))
        with torch.no_grad():
            self.net[2].weight[:4] = 0
            self.net[2].bias[:4] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.features.expand(x.shape[0], 6)
        return self.net(torch.cat((t, torch.broadcast_to(x, x.shape)), -1))


def _layouts(activation) -> dict[str, torch.nn.Module]:
    """Chains the trace takes: two activations apart, one adjacent to a tanh, one alone, the
    time features beside ``x``; each with pre-activations at 0 (a bias of 0 and ``x``'s
    first column 0 below, zero rows above)."""
    two = torch.nn.Sequential(
        torch.nn.Linear(2, 8), activation(), torch.nn.Linear(8, 8), activation()
    )
    two.append(torch.nn.Linear(8, 2))
    adjacent = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.Tanh(), activation(), torch.nn.Linear(8, 8, bias=False)
    )
    adjacent.extend([activation(), torch.nn.Linear(8, 2)])
    one = torch.nn.Sequential(torch.nn.Linear(2, 8), activation(), torch.nn.Linear(8, 2))
    for net in (two, adjacent, one):
        with torch.no_grad():
            net[0].weight[:3, 1] = 0
            net[0].bias[:3] = 0
    return {"two": two, "adjacent": adjacent, "one": one, "timed": _Timed(activation)}


@pytest.mark.parametrize("train", [False, True], ids=["frozen", "train"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_the_trace_with_elu_gives_the_loop_s_values_and_parameter_gradients(
    chain_traced, activation, train
):
    """Each layout on a later call: the trace by cyclicity taken, values and parameter
    gradients (of the squared trace: second derivatives of the activations at the kink
    too) equal the float64 loop's to float64's tolerances."""
    torch.manual_seed(0)
    for name, net in _layouts(ACTIVATIONS[activation]).items():
        net = net.double().requires_grad_(train)
        x = torch.randn(16, 2, dtype=torch.float64)
        x[:5, 0] = 0  # (the first layer's zeroed units at 0 for these samples)
        want = loop_diagonal(net, x, create_graph=train).sum(-1)
        torchdiv.divergence(net, x)  # (the first call is watched for sample mixing)
        del chain_traced[:]
        got = torchdiv.divergence(net, x)
        assert chain_traced == [True], (name, chain_traced)
        assert_close(got, want)
        if train:
            assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_the_trace_with_elu_keeps_its_graph_in_x(chain_traced, activation):
    """``x`` requiring grad: the gradient of the divergence in ``x`` and the parameters (a
    third derivative of ``f``, ``elu_backward``'s double backward against ``clamp`` and
    ``exp``'s) equals that of the loop on ``x``'s own graph, float64, at the kink too."""
    torch.manual_seed(0)
    net = _layouts(ACTIVATIONS[activation])["two"].double()
    x = torch.randn(8, 2, dtype=torch.float64)
    x[:3, 0] = 0
    x.requires_grad_(True)
    torchdiv.divergence(net, x)
    del chain_traced[:]
    ours = torchdiv.divergence(net, x)
    assert chain_traced == [True]
    z = x.view_as(x)
    y = net(z)
    rows = [torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2)]
    theirs = sum(rows)
    params = [x, *net.parameters()]
    for a, b in zip(
        torch.autograd.grad(ours.square().sum(), params, allow_unused=True),
        torch.autograd.grad(theirs.square().sum(), params, allow_unused=True),
        strict=True,
    ):
        assert (a is None) == (b is None)  # (the top layer's bias reaches no derivative)
        if a is not None:
            assert_close(a, b)


def _beside(net: torch.nn.Module, expand: bool):
    """``f(z) = net(cat((c, z), -1))`` with ``c`` a constant time's features (no grad) and
    ``z`` maybe broadcast to its own shape (zuko's velocity)."""
    c = torch.linspace(-1, 1, 6, dtype=torch.float64).expand(16, 6)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(torch.cat((c, torch.broadcast_to(z, z.shape) if expand else z), -1))

    return f


@pytest.mark.parametrize("expand", [False, True], ids=["cat", "cat-expand"])
def test_a_frozen_f_with_x_beside_constants_gives_a_result_without_a_graph(
    chain_traced, unit_rows, expand
):
    """A frozen ``f`` concatenating ``x`` (broadcast or not) beside constants: the chain's
    walk met ``x``'s own leaf below the concatenation and counted it as another leaf
    (``others``): the products built with ``create_graph`` in a frozen call, the result
    requiring grad through torchdiv's own copy of ``x`` (``test_api``'s frozen contract;
    and a graph recorded for every op of the trace: ``elu_backward`` under grad mode at
    zuko's D = 2). Values equal the float64 loop's; with a parameter requiring grad (or ``x``)
    the result keeps its graph."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ELU(), torch.nn.Linear(16, 16))
    net.extend([torch.nn.ELU(), torch.nn.Linear(16, 2)])
    net = net.double().requires_grad_(False)
    f = _beside(net, expand)
    x = torch.randn(16, 2, dtype=torch.float64)
    want = loop_diagonal(f, x)
    for op in ("divergence", "jacobian_diagonal", "jacobian"):
        getattr(torchdiv, op)(f, x)
    del chain_traced[:], unit_rows[:]
    got = torchdiv.divergence(f, x)
    diagonal = torchdiv.jacobian_diagonal(f, x)
    jacobian = torchdiv.jacobian(f, x)
    assert chain_traced == [True] and unit_rows == [True, True], (chain_traced, unit_rows)
    assert not got.requires_grad and not diagonal.requires_grad and not jacobian.requires_grad
    assert_close(got, want.sum(-1))
    assert_close(diagonal, want)
    net[0].weight.requires_grad_(True)
    assert torchdiv.divergence(f, x).requires_grad
    net[0].weight.requires_grad_(False)
    assert torchdiv.divergence(f, x.requires_grad_(True)).requires_grad


def test_zuko_s_frozen_velocity_gives_a_result_without_a_graph(chain_traced):
    """zuko's CNF velocity (``FFJTransform.f`` at a time: ELU MLP over the time's features
    beside a broadcast ``x``), frozen, float64: its trace by cyclicity has no graph and equals
    the loop's; trained, it keeps one and its parameter gradients equal the loop's."""
    zuko = pytest.importorskip("zuko.flows.continuous")
    torch.manual_seed(0)
    transform = zuko.FFJTransform(2).double().requires_grad_(False)
    t = torch.tensor(0.3, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return transform.f(t, z)

    x = torch.randn(16, 2, dtype=torch.float64)
    want = loop_diagonal(f, x).sum(-1)
    torchdiv.divergence(f, x)
    del chain_traced[:]
    got = torchdiv.divergence(f, x)
    assert chain_traced == [True] and not got.requires_grad
    assert_close(got, want)
    transform.requires_grad_(True)
    want = loop_diagonal(f, x, create_graph=True).sum(-1)
    got = torchdiv.divergence(f, x)
    assert got.requires_grad
    assert_close(got, want)
    assert_same_parameter_gradients(transform, got.square().sum(), want.square().sum())
