"""walk31: the TorchScript walk's documented misses closed where cheap. A scripted module held
by a ``collections.deque``, a set or a frozenset (a partial's argument, a global) was not
looked into (each was read as a plain object without a ``__dict__``), nor what the body of a
``functools.wraps``-decorated ``__call__``, method or ``forward`` reads off ``self`` (a
partial two attributes down, a helper method): its optimized plan ran
(made by the three calls outside torchdiv), forward mode's divergence 0-off and parameter
gradients gone. References: per-sample ``autograd.grad`` loops on an eager copy (conftest),
float64 (conftest's float64 tolerances)."""

from __future__ import annotations

import collections
import functools
import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_scripted_as_eager

from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


def _first(held: Any, z: torch.Tensor) -> torch.Tensor:
    return next(iter(held))(z)


HELD: Any = None  # (a global a function names: set by a test)


def _by_global(z: torch.Tensor) -> torch.Tensor:
    return HELD[-1](z)


@pytest.mark.parametrize("kind", [collections.deque, set, frozenset])
def test_a_script_held_by_a_c_container_bound_by_a_partial(nets, kind: Callable[..., Any]):
    f = functools.partial(_first, kind([nets[1]]))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


def test_a_script_in_a_deque_a_function_names(nets, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys.modules[__name__], "HELD", collections.deque([0.5, nets[1]]))
    assert_scripted_as_eager(_by_global, *nets)


def test_a_deques_items_past_the_first_64_are_not_read(nets):
    """The same cap as a list's (``_HELD_ITEMS``): a long deque of numbers is data."""
    held = collections.deque([0.0] * script._HELD_ITEMS + [nets[1]])
    assert nets[1] not in script.scripted(functools.partial(_first, held))


def test_a_weak_proxy_of_a_scripted_module_as_f(nets):
    """Not a miss (it passed before walk31): kept so."""
    assert_scripted_as_eager(weakref.proxy(nets[1]), *nets)


# (the walk's documented miss until walk31: what a ``functools.wraps``-decorated function's own
# body reads off ``self``, its wrapper only calling it)


def _decorated(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def run(self: Any, z: torch.Tensor) -> torch.Tensor:
        return fn(self, z)

    return run


def _apply(net: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return net(z)


class _Runner:
    """Its decorated ``__call__`` reads a partial two attributes down off ``self``."""

    def __init__(self, run: Any) -> None:
        self.state = types.SimpleNamespace(run=run)

    @_decorated
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)

    @_decorated
    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _Net(torch.nn.Module):
    """Its decorated ``forward`` calls a helper method, which names the global ``HELD``."""

    @_decorated
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.helper(z)

    def helper(self, z: torch.Tensor) -> torch.Tensor:
        return HELD(z)


def test_a_decorated_call_reading_a_partial_two_attributes_down(nets):
    _assert_found(_Runner(functools.partial(_apply, nets[1])), nets)


def test_a_decorated_method_reading_a_partial_two_attributes_down(nets):
    _assert_found(_Runner(functools.partial(_apply, nets[1])).step, nets)


def test_a_decorated_forward_calling_a_helper_method(nets, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys.modules[__name__], "HELD", nets[1])
    _assert_found(_Net(), nets)


def _assert_found(f: Callable[[torch.Tensor], torch.Tensor], nets: Any) -> None:
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)
