"""pyvers31: the TorchScript walk (``_core.script.scripted``) reads bytecode, which Python
versions write differently where a script is named: 3.12 inlines list, dict and set
comprehensions (PEP 709: their names land in the function's own code, no nested code object;
a closure variable read only there is the function's own cell), a generator expression keeps
its nested code; ``super().forward`` is 3.12's ``LOAD_SUPER_ATTR``; ``self.x(z)`` is
3.10-3.11's ``LOAD_METHOD``, 3.12+'s ``LOAD_ATTR``; 3.13 re-encodes ``LOAD_GLOBAL`` and
``LOAD_ATTR``. Each ``f`` below names a scripted module in one of those ways; the walk finds it
on 3.10, 3.11, 3.12 and 3.13 (checked on each): a version whose bytecode it misread would run
the script's optimized plan (forward mode's divergence 0, parameter gradients gone)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own

NET = torch.jit.script(torch.nn.Linear(2, 2))


def _closure_in_a_comprehension() -> Callable[[torch.Tensor], Any]:
    held = NET

    def f(z: torch.Tensor) -> Any:
        return torch.stack([held(w) for w in z])

    return f


def _in_a_list_comprehension(z: torch.Tensor) -> Any:
    return torch.stack([NET(w) for w in z])


def _in_a_dict_comprehension(z: torch.Tensor) -> Any:
    return {i: NET(w) for i, w in enumerate(z)}[0]


def _in_a_set_comprehension(z: torch.Tensor) -> Any:
    return {id(NET(w)) for w in z}


def _in_a_generator(z: torch.Tensor) -> Any:
    return sum(NET(w) for w in z)


def _in_a_nested_comprehension(z: torch.Tensor) -> Any:
    return [[NET(w) for w in row] for row in z]


class _Holder:
    def __init__(self) -> None:
        self.nets = {"a": NET}

    def run(self, z: torch.Tensor) -> Any:
        return torch.stack([self.nets[n](z) for n in self.nets])


class _Base(torch.nn.Module):
    def forward(self, z: torch.Tensor) -> Any:
        return NET(z)


class _Derived(_Base):
    def forward(self, z: torch.Tensor) -> Any:
        return super().forward(z) * 2.0


def _keyword_default_in_a_comprehension(z: torch.Tensor, *, act: Any = NET) -> Any:
    return [act(w) for w in z]


@pytest.mark.parametrize(
    "make",
    [
        _closure_in_a_comprehension,
        lambda: _in_a_list_comprehension,
        lambda: _in_a_dict_comprehension,
        lambda: _in_a_set_comprehension,
        lambda: _in_a_generator,
        lambda: _in_a_nested_comprehension,
        lambda: _Holder().run,
        _Derived,
        lambda: _keyword_default_in_a_comprehension,
    ],
    ids=[
        "closure-in-comprehension",
        "list-comprehension",
        "dict-comprehension",
        "set-comprehension",
        "generator",
        "nested-comprehension",
        "self-attribute-in-comprehension",
        "super-forward",
        "keyword-default",
    ],
)
def test_the_walk_finds_a_script_named_where_versions_differ(make: Callable[[], Any]) -> None:
    assert any(found is NET for found in script.scripted(make()))
