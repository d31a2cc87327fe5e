"""The TorchScript walk's memos of 1bf3b7d1 (rev-lead30): the names a code reads remembered
per code object (``per_code``), whether a class is built-in or PyTorch's remembered per class
(``_foreign``), namespaces met by set intersections. What the walk misses runs the scripted
code's optimized plan (made by the caller's calls before): forward mode's divergence 0 and
no parameter gradients. So each case changes what ``f`` reaches after a first torchdiv call,
runs ``f`` three times outside torchdiv (TorchScript's executor profiles, then optimizes),
and checks two divergences and the parameter gradients of their sum against per-sample
``autograd.grad`` loops on an eager copy (conftest), float64 (its tolerances)."""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
import torch
from conftest import assert_scripted_as_eager

import torchdiv
from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


# the scripted module the functions below name as a global (set by each test)
_SCRIPTED: torch.jit.ScriptModule | None = None


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z * 1.0


def _through_scripted(z: torch.Tensor) -> torch.Tensor:
    assert _SCRIPTED is not None
    return _SCRIPTED(z)


def assert_run_as_written(f: Callable[[torch.Tensor], torch.Tensor], eager: torch.nn.Module):
    """``conftest.assert_scripted_as_eager`` with this file's scripted module."""
    assert _SCRIPTED is not None
    assert_scripted_as_eager(f, eager, _SCRIPTED)


@pytest.fixture
def scripted_global(nets):
    global _SCRIPTED
    eager, _SCRIPTED = nets  # (conftest's pair)
    yield eager
    _SCRIPTED = None


def test_a_code_object_replaced_on_the_function_is_read_anew(scripted_global):
    """``per_code`` keeps a code's names by its id: the function's new code (``fn.__code__ =
    ...`` between calls) is another object, its names read."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return _identity(z)

    x = torch.randn(4, 3, dtype=torch.float64)
    torchdiv.divergence(f, x, method="forward")  # (the walk remembers f's first code)
    f.__code__ = _through_scripted.__code__
    assert_run_as_written(f, scripted_global)


def test_codes_past_the_bound_and_made_anew_are_each_read(scripted_global, monkeypatch):
    """Functions made anew by ``exec`` (a notebook's cells): each a new code object, some
    at the id of a freed one once the table is cleared at its bound."""
    monkeypatch.setattr(script, "_PER_CODE", 2, raising=False)  # (raising: the base's)
    f: Callable[[torch.Tensor], torch.Tensor] = _identity
    for i in range(6):
        scope = {"_SCRIPTED": _SCRIPTED, "_identity": _identity}
        body = "_SCRIPTED(z)" if i == 5 else f"_identity(z) * {i + 1}.0"
        exec(f"def f(z):\n    return {body}\n", scope)
        f = scope["f"]
        assert script.scripted(f) == ([_SCRIPTED] if i == 5 else [])
        gc.collect()
    assert_run_as_written(f, scripted_global)


class _Runner(torch.nn.Module):
    """A module of the user's whose forward calls a helper method reaching the global
    scripted module (the walk reads the helper through the class's namespace)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.helper(z)

    @staticmethod
    def helper(z: torch.Tensor) -> torch.Tensor:
        return _through_scripted(z)


def test_a_class_whose_module_changes_is_told_anew(scripted_global, monkeypatch):
    """``_foreign`` tells PyTorch's classes by ``__module__``, which a class can change:
    a class first named as PyTorch's (``torch.*``: not followed, by design) and then as the
    user's is followed from then on, as it was before 1bf3b7d1 (read at every call)."""

    class Runner(torch.nn.Module):  # (its own methods: a base class is told on its own)
        forward, helper = _Runner.forward, _Runner.__dict__["helper"]

    monkeypatch.setattr(Runner, "__module__", "torch.nn.modules.fake")
    assert script.scripted(Runner()) == []  # (PyTorch's class: not followed)
    monkeypatch.setattr(Runner, "__module__", __name__)
    assert_run_as_written(Runner(), scripted_global)  # (1bf3b7d1: divergence 0, no gradients)
    assert script.scripted(Runner()) == [_SCRIPTED]


def test_a_base_class_swapped_is_followed(scripted_global):
    """``__bases__`` changed between calls: the method resolution order is read at every
    call, each class told on its own."""

    class Plain(torch.nn.Module):
        @staticmethod
        def helper(z: torch.Tensor) -> torch.Tensor:
            return _identity(z)

    class Runner(Plain):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.helper(z)

    runner = Runner()
    assert script.scripted(runner) == []
    Runner.__bases__ = (_Runner,)
    assert script.scripted(runner) == [_SCRIPTED]
    assert_run_as_written(runner, scripted_global)


class _Holder:
    """A plain object holding the model (a bound method's ``self``)."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def test_a_namespace_with_keys_not_strings(scripted_global):
    """An object's ``__dict__`` holding keys that are not strings (set through it): the
    intersection with the names a code reads still finds the model."""
    assert _SCRIPTED is not None
    holder = _Holder(_SCRIPTED)
    vars(holder)[1] = torch.nn.Linear(2, 2)
    vars(holder)[("net",)] = None
    assert script.scripted(holder.run) == [_SCRIPTED]
    assert_run_as_written(holder.run, scripted_global)


def test_a_freed_class_id_is_not_told_by_the_old_class():
    """A class freed (a model factory's class, made at every call) and another made at its
    id: ``_foreign`` reads the new one (``_remember``'s finalizer dropped the old entry)."""

    def made(module: str) -> type:
        return type("Made", (), {"__module__": module})

    old = made("torch.fake")
    assert script._foreign(old)
    key = id(old)
    del old
    gc.collect()
    assert key not in script._FOREIGN
    reused = False
    for _ in range(200):  # (CPython's allocator gives a freed type's memory to the next)
        new = made(__name__)
        reused |= id(new) == key
        assert not script._foreign(new)
        if reused:
            break
    assert key not in script._FOREIGN or reused


def _g1(z: torch.Tensor) -> torch.Tensor:
    return _through_scripted(z)


def _helper(z: torch.Tensor) -> torch.Tensor:  # (3 functions deep with the method: found)
    return _g1(z)


def _runner_class(other: str) -> type[torch.nn.Module]:
    """A module whose forward reads two methods: ``helper`` (``_helper``, static) and
    ``other``, which names the same function as a global (one function deeper)."""
    scope: dict[str, object] = {}
    code = (
        f"def forward(self, z):\n    return self.helper(z) + 0.0 * self.{other}(z)\n"
        f"def {other}(self, z):\n    return _helper(z)\n"
    )
    exec(code, globals(), scope)
    namespace = {"forward": scope["forward"], other: scope[other]}
    return type("Runner", (torch.nn.Module,), {**namespace, "helper": staticmethod(_helper)})


def test_the_walk_does_not_depend_on_the_order_names_are_met(scripted_global):
    """``_methods`` meets a namespace's names by set intersection, in the strings' hash order
    (``PYTHONHASHSEED``: another order in every process), and the walk visited each object
    once, at the depth it first met it: ``_helper`` met first through ``other``'s globals,
    one function deeper than as the class's method, reached the scripted module 2 functions
    further only in the processes where the method came first (1bf3b7d1: in the others
    divergence 0, no gradients). Here ``other`` is named so that it comes first."""
    for i in range(64):
        cls = _runner_class(f"other{i}")
        met = script._methods(cls, ("forward",))
        if met.index(vars(cls)[f"other{i}"]) > met.index(_helper):  # (walked first: a stack)
            break
    assert _SCRIPTED is not None
    assert_run_as_written(cls(), scripted_global)
    assert script.scripted(cls()) == [_SCRIPTED]
