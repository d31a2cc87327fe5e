"""rev-merges19e: what leftovers19's structure key (containers told by their items) still did
not tell, each served from a stale pass (silently wrong) until this review.

- An ``f`` kept across calls whose ``identity`` cannot tell what it holds (a list of more
  than 32 items, lists nested four deep, a function over such a list, a partial over one):
  the pass was kept by the object and ``cache.structure_key``, which holds none of the
  list's items (a flag set in it, a module in it set to mix).
- Mutable objects ``identity`` held by identity only: a ``set``, a ``deque``, an
  ``OrderedDict``, a ``list`` subclass, a NumPy array (in a list too: leftovers19 made such a
  list tellable), a ``frozenset`` of modules; and a named tuple's module, told by identity
  while ``cache.named`` did not walk named tuples for its flags.
- A callable object's (or a bound method's object's) list or dictionary of flags: ``named``
  walked them for modules only.

Each: three calls, then the change that turns mixing on; the next call must be watched and
refused (``BatchInteractionError``), values before it the per-sample Jacobians' traces.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from conftest import assert_close, reference_divergence
from test_mixing_containers19 import Centre
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


def _centre_if(on: Any, z: torch.Tensor) -> torch.Tensor:
    return z - z.mean(0) if on else 2 * z


class Options:
    """A callable object reading its switch from a dictionary or list attribute."""

    def __init__(self, held: Any, name: Any) -> None:
        self.held, self.name = held, name

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return _centre_if(self.held[self.name], z)

    def run(self, z: torch.Tensor) -> torch.Tensor:
        return self(z)


class Held(NamedTuple):
    net: nn.Module


class Layers(list):  # type: ignore[type-arg]
    """A user's list type (its items may be computed: told by identity only until now)."""


Case = Callable[[], tuple[Callable[[], Any], Callable[[], None]]]


def _cases() -> dict[str, Case]:
    """Each: a maker of ``f`` and the change after which ``f`` mixes samples."""

    def kept_long_list() -> tuple[Callable[[], Any], Callable[[], None]]:
        flags = [False] * 33
        f = lambda z: _centre_if(flags[0], z)  # noqa: E731
        return (lambda: f), lambda: flags.__setitem__(0, True)

    def kept_deep_list() -> tuple[Callable[[], Any], Callable[[], None]]:
        deep = [[[[Centre(mix=False)]]]]
        f = lambda z: deep[0][0][0][0](z)  # noqa: E731
        return (lambda: f), lambda: setattr(deep[0][0][0][0], "mix", True)

    def kept_long_list_module() -> tuple[Callable[[], Any], Callable[[], None]]:
        held: list[Any] = [Centre(mix=False), *[0.0] * 40]
        f = lambda z: held[0](z)  # noqa: E731
        return (lambda: f), lambda: held.__setitem__(0, Centre(mix=True))

    def function_over_long_list() -> tuple[Callable[[], Any], Callable[[], None]]:
        flags = [False] * 33
        g = lambda z: _centre_if(flags[0], z)  # noqa: E731
        return (lambda: lambda z: g(z)), lambda: flags.__setitem__(0, True)

    def partial_over_function() -> tuple[Callable[[], Any], Callable[[], None]]:
        flags = [False] * 33
        g = lambda z, s: _centre_if(flags[0], z) * s  # noqa: E731
        return (lambda: functools.partial(g, s=1.0)), lambda: flags.__setitem__(0, True)

    def a_set() -> tuple[Callable[[], Any], Callable[[], None]]:
        on: set[str] = set()
        return (lambda: lambda z: _centre_if("mix" in on, z)), lambda: on.add("mix")

    def a_deque() -> tuple[Callable[[], Any], Callable[[], None]]:
        held = collections.deque([Centre(mix=False)])
        return (lambda: lambda z: held[0](z)), lambda: held.__setitem__(0, Centre(mix=True))

    def an_ordered_dict() -> tuple[Callable[[], Any], Callable[[], None]]:
        held = collections.OrderedDict(net=Centre(mix=False))
        change = lambda: held.__setitem__("net", Centre(mix=True))  # noqa: E731
        return (lambda: lambda z: held["net"](z)), change

    def a_list_subclass() -> tuple[Callable[[], Any], Callable[[], None]]:
        held = Layers([Centre(mix=False)])
        return (lambda: lambda z: held[0](z)), lambda: held.__setitem__(0, Centre(mix=True))

    def numpy_in_list() -> tuple[Callable[[], Any], Callable[[], None]]:
        shift = [np.zeros(1, dtype=np.int64)]
        f = lambda: lambda z: 2 * z.roll(int(shift[0][0]), 0)  # noqa: E731
        return f, lambda: shift[0].__setitem__(0, 1)

    def frozenset_module() -> tuple[Callable[[], Any], Callable[[], None]]:
        held = frozenset([Centre(mix=False)])
        (net,) = held
        return (lambda: lambda z: next(iter(held))(z)), lambda: setattr(net, "mix", True)

    def named_tuple_module() -> tuple[Callable[[], Any], Callable[[], None]]:
        held = Held(Centre(mix=False))
        return (lambda: lambda z: held.net(z)), lambda: setattr(held.net, "mix", True)

    def object_dict_flag() -> tuple[Callable[[], Any], Callable[[], None]]:
        f = Options({"mix": False}, "mix")
        return (lambda: f), lambda: f.held.__setitem__("mix", True)

    def object_list_flag() -> tuple[Callable[[], Any], Callable[[], None]]:
        f = Options([None], 0)
        return (lambda: f), lambda: f.held.__setitem__(0, "centre")

    def method_dict_flag() -> tuple[Callable[[], Any], Callable[[], None]]:
        f = Options({"mix": False}, "mix")
        return (lambda: f.run), lambda: f.held.__setitem__("mix", True)

    return {
        "kept f: a 33-item list's flag": kept_long_list,
        "kept f: lists four deep, a module's flag": kept_deep_list,
        "kept f: a 41-item list's module replaced": kept_long_list_module,
        "a function over a 33-item list": function_over_long_list,
        "a partial over a function over a 33-item list": partial_over_function,
        "a set": a_set,
        "a deque's module replaced": a_deque,
        "an OrderedDict's module replaced": an_ordered_dict,
        "a list subclass's module replaced": a_list_subclass,
        "a NumPy array in a list, written": numpy_in_list,
        "a frozenset's module's flag": frozenset_module,
        "a named tuple's module's flag": named_tuple_module,
        "a callable object's dict flag": object_dict_flag,
        "a callable object's list flag": object_list_flag,
        "a bound method's object's dict flag": method_dict_flag,
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_a_change_the_key_cannot_tell_is_never_served_by_a_pass(case: str) -> None:
    """Three calls (values against the per-sample Jacobians' traces, float64), then the change
    that turns mixing on: the next call is watched and refused."""
    torch.manual_seed(0)
    make, change = CASES[case]()
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        f = make()
        assert_close(torchdiv.divergence(f, x), reference_divergence(f, x))
    change()
    with pytest.raises(BatchInteractionError, match="f mixes samples"):
        torchdiv.divergence(make(), x)


def test_what_the_key_tells_is_still_watched_once(watches: list[int]) -> None:
    """The sound cases stay cheap: a lambda made anew over a short list of modules, a named
    tuple and a callable object over a dictionary of flags are each watched once."""
    torch.manual_seed(0)
    layers = [nn.Linear(3, 3).to(f64), Centre(mix=False)]
    held = Held(Centre(mix=False))
    options = Options({"mix": False}, "mix")
    x = torch.randn(8, 3, dtype=f64)
    for make in (lambda: lambda z: layers[1](layers[0](z)), lambda: lambda z: held.net(z)):
        for _ in range(3):
            torchdiv.divergence(make(), x)
    for _ in range(3):
        torchdiv.divergence(options, x)
    assert len(watches) == 3


def test_a_frozenset_of_names_is_told_by_identity(watches: list[int]) -> None:
    """A frozenset of values cannot change: a lambda made anew over one is watched once."""
    names = frozenset({"tanh", "relu"})
    net = nn.Linear(3, 3).to(f64)
    x = torch.randn(8, 3, dtype=f64)
    for _ in range(3):
        torchdiv.divergence(lambda z: torch.tanh(net(z)) if "tanh" in names else net(z), x)
    assert len(watches) == 1


def _interleaved(x: torch.Tensor) -> torch.Tensor:
    """Each sample's row and its double interleaved, the first ``B`` rows kept: row ``j``
    holds sample ``j // 2`` (mixes samples)."""
    h = torch.tanh(x)
    return torch.stack([h, 2 * h], 1).reshape(2 * len(x), -1)[: len(x)]


def _interleaved_written(x: torch.Tensor) -> torch.Tensor:
    """The same through a buffer written in place (``buf[:, 0] = h``)."""
    h = torch.tanh(x)
    buf = x.new_zeros(len(x), 2, x.shape[1])
    buf[:, 0] = h
    return buf.reshape(2 * len(x), -1)[: len(x)] * 1


@pytest.mark.parametrize("f", [_interleaved, _interleaved_written])
@pytest.mark.parametrize("size", [(4, 6), (16, 64)])
def test_rows_repeated_in_the_first_places_are_refused(f: Callable[..., Any], size: Any) -> None:
    """A slice of the batch interleaved with another tensor, ``[:B]`` of ``2B`` rows, holds
    samples ``0, 0, 1, 1, ...``: its batch axis has rows ``(0, 1, ...)`` at ``inner`` 2, taken
    for the first samples in order (``x[:k]``), served silently (the divergence off by up to
    4), older than leftovers19. Refused, as is every engine's call; ``[::2]`` of the same
    rows, the samples in their own places, is exact."""
    x = torch.randn(*size, dtype=f64)
    with pytest.raises(BatchInteractionError, match="place 1 along dimension 0"):
        torchdiv.divergence(f, x)
    every_other = lambda z: torch.stack([torch.tanh(z), z], 1).reshape(2 * len(z), -1)[::2]  # noqa: E731
    assert_close(torchdiv.divergence(every_other, x), reference_divergence(every_other, x))
