"""The Taylor engine's calls traced inside a compiled loss (``_laplacian.traced``): one graph,
values and parameter gradients equal to eager (``laplacian``, ``value_grad_laplacian``,
partial-coordinate Laplacians), no recompilation for fixed shapes, at most one more for
dynamic ones, and never a stale replay (a changed module is recorded again; a closure's
tensor, a module made in the compiled code and a plan read from values are not replayed)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from conftest import assert_close, in_todays_sample, sampled_daily
from test_compiled_losses import (
    Counting,
    _fresh_dynamo,  # noqa: F401  (autouse: Dynamo reset per test)
    assert_compiled_matches,
    mlp,
    pinn,
)
from test_compiled_replay import Branching, Centred, Scaled, assert_steps_compile_once

import torchdiv
from torchdiv._laplacian import traced

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


def _sweep(**options: object) -> Callable[..., torch.Tensor]:
    """``value_grad_laplacian``'s three results in one tensor per sample."""

    def op(f: Callable[..., torch.Tensor], x: torch.Tensor, p: object = None) -> torch.Tensor:
        out = torchdiv.value_grad_laplacian(f, x, **options)
        return out.value + out.gradient.sum(-1) + out.laplacian

    return op


class Heat(torch.nn.Module):
    """``u(x, y, t)``: a tanh MLP with a scalar per sample (a heat equation's PINN)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(3, 1)

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        return self.net(xyt).squeeze(-1)


OPS: dict[str, tuple[Callable[[], torch.nn.Module], Callable[..., torch.Tensor]]] = {
    "laplacian taylor": (pinn, lambda f, x, p=None: torchdiv.laplacian(f, x, method="taylor")),
    "laplacian taylor, chunked": (
        pinn,
        lambda f, x, p=None: torchdiv.laplacian(f, x, method="taylor", chunk_size=1),
    ),
    "laplacian taylor, coordinates": (
        Heat,
        lambda f, x, p=None: torchdiv.laplacian(f, x, method="taylor", coordinates=[0, 1]),
    ),
    "value_grad_laplacian taylor": (Heat, _sweep(method="taylor")),
    "value_grad_laplacian auto, coordinates": (Heat, _sweep(coordinates=[0, 1])),
}


def _x(make: Callable[[], torch.nn.Module], n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3 if make is Heat else 2, dtype=torch.float64)


# always the Laplacian and the sweep with coordinates (auto); the rest in the daily sample
DAILY = {
    "laplacian taylor, chunked",
    "laplacian taylor, coordinates",
    "value_grad_laplacian taylor",
}


@pytest.mark.parametrize("name", sampled_daily(OPS, DAILY))
def test_one_graph_equal_to_eager(name):
    """``fullgraph=True`` holds (the call was run eagerly behind a break); float64, 1e-10."""
    make, op = OPS[name]
    backend = assert_compiled_matches(make(), op, _x(make), fullgraph=True)
    assert backend.compiled == 1


def test_float32_equal_to_eager():
    make, op = OPS["value_grad_laplacian taylor"]
    assert_compiled_matches(make().float(), op, _x(make).float(), fullgraph=True)


def test_a_compiled_step_is_not_recompiled():
    """Fixed shapes: the first graph serves every SGD step, the parameters updated in place
    (read by name at every call: the values of this step)."""
    assert_steps_compile_once(pinn(), _x(pinn), OPS["laplacian taylor"][1])


@pytest.mark.parametrize(("sizes", "graphs"), [((3, 5, 7), 1), ((2, 3, 5), 2)])
def test_dynamic_batch_recompiles_at_most_once(sizes, graphs):
    """The integers of the recorded calls that follow the batch size are replayed from it
    (``Sized``): one graph for every size. A first batch of 2, the event's size, is
    specialised by the guard on the event (Dynamo gives equal sizes one symbol): one more."""
    net, backend = pinn(), Counting()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return torchdiv.laplacian(net, x, method="taylor").square().mean()

    compiled = torch.compile(loss, backend=backend, dynamic=True)
    for n in sizes:
        x = _x(pinn, n)
        assert_close(compiled(x), loss(x))
    assert backend.compiled == graphs and backend.runs == len(sizes)


def _matches(f: torch.nn.Module, loss: Callable[..., torch.Tensor], x: torch.Tensor) -> None:
    """The compiled ``loss`` (of ``f``) gives eager's value and parameter gradients."""
    want = OPS["laplacian taylor"][1](f, x).square().mean()
    params = list(f.parameters())
    options = {"allow_unused": True, "materialize_grads": True}
    got = loss(x)
    assert_close(got, want)
    expected = torch.autograd.grad(want, params, **options)
    for g, e in zip(torch.autograd.grad(got, params, **options), expected, strict=True):
        assert_close(g, e)


def test_a_changed_module_is_recorded_again(pytestconfig):
    """A swapped layer, a changed activation (a Softplus's ``beta``) and a replaced Parameter:
    Dynamo's guards on ``f`` (its call traced with the replay) recompile, and the new trace
    records the new ``f``. The swapped layer (a guard on a submodule, as the structured
    replay's test in tests/stacks/test_compiled_replay.py swaps one always) in the daily
    sample: each change is one more trace of the Taylor engine's call, ~1.3 s alone; the
    changed attribute takes the same recompilation and new recording every day."""
    net = torch.nn.Sequential(*pinn()[0][:4], torch.nn.Softplus(), pinn()[0][4], pinn()[1])
    x = _x(pinn)
    loss = torch.compile(
        lambda x: OPS["laplacian taylor"][1](net, x).square().mean(), backend="aot_eager"
    )
    _matches(net, loss, x)
    if in_todays_sample(pytestconfig, "test_compiled_taylor/a swapped layer recorded again"):
        net[1] = torch.nn.Sigmoid()
        _matches(net, loss, x)
    net[4].beta = 3.0
    _matches(net, loss, x)
    net[2].weight = torch.nn.Parameter(torch.randn_like(net[2].weight))
    _matches(net, loss, x)


def test_a_tensor_outside_the_parameters_is_not_replayed():
    """A replay would hold the attribute's tensor of the recording: rebound, it would be
    stale. The call runs eagerly instead (no full graph), right after the rebinding."""
    f, x = Scaled(), _x(Heat)
    op = OPS["laplacian taylor"][1]
    full = torch.compile(lambda x: op(f, x).sum(), backend="aot_eager", fullgraph=True)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
        full(x)
    loss = torch.compile(lambda x: op(f, x).sum(), backend="aot_eager")
    loss(x)
    f.scale = torch.full((3,), -1.0, dtype=torch.float64)
    assert_close(loss(x), op(f, x).sum())


def test_a_module_made_or_changed_in_the_compiled_code_is_not_replayed():
    """Dynamo applies what the traced code did to the real objects after the graph: a
    recording while tracing would see a module made there blank and a layer swapped there
    as it was. Such calls run eagerly."""
    net, x = pinn(), _x(pinn)
    op = OPS["laplacian taylor"][1]

    def made(x: torch.Tensor) -> torch.Tensor:
        inner = net[0]
        return op(torch.nn.Sequential(inner[0], torch.nn.Sigmoid(), *inner[2:], net[1]), x)

    want = made(x)
    got = torch.compile(made, backend="aot_eager")(x)
    assert_close(got, want)
    assert got.requires_grad

    def swapped(x: torch.Tensor) -> torch.Tensor:
        net[0][1] = torch.nn.Sigmoid()
        return op(net, x)

    got = torch.compile(swapped, backend="aot_eager")(x)
    assert_close(got, op(net, x))


def test_a_plan_read_from_values_is_not_replayed():
    """A recording under one branch of ``f`` must not serve the next call: it runs eagerly,
    right after the branch flips."""
    f, x = Branching(), _x(Heat)
    op = OPS["laplacian taylor"][1]
    loss = torch.compile(lambda x: op(f, x), backend="aot_eager")
    for flip in (False, True):
        if flip:
            with torch.no_grad():
                f.net[4].bias.sub_(2 * f.net(x).mean())  # (the sum's sign flipped)
        assert_close(loss(x), op(f, x))


@pytest.mark.parametrize(
    "f",
    [
        lambda x: (x.square() * x[0, 0].item()).sum(-1),  # a value read on the host
        lambda x: (x.square() * torch.tensor(x[0].tolist())).sum(-1),  # read undispatched
        lambda x: torch.nn.functional.dropout(x, 0.5).square().sum(-1),  # a random draw
    ],
    ids=["item", "tolist", "dropout"],
)
def test_recordings_that_cannot_be_replayed_are_refused(f):
    """What a replay would not compute alike is no ``Program`` (the call runs eagerly)."""

    class Wrapped(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return f(x)

    x = _x(pinn)
    program = traced._planned(torchdiv.laplacian, Wrapped(), x, (("method", "taylor"),), True)
    assert program is None


class Counter(torch.nn.Module):
    """A PINN that counts its calls in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.net = pinn()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.net(x)


def test_a_write_to_a_buffer_is_put_back_and_refused():
    """The recordings (three while tracing) would each have counted: they are put back, and
    the call runs eagerly, one count per call as in eager code."""
    f, x = Counter(), _x(pinn)
    loss = torch.compile(lambda x: OPS["laplacian taylor"][1](f, x).sum(), backend="aot_eager")
    loss(x)
    loss(x)
    assert f.calls.item() == 2


# (7 s each on a loaded run: value_grad_laplacian in the daily sample, its mixing in a compiled
# loss always refused in test_compiled_losses)
@pytest.mark.parametrize(
    "name",
    sampled_daily(
        ["laplacian taylor", "value_grad_laplacian taylor"], {"value_grad_laplacian taylor"}
    ),
)
def test_sample_mixing_is_still_refused(name):
    """The recordings watch ``f`` as the eager call does: refused, the call runs eagerly."""
    op = OPS[name][1]
    loss = torch.compile(lambda x: op(Centred(), x).sum(), backend="aot_eager")
    with pytest.raises(torchdiv.BatchInteractionError):
        loss(_x(Heat))


def test_a_replay_recorded_inside_allow_batch_interaction_is_not_served_outside():
    """Compiled inside ``allow_batch_interaction()``, the recordings still watch (a mixing
    ``f`` then runs eagerly): a replay recorded unwatched there served the call outside the
    block, where the eager call raises (a Laplacian of 0 returned, lead's review)."""
    f, op = Centred(mlp(3, 1)), OPS["laplacian taylor"][1]
    loss = torch.compile(lambda x: op(f, x).sum(), backend="aot_eager")
    x = _x(Heat)
    with torchdiv.allow_batch_interaction():
        assert_close(loss(x), op(f, x).sum())
    with pytest.raises(torchdiv.BatchInteractionError):
        loss(x)


def test_an_event_dimension_marked_dynamic_is_not_replayed():
    """The replay guards on the event's shape; a dimension the caller marked dynamic
    (``mark_dynamic``) made Dynamo raise ``ConstraintViolationError``: run eagerly instead."""
    f, op = pinn(), OPS["laplacian taylor"][1]
    loss = torch.compile(lambda x: op(f, x).square().mean(), backend="aot_eager")
    x = _x(pinn)
    torch._dynamo.mark_dynamic(x, 1)
    assert_close(loss(x), op(f, x).square().mean())
