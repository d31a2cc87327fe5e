"""Review of keyleft21's structure key (rev-merges21d): what it crashed on and what it still
served by an old pass.

Crashes (new in keyleft21): a module holding the bound method of a ``__slots__`` object whose
``__getattr__`` raises (``KeyError``, or ``RecursionError`` where it reads an unset slot), or
a dictionary subclass whose ``__len__`` raises, crashed every call. Served mixed: a plain
object's bound method or a module held as a class attribute (``act = helper.apply``), an
``Enum``, ``IntEnum`` or NumPy float held as a module's own attribute, changed between calls
(the guide says a module's ``int`` and ``float`` attributes are read by value: these are
``int`` and ``float`` instances), or a named tuple or ``frozenset`` it holds replaced.
"""

from __future__ import annotations

import collections
import enum
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from conftest import assert_close, reference_divergence
from test_module_key21 import _Acting, _Centred, _Helper, _made, _served_then_refused, _x
from torch import nn

import torchdiv
from torchdiv._taylor.cache import structure_key


class _Slotted:
    """A ``__slots__`` object delegating unknown attributes to a dictionary (``KeyError`` for
    ``__dict__``) or, with ``recursing``, to an unset slot (``RecursionError``)."""

    __slots__ = ("options",)

    def __init__(self, recursing: bool = False) -> None:
        if not recursing:
            self.options = {"shift": 0}

    def __getattr__(self, name: str) -> Any:
        return self.options[name]

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h)


class _LazyConfig(dict):
    """A configuration whose ``len`` is refused until it is loaded (its items are there)."""

    def __len__(self) -> int:
        raise RuntimeError("not loaded")


@pytest.mark.parametrize(
    "make",
    [
        lambda: _Acting(3, _Slotted().apply),
        lambda: _Acting(3, _Slotted(recursing=True).apply),
        lambda: _Centred(3, _LazyConfig(centre=False)),
    ],
    ids=["slots getattr KeyError", "slots getattr recursion", "dict len raises"],
)
def test_odd_objects_do_not_crash_the_key(make: Callable[[], nn.Module]) -> None:
    """Three divergences, against the reference (each crashed in the key after keyleft21)."""
    torch.manual_seed(0)
    m, x = _made(make()), _x(8, 3)
    for _ in range(3):
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))


class _Mode(enum.Enum):
    KEEP = 0
    ROLL = 1


class _Shift(enum.IntEnum):
    NONE = 0
    ONE = 1


class _Options(NamedTuple):
    shift: int = 0


class _Rolled(nn.Module):
    """``tanh(lin(z))`` moved ``int(self.shift)`` samples along the batch (``self.shift`` an
    ``IntEnum`` or a NumPy float), one more where ``self.mode`` is ``ROLL``, ``options.shift``
    more (a named tuple) and as many more as ``self.on`` holds (a ``frozenset``)."""

    def __init__(self, d: int, shift: Any = 0, mode: _Mode = _Mode.KEEP) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.shift = shift
        self.mode = mode
        self.options = _Options()
        self.on: frozenset[str] = frozenset()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        shift = int(self.shift) + (self.mode is _Mode.ROLL) + self.options.shift + len(self.on)
        return torch.tanh(self.lin(z)).roll(shift, 0)


class _Layer(nn.Module):
    """A linear layer and the shared ``act`` of its class (a plain object's bound method or a
    module, set on the class in each case below)."""

    act: Any = None

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(z))


class _RollModule(nn.Module):
    """``tanh(h)`` moved ``shift`` samples along the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h).roll(self.shift, 0)


def _cases() -> dict[str, Callable[[], tuple[nn.Module, Callable[[], None]]]]:
    """Each: a module and the change after which it mixes samples."""

    def enum_member():
        m = _made(_Rolled(3))
        return m, lambda: setattr(m, "mode", _Mode.ROLL)

    def int_enum():
        m = _made(_Rolled(3, _Shift.NONE))
        return m, lambda: setattr(m, "shift", _Shift.ONE)

    def numpy_float():
        m = _made(_Rolled(3, np.float64(0.0)))
        return m, lambda: setattr(m, "shift", np.float64(1.0))

    def named_tuple():
        m = _made(_Rolled(3))
        return m, lambda: setattr(m, "options", _Options(1))

    def frozen_set():
        m = _made(_Rolled(3))
        return m, lambda: setattr(m, "on", frozenset({"roll"}))

    def class_bound_method():
        helper = _Helper()
        kind = type("Layer", (_Layer,), {"act": helper.apply})
        return _made(kind(3)), lambda: setattr(helper, "shift", 1)

    def class_module():
        kind = type("Layer", (_Layer,), {"act": _RollModule()})
        return _made(kind(3)), lambda: setattr(kind.act, "shift", 1)

    return {
        "an Enum member": enum_member,
        "an IntEnum": int_enum,
        "a NumPy float": numpy_float,
        "a named tuple": named_tuple,
        "a frozenset": frozen_set,
        "a plain object's bound method on the class": class_bound_method,
        "a module on the class": class_module,
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_a_change_the_key_missed_is_refused(case: str) -> None:
    """Three divergences served, the change, the next refused (each served mixed after
    keyleft21: ``DID NOT RAISE``)."""
    torch.manual_seed(0)
    _served_then_refused(*CASES[case](), "divergence", _x(8, 3))


@pytest.mark.parametrize("case", list(CASES))
def test_unchanged_they_keep_the_pass(case: str, watches: list[int]) -> None:
    """Unchanged, three divergences: watched once."""
    torch.manual_seed(0)
    m, x = CASES[case]()[0], _x(8, 3)
    for _ in range(3):
        assert_close(torchdiv.divergence(m, x), reference_divergence(m, x))
    assert len(watches) == 1


class _Tabled(nn.Module):
    """A linear layer whose class holds a long table (a codebook of constants) and which
    holds a long vocabulary (an ``OrderedDict``): neither read by ``forward``."""

    TABLE = [0.5] * 1_000_000

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.vocabulary = collections.OrderedDict.fromkeys(map(str, range(300_000)), 0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z))


def test_long_tables_cost_the_key_no_walk() -> None:
    """The structure key (made at every call) tells neither (more than ``VALUE_ITEMS``) and
    so reads no item of them: the fastest of five keys under 2 ms (~10 us; 20-100 ms until
    rev-merges21d, a walk of the table's item types and a copy of the vocabulary at every
    call)."""
    m, x = _Tabled(3), _x(8, 3)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        structure_key(m, x, 1)
        times.append(time.perf_counter() - start)
    assert min(times) < 2e-3
