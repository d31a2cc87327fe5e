"""TorchScript that ``f`` reaches through what the walk of ``_core.script.scripted`` read only
in part (rev-late29): a property's getter, a ``functools.partialmethod`` (or
``cached_property``) on the class, a method of an ``Enum`` member or of a class whose
metaclass has a ``__call__``, a ``typing.NamedTuple``'s method, a ``types.SimpleNamespace``
holder; and a metaclass whose ``__getattribute__`` raises (the walk raised its error). The
scripted activation's executor optimized its plan at the caller's own calls: the structured
divergence was silently wrong. Reference: the per-sample ``autograd.grad`` loop on the same
``f`` with the eager activation (conftest), float64."""

from __future__ import annotations

import enum
import functools
import types
import typing
from collections.abc import Callable

import pytest
import torch
from conftest import assert_close, loop_diagonal

import torchdiv
from torchdiv._core.script import scripted

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own

Fn = Callable[[torch.Tensor], torch.Tensor]


def _act(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z) * z


_SCRIPTED_ACT = torch.jit.script(_act)
_ACT: Fn = _act  # (the scripted one while the test's scripted f runs)
torch.manual_seed(0)
_LIN = torch.nn.Linear(3, 3).double()


class _Property:
    @property
    def act(self) -> Fn:  # (the walk reads its getter's code; it never runs it)
        return _ACT

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(_LIN(z))


class _PartialMethod:
    def _go(self, z: torch.Tensor, k: float) -> torch.Tensor:
        return _ACT(_LIN(z)) * k

    go = functools.partialmethod(_go, k=2.0)

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self.go(z)


class _PropertyModule(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = _LIN

    @property
    def act(self) -> Fn:
        return _ACT

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(z))


class _Mode(enum.Enum):
    A = 1

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return _ACT(_LIN(z))


class _Params(typing.NamedTuple):
    k: float

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return _ACT(_LIN(z)) * self.k


class _Single(type):
    """A singleton metaclass: its ``__call__`` made its classes callable objects to the walk."""

    made: typing.ClassVar[dict[type, object]] = {}

    def __call__(cls, *args: object) -> object:
        return _Single.made.setdefault(cls, super().__call__(*args))


class _Service(metaclass=_Single):
    def run(self, z: torch.Tensor) -> torch.Tensor:
        return _ACT(_LIN(z))


class _Guarded(type):
    """A metaclass whose ``__getattribute__`` raises for what the walk read off a class."""

    guarding = False  # (on while the test runs: pytest's collection reads them too)

    def __getattribute__(cls, name: str) -> typing.Any:
        if _Guarded.guarding and name in ("__mro__", "__dict__", "__module__", "__call__"):
            raise RuntimeError(f"guarded {name}")
        return type.__getattribute__(cls, name)


class _GuardedHolder(metaclass=_Guarded):
    def run(self, z: torch.Tensor) -> torch.Tensor:
        return _ACT(_LIN(z))


def _case(where: str) -> Fn:
    if where == "a property's getter":
        held: typing.Any = _Property()
        return lambda z: held.run(z)
    if where == "a functools.partialmethod":
        held = _PartialMethod()
        return lambda z: held.run(z)
    if where == "a module's property":
        return _PropertyModule()
    if where == "an Enum member's method":
        return lambda z: _Mode.A.run(z)
    if where == "a NamedTuple's method":
        held = _Params(2.0)
        return lambda z: held.run(z)
    if where == "a SimpleNamespace holder":
        held = types.SimpleNamespace(fn=lambda z: _ACT(_LIN(z)))
        return lambda z: held.fn(z)
    if where == "a class of a metaclass with __call__":
        return lambda z: _Service().run(z)
    assert where == "a class whose metaclass raises"
    held = _GuardedHolder()
    _Guarded.guarding = True
    return lambda z: held.run(z)


WHERE = [
    "a property's getter",
    "a functools.partialmethod",
    "a module's property",
    "an Enum member's method",
    "a NamedTuple's method",
    "a SimpleNamespace holder",
    "a class of a metaclass with __call__",
    "a class whose metaclass raises",
]


@pytest.mark.parametrize("where", WHERE)
def test_scripted_code_reached_through_the_class_is_run_as_written(where: str) -> None:
    global _ACT
    x = torch.randn(4, 3, dtype=torch.float64)
    try:
        want = loop_diagonal(_case(where), x).sum(-1)
        _ACT = _SCRIPTED_ACT
        f = _case(where)
        for _ in range(3):  # the executor's profiled runs, outside torchdiv
            f(x)
        for _ in range(2):
            got = torchdiv.divergence(f, x, method="structured")
            assert_close(got, want)  # float64: the dtype's tolerances (conftest)
    finally:
        _ACT, _Guarded.guarding = _act, False


def test_a_property_is_not_evaluated_by_the_walk() -> None:
    """The walk reads a property's getter's code, never calls it (it may compute)."""
    calls = []

    class Counted:
        @property
        def act(self) -> Fn:
            calls.append(1)
            return _act

    held = Counted()
    scripted(lambda z: held.act(z))
    assert not calls
