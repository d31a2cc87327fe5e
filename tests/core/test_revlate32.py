"""rev-late32: late review of rev-merges32's weak-reference routes (the TorchScript walk's
``_REFERENCE`` kind, ``referent``) and of the structure key's reading of weak references.

References: per-sample ``autograd.grad`` loops on an eager copy, values and parameter
gradients (conftest's ``assert_scripted_as_eager``: the scripted copy run three times
outside torchdiv first), float64 per-sample loops (``reference_divergence``) and, for the
structure key, the mixing watch's refusal (``BatchInteractionError``) on the first call after
a module behind a weak reference came to mix samples. Float64 3-6-3 and 3-3 tanh nets:
``assert_close``'s float64 tolerances."""

from __future__ import annotations

import argparse
import functools
import weakref
from typing import Any, ClassVar

import pytest
import torch
from conftest import assert_close, assert_scripted_as_eager, reference_divergence

import torchdiv
from torchdiv import BatchInteractionError
from torchdiv._core import script

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own


# -- the TorchScript walk: a weak container read at the depth of a dictionary ---------------

_MODELS: Any = None  # (a module-level registry, set by each test)


def _get(name: str) -> Any:
    """A model registry's getter (``f`` calls it)."""
    return _MODELS[name]


def _first(name: str) -> Any:
    return next(iter(_MODELS))


def _registries(net: Any) -> dict[str, tuple[Any, Any]]:
    """Registries of ``net`` read by a getter ``f`` calls, with the getter."""
    return {
        "dictionary": ({"flow": net}, _get),
        "weak value dictionary": (weakref.WeakValueDictionary(flow=net), _get),
        "weak set": (weakref.WeakSet([net]), _first),
        "weak key dictionary's key": (weakref.WeakKeyDictionary({net: 1}), _first),
    }


@pytest.mark.parametrize("way", list(_registries(torch.nn.Identity())))
def test_a_weak_registry_read_by_a_getter_is_walked(nets, way: str, monkeypatch):
    """``f = lambda z: get("flow")(z)``, ``get`` reading a module-level registry: a
    ``WeakValueDictionary`` or ``WeakSet`` was read as a plain object, its ``data`` one
    level further down than a dictionary's items, past the walk's depth: the script's
    optimized plan ran (forward mode's divergence off, parameter gradients gone), where a
    plain dictionary's was found. A ``WeakKeyDictionary``'s keys were not read at all."""
    registry, getter = _registries(nets[1])[way]
    monkeypatch.setattr(f"{__name__}._MODELS", registry)
    f = {_get: lambda z: _get("flow")(z), _first: lambda z: _first("flow")(z)}[getter]
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


class _State:
    def __init__(self, net: Any) -> None:
        self.net = net


class _Owner:
    """A trainer's object: ``state.net`` its script (read off it, not one of its own)."""

    def __init__(self, net: Any) -> None:
        self.state = _State(net)


class _OwnedBy(torch.nn.Module):
    """A module keeping its owner weakly (against a cycle), running the owner's script."""

    def __init__(self, owner: _Owner) -> None:
        super().__init__()
        self.owner = weakref.ref(owner)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.owner().state.net(z)


class _Calls:
    """A callable object keeping its owner weakly."""

    def __init__(self, owner: _Owner) -> None:
        self.owner = weakref.ref(owner)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.owner().state.net(z)


def _run_owner(owner: Any, z: torch.Tensor) -> torch.Tensor:
    return owner().state.net(z)


def _hook(owner: Any, module: Any, args: Any, y: torch.Tensor) -> torch.Tensor:
    return owner().state.net(y)


def _hooked(owner: _Owner) -> torch.nn.Module:
    """An identity whose forward hook (a partial binding the owner weakly) runs the script."""
    layer = torch.nn.Identity()
    layer.register_forward_hook(functools.partial(_hook, weakref.ref(owner)))
    return layer


_OWNERS: dict[str, Any] = {
    "module keeping a reference": _OwnedBy,
    "callable object keeping a reference": _Calls,
    "partial binding a reference": lambda o: functools.partial(_run_owner, weakref.ref(o)),
    "forward hook binding a reference": _hooked,
    "closure over a reference": lambda o: (lambda r: lambda z: r().state.net(z))(weakref.ref(o)),
}


@pytest.mark.parametrize("way", list(_OWNERS))
def test_what_code_reads_off_a_reference_s_target_is_walked(nets, way: str):
    """``self.owner().state.net(z)``, ``owner`` a ``weakref.ref``: the names the code reads
    were looked up off a plain object or proxy it holds (``self.owner.state.net(z)``: found),
    not off a reference's target, whose ``state`` (a plain object, not followed as an
    attribute) was never read: the script's optimized plan ran, divergence off."""
    owner = _Owner(nets[1])
    f = _OWNERS[way](owner)
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


# -- the structure key: a module behind a weak reference by its state -----------------------


def tanh_layer() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()).double()


class _Flagged(torch.nn.Module):
    """A 3-3 tanh layer whose ``forward`` adds the batch's mean once ``mix`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.mix = torch.nn.Linear(3, 3).double(), False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(z))
        return y + z.mean(0, keepdim=True) if self.mix else y


class _Calling:
    """A kept callable object running the module its weak reference refers to (a wrapper
    that must not keep the model alive)."""

    def __init__(self, held: Any, read: Any) -> None:
        self.held, self.read = held, read

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.read(self.held)(z)


def _weak_ways(net: _Flagged) -> dict[str, Any]:
    """``f`` reaching ``net`` through a weak reference, kept across calls."""
    return {
        "ref held by a callable object": _Calling(weakref.ref(net), lambda r: r()),
        "weak method held by a callable object": _Calling(
            weakref.WeakMethod(net.forward), lambda r: r()
        ),
        "weak value dictionary in a partial": functools.partial(
            lambda h, z: h["m"](z), weakref.WeakValueDictionary(m=net)
        ),
        "weak value dictionary in a closure": (lambda h: lambda z: h["m"](z))(
            weakref.WeakValueDictionary(m=net)
        ),
        "weak set in a partial": functools.partial(
            lambda h, z: next(iter(h))(z), weakref.WeakSet([net])
        ),
        "weak key dictionary in a partial": functools.partial(
            lambda h, z: next(iter(h))(z), weakref.WeakKeyDictionary({net: 1})
        ),
        "proxy held by a callable object": _Calling(weakref.proxy(net), lambda p: p),
        "ref held by a plain object": (lambda h: lambda z: h.net()(z))(_State(weakref.ref(net))),
        "weak value dictionary held by a plain object": (lambda h: lambda z: h.net["m"](z))(
            _State(weakref.WeakValueDictionary(m=net))
        ),
    }


@pytest.mark.parametrize("way", list(_weak_ways(_Flagged())))
def test_a_module_behind_a_weak_reference_set_to_mix_is_refused(way: str):
    """The structure key read a ``weakref.ref``, ``WeakMethod`` or a weak container's
    references by their ids alone (a ``WeakSet``'s not at all): ``net.mix = True`` after a
    call kept the key, the first call's pass was served, the batch's mean unwatched
    (divergence silently off by the mean's share, parameter gradients with it)."""
    net = _Flagged()
    f = _weak_ways(net)[way]
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(net, x))
    net.mix = True
    with pytest.raises(BatchInteractionError, match="mean"):
        torchdiv.divergence(f, x)


class _Unbound:
    """A context-local stand-in not bound: every attribute read raises; its type's
    ``__call__`` runs the module it holds."""

    def __init__(self, net: torch.nn.Module) -> None:
        object.__setattr__(self, "net", net)

    def __getattribute__(self, name: str) -> Any:
        raise RuntimeError(f"unbound: {name}")

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return object.__getattribute__(self, "net")(z)


class _Forwarding:
    """An object forwarding every attribute read to its configuration; its type's
    ``__call__`` runs the module it holds."""

    def __init__(self, net: torch.nn.Module, config: Any) -> None:
        object.__setattr__(self, "net", net)
        object.__setattr__(self, "config", config)

    def __getattribute__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "config"), name)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return object.__getattribute__(self, "net")(z)


class _Config:
    scale = 1.0


@pytest.mark.parametrize("kind", [_Unbound, _Forwarding])
def test_a_proxy_whose_target_is_not_read_makes_the_key_untold(kind: type):
    """A kept callable object holding a ``weakref.proxy`` of an object whose attribute reads
    raise (``referent``: ``None``, told as a flag) or forward to another object (``referent``:
    the other, whose state was told for the target's): the target's module swapped for one
    mixing samples kept the key, the old pass served (divergence silently off). Such a
    proxy now makes the key untold: watched at every call."""
    net = tanh_layer()
    held = kind(net) if kind is _Unbound else kind(net, _Config())
    f = _Calling(weakref.proxy(held), lambda p: p)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(net, x))
    mixing = _Flagged()
    mixing.mix = True
    object.__setattr__(held, "net", mixing)
    with pytest.raises(BatchInteractionError, match="mean"):
        torchdiv.divergence(f, x)
    assert script.referent(weakref.proxy(held)) is not net


class _Slotted:
    """A holder without a ``__dict__`` (``named`` does not read its attributes)."""

    __slots__ = ("__weakref__", "net")

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net


def test_a_reference_swapped_for_another_is_another_structure():
    """A reference is told by its ``id`` as well as by what it refers to: one to a holder
    ``named`` does not read (slotted), set to refer to another holder whose module mixes,
    is another structure, watched (guards ``named``'s reading of references)."""
    net = tanh_layer()
    keep = [_Slotted(net)]  # (the holders: alive while referred to)
    f = _Calling(weakref.ref(keep[0]), lambda r: r().net)
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(net, x))
    mixing = _Flagged()
    mixing.mix = True
    keep.append(_Slotted(mixing))
    f.held = weakref.ref(keep[-1])
    with pytest.raises(BatchInteractionError, match="mean"):
        torchdiv.divergence(f, x)


def test_an_object_of_many_attributes_beside_a_small_holder_is_read_after_it(nets):
    """``partial(step, (args, {"flow": net}))``, ``args`` an ``argparse.Namespace`` of 70
    hyperparameters: a level's objects were read first (of size 0), its attributes spent
    the 64-item budget, the dictionary never read (the script's optimized plan ran,
    divergence off); an object is now sized by its attributes."""
    args = argparse.Namespace(**{f"h{i}": 0.1 for i in range(script._HELD_ITEMS + 6)})
    f = functools.partial(lambda s, z: s[1]["flow"](z), (args, {"flow": nets[1]}))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


class _Lazy:
    """A lazy object proxy: every attribute read, its call too, forwarded to the object it
    wraps."""

    def __init__(self, wrapped: Any) -> None:
        object.__setattr__(self, "wrapped", wrapped)

    def __getattribute__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "wrapped"), name)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return object.__getattribute__(self, "wrapped")(z)


def test_a_proxy_of_a_forwarding_object_is_walked_through(nets):
    """The walk reads a proxy's unverified target (the object a forwarding ``__getattribute__``
    gives): reading more is safe there, where the structure key makes such a proxy untold."""
    lazy = _Lazy(nets[1])
    f = functools.partial(lambda p, z: p(z), weakref.proxy(lazy))
    assert_scripted_as_eager(f, *nets)
    assert nets[1] in script.scripted(f)


def _registry_ways(net: _Flagged) -> dict[str, Any]:
    """``f`` reaching ``net`` through a class of the user's it names (a registry)."""

    class Registry:
        model = net

    class WeakRegistry:
        models: ClassVar[Any] = weakref.WeakValueDictionary(flow=net)

    class Models:
        models: ClassVar[dict[str, Any]] = {"flow": net}

    return {
        "class attribute": (lambda r: lambda z: r.model(z))(Registry),
        "weak value dictionary as a class attribute": (lambda r: lambda z: r.models["flow"](z))(
            WeakRegistry
        ),
        "dictionary as a class attribute": (lambda r: lambda z: r.models["flow"](z))(Models),
    }


@pytest.mark.parametrize("way", list(_registry_ways(_Flagged())))
def test_a_module_held_by_a_class_f_names_set_to_mix_is_refused(way: str):
    """A class ``f`` names was told by its identity alone, not looked into: ``net.mix =
    True`` on a module it holds (a registry's class attribute, a ``WeakValueDictionary`` or
    dictionary there) kept the key, the first call's pass served (divergence silently off)."""
    net = _Flagged()
    f = _registry_ways(net)[way]
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_close(torchdiv.divergence(f, x), reference_divergence(net, x))
    net.mix = True
    with pytest.raises(BatchInteractionError, match="mean"):
        torchdiv.divergence(f, x)


def test_a_plain_object_behind_a_plain_object_s_reference_is_read_for_its_modules(watches):
    """A trainer's object holding another weakly (``self.owner = weakref.ref(trainer)``):
    the other is read for its modules alone, as a plain object held itself is, not its
    flags: a status string set at every step does not make every call another structure,
    watched again (guards ``_kept``)."""
    net = tanh_layer()
    inner = _State(net)
    inner.status = "step 0"
    outer = _State(weakref.ref(inner))
    f = (lambda h: lambda z: h.net().net(z))(outer)
    x = torch.randn(5, 3, dtype=torch.float64)
    for step in range(3):
        inner.status = f"step {step}"
        assert_close(torchdiv.divergence(f, x), reference_divergence(net, x))
    assert len(watches) == 1
