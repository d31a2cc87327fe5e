"""A seeded differential fuzzer of the TorchScript walk (``_core.script.scripted``, ``_held``,
``_read``, ``_methods``, ``_named``, ``_kind``): from its second call on, TorchScript's
profiling executor runs scripted code through an optimized plan that carries no forward-mode
tangents, ``torch.func`` levels or recording, so an engine that runs it sees a constant
(divergence 0, parameter gradients gone) unless the walk finds it and drops its plans.

A case is a *payload* (a scripted module, a scripted function, bare or bound with its weights
by a partial, a scripted module's exported method or child, a traced module or function, a
frozen module, one saved and ``torch.jit.load``ed from a ``BytesIO``) placed at the end of a
chain of *levels*, each a way the walk documents to reach what the level below is
(``ROUTES``: a closure, a default or keyword default, a global, an inner lambda's global, a
partial's argument or keyword, a bound method's ``self``, a callable object, an own module's
attribute, an item of ``nn.Sequential`` or of an ``nn.ModuleList``, a helper method,
``super().forward``, a property, a ``cached_property``, a staticmethod, a classmethod, a
partialmethod, a list, tuple, dict, plain object, ``SimpleNamespace``, class, an object's
list, a ``NamedTuple``'s field or method, an ``Enum`` member's method, a class of a metaclass
with ``__call__``, a staticmethod off its class, a class swapped under an instance), within
its budget of three functions (or holders) deep. Before every torchdiv call ``f`` is run
outside torchdiv under ``torch.jit.optimized_execution(True)`` (``warm``: its plans
optimized), then ``divergence`` (``"auto"``, ``"forward"``, ``"reverse"``, ``"structured"``,
Hutchinson with fixed probes or a seeded generator), ``estimate_divergence`` (seeded),
``jacobian_diagonal`` or ``laplacian`` runs in float64, with the
parameters frozen or trainable and ``x`` a leaf or not. Between calls a level is *mutated*:
what it holds is swapped for a fresh equivalent chain (a new scripted object made after the
last call) by the level's own way (a global rebound, a closure cell or default replaced, a
method of the user's class replaced, an attribute set on a plain object, namespace, class or
module, a container item or submodule swapped, ``__bases__`` or ``__class__`` reassigned, a
property redefined), the same ``f`` object called again. A quarter of the cases start from the
payload's eager twin (no TorchScript in ``f``'s graph at the first call: a walk that
remembered "nothing scripted here" would miss the script the first mutation brings).

Reference: float64 rows of ``torch.autograd.grad`` over the batch (the programs are
per-sample) with a graph, on the same objects run as written: every script the case made
(known by construction, not by the walk) has its plans dropped and runs under
``torch.jit.optimized_execution(False)``; Laplacians by grad of grad. Values and the gradients
of a weighted scalar loss in every trainable tensor and ``x`` are compared
(``fuzzing.far``/``gradient_faults``). Each case also checks that ``scripted(f)`` holds the
payload's script: a route that stops reaching it fails as "not found" rather than checks less.
``test_the_reference_runs_scripts_as_their_eager_twins`` checks the reference's way against
eager twins.

Faults found (six, all fixed in ``_core/script.py``; ``NOTES_fuzzscript30.md``): each route
the walk missed keeps its ``fault`` (what it missed) and a test of its own, and is drawn with
the others; a class changed after the walk read its kind has a test of its own too.

Run many by hand: ``PYTHONPATH=src:tests python tests/core/test_fuzzscript30.py FIRST COUNT``.
"""

from __future__ import annotations

import copy
import enum
import functools
import io
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import PARTIAL_ON_A_CLASS
from fuzzing import far, gradient_faults, weighted
from fuzzing import pick as _pick
from fuzzing import randn as _randn
from fuzzing import uniform_int as _int
from torch import nn

import torchdiv
from torchdiv._core import script

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit's own
    # Python 3.13's, where a program the fuzzer writes (a partial set on a class, read as
    # ``self.act``) runs: the program's own call warns, never the walk (pyvers31)
    pytest.mark.filterwarnings(PARTIAL_ON_A_CLASS),
]

f64 = torch.float64
Fn = Callable[[torch.Tensor], torch.Tensor]
# float64 rows against float64 engines, a few hundred flops deep (conftest.tolerances)
TOL = 1e-9


# ---------------------------------------------------------------------------------------------
# payloads: the scripted code, made afresh (an equivalent object) at every mutation


class _MLP(nn.Module):
    def __init__(self, d: int, g: torch.Generator) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(d, 4).double(), nn.Linear(4, d).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(_randn(g, *p.shape, scale=0.7))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.lin2(torch.tanh(self.lin1(z))) + torch.sin(z)

    @torch.jit.export
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin2(torch.sigmoid(self.lin1(z)))) * z


class _Outer(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.block(z) * 2.0


def _act(z: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z) * z + torch.sin(z) * z * z


def _lin_act(z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.tanh(z @ w.t() + b) * z + z


PAYLOADS = (
    "module",
    "function",
    "bound function",
    "method",
    "child",
    "traced",
    "traced function",
    "frozen",
    "loaded",
)


@dataclass
class Payload:
    """What a case's chain ends in: ``fn`` (called as ``fn(z)``), the scripts it holds
    (``made``, for the reference), the objects ``scripted(f)`` may name for it (``found``:
    the script, or the scripted module that holds the child or method) and its tensors."""

    fn: Any
    made: list[Any]
    found: list[Any]
    tensors: list[torch.Tensor]


@dataclass
class Source:
    """The eager objects a case's payloads are scripted from (the same at every mutation:
    an equivalent payload, the same math and, but for a loaded one, the same parameters)."""

    kind: str
    d: int
    eager: _MLP
    w: torch.Tensor
    b: torch.Tensor
    saved: bytes = b""
    builds: int = 0

    def twin(self) -> Payload:
        """The eager code the payload is scripted from (its tensors in the payload's order;
        a loaded module's are copies of the eager module's)."""
        m = self.eager
        if self.kind in ("function", "traced function"):
            return Payload(_act, [], [], [])
        if self.kind == "bound function":
            fn = functools.partial(_lin_act, w=self.w, b=self.b)
            return Payload(fn, [], [], [self.w, self.b])
        return Payload(m.encode if self.kind == "method" else m, [], [], list(m.parameters()))

    def fresh(self) -> _MLP:
        """The eager module (its parameters) as an instance of a class of its own: scripting
        one instance again shares its compiled methods, and so their plans, with the first
        script (a walk that dropped the old script's plans dropped the new one's too)."""
        self.builds += 1
        m = copy.copy(self.eager)
        m.__class__ = type(f"_MLP{self.builds}", (_MLP,), {"__module__": __name__})
        return m

    def make(self) -> Payload:
        kind, m = self.kind, self.fresh()
        if kind == "module":
            s = torch.jit.script(m)
            return Payload(s, [s], [s], list(m.parameters()))
        if kind == "function":
            s = torch.jit.script(_act)
            return Payload(s, [s], [s], [])
        if kind == "bound function":
            s = torch.jit.script(_lin_act)
            return Payload(functools.partial(s, w=self.w, b=self.b), [s], [s], [self.w, self.b])
        if kind == "method":
            s = torch.jit.script(m)
            return Payload(s.encode, [s], [s, s.encode], list(m.parameters()))
        if kind == "child":
            s = torch.jit.script(_Outer(m))
            return Payload(s.block, [s], [s, s.block], list(m.parameters()))
        if kind == "traced":
            s = torch.jit.trace(m, torch.zeros(2, self.d, dtype=f64))
            return Payload(s, [s], [s], list(m.parameters()))
        if kind == "traced function":
            s = torch.jit.trace(_act, torch.zeros(2, self.d, dtype=f64))
            return Payload(s, [s], [s], [])
        if kind == "frozen":
            s = torch.jit.freeze(torch.jit.script(m).eval())
            return Payload(s, [s], [s], [])
        assert kind == "loaded"
        if not self.saved:
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.script(m), buffer)
            self.saved = buffer.getvalue()
        s = torch.jit.load(io.BytesIO(self.saved))
        return Payload(s, [s], [s], list(s.parameters()))


# ---------------------------------------------------------------------------------------------
# routes: each wraps what is below it (``inner``) into what the level above reaches


def _define(source: str, **names: Any) -> dict[str, Any]:
    """The namespace ``source`` defines in, its globals ``names`` (a module of the user's)."""
    space: dict[str, Any] = {"torch": torch, "nn": nn, "functools": functools, "enum": enum}
    space.update(names, typing=typing, __name__="fuzzscript30_user")
    exec(source, space)  # (the test's own sources)
    return space


def _apply(fn: Fn, z: torch.Tensor) -> torch.Tensor:
    return fn(z)


def _apply_kw(z: torch.Tensor, *, fn: Fn, k: float) -> torch.Tensor:
    return fn(z) * k


class _Trainer:
    """A trainer whose bound ``step`` is ``f``: its ``self`` holds the model and the rest."""

    def __init__(self, model: Any) -> None:
        self.model, self.lr, self.history = model, 0.1, [1.0, 2.0]
        self.loader = [torch.zeros(2)] * 3

    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class _Callable:
    def __init__(self, fn: Any) -> None:
        self.fn, self.scale = fn, 1.0

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z) * self.scale


class _Plain:
    pass


@dataclass
class Level:
    """One level of a chain: what it is (``fn``) and how it swaps what it holds (``rebind``,
    ``None`` where it cannot: a partial's bound argument), by the way named ``mutation``."""

    route: str
    fn: Any
    rebind: Callable[[Any], None] | None = None
    mutation: str = ""


def _closure(inner: Any, g: torch.Generator) -> Level:
    def outer(z: torch.Tensor) -> torch.Tensor:
        return inner(z) + 0.25 * torch.tanh(z)

    def rebind(new: Any) -> None:
        assert outer.__closure__ is not None
        outer.__closure__[0].cell_contents = new

    return Level("closure", outer, rebind, "closure cell replaced")


def _default(inner: Any, g: torch.Generator) -> Level:
    def outer(z: torch.Tensor, fn: Any = inner) -> torch.Tensor:
        return fn(z)

    def rebind(new: Any) -> None:
        outer.__defaults__ = (new,)

    return Level("default", outer, rebind, "default replaced")


def _keyword_default(inner: Any, g: torch.Generator) -> Level:
    def outer(z: torch.Tensor, *, fn: Any = inner) -> torch.Tensor:
        return fn(z)

    def rebind(new: Any) -> None:
        outer.__kwdefaults__ = {"fn": new}

    return Level("keyword default", outer, rebind, "keyword default replaced")


def _cached_property(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Own(nn.Module):\n"
        "    @functools.cached_property\n"
        "    def act(self):\n"
        "        return G\n"
        "    def forward(self, z):\n"
        "        return self.act(z)\n",
        G=inner,
    )
    held = space["Own"]()

    def rebind(new: Any) -> None:  # (its value cached on the instance: forgotten)
        space.update(G=new)
        held.__dict__.pop("act", None)

    return Level("cached_property", held, rebind, "global rebound")


def _global(inner: Any, g: torch.Generator) -> Level:
    space = _define("def outer(z):\n    return G(z) * 1.5\n", G=inner)
    return Level("global", space["outer"], lambda new: space.update(G=new), "global rebound")


def _inner_lambda(inner: Any, g: torch.Generator) -> Level:
    space = _define("def outer(z):\n    return (lambda w: G(w))(z)\n", G=inner)
    return Level("inner lambda", space["outer"], lambda new: space.update(G=new), "global rebound")


def _lambda_global(inner: Any, g: torch.Generator) -> Level:
    space = _define("outer = lambda z: G(z)\n", G=inner)
    return Level("lambda", space["outer"], lambda new: space.update(G=new), "global rebound")


def _partial(inner: Any, g: torch.Generator) -> Level:
    return Level("partial argument", functools.partial(_apply, inner))


def _partial_keyword(inner: Any, g: torch.Generator) -> Level:
    held = functools.partial(_apply_kw, fn=inner, k=1.0)

    def rebind(new: Any) -> None:
        held.keywords["fn"] = new

    return Level("partial keyword", held, rebind, "partial keyword replaced")


def _bound_method(inner: Any, g: torch.Generator) -> Level:
    trainer = _Trainer(inner)
    return Level("bound method", trainer.step, lambda new: setattr(trainer, "model", new), "attr")


def _callable_object(inner: Any, g: torch.Generator) -> Level:
    held = _Callable(inner)
    return Level("callable object", held, lambda new: setattr(held, "fn", new), "attr")


def _module_attribute(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Own(nn.Module):\n"
        "    def __init__(self, fn):\n"
        "        super().__init__()\n"
        "        self.fn = fn\n"
        "    def forward(self, z):\n"
        "        return self.fn(z)\n"
    )
    held = space["Own"](inner)
    mutation = "submodule replaced" if isinstance(inner, nn.Module) else "module attr set"
    return Level("module attribute", held, lambda new: setattr(held, "fn", new), mutation)


class _Wrap(nn.Module):
    """A module of the user's around what is not a module (to sit in PyTorch's containers)."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z)


def _as_module(inner: Any) -> nn.Module:
    return inner if isinstance(inner, nn.Module) else _Wrap(inner)


def _sequential(inner: Any, g: torch.Generator) -> Level:
    held = nn.Sequential(nn.Identity(), _as_module(inner), nn.Tanh())

    def rebind(new: Any) -> None:
        held[1] = _as_module(new)

    return Level("Sequential item", held, rebind, "Sequential item replaced")


def _module_list(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Own(nn.Module):\n"
        "    def __init__(self, block):\n"
        "        super().__init__()\n"
        "        self.blocks = nn.ModuleList([nn.Identity(), block])\n"
        "    def forward(self, z):\n"
        "        for block in self.blocks:\n"
        "            z = block(z)\n"
        "        return z\n"
    )
    held = space["Own"](_as_module(inner))

    def rebind(new: Any) -> None:
        held.blocks[1] = _as_module(new)

    return Level("ModuleList item", held, rebind, "ModuleList item replaced")


def _helper(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Own(nn.Module):\n"
        "    def forward(self, z):\n"
        "        return self.helper(z) - z\n"
        "    def helper(self, z):\n"
        "        return G(z) + z\n",
        G=inner,
    )
    cls = space["Own"]
    if _int(g, 0, 1):
        return Level("helper method", cls(), lambda new: space.update(G=new), "global rebound")

    def rebind(new: Any) -> None:
        def helper(self: Any, z: torch.Tensor) -> torch.Tensor:
            return new(z) + z

        cls.helper = helper

    return Level("helper method", cls(), rebind, "class method replaced")


def _super_forward(inner: Any, g: torch.Generator) -> Level:
    source = (
        "class Base(nn.Module):\n"
        "    def forward(self, z):\n"
        "        return G(z)\n"
        "class Derived(Base):\n"
        "    def forward(self, z):\n"
        "        return super().forward(z) * 0.5\n"
    )
    space = _define(source, G=inner)
    cls = space["Derived"]

    def rebind(new: Any) -> None:
        cls.__bases__ = (_define(source, G=new)["Base"],)

    return Level("super().forward", cls(), rebind, "__bases__ reassigned")


def _property(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Own(nn.Module):\n"
        "    @property\n"
        "    def act(self):\n"
        "        return G\n"
        "    def forward(self, z):\n"
        "        return self.act(z)\n",
        G=inner,
    )
    cls = space["Own"]

    def rebind(new: Any) -> None:
        cls.act = property(lambda self: new)

    return Level("property", cls(), rebind, "property redefined")


def _static(kind: str) -> Callable[[Any, torch.Generator], Level]:
    def route(inner: Any, g: torch.Generator) -> Level:
        helper = {
            "staticmethod": "    @staticmethod\n    def helper(z):\n        return G(z)\n",
            "classmethod": "    @classmethod\n    def helper(cls, z):\n        return G(z)\n",
            "partialmethod": "    def _go(self, z, k):\n        return G(z) * k\n"
            "    helper = functools.partialmethod(_go, k=1.0)\n",
        }[kind]
        space = _define(
            f"class Own(nn.Module):\n{helper}"
            "    def forward(self, z):\n"
            "        return self.helper(z)\n",
            G=inner,
        )
        return Level(kind, space["Own"](), lambda new: space.update(G=new), "global rebound")

    return route


def _container(kind: str) -> Callable[[Any, torch.Generator], Level]:
    def route(inner: Any, g: torch.Generator) -> Level:
        at = _int(g, 0, 63)  # (the walk looks at the first 64 items)
        junk: list[Any] = [1.0, "a", torch.zeros(1), None]
        items = [junk[i % 4] for i in range(at)] + [inner, 3]
        if kind == "dict":
            held: Any = {f"k{i}": v for i, v in enumerate(items)}
            key: Any = f"k{at}"
        else:
            held, key = (tuple(items) if kind == "tuple" else items), at
        space = _define(f"def outer(z):\n    return H[{key!r}](z)\n", H=held)

        def rebind(new: Any) -> None:
            if kind == "tuple":
                space["H"] = (*items[:at], new, 3)
            else:
                space["H"][key] = new

        mutation = "global rebound" if kind == "tuple" else "container item swapped"
        return Level(kind, space["outer"], rebind, mutation)

    return route


def _holder(kind: str) -> Callable[[Any, torch.Generator], Level]:
    def route(inner: Any, g: torch.Generator) -> Level:
        if kind == "class":
            space = _define("class Holder:\n    lr = 0.1\n\nouter = lambda z: Holder.net(z)\n")
            held: Any = space["Holder"]
            held.net = inner
        else:
            held = types.SimpleNamespace() if kind == "namespace" else _Plain()
            held.lr, held.net = 0.1, inner
            space = _define("def outer(z):\n    return H.net(z)\n", H=held)
        return Level(kind, space["outer"], lambda new: setattr(held, "net", new), "attr")

    return route


def _nested_plain(inner: Any, g: torch.Generator) -> Level:
    """``runner.state.net(z)``: a plain object's plain object, both read by the code."""
    state = types.SimpleNamespace(net=inner, step=0) if _int(g, 0, 1) else _Plain()
    state.net = inner
    runner = _Plain()
    runner.state, runner.lr = state, 0.1
    space = _define("def outer(z):\n    return R.state.net(z)\n", R=runner)
    return Level("nested plain object", space["outer"], lambda n: setattr(state, "net", n), "attr")


def _object_list(inner: Any, g: torch.Generator) -> Level:
    held = types.SimpleNamespace(items=[inner], lr=0.1) if _int(g, 0, 1) else _Plain()
    held.items = [inner]
    space = _define("def outer(z):\n    return H.items[0](z)\n", H=held)
    return Level(
        "object's list", space["outer"], lambda new: held.items.__setitem__(0, new), "item"
    )


class _Pair(typing.NamedTuple):
    k: float
    fn: Any


def _named_tuple(inner: Any, g: torch.Generator) -> Level:
    space = _define("def outer(z):\n    return P.fn(z) * P.k\n", P=_Pair(1.0, inner))
    return Level(
        "NamedTuple", space["outer"], lambda new: space.update(P=_Pair(1.0, new)), "global"
    )


def _named_tuple_method(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Params(typing.NamedTuple):\n"
        "    k: float\n"
        "    def run(self, z):\n"
        "        return G(z) * self.k\n"
        "outer = lambda z: P.run(z)\n",
        G=inner,
    )
    space["P"] = space["Params"](1.0)
    return Level("NamedTuple method", space["outer"], lambda n: space.update(G=n), "global")


def _singleton(inner: Any, g: torch.Generator) -> Level:
    """A class whose metaclass has a ``__call__`` (a singleton), made in ``f``."""
    space = _define(
        "class Single(type):\n"
        "    made = {}\n"
        "    def __call__(cls, *args):\n"
        "        return Single.made.setdefault(cls, super().__call__(*args))\n"
        "class Service(metaclass=Single):\n"
        "    def run(self, z):\n"
        "        return G(z)\n"
        "outer = lambda z: Service().run(z)\n",
        G=inner,
    )
    return Level("metaclass __call__", space["outer"], lambda n: space.update(G=n), "global")


def _static_via_class(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Ops:\n"
        "    @staticmethod\n"
        "    def apply(z):\n"
        "        return G(z)\n"
        "outer = lambda z: Ops.apply(z)\n",
        G=inner,
    )
    cls = space["Ops"]
    if _int(g, 0, 1):
        return Level(
            "staticmethod via class", space["outer"], lambda n: space.update(G=n), "global"
        )

    def rebind(new: Any) -> None:
        cls.apply = staticmethod(lambda z: new(z))

    return Level("staticmethod via class", space["outer"], rebind, "class method replaced")


def _enum(inner: Any, g: torch.Generator) -> Level:
    space = _define(
        "class Mode(enum.Enum):\n"
        "    A = 1\n"
        "    def run(self, z):\n"
        "        return G(z) * self.value\n"
        "outer = lambda z: Mode.A.run(z)\n",
        G=inner,
    )
    return Level("Enum", space["outer"], lambda new: space.update(G=new), "global rebound")


def _class_swap(inner: Any, g: torch.Generator) -> Level:
    source = "class Runner:\n    def run(self, z):\n        return G(z)\n"
    held = _define(source, G=inner)["Runner"]()
    space = _define("outer = lambda z: R.run(z)\n", R=held)

    def rebind(new: Any) -> None:
        held.__class__ = _define(source, G=new)["Runner"]

    return Level("class swapped", space["outer"], rebind, "__class__ reassigned")


def _diamond(inner: Any, g: torch.Generator) -> Level:
    """Two ways to the same global: directly and through a function one deeper (the walk
    meets the longer way first, its stack's order)."""
    space = _define(
        "def via(z):\n    return G(z)\ndef outer(z):\n    return 0.5 * (G(z) + via(z))\n", G=inner
    )
    return Level("diamond", space["outer"], lambda new: space.update(G=new), "global rebound")


def _class_attribute(inner: Any, g: torch.Generator) -> Level:
    """A trainer whose class holds the scripted code, read as ``self.act`` by its method."""
    space = _define("class Runner:\n    def run(self, z):\n        return self.act(z)\n")
    cls = space["Runner"]
    cls.act = staticmethod(inner) if isinstance(inner, types.FunctionType) else inner
    held = cls()

    def rebind(new: Any) -> None:
        cls.act = staticmethod(new) if isinstance(new, types.FunctionType) else new

    return Level("class attribute via self", held.run, rebind, "class attr set")


def _module_class_attribute(inner: Any, g: torch.Generator) -> Level:
    """A module class of the user's whose class holds what is below (``act = ...`` in its
    body; a function as a staticmethod), read as ``self.act`` by its forward."""
    space = _define(
        "class Own(nn.Module):\n    def forward(self, z):\n        return self.act(z) * 1.0\n"
    )
    cls = space["Own"]

    def rebind(new: Any) -> None:
        cls.act = staticmethod(new) if isinstance(new, types.FunctionType) else new

    rebind(inner)
    return Level("module class attribute", cls(), rebind, "class attr set")


def _call_helper(inner: Any, g: torch.Generator) -> Level:
    """A callable object whose ``__call__`` calls a helper method of its class."""
    space = _define(
        "class Model:\n"
        "    def __call__(self, z):\n"
        "        return self.helper(z)\n"
        "    def helper(self, z):\n"
        "        return G(z)\n",
        G=inner,
    )
    return Level("__call__'s helper", space["Model"](), lambda n: space.update(G=n), "global")


def _callable_method(inner: Any, g: torch.Generator) -> Level:
    """A method of a callable object, called through a lambda that names the object."""
    space = _define(
        "class Model:\n"
        "    def __call__(self, z):\n"
        "        return z\n"
        "    def run(self, z):\n"
        "        return G(z)\n"
        "outer = lambda z: M.run(z)\n",
        G=inner,
    )
    space["M"] = space["Model"]()
    return Level("callable object's method", space["outer"], lambda n: space.update(G=n), "global")


@dataclass(frozen=True)
class Route:
    """A way to reach what is below, at ``cost`` of the walk's three functions (or holders)
    deep; ``fault``: why the walk missed what it holds before fuzzscript30's fixes."""

    make: Callable[[Any, torch.Generator], Level]
    cost: int
    fault: str = ""


ROUTES: dict[str, Route] = {
    "closure": Route(_closure, 1),
    "default": Route(_default, 1),
    "keyword default": Route(_keyword_default, 1),
    "cached_property": Route(_cached_property, 1),
    "global": Route(_global, 1),
    "inner lambda": Route(_inner_lambda, 1),
    "lambda": Route(_lambda_global, 1),
    "partial argument": Route(_partial, 0),
    "partial keyword": Route(_partial_keyword, 0),
    "bound method": Route(_bound_method, 0),
    "callable object": Route(_callable_object, 0),
    "module attribute": Route(_module_attribute, 0),
    "Sequential item": Route(_sequential, 0),
    "ModuleList item": Route(_module_list, 0),
    "helper method": Route(_helper, 1),
    "super().forward": Route(_super_forward, 1),
    "property": Route(_property, 1),
    "staticmethod": Route(_static("staticmethod"), 1),
    "classmethod": Route(_static("classmethod"), 1),
    "partialmethod": Route(_static("partialmethod"), 1),
    "list": Route(_container("list"), 2),
    "tuple": Route(_container("tuple"), 2),
    "dict": Route(_container("dict"), 2),
    "plain object": Route(_holder("plain"), 1),
    "namespace": Route(_holder("namespace"), 1),
    "class": Route(_holder("class"), 1),
    "object's list": Route(_object_list, 2),
    "nested plain object": Route(
        _nested_plain,
        2,
        fault="runner.state.net(z) with net a function, partial or callable object: the "
        "plain object state is walked as a holder (scripts, modules, containers only), not "
        "read by the code's names",
    ),
    "NamedTuple": Route(_named_tuple, 2),
    "Enum": Route(_enum, 2),
    "NamedTuple method": Route(_named_tuple_method, 2),
    "metaclass __call__": Route(_singleton, 2),
    "staticmethod via class": Route(_static_via_class, 2),
    "class swapped": Route(_class_swap, 2),
    # faults found (NOTES_fuzzscript30.md), fixed: each also has a test of its own
    "diamond": Route(
        _diamond,
        1,
        fault="scripted's seen set: a function met first by a longer way (fewer functions "
        "left) is marked seen unexpanded and skipped when met by the shorter way: a script "
        "three functions deep missed",
    ),
    "class attribute via self": Route(
        _class_attribute,
        0,
        fault="a script held by a plain object's class, read as self.act: _read looks in the "
        "instance's __dict__ and the class's functions only",
    ),
    "module class attribute": Route(
        _module_class_attribute,
        0,
        fault="a partial, bound method or callable object held by a module class of the "
        "user's (act = partial(...) in its body), read as self.act: _methods follows "
        "functions only, the class as a holder scripts, modules and containers only",
    ),
    "__call__'s helper": Route(
        _call_helper,
        1,
        fault="a callable object's __call__ calling self.helper(z): the walk reads no "
        "attribute off a callable object (its __call__ and __dict__ only)",
    ),
    "callable object's method": Route(
        _callable_method,
        2,
        fault="M.run(z) of a callable object M that a function names: _read returns nothing "
        "for a callable object",
    ),
}
SOUND = list(ROUTES)
BUDGET = 3  # script._FUNCTION_DEPTH: functions (or holders) along the way


# ---------------------------------------------------------------------------------------------
# a case: a payload at the end of a chain of levels, called, mutated, called again


@dataclass
class Case:
    seed: int
    source: Source
    routes: list[str]  # innermost first
    levels: list[Level] = field(default_factory=list)
    payload: Payload | None = None
    g: torch.Generator = field(default_factory=torch.Generator)
    eager: bool = False  # (its first payload the eager twin: the first mutation scripts it)
    eager_first: bool = False

    def build(self, below: int) -> Any:
        """A fresh payload (the eager twin the first time where ``eager``) and the levels
        below ``below`` made anew around it: what level ``below`` then holds."""
        self.payload = self.source.twin() if self.eager else self.source.make()
        self.eager = False
        held = self.payload.fn
        for i in range(below):
            self.levels[i] = ROUTES[self.routes[i]].make(held, self.g)
            held = self.levels[i].fn
        return held

    @property
    def f(self) -> Any:
        return self.levels[-1].fn if self.levels else self.payload.fn  # type: ignore[union-attr]

    def describe(self) -> str:
        return f"{self.source.kind} <- " + " <- ".join(self.routes)

    def mutate(self, include: str = "") -> None:
        """A level (of route ``include`` where it can, else one drawn) swaps what it holds
        for a fresh equivalent chain: a new scripted object, made after the last call."""
        at = [k for k, level in enumerate(self.levels) if level.rebind is not None]
        if include and (ours := [k for k in at if self.routes[k] == include]):
            at = ours
        if at:
            k = _pick(self.g, at)
            self.levels[k].rebind(self.build(k))  # type: ignore[misc]


def draw(seed: int, routes: list[str] | None = None, include: str = "") -> Case:
    """A case of seed ``seed``: its payload and a chain of 0-4 levels within the walk's
    budget (``routes``, innermost first: those; else drawn from the sound routes, with the
    route ``include`` put at a random level)."""
    g = torch.Generator().manual_seed(30_300_000 + seed)
    d = _int(g, 2, 3)
    kind = PAYLOADS[_int(g, 0, len(PAYLOADS) - 1)]
    source = Source(kind, d, _MLP(d, g), _randn(g, d, d, scale=0.6), _randn(g, d, scale=0.3))
    if routes is None:
        routes, left = [], BUDGET
        for _ in range(_int(g, 0, 4)):
            routes.append(_pick(g, [n for n in SOUND if ROUTES[n].cost <= left]))
            left -= ROUTES[routes[-1]].cost
        if include:
            while sum(ROUTES[r].cost for r in routes) + ROUTES[include].cost > BUDGET:
                routes.pop(_int(g, 0, len(routes) - 1))
            routes.insert(_int(g, 0, len(routes)), include)
    assert sum(ROUTES[r].cost for r in routes) <= BUDGET
    case = Case(seed, source, routes, [Level("", None)] * len(routes), g=g)
    case.eager = case.eager_first = any(r != "partial argument" for r in routes) and (
        _int(g, 0, 3) == 0
    )
    case.build(len(routes))
    return case


OPERATORS = (
    "divergence/auto",
    "divergence/forward",
    "divergence/reverse",
    "divergence/structured",
    "divergence/hutchinson",
    "divergence/hutchinson, seeded",
    "estimate_divergence",
    "jacobian_diagonal",
    "laplacian",
)


def _run(name: str, f: Any, x: torch.Tensor, probes: torch.Tensor, seed: int) -> torch.Tensor:
    """Operator ``name`` of ``f`` at ``x``; the stochastic ones with the probes ``probes``,
    given as such or drawn by a generator of seed ``seed`` (``draw_probes``' own)."""
    if name == "jacobian_diagonal":
        return torchdiv.jacobian_diagonal(f, x)
    if name == "laplacian":
        return torchdiv.laplacian(f, x)
    seeded = torch.Generator().manual_seed(seed)
    if name == "estimate_divergence":
        return torchdiv.estimate_divergence(f, x, num_probes=2, generator=seeded).value
    method = name.split("/")[1]
    if method == "hutchinson":
        return torchdiv.divergence(f, x, method="hutchinson", probes=probes)
    if method == "hutchinson, seeded":
        return torchdiv.divergence(f, x, method="hutchinson", num_probes=2, generator=seeded)
    return torchdiv.divergence(f, x, method=method)


def _as_written(made: list[Any]) -> None:
    """Drop the plans of the scripts ``made`` (each method of each scripted module in them):
    under ``optimized_execution(False)`` they then run unoptimized."""
    for s in made:
        if isinstance(s, torch.jit.ScriptModule):
            for m in s.modules():
                for name in m._c._method_names():
                    m._c._get_method(name)._debug_flush_compilation_cache()
        else:
            s._debug_flush_compilation_cache()


def reference(
    name: str, f: Any, x: torch.Tensor, made: list[Any], probes: torch.Tensor
) -> torch.Tensor:
    """The float64 reference of operator ``name``: ``autograd.grad`` rows over the batch with
    a graph (grad of grad for the Laplacian), ``made``'s scripts run as written."""
    leaf = x if x.requires_grad else x.detach().requires_grad_(True)
    with torch.jit.optimized_execution(False):
        _as_written(made)
        y = f(leaf)
        n = y.shape[1]
        rows = [
            torch.autograd.grad(y[:, i].sum(), leaf, create_graph=True, materialize_grads=True)[0]
            for i in range(n)
        ]
        jac = torch.stack(rows, 1)  # (N, out, in)
        if name == "laplacian":
            columns = [
                sum(
                    torch.autograd.grad(
                        jac[:, i, j].sum(), leaf, create_graph=True, materialize_grads=True
                    )[0][:, j]
                    for j in range(n)
                )
                for i in range(n)
            ]
            return torch.stack(columns, 1)  # type: ignore[arg-type]
    diagonal = jac.diagonal(dim1=1, dim2=2)
    if name == "jacobian_diagonal":
        return diagonal
    if name in ("divergence/hutchinson", "divergence/hutchinson, seeded", "estimate_divergence"):
        return torch.einsum("pni,nij,pnj->n", probes, jac, probes) / len(probes)
    return diagonal.sum(-1)


def warm(f: Any, x: torch.Tensor, g: torch.Generator) -> None:
    """Run ``f`` as the caller would, so that its scripts' plans are optimized: once at a
    leaf ``x`` (a training step: the profiled run), then two or three times at ``x`` without
    grad. The profile then holds autodiff subgraphs (which detach their inputs) and guards
    that torchdiv's inputs pass: with every run at a leaf, ``"forward"`` never saw a stale plan
    (its inputs fail the guards: the unoptimized fallback ran) and the others 11-15 of 20
    seeds; with none at a leaf, the plan holds no autodiff subgraph and only ``"forward"``
    and (4 of 20) the structured and Laplacian calls saw it; this way 10-15 of 20 for each
    operator (``forget_plans`` a no-op)."""
    with torch.jit.optimized_execution(True):
        f(x.detach().requires_grad_(True))
        for _ in range(_int(g, 2, 3)):
            f(x.detach())


def fuzz_one(
    seed: int, *, calls: int = 2, case: Case | None = None, include: str = ""
) -> list[str]:
    """Run case ``seed`` (or ``case``) ``calls`` times, a mutation between calls (at the level
    of route ``include`` where it has one, else at a random level that can): the messages of
    every disagreement with its reference."""
    case = case or draw(seed, include=include)
    g = case.g
    faults: list[str] = []
    frozen = bool(_int(g, 0, 2) == 0)
    for i in range(calls):
        if i:
            case.mutate(include)
        payload = case.payload
        assert payload is not None
        for t in payload.tensors:
            t.requires_grad_(not frozen)
            t.grad = None
        f = case.f
        found = {id(s) for s in script.scripted(f)}
        if payload.made and not any(id(s) in found for s in payload.found):
            faults.append(f"call {i}: scripted(f) does not hold the payload's script")
        x = _randn(g, 3, case.source.d).requires_grad_(bool(_int(g, 0, 1)))
        name = _pick(g, list(OPERATORS))
        probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(seed))
        want = reference(name, f, x, payload.made, probes)
        warm(f, x, g)
        tensors = [t for t in (*payload.tensors, x) if t.requires_grad]
        labels = [f"tensor {j}" for j in range(len(tensors) - x.requires_grad)] + ["x"] * (
            x.requires_grad
        )
        expected = [torch.zeros_like(t) for t in tensors]
        if tensors:
            _, ref_loss = weighted([want], [want])
            if ref_loss.requires_grad:
                expected = list(
                    torch.autograd.grad(
                        ref_loss, tensors, allow_unused=True, materialize_grads=True
                    )
                )
        for t in tensors:
            t.grad = None
        at = (
            f"call {i} {name} ({'frozen' if frozen else 'trainable'}, x{'+grad' * x.requires_grad})"
        )
        try:
            got = _run(name, f, x, probes, seed)
        except Exception as exc:  # (a fault like any other)
            faults.append(f"{at}: raised {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if (bad := far(got, want, TOL)) is not None:
            faults.append(f"{at}: value {bad}")
            continue
        if tensors:
            loss, _ = weighted([got], [want])
            faults += gradient_faults(at, loss, tensors, labels, expected, TOL)
    return [f"seed {seed}: {case.describe()}\n  {m}" for m in faults]


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_reference_runs_scripts_as_their_eager_twins(kind: str) -> None:
    """The reference's way (the scripts' plans dropped, ``optimized_execution(False)``) after
    the caller's optimizing calls gives the eager code's values and gradients, for every
    operator: values and the gradients of a weighted loss in the parameters and ``x``."""
    g = torch.Generator().manual_seed(5)
    m = _MLP(3, g)
    source = Source(kind, 3, m, _randn(g, 3, 3, scale=0.6), _randn(g, 3, scale=0.3))
    payload = source.make()
    eager = source.twin()
    twin, twin_tensors = eager.fn, [] if kind == "frozen" else eager.tensors
    for t in (*payload.tensors, *twin_tensors):
        t.requires_grad_(True)
    x = _randn(g, 4, 3).requires_grad_(True)
    probes = torchdiv.draw_probes(x, 2, generator=torch.Generator().manual_seed(0))
    for name in OPERATORS:
        warm(payload.fn, x, g)
        want = reference(name, twin, x, [], probes)
        got = reference(name, payload.fn, x, payload.made, probes)
        assert far(got, want, TOL) is None, name
        _, want_loss = weighted([want], [want])
        _, got_loss = weighted([got], [got])
        expected = torch.autograd.grad(
            want_loss, [*twin_tensors, x], allow_unused=True, materialize_grads=True
        )
        actual = torch.autograd.grad(
            got_loss, [*payload.tensors, x], allow_unused=True, materialize_grads=True
        )
        assert (
            len(actual)
            == len(expected)
            >= 1 + (kind not in ("function", "traced function", "frozen"))
        )
        assert all(far(a, e, TOL) is None for a, e in zip(actual, expected, strict=True)), name


# the always-run cases: each sound route once (mutated there where it can), then drawn ones
FAST = [(seed, route) for seed, route in enumerate(SOUND)] + [(s, "") for s in range(26, 38)]


def test_fuzz_fixed_seeds() -> None:
    """The fixed cases agree with their references; they draw every payload."""
    faults = [m for seed, route in FAST for m in fuzz_one(seed, include=route)]
    assert not faults, "\n\n".join(faults[:5])
    cases = [draw(s, include=r) for s, r in FAST]
    assert {c.source.kind for c in cases} == set(PAYLOADS)
    assert sum(c.eager_first for c in cases) >= 4


def _memoized_per_f() -> Callable[[Any], bool]:
    """A ``forget_plans`` that walks each ``f`` once (a cache keyed on ``f``, as a faster walk
    might keep): the scripts a mutation brings in later are never dropped."""
    memo: dict[int, list[Any]] = {}

    def forget(f: Any) -> bool:
        _as_written(memo.setdefault(id(f), script.scripted(f)))
        return True

    return forget


@pytest.mark.parametrize(("stale", "least"), [("no-op", 9), ("memoized per f", 5)])
def test_the_fuzzer_sees_a_missed_script(
    monkeypatch: pytest.MonkeyPatch, stale: str, least: int
) -> None:
    """With the plans left in place (``forget_plans`` a no-op: 10 of the 12 first fixed cases
    disagree) or dropped only for what ``f`` reached at its first call (7 of 12: the new
    scripts the mutations bring), the cases disagree with their references (the rest drew
    operators and states that a stale plan does not change: ``"forward"`` at a plan whose
    guards its inputs fail; a mutation-free case). The fuzzer's own ``scripted(f)`` check is
    left as it is: only values and gradients tell here."""
    seen = []
    for seed, route in FAST[:12]:
        forget = _memoized_per_f() if stale == "memoized per f" else (lambda f: True)
        monkeypatch.setattr(script, "forget_plans", forget)
        seen.append(bool(fuzz_one(seed, include=route)))
    assert sum(seen) >= least, seen


@pytest.mark.slow
@pytest.mark.parametrize("first", [100, 200, 300, 400])
def test_fuzz_many(first: int) -> None:
    faults = [m for s in range(first, first + 100) for m in fuzz_one(s, calls=3)]
    assert not faults, "\n\n".join(faults[:5])


# the faults' smallest chains (innermost first), each within the walk's documented coverage
FAULTS = {
    "diamond": ["list", "diamond"],
    "class attribute via self": ["class attribute via self"],
    "__call__'s helper": ["__call__'s helper"],
    "callable object's method": ["callable object's method"],
    "module class attribute": ["partial keyword", "module class attribute"],
    "nested plain object": ["closure", "nested plain object"],
}


@pytest.mark.parametrize("route", FAULTS)
def test_a_fault(route: str) -> None:
    """Three payloads (a scripted function, module, exported method) behind the fault's chain:
    each was not found by the walk before its fix, its optimized plan run by the engines."""
    faults = [m for s in (22, 28, 0) for m in fuzz_one(s, case=draw(s, routes=FAULTS[route]))]
    assert not faults, "\n\n".join(faults[:5])


@pytest.mark.slow
@pytest.mark.parametrize("route", FAULTS)
def test_fuzz_a_fault_route(route: str) -> None:
    """The fault's route at a random level of drawn chains."""
    faults = [m for s in range(500, 530) for m in fuzz_one(s, calls=3, include=route)]
    assert not faults, "\n\n".join(faults[:5])


if __name__ == "__main__":
    first, count = int(sys.argv[1]), int(sys.argv[2])
    bad = 0
    for s in range(first, first + count):
        for message in fuzz_one(s, calls=3):
            bad += 1
            print(message, flush=True)
    print(f"{bad} faults in {count} seeds")


def _net_forward(self: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    return _SCRIPTED_ACT(nn.Sequential.forward(self, z))


def _call(self: Any, z: torch.Tensor) -> torch.Tensor:
    return _SCRIPTED_ACT(z) * 2.0


_SCRIPTED_ACT = torch.jit.script(_act)


@pytest.mark.parametrize("change", ["forward set on a Sequential subclass", "__call__ replaced"])
def test_a_class_changed_after_its_kind_was_read(change: str) -> None:
    """A ``nn.Sequential`` subclass of the user's without a ``forward`` (PyTorch's: the walk
    follows its children only), then given one on the class that calls a scripted activation;
    a plain object's ``__call__`` set on its class after the walk read it as a holder (no
    ``__call__`` then: ``f`` was a lambda over it)."""
    g = torch.Generator().manual_seed(1)
    x = _randn(g, 3, 2)
    if change == "__call__ replaced":
        held = _Plain()
        torchdiv.divergence(lambda z: z * 2.0 if held else z, x)  # (its kind read: plain)
        _Plain.__call__ = _call  # type: ignore[attr-defined]
        f: Any = held
    else:

        class Net(nn.Sequential):
            pass

        f = Net(nn.Linear(2, 2).double())
        torchdiv.divergence(f, x)  # (its kind read: PyTorch's forward)
        Net.forward = _net_forward  # type: ignore[method-assign,assignment]
    try:
        found = script.scripted(f)
        want = reference("divergence/structured", f, x, [_SCRIPTED_ACT], x)
        warm(f, x, g)
        got = torchdiv.divergence(f, x, method="structured")
    finally:
        if change == "__call__ replaced":
            del _Plain.__call__  # type: ignore[attr-defined]
    assert far(got, want, TOL) is None, (got, want)
    assert found == [_SCRIPTED_ACT]
