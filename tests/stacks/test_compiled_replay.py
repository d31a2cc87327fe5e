"""The structured engine's chain plans traced inside a compiled loss (``_structured.replay``):
one graph, values and parameter gradients equal to eager, no recompilation for fixed shapes,
at most one for dynamic ones, and never a stale plan (a changed module is recorded again, a
replaced parameter is the one read, a closure's tensor is not replayed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from conftest import assert_close
from test_compiled_losses import (
    Counting,
    _fresh_dynamo,  # noqa: F401  (autouse: Dynamo reset per test)
    assert_compiled_matches,
    loss_and_grads,
    mlp,
)

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")

OPS: dict[str, Callable[..., torch.Tensor]] = {
    "divergence": lambda f, x, p=None: torchdiv.divergence(f, x, method="structured"),
    "jacobian_diagonal": lambda f, x, p=None: torchdiv.jacobian_diagonal(
        f, x, method="structured", chunk_size=2
    ),
}


@pytest.mark.parametrize("name", list(OPS))
def test_a_chain_is_one_graph(name):
    """``fullgraph=True`` holds: the call is traced, not run eagerly behind a break."""
    backend = assert_compiled_matches(
        mlp(), OPS[name], torch.randn(5, 3, dtype=torch.float64), fullgraph=True
    )
    assert backend.compiled == 1


def assert_steps_compile_once(
    net: torch.nn.Module, x: torch.Tensor, op: Callable[..., torch.Tensor] = OPS["divergence"]
) -> None:
    """Three SGD steps on a compiled loss ``op(net, x)**2`` averaged: each step's loss equals
    eager's, and the first graph serves every step (the parameters updated in place: read by
    name at every call)."""
    backend = Counting()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return op(net, x).square().mean()

    compiled = torch.compile(loss, backend=backend)
    for _ in range(3):
        opt.zero_grad()
        value = compiled(x)
        value.backward()
        assert_close(value, loss(x))
        opt.step()
    assert backend.compiled == 1 and backend.runs == 3


def test_a_compiled_step_is_not_recompiled():
    """Fixed shapes: the first graph serves every step, parameters updated in place."""
    assert_steps_compile_once(mlp(), torch.randn(6, 3, dtype=torch.float64))


@pytest.mark.parametrize("fn", [torchdiv.divergence, torchdiv.jacobian_diagonal])
def test_dynamic_batch_recompiles_at_most_once(fn):
    """(The diagonal's default block of columns, made from the traced batch size, was a
    guard on it: one graph per size.)"""
    net = mlp()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return fn(net, x, method="structured").square().mean()

    backend = Counting()
    compiled = torch.compile(loss, backend=backend, dynamic=True)
    for n in (2, 3, 5, 8):
        x = torch.randn(n, 3, dtype=torch.float64)
        assert_close(compiled(x), loss(x))
    assert backend.compiled <= 2 and backend.runs == 4


def _step_matches(net: torch.nn.Module, loss: Callable[..., torch.Tensor], x: torch.Tensor):
    """The compiled loss's value and parameter gradients (``loss`` compiled already) equal
    eager ones."""
    value, grads = loss_and_grads(lambda x, _: loss(x), net, x, x)
    want, want_grads = loss_and_grads(
        lambda x, _: OPS["divergence"](net, x).square().mean(), net, x, x
    )
    assert_close(value, want)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got, expected)


def test_a_changed_module_is_recorded_again():
    """A swapped activation recompiles (Dynamo's guards on ``f``, traced with the replay) and
    the new trace records the new structure; a parameter replaced by another object is read
    by name, so its value and gradient are the new one's."""
    net, x = mlp(), torch.randn(5, 3, dtype=torch.float64)
    loss = torch.compile(lambda x: OPS["divergence"](net, x).square().mean(), backend="aot_eager")
    _step_matches(net, loss, x)
    net[1] = torch.nn.Sigmoid()
    _step_matches(net, loss, x)
    net[2].weight = torch.nn.Parameter(torch.randn_like(net[2].weight))
    _step_matches(net, loss, x)


class Scaled(torch.nn.Module):
    """An MLP times a tensor that is not a parameter or buffer (a plain attribute)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.scale = torch.full((3,), 2.0, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def test_a_tensor_outside_the_parameters_is_not_replayed():
    """A replay would hold the attribute's tensor of the recording: rebound, it went stale.
    The call runs eagerly instead (no full graph), right after the rebinding."""
    f, x = Scaled(), torch.randn(5, 3, dtype=torch.float64)
    full = torch.compile(lambda x: OPS["divergence"](f, x).sum(), fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        full(x)
    loss = torch.compile(lambda x: OPS["divergence"](f, x).sum(), backend="aot_eager")
    loss(x)
    f.scale = torch.full((3,), -1.0, dtype=torch.float64)
    assert_close(loss(x), OPS["divergence"](f, x).sum())


class Centred(torch.nn.Module):
    """``net`` (an MLP by default) centred over the batch: it mixes samples."""

    def __init__(self, net: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.net = mlp() if net is None else net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y - y.mean(0)


def test_sample_mixing_is_still_refused():
    loss = torch.compile(lambda x: OPS["divergence"](Centred(), x).sum(), backend="aot_eager")
    with pytest.raises(torchdiv.BatchInteractionError):
        loss(torch.randn(5, 3, dtype=torch.float64))


def test_a_module_made_or_changed_in_the_compiled_code_is_not_replayed():
    """Dynamo applies what the traced code did to the real objects only after the graph: a
    recording while tracing saw a module made there blank (its divergence 3.2 off, without a
    gradient) and a layer swapped there as it was before (0.08 off). Such calls run eagerly."""
    net, x = mlp(), torch.randn(5, 3, dtype=torch.float64)

    def made(x: torch.Tensor) -> torch.Tensor:
        return OPS["divergence"](torch.nn.Sequential(net[0], torch.nn.ReLU(), net[4]), x)

    want = made(x)
    got = torch.compile(made, backend="aot_eager")(x)
    assert_close(got, want)
    assert got.requires_grad

    def swapped(x: torch.Tensor) -> torch.Tensor:
        net[1] = torch.nn.Sigmoid()
        return OPS["divergence"](net, x)

    got = torch.compile(swapped, backend="aot_eager")(x)
    assert_close(got, OPS["divergence"](net, x))


class Permuted(torch.nn.Module):
    """An MLP on permuted features, the permutation a buffer (index values, not structure)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.register_buffer("perm", torch.tensor([2, 0, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, self.perm])


class Branching(torch.nn.Module):
    """A branch on a value of the batch: Dynamo breaks the graph inside ``f`` there."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.tanh(y) if y.sum() > 0 else torch.sigmoid(y)


@pytest.mark.parametrize("make", [Permuted, Branching])
def test_plans_read_from_values_are_not_replayed(make):
    """A factor whose index map is read from index values (a permutation buffer changed in
    place: no guard sees it) and a plan made under one branch of ``f`` must not serve the
    next call: both run eagerly, right after the values change."""
    f, x = make(), torch.randn(5, 3, dtype=torch.float64)
    loss = torch.compile(lambda x: OPS["divergence"](f, x), backend="aot_eager")
    for flip in (False, True):
        if flip and make is Permuted:
            f.perm.copy_(torch.tensor([1, 2, 0]))
        if flip and make is Branching:  # the other branch
            with torch.no_grad():
                f.net[4].bias.sub_(2 * f.net(x).mean())  # (the sum's sign flipped)
        assert_close(loss(x), OPS["divergence"](f, x))


class Flipped(torch.nn.Module):
    """An MLP on reversed features: a data-movement factor (a permutation matrix)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flip(-1))


# (net, x's shape, batch_dims): chains through data-movement factors, made while recording
MOVED: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...], int]] = {
    "flip": (Flipped, (5, 3), 1),
    "tokens (a Linear's views of 3-D input)": (mlp, (4, 5, 3), 2),
}


@pytest.mark.parametrize("name", list(MOVED))
def test_a_chain_through_data_movement_is_one_graph(name):
    """The movement's 0/1 matrix is made on the host from shapes: made while recording and
    kept with the replay (before, such a chain ran eagerly behind a break)."""
    make, shape, batch_dims = MOVED[name]

    def op(f: torch.nn.Module, x: torch.Tensor, p: object) -> torch.Tensor:
        return torchdiv.divergence(f, x, method="structured", batch_dims=batch_dims)

    backend = assert_compiled_matches(
        make(), op, torch.randn(shape, dtype=torch.float64), fullgraph=True
    )
    assert backend.compiled == 1


class Selected(torch.nn.Module):
    """An MLP on features picked by ``index_select`` with a buffer: a movement factor whose
    matrix is made from the buffer's values."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.register_buffer("perm", torch.tensor([2, 0, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.index_select(x, 1, self.perm))


def test_a_movement_read_from_a_buffer_is_not_replayed():
    """No guard sees a buffer's values: the matrix of the old permutation, kept, was wrong
    after the buffer changed in place. Such a chain runs eagerly."""
    f, x = Selected(), torch.randn(5, 3, dtype=torch.float64)
    loss = torch.compile(lambda x: OPS["divergence"](f, x), backend="aot_eager")
    assert_close(loss(x), OPS["divergence"](f, x))
    f.perm.copy_(torch.tensor([1, 2, 0]))
    assert_close(loss(x), OPS["divergence"](f, x))
