"""walk32: the TorchScript walk's documented misses closed where cheap. A scripted module held
by a ``types.MappingProxyType`` or a dictionary's ``keys()``/``values()``/``items()`` view (a
partial's argument, a global), by what an ``functools.lru_cache``d function has cached (a
getter's result: its body names none of it), by a container or an object of the user's in a
container (``[[net]]``, ``{"nets": [net]}``, ``[Holder(net)]``) was not looked into: its
optimized plan ran (made by the runs outside torchdiv), forward mode's divergence off and
parameter gradients gone. References: per-sample ``autograd.grad`` loops on an eager copy
(conftest's ``assert_scripted_as_eager``), float64 (conftest's float64 tolerances); and
fuzzscript30's differential cases, one per route and operator (every engine: forward, reverse,
structured, Hutchinson, estimators, Jacobian diagonal, Laplacian), against float64
``autograd.grad`` rows of the same objects run as written."""

from __future__ import annotations

import collections
import functools
import types
from collections.abc import Callable
from typing import Any

import pytest
import test_fuzzscript30 as fuzz
import torch
from conftest import assert_scripted_as_eager

from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


class _Holder:
    def __init__(self, net: Any) -> None:
        self.lr, self.net = 0.1, net


def _views(net: Any) -> dict[str, tuple[Any, str]]:
    """Each way to hold ``net`` this file closes, and how ``f``'s body reaches it there (an
    expression in ``H``, what holds it, and ``z``)."""
    d = {"lr": 0.1, "net": net}
    return {
        "mappingproxy": (types.MappingProxyType(d), "H['net'](z)"),
        "values": (d.values(), "list(H)[1](z)"),
        "items": (d.items(), "dict(H)['net'](z)"),
        "keys": ({net: 1}.keys(), "next(iter(H))(z)"),
        "ordered values": (collections.OrderedDict(d).values(), "list(H)[1](z)"),
        "list in a list": ([[0.5], [net]], "H[1][0](z)"),
        "list in a dict": ({"lr": 0.1, "nets": [net]}, "H['nets'][0](z)"),
        "object in a list": ([1.0, _Holder(net)], "H[1].net(z)"),
        "object in a tuple in a list": ([(_Holder(net),)], "H[0][0].net(z)"),
        "object's object in a list": ([_Holder(_Holder(net))], "H[0].net.net(z)"),
    }


def _bound(way: str, net: Any) -> Any:
    """``f``: a partial binding what holds ``net`` the way ``way``."""
    held, body = _views(net)[way]
    return functools.partial(eval(f"lambda H, z: {body}"), held)  # (the test's own text)


@pytest.mark.parametrize("way", list(_views(None)))
def test_a_script_held_by_a_view_or_a_nested_holder(nets, way: str):
    f = _bound(way, nets[1])
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


@pytest.mark.parametrize("maxsize", [None, 128])
def test_what_a_cached_function_has_cached(nets, maxsize: int | None):
    """A getter ``lru_cache``d (unbounded: its results in its cache dictionary; bounded: in its
    linked entries), whose body names a store the script has left: the cache alone holds it."""
    store = {"net": nets[1]}

    @functools.lru_cache(maxsize=maxsize)
    def get(key: str) -> Any:
        return store.pop(key)

    get("net")
    assert_scripted_as_eager(lambda z: get("net")(z), *nets)
    assert nets[1] in script.scripted(lambda z: get("net")(z))
    for i in range(script._HELD_ITEMS):  # (more entries: an unbounded cache's first 64
        store[str(i)] = float(i)  # values are read; a bounded one is not, documented)
        get(str(i))
    assert (nets[1] in script.scripted(lambda z: get("net")(z))) is (maxsize is None)


def test_nested_holders_are_read_within_a_budget(nets, monkeypatch: pytest.MonkeyPatch):
    """What a container's holders hold is read breadth first, ``_HELD_ITEMS`` items in all
    beyond the container's own: a list of 64 lists of numbers costs twice a list's reading,
    not 64 times; a script past the budget is not found (the documented miss: behind a
    larger holder since rev-merges32, which reads each level's smallest first)."""
    far = [[0.0] * script._HELD_ITEMS, [0.0] * script._HELD_ITEMS + [nets[1]]]
    assert nets[1] not in script.scripted(functools.partial(lambda h, z: h[1][-1](z), far))
    near = [[0.0] * (script._HELD_ITEMS - 2), [nets[1]]]
    assert nets[1] in script.scripted(functools.partial(lambda h, z: h[1][0](z), near))
    read: list[int] = []
    items = script._items

    def spy(obj: Any, n: int) -> list[Any]:
        out = items(obj, n)
        read.append(len(out))
        return out

    monkeypatch.setattr(script, "_items", spy)
    data = [[float(i)] * script._HELD_ITEMS for i in range(script._HELD_ITEMS)]
    script._held(data, script._CONTAINER)
    assert sum(read) == 2 * script._HELD_ITEMS


def test_a_cycle_of_holders_ends(nets):
    """A list holding itself, an object holding its list: each read once."""
    cycle: list[Any] = []
    holder = _Holder(cycle)
    cycle += [cycle, holder, [holder, [cycle]]]
    assert nets[1] not in script.scripted(functools.partial(lambda h, z: z, cycle))
    cycle.append([nets[1]])
    assert nets[1] in script.scripted(functools.partial(lambda h, z: z, cycle))


def test_a_user_mapping_behind_a_proxy_runs_none_of_its_code(nets):
    """A ``MappingProxyType`` over a mapping of the user's: the mapping is read as an object
    (its attributes), never through its own ``values``/``__iter__``/``__getitem__``."""

    class Raising(collections.abc.Mapping):
        def __init__(self) -> None:
            self.net = nets[1]

        def __getitem__(self, key: Any) -> Any:
            raise AssertionError("ran")

        def __iter__(self) -> Any:
            raise AssertionError("ran")

        def __len__(self) -> int:
            raise AssertionError("ran")

    held = types.MappingProxyType(Raising())
    assert nets[1] in script.scripted(functools.partial(lambda h, z: z, held))


# fuzzscript30's differential cases over every operator, by the routes closed here


def _route(way: str) -> Callable[[Any, torch.Generator], fuzz.Level]:
    def make(inner: Any, g: torch.Generator) -> fuzz.Level:
        held, body = _views(inner)[way]
        space = fuzz._define(f"def outer(z):\n    return {body}\n", H=held)

        def rebind(new: Any) -> None:
            space["H"] = _views(new)[way][0]

        return fuzz.Level(way, space["outer"], rebind, "global rebound")

    return make


def _cached_route(inner: Any, g: torch.Generator) -> fuzz.Level:
    space = fuzz._define(
        "@functools.lru_cache(maxsize=None)\n"
        "def get(key):\n    return STORE.pop(key)\n\n"
        "def outer(z):\n    return get('net')(z)\n",
        STORE={"net": inner},
    )
    space["get"]("net")

    def rebind(new: Any) -> None:
        space["get"].cache_clear()
        space["STORE"]["net"] = new
        space["get"]("net")

    return fuzz.Level("lru_cache's result", space["outer"], rebind, "cache refilled")


_ROUTES = {
    **{way: fuzz.Route(_route(way), 2) for way in ("mappingproxy", "values", "list in a dict")},
    "object in a list": fuzz.Route(_route("object in a list"), 2),
    "lru_cache's result": fuzz.Route(_cached_route, 1),
}


@pytest.mark.parametrize("operator", fuzz.OPERATORS)
@pytest.mark.parametrize("route", list(_ROUTES))
def test_every_operator_by_the_closed_routes(
    route: str, operator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fuzz, "ROUTES", {**fuzz.ROUTES, **_ROUTES})
    monkeypatch.setattr(fuzz, "OPERATORS", (operator,))
    seed = 3200 + list(_ROUTES).index(route)
    case = fuzz.draw(seed, routes=[route, "partial argument"][: 1 + (seed % 2)])
    faults = fuzz.fuzz_one(seed, case=case)
    assert not faults, "\n\n".join(faults[:3])
