"""Lifetimes: what a call leaves behind once the caller drops its results. Nothing the call
made may sit in a reference cycle (freed only when Python's cycle collector next runs, a few
calls later: every activation of ``f`` held that long, one call's worth per call in between),
and the caches keep no model, parameter or tensor alive."""

from __future__ import annotations

import contextlib
import gc
import sys
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import sampled_daily

import torchdiv


def _net(width: int, out: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, out)
    )


CALLS: dict[str, Callable[[torch.nn.Module, torch.Tensor], object]] = {
    "divergence-forward": lambda f, x: torchdiv.divergence(f, x, method="forward"),
    "divergence-auto": lambda f, x: torchdiv.divergence(f, x),
    "jacobian-forward": lambda f, x: torchdiv.jacobian(f, x, method="forward"),
    "hutchinson": lambda f, x: torchdiv.divergence(f, x, method="hutchinson", num_probes=2),
    "laplacian-taylor": lambda f, x: torchdiv.laplacian(f, x, method="taylor"),
    "laplacian-hessian": lambda f, x: torchdiv.laplacian(f, x, method="hessian"),
    "laplacian-forward-over-reverse": lambda f, x: torchdiv.laplacian(
        f, x, method="forward-over-reverse"
    ),
}


@pytest.fixture
def no_cycle_collection() -> Iterator[list[object]]:
    """Cycle collection off for the test; the list receives what the collector then finds
    (``gc.DEBUG_SAVEALL``) when the test calls ``gc.collect()``.

    Collected first until a collection finds nothing: one collection runs the finalizers of
    what an earlier test left (weakref callbacks: Dynamo's guards of a freed compiled
    module), which drop the last references to more cycles (Dynamo's cache entries, with
    their ``FakeTensor``s), found only by the next collection. With one collection, those
    were counted as this test's call's (``[divergence-forward]`` after any compiled model of
    ``tests/stacks/test_compiled_models.py`` in the same process: 5 to 40 ``FakeTensor``s;
    none reachable from torchdiv, rev-merges17a).

    pytest's record of the previous test's error (``sys.last_value``, kept for post-mortem
    debugging until this test's call starts) dropped first: an xfailed test's error, its
    traceback's frames holding tensors in a cycle, became garbage only once this test ran,
    and a collection here keeps what it finds (``gc.garbage``: clearing that list does not
    free a cycle), so its ``Parameter`` was counted as this test's call's
    (``[divergence-forward]`` after ``tests/stacks/test_fuzz24.py``'s xfailed tests, percall25;
    pytest's, not torchdiv's: rev-merges25b)."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        with contextlib.suppress(AttributeError):
            delattr(sys, name)
    for _ in range(10):
        if not gc.collect():
            break
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


# always: the two engines whose cycles were found (forward mode, Taylor); "auto" and the
# other engines (three full cycle collections a case, ~0.6 s alone, 5-6 s in the full suite's
# heap on a loaded run) in the daily sample of slow tests
SAMPLED_CALLS = {
    "divergence-auto",
    "jacobian-forward",
    "hutchinson",
    "laplacian-hessian",
    "laplacian-forward-over-reverse",
}


@pytest.mark.parametrize(
    "call",
    sampled_daily(CALLS, SAMPLED_CALLS),
)
def test_a_call_leaves_no_tensor_in_a_reference_cycle(
    call: str, no_cycle_collection: list[object]
) -> None:
    """The forward engine held itself through a bound method of its own (with ``x``, ``f`` and
    ``f(x)``'s graph), and the Taylor engine's graph its plan, which held the graph (every
    value ``f`` computed): freed only by the cycle collector, about 20 calls' worth of
    activations alive at once in a loop of forward-mode divergences."""
    CALLS[call](_net(16), torch.randn(5, 3))  # first calls: what torch sets up once
    gc.collect()
    no_cycle_collection.clear()
    net, x = _net(17), torch.randn(6, 3)
    CALLS[call](net, x)
    dropped = weakref.ref(net), weakref.ref(x)
    del net, x
    assert [r() for r in dropped] == [None, None]  # freed by reference counting alone
    gc.collect()
    assert [type(o) for o in no_cycle_collection if isinstance(o, torch.Tensor)] == []


@pytest.fixture
def _an_earlier_test_s_error() -> None:
    """What pytest keeps of a previous test's error until this test's call starts
    (``sys.last_value``; ``_pytest.runner.pytest_runtest_call`` deletes it then): an error
    whose traceback holds a ``Parameter`` in a cycle (the frame holds the error)."""

    def failing() -> None:
        weight = torch.nn.Parameter(torch.ones(3))
        try:
            raise AssertionError(weight.sum())
        except AssertionError as error:
            caught = error  # (the frame holds its own error: a cycle)
            sys.last_type, sys.last_value = type(caught), caught
            sys.last_traceback = caught.__traceback__
        del weight

    failing()


@pytest.mark.slow  # (three full cycle collections: 1-3 s in a large heap)
def test_an_earlier_test_s_error_is_not_counted(
    _an_earlier_test_s_error: None, no_cycle_collection: list[object]
) -> None:
    """The error pytest held for the previous test, dropped when this test's call starts, is
    not counted as garbage of this test (``no_cycle_collection``; with ``[divergence-forward]``
    after ``tests/stacks/test_fuzz24.py``'s xfailed tests, failed on main: rev-merges25b)."""
    gc.collect()
    no_cycle_collection.clear()
    gc.collect()
    assert [type(o) for o in no_cycle_collection if isinstance(o, torch.Tensor)] == []


SWEEP: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "auto": lambda net, x: torchdiv.divergence(net, x),
    "forward, a new lambda": lambda net, x: torchdiv.divergence(
        lambda z: net(z), x, method="forward"
    ),
    "structured": lambda net, x: torchdiv.divergence(net, x, method="structured"),
}


def test_models_of_a_sweep_are_freed() -> None:
    """Many models, one call of each (a hyperparameter sweep): none stays alive in a cache,
    each one's result right (a freed model's ``id``, reused, never finds its plans)."""
    dropped = []
    for width in range(4, 12):
        net, x = _net(width).double(), torch.randn(4, 3, dtype=torch.float64)
        a, b = net[0].weight, net[2].weight
        with torch.no_grad():  # tr(B diag(tanh') A), in float64
            expected = torch.einsum("ij,bj,ji->b", b, 1 - torch.tanh(net[0](x)) ** 2, a)
        for call in SWEEP.values():
            torch.testing.assert_close(call(net, x), expected, rtol=1e-12, atol=1e-12)
        dropped += [weakref.ref(net), weakref.ref(a), weakref.ref(x)]
        del net, x, a, b
    gc.collect()
    assert [r for r in dropped if r() is not None] == []


def _made_here(scale: torch.Tensor) -> torch.nn.Module:
    """A model whose class is made at every call (a model factory), its forward closing over
    ``scale``."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.linear(x)) * scale

    return Scaled()


@pytest.mark.parametrize("bound", [False, True])
@pytest.mark.parametrize("call", ["divergence", "laplacian"])
def test_classes_made_at_every_call_are_freed(call: str, bound: bool) -> None:
    """The TorchScript search's tables (``_core.script``) held every class it met, with the
    tensors its methods close over, for the rest of the process; the structure keys of the
    caches held them, or a bound method's function, as long as they were kept (256 calls)."""
    dropped = []
    for _ in range(3):
        scale = torch.full((3,), 2.0)
        net = _made_here(scale)
        getattr(torchdiv, call)(net.forward if bound else net, torch.randn(4, 3))
        dropped += [weakref.ref(type(net)), weakref.ref(scale)]
        del net, scale
    gc.collect()
    assert [r for r in dropped if r() is not None] == []


def test_each_graph_modules_class_is_freed() -> None:
    """``torch.fx`` makes a class for every ``GraphModule``: none outlives its module."""
    dropped = []
    for _ in range(3):
        traced = torch.fx.symbolic_trace(_net(8))
        torchdiv.divergence(traced, torch.randn(4, 3))
        dropped.append(weakref.ref(type(traced)))
        del traced
    gc.collect()
    assert [r for r in dropped if r() is not None] == []


def _tensors_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize(
    ("operator", "train"), [("jacobian_diagonal", False), ("divergence", True)]
)
def test_later_calls_of_a_small_problem_keep_no_tensor(operator: str, train: bool) -> None:
    """The calls after the first (unwatched: plain autograd and the chain's walk, the path of
    every later call of a small problem) leave no tensor alive: a cache of the chain's walk by
    its arguments (a decorator of the next function, taken by the walk's helper when it was
    put above it) kept every call's ``f(x)`` with its graph, ~280 KB a call of a D = 2 MLP at
    batch 256, and each call faulted in fresh pages (1.7x the call's time)."""
    torch.manual_seed(0)
    net = _net(8, out=2)
    net[0] = torch.nn.Linear(2, 8)
    net.requires_grad_(train)
    x = torch.randn(4, 2)
    op = getattr(torchdiv, operator)
    for _ in range(3):
        op(net, x)
    before = _tensors_alive()
    for _ in range(4):
        op(net, x)
    assert _tensors_alive() == before
