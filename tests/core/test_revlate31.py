"""rev-late31: the TorchScript walk (``_core.script.scripted``) after walk31 and rev-merges31,
attacked just past their new reach. Each case below was missed (the scripted module's
optimized plan ran during the torchdiv call: forward mode's divergence off, parameter
gradients gone): a ``functools.lru_cache``d (``cache``d) function met as a function (a global,
``f`` itself, a bound cached method: only a cached method read off its class was followed),
a function under more ``functools.wraps`` decorators than ``_FUNCTION_DEPTH`` (each wrapper
took a function of the depth), the slots of an object that has a ``__dict__`` too (a
slotted dataclass's subclass), and what a body under a decorator object (a class-based
decorator, a ``functools.singledispatchmethod``) reads off ``self``; and one crash (a class
holding another class's slot descriptor). References: per-sample ``autograd.grad`` loops on an eager
copy (conftest's ``assert_scripted_as_eager``), float64 (its float64 tolerances)."""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_scripted_as_eager

from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


# the scripted module a test binds, named by the functions below as a global
_NET: Any = None


@pytest.fixture
def global_net(nets, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(globals(), "_NET", nets[1])
    return nets


def _apply(net: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    return net(z)


# (a ``functools.lru_cache``d function: C's wrapper, read as an object of ``functools``, its
# body never read)


@functools.cache
def _model() -> Any:
    return _NET


def _from_model(z: torch.Tensor) -> torch.Tensor:
    return _model()(z)


@functools.lru_cache(maxsize=0, typed=True)  # (nothing kept: each call runs the body)
def _cached_apply(z: torch.Tensor) -> torch.Tensor:
    return _NET(z)


class _Runner:
    def __init__(self, run: Any) -> None:
        self.state = types.SimpleNamespace(run=run)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (the object lives as long as the test)
    def model(self) -> Any:
        return self.state.run


def _call_model(model: Callable[[], Any], z: torch.Tensor) -> torch.Tensor:
    return model()(z)


@pytest.mark.parametrize(
    "make",
    [
        lambda: _from_model,
        lambda: _cached_apply,
        lambda: lambda z: _cached_apply(z),
    ],
    ids=["global-getter", "f", "global"],
)
def test_a_cached_functions_body_is_read(global_net, make):
    _model.cache_clear()
    f = make()
    assert_scripted_as_eager(f, *global_net)
    assert global_net[1] in script.scripted(f)


def test_a_bound_cached_methods_reads_off_self(nets):
    """``runner.model`` (a bound method whose ``__func__`` is the cache wrapper) passed to a
    partial: what the cached body reads off ``self`` (``self.state.run``) was not followed."""
    f = functools.partial(_call_model, _Runner(functools.partial(_apply, nets[1])).model)
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


# (``functools.wraps`` chains: each wrapper took one of the walk's three functions, so that
# the body of a function under three decorators, or under two reached through a lambda, was
# never read)


def _decorated(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def run(*args: Any) -> torch.Tensor:
        return fn(*args)

    return run


@_decorated
@_decorated
@_decorated
def _thrice(z: torch.Tensor) -> torch.Tensor:
    return _NET(z)


@_decorated
@_decorated
def _twice(z: torch.Tensor) -> torch.Tensor:
    return _NET(z)


@pytest.mark.parametrize(
    "make",
    [lambda: _thrice, lambda: lambda z: _twice(z), lambda: functools.partial(_thrice)],
    ids=["thrice", "twice-by-lambda", "partial"],
)
def test_a_decorated_functions_body_is_read(global_net, make):
    f = make()
    assert_scripted_as_eager(f, *global_net)
    assert global_net[1] in script.scripted(f)


# (the slots of an object that has a ``__dict__`` too: read as its ``__dict__`` alone)


@dataclasses.dataclass(slots=True)
class _Config:
    net: Any


class _Extended(_Config):  # (no ``__slots__``: its objects have a ``__dict__``)
    pass


class _Open:
    __slots__ = ("__dict__", "__weakref__", "net")

    def __init__(self, net: Any) -> None:
        self.net = net


def _configured(config: Any, z: torch.Tensor) -> torch.Tensor:
    return config.net(z)


@pytest.mark.parametrize("holder", [_Extended, _Open], ids=["subclass", "dict-slot"])
def test_the_slots_of_an_object_with_a_dict_are_read(nets, holder):
    f = functools.partial(_configured, holder(nets[1]))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


class _Other:
    __slots__ = ("y",)


class _Aliased:
    """A slotted class holding another class's slot descriptor (``member.__get__`` of an
    object it does not apply to raises ``TypeError``: every torchdiv call of ``f`` raised)."""

    __slots__ = ("net",)
    alias = _Other.__dict__["y"]

    def __init__(self, net: Any) -> None:
        self.net = net


def test_a_foreign_slot_descriptor_is_skipped(nets):
    f = functools.partial(_configured, _Aliased(nets[1]))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


# (a method, ``__call__`` or ``forward`` decorated by an object, a class-based decorator that
# ``functools.update_wrapper``s itself, or a ``functools.singledispatchmethod``'s registered
# function: what its body reads off ``self`` was not followed)


class _Decorator:
    """A class-based decorator: called with the object first, bound like a function."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        return self if obj is None else functools.partial(self.fn, obj)

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.fn(*args)


class _DecoratedCall:
    def __init__(self, run: Any) -> None:
        self.state = types.SimpleNamespace(run=run)

    @_Decorator
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _DecoratedHelper(_DecoratedCall):
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.step(z)

    @_Decorator
    def step(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _DecoratedForward(torch.nn.Module):
    def __init__(self, run: Any) -> None:
        super().__init__()
        self.state = types.SimpleNamespace(run=run)

    @_Decorator
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


class _Dispatched(_DecoratedCall):
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.step(z)

    @functools.singledispatchmethod
    def step(self, z: Any) -> torch.Tensor:
        raise NotImplementedError

    @step.register
    def _(self, z: torch.Tensor) -> torch.Tensor:
        return self.state.run(z)


@pytest.mark.parametrize(
    "holder",
    [_DecoratedCall, _DecoratedHelper, _DecoratedForward, _Dispatched],
    ids=["call", "helper", "forward", "singledispatch"],
)
def test_a_body_under_a_decorator_object_is_read(nets, holder):
    f = holder(functools.partial(_apply, nets[1]))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


class _ClassCached:
    """``__call__`` runs what a ``classmethod`` over ``functools.cache`` returns, read off the
    class (``cls.run``: a partial of the scripted module, set by the test)."""

    run: Any = None

    @classmethod
    @functools.cache
    def model(cls) -> Any:
        return cls.run

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.model()(z)


def test_a_cached_class_methods_reads_off_its_class(nets, monkeypatch: pytest.MonkeyPatch):
    """The static or class method's cache wrapper was no function to ``_functions``: its
    body's reads (``cls.run``) were not looked up."""
    monkeypatch.setattr(_ClassCached, "run", functools.partial(_apply, nets[1]))
    _ClassCached.model.cache_clear()
    f = _ClassCached()
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


class _Unbound:
    """A proxy not bound yet (a context-local's outside its context): every attribute read
    raises, ``__class__`` included (``isinstance`` reads it where the type does not match)."""

    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError(f"unbound proxy: {name}")


def _guarded(base: type) -> type:
    """A class whose ``__call__`` (or ``forward``, over a module) names a class attribute
    holding the unbound proxy, never calling it (made in the test: doctest's collection reads
    a module's classes' attributes)."""

    class Guarded(base):  # type: ignore[misc,valid-type]
        hook: Any = _Unbound()

        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def __call__(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z) if self.hook is not None else z

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.net(z) if self.hook is not None else z

    if base is torch.nn.Module:
        del Guarded.__call__  # (the module's own, which runs forward)
    return Guarded


@pytest.mark.parametrize("base", [object, torch.nn.Module], ids=["object", "module"])
def test_a_raising_proxy_on_a_class_is_passed_over(nets, base):
    """The walk told these values by ``isinstance``, which read the proxy's ``__class__``:
    every torchdiv call raised the proxy's error (rev-late31; before rev-late31 too)."""
    f = _guarded(base)(nets[1])
    assert_scripted_as_eager(f, *nets)


def _holding(proxy: Any, scripted: Any, holder: str) -> Callable[[torch.Tensor], Any]:
    """An ``f`` running ``scripted`` that holds ``proxy`` (never calling it) by ``holder``."""
    if holder == "class __call__":
        return functools.partial(lambda z, c: scripted(z), c=type("H", (), {"__call__": proxy})())
    if holder == "closure":
        return (lambda u: lambda z: scripted(z) if u is not None else z)(proxy)
    if holder == "default":
        return lambda z, u=proxy: scripted(z)
    held = {"partial": proxy, "list": [proxy], "object": types.SimpleNamespace(u=proxy)}
    return functools.partial(lambda z, c: scripted(z), c=held[holder])


class _UnboundCallable(_Unbound):
    """The unbound proxy of a callable (``callable`` reads the type's slot, not the proxy)."""

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return z


@pytest.mark.parametrize("proxy", [_Unbound, _UnboundCallable])
@pytest.mark.parametrize(
    "holder", ["class __call__", "closure", "default", "partial", "list", "object"]
)
def test_a_raising_proxy_held_by_f_is_passed_over_by_the_key(nets, holder, proxy):
    """The unbound proxy held by ``f`` where the structure key's walks read it
    (``_taylor.cache.named``/``_contents``/``_modules_in``/``_reached``,
    ``_taylor.mixing._untold``, ``_exact.attributes.modules_of``): they told it by
    ``isinstance``, which read its ``__class__``: every torchdiv call raised the proxy's error
    (rev-late31's notes, the class's ``__call__``; the lead, the others)."""
    assert_scripted_as_eager(_holding(proxy(), nets[1], holder), *nets)
