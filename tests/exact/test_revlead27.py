"""Adversarial review of issue 19's chain work (rev-lead27): concatenations (``CatBackward0``)
and ``expand`` of ``x`` in ``_exact.chain`` placed where the lead's tests do not put them
(at the top, between two activations, at the bottom without a linear step, 3-D ``x``, legacy
empty inputs, other dims), second derivatives and a caller's ``vmap`` through them, and the
data-movement matrices ``_structured.factors`` keeps across calls (a Python int that moves
the elements, a dtype). References: float64 loops of ``torch.autograd.grad`` (one backward
pass per output component over the batch: ``f`` does not mix samples), never ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close

import torchdiv
from torchdiv._exact import chain

DOUBLE = torch.float64
N, D, H = 6, 3, 5


def _rows(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Every sample's Jacobian ``(N, m, n)``, one ``autograd.grad`` per output component of
    the whole batch (samples independent), with a graph in ``f``'s parameters."""
    leaf = x.detach().requires_grad_(True)
    y = f(leaf).reshape(len(x), -1)
    rows = [
        torch.autograd.grad(y[:, i].sum(), leaf, create_graph=True)[0].reshape(len(x), -1)
        for i in range(y.shape[1])
    ]
    return torch.stack(rows, 1)


class _Net(torch.nn.Module):
    """Linear layers and a time parameter ``t`` (expanded beside the features), wired by
    ``wiring``."""

    def __init__(self, sizes: list[tuple[int, int]], wiring: Callable, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in sizes)
        self.t = torch.nn.Parameter(torch.randn(1, 1))
        self.wiring = wiring
        self.to(dtype)

    def time(self, z: torch.Tensor) -> torch.Tensor:
        return self.t.expand(len(z), 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.wiring(self, z)


# (layer sizes, the wiring, whether the trace by cyclicity takes it): each a square chain
LAYOUTS = {
    # y itself a concatenation: the time beside the features (its rows of J are zero)
    "cat at the top, time last": (
        [(D, D - 1)],
        lambda m, z: torch.cat([torch.tanh(m.layers[0](z)), m.time(z)], -1),
    ),
    "cat at the top, time first": (
        [(D, D - 1)],
        lambda m, z: torch.cat([m.time(z), torch.tanh(m.layers[0](z))], 1),
    ),
    # a cat at either end, a linear step between
    "cat at both ends": (
        [(D + 1, H), (H, D - 1)],
        lambda m, z: torch.cat(
            [m.time(z), m.layers[1](torch.sigmoid(m.layers[0](torch.cat([z, m.time(z)], -1))))],
            -1,
        ),
    ),
    # between two activations, no linear step between them
    "activation, cat, activation": (
        [(D, H), (H + 1, D)],
        lambda m, z: m.layers[1](
            torch.tanh(torch.cat([torch.sigmoid(m.layers[0](z)), m.time(z)], -1))
        ),
    ),
    # at the bottom with no linear step below it (the slice of an identity)
    "cat at the bottom, one activation": (
        [(D + 1, D)],
        lambda m, z: m.layers[0](torch.tanh(torch.cat([m.time(z), z], -1))),
    ),
    # x broadcast to its own shape, then a legacy empty (0,) tensor beside x and the time
    "expand and a legacy empty tensor": (
        [(D + 1, H), (H, D)],
        lambda m, z: m.layers[1](
            torch.nn.functional.softplus(
                m.layers[0](torch.cat([z.expand(len(z), D), m.time(z), z.new_empty(0)], -1))
            )
        ),
    ),
}


@pytest.mark.parametrize("dtype", [DOUBLE, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_concatenation_anywhere_on_the_chain_gives_the_loop_s_values(chain_traced, layout, dtype):
    """Each layout on a later call (the first is watched) is a chain (the divergence by the
    trace's cyclicity), and the divergence, the diagonal and the Jacobian equal the loop of
    ``autograd.grad`` (in float64; float32 against the float64 loop, tolerances of float32:
    the chain and the loop round differently), and so do the gradients of each in every
    parameter, the time's included."""
    sizes, wiring = LAYOUTS[layout]
    torch.manual_seed(0)
    net = _Net(sizes, wiring, dtype)
    x = torch.randn(N, D, dtype=dtype)
    reference = _Net(sizes, wiring, DOUBLE)
    reference.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    want = _rows(reference, x.double())
    for operator in ("divergence", "jacobian_diagonal", "jacobian"):
        getattr(torchdiv, operator)(net, x)
    del chain_traced[:]
    got = {
        "divergence": torchdiv.divergence(net, x),
        "jacobian_diagonal": torchdiv.jacobian_diagonal(net, x),
        "jacobian": torchdiv.jacobian(net, x),
    }
    assert chain_traced == [True], chain_traced
    wanted = {
        "divergence": want.diagonal(0, 1, 2).sum(-1),
        "jacobian_diagonal": want.diagonal(0, 1, 2),
        "jacobian": want,
    }
    for operator, value in got.items():
        assert_close(value, wanted[operator].to(dtype))
        weights = torch.randn(value.shape, dtype=DOUBLE)
        ours = _gradients((value * weights.to(dtype)).sum(), net)
        theirs = _gradients((wanted[operator] * weights).sum(), reference)
        for a, b in zip(ours, theirs, strict=True):
            assert_close(a, b.to(dtype), scale=10.0)  # (sums over N samples' rows)


def _gradients(loss: torch.Tensor, net: torch.nn.Module) -> list[torch.Tensor]:
    """``loss``'s gradient in each parameter, zeros where unused (a bias under the last
    linear step does not reach a derivative)."""
    params = list(net.parameters())
    found = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, found, strict=True)]


@pytest.mark.parametrize("layout", ["activation, cat, activation", "cat at both ends"])
def test_second_derivatives_in_x_through_a_concatenation(layout):
    """``x`` requiring grad: the gradient in ``x`` of the divergence, of the diagonal's sum
    and of the Jacobian's trace (each a third derivative of ``f``) through the chain with its
    slices equals that of the float64 loop of ``autograd.grad``."""
    sizes, wiring = LAYOUTS[layout]
    torch.manual_seed(1)
    net = _Net(sizes, wiring, DOUBLE)
    x = torch.randn(N, D, dtype=DOUBLE, requires_grad=True)
    z = x.view_as(x)
    y = net(z)
    trace = sum(torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(D))
    (want,) = torch.autograd.grad(trace.sum(), x)
    for _ in range(2):  # (the first call watched)
        values = (
            torchdiv.divergence(net, x),
            torchdiv.jacobian_diagonal(net, x).sum(-1),
            torchdiv.jacobian(net, x).diagonal(0, 1, 2).sum(-1),
        )
    for value in values:
        (got,) = torch.autograd.grad(value.sum(), x)
        assert_close(got, want)


def test_a_callers_vmap_over_a_concatenation_of_x_and_the_time():
    """``torch.func.vmap`` over an ensemble of batches (the chain's walk under the caller's
    transform): each member's divergence and diagonal equal the float64 loop's."""
    sizes, wiring = LAYOUTS["expand and a legacy empty tensor"]
    torch.manual_seed(2)
    net = _Net(sizes, wiring, DOUBLE)
    xs = torch.randn(3, N, D, dtype=DOUBLE)
    want = torch.stack([_rows(net, x).diagonal(0, 1, 2) for x in xs]).detach()
    for _ in range(2):
        divergence = torch.func.vmap(lambda z: torchdiv.divergence(net, z))(xs)
        diagonal = torch.func.vmap(lambda z: torchdiv.jacobian_diagonal(net, z))(xs)
    assert_close(divergence, want.sum(-1))
    assert_close(diagonal, want)


def _products(build: Callable, shape: tuple[int, ...]) -> tuple[list | None, torch.Tensor | None]:
    """``chain.chain`` of ``build(x)``, and its products of 4 random cotangents less those of
    ``autograd.grad`` (``None`` where it is not a chain)."""
    x = torch.randn(*shape, dtype=DOUBLE, requires_grad=True)
    y = build(x)
    steps = chain.chain(y, x)
    if not steps:
        return None, None
    cotangents = torch.randn(4, *y.shape, dtype=DOUBLE)
    want = torch.stack([torch.autograd.grad(y, x, v, retain_graph=True)[0] for v in cotangents])
    return steps, chain.products(steps, cotangents, False) - want


_SIDE = torch.randn(N, 2, 1, dtype=DOUBLE)
PLACED = {  # a non-square chain with a concatenation in it, x's shape
    "3-D x, time first": (lambda z: torch.tanh(torch.cat([_SIDE, z], -1)), (N, 2, D)),
    "3-D x, time last, dim 2": (lambda z: torch.sigmoid(torch.cat([z, _SIDE], 2)), (N, 2, D)),
    "x of width 1": (lambda z: torch.tanh(torch.cat([_SIDE[:, 0], z], -1)), (N, 1)),
    "legacy empty first, x last": (
        lambda z: torch.tanh(torch.cat([z.new_empty(0), _SIDE[:, 0], z], -1)),
        (N, D),
    ),
}
REFUSED = {  # concatenations the chain cannot place: another dim, x in the middle
    "3-D x along dim -2": (
        lambda z: torch.tanh(torch.cat([z, torch.zeros(N, 1, D, dtype=DOUBLE)], -2)),
        (N, 2, D),
    ),
    "along the batch": (
        lambda z: torch.tanh(torch.cat([z, torch.zeros(2, D, dtype=DOUBLE)], 0)),
        (N, D),
    ),
    "legacy empty first, x in the middle": (
        lambda z: torch.tanh(torch.cat([z.new_empty(0), z, _SIDE[:, 0]], -1)),
        (N, D),
    ),
}


@pytest.mark.parametrize("case", list(PLACED))
def test_the_chain_places_a_concatenation_of_any_rank_along_its_last_dim(case):
    """Non-square chains (``jacobian``'s products, a basis's): the slice's products equal
    ``autograd.grad``'s for random cotangents, float64."""
    steps, error = _products(*PLACED[case])
    assert steps is not None and error is not None
    assert error.abs().max() < 1e-14  # (the same ATen formulas, a slice: exact up to rounding)


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_chain_refuses_a_concatenation_it_cannot_place(case):
    steps, _ = _products(*REFUSED[case])
    assert steps is None


class _Kept(torch.nn.Module):
    """A time input concatenated before ``x``, then a slice of ``start`` (a Python int that
    moves the elements, changed between calls) of the MLP's output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(D + 4, 16), torch.nn.Tanh(), torch.nn.Linear(16, D + 4)
        )
        self.start = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = torch.full((1, 2), 0.3, dtype=z.dtype).expand(len(z), 2)
        h = torch.cat([t, z, t], 1)
        return self.net(h).narrow(1, self.start, D)


def test_kept_movement_matrices_follow_python_ints_and_dtypes():
    """``method="structured"``: the output slice's matrix is kept by its start (a Python int)
    and the source's dtype: a start changed between calls, then float32 after float64, each
    call equals the float64 loop of ``autograd.grad`` (float32 to its tolerances)."""
    torch.manual_seed(3)
    net = _Kept().double()
    x = torch.randn(40, D, dtype=DOUBLE)
    for start in (0, 2, 4, 2, 0):
        net.start = start
        want = _rows(net, x).diagonal(0, 1, 2).sum(-1)
        assert_close(torchdiv.divergence(net, x, method="structured"), want)
    net.float()
    for start in (4, 0):
        net.start = start
        want = _rows(net.double(), x).diagonal(0, 1, 2).sum(-1)
        net.float()
        got = torchdiv.divergence(net, x.float(), method="structured")
        assert got.dtype == torch.float32
        assert_close(got, want.float())


@pytest.mark.parametrize("d", [1, 3])
def test_an_integer_tensor_concatenated_as_data_is_no_index(d):
    """``method="structured"``: an integer column concatenated beside ``x`` (a sample's index,
    scaled by the event size: ``cat`` promotes it to ``x``'s dtype, it is data) was read as
    the indices of ``x``'s elements that the column copies (``factors._index``), so the
    divergence took ``x[:, 0]``'s path through the column too (6 % off at d = 3); only
    ``index_select``'s index moves the elements. Equals the float64 loop of
    ``autograd.grad``."""
    torch.manual_seed(4)
    n = 40
    net = torch.nn.Sequential(
        torch.nn.Linear(d + 1, 16), torch.nn.Tanh(), torch.nn.Linear(16, d)
    ).double()
    column = torch.arange(n)[:, None] * d  # (sample b's value: b * d, x[b, 0]'s flat index)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(torch.cat([z, column], 1))

    x = torch.randn(n, d, dtype=DOUBLE)
    want = _rows(f, x).diagonal(0, 1, 2).sum(-1).detach()
    for _ in range(2):
        assert_close(torchdiv.divergence(f, x, method="structured"), want)
