"""Module attributes that ``f`` sets inside ``torch.func`` transforms, left as plain tensors.

A module may keep a tensor it computes during its forward as a plain attribute: the legacy
``nn.utils.weight_norm`` and ``nn.utils.spectral_norm`` recompute ``module.weight`` in a
forward pre-hook and set it so; a model may keep its last activation (``self.h = h``).
Evaluated inside ``torch.func.vjp``/``jvp`` (the forward and reverse engines, and the
Laplacian's nested methods over the forward one), such a tensor is the transform's wrapper (a
``GradTrackingTensor``), which outlives the transform dead: ``torch.save(model)`` then failed
("Cannot access storage of TensorWrapper"), far from the call.

An engine says when it evaluates ``f`` under its transforms (``transforming``); when such a
public call ends (``PlainAttributes``), every dead wrapper among the plain attributes of the
modules ``f`` reaches (``f`` itself and its submodules, or those a function names:
``_taylor.cache.named``; in their buffers, lists and dictionaries too (and tuples in them), such as
EDM's and E-NF's cache of edge indices ``self._edges_dict[n_nodes][batch_size] = [rows,
cols]``, made by ``f`` inside the transforms: ``_unwrap``) is replaced by
the tensor it wraps: the value, with the graph, that the same evaluation outside the
transforms leaves. Calls whose engines use no transform
(plain autograd, the structured and Taylor engines) walk nothing. The modules are walked, not
watched: a forward hook on every module cost 8 us per module call (a 3-layer MLP's reverse
engine: +3.5% a call), replacing ``Module.__setattr__`` for the call 250 us (Python
invalidates the method caches of every subclass of ``Module``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextvars import Token
from itertools import islice
from typing import Any

import torch
from torch._C._functorch import maybe_get_level

from torchdiv._core import settings
from torchdiv._core.script import PROXIES, instance, referent
from torchdiv._core.subclass import DEAD_LEVEL as _DEAD
from torchdiv._core.subclass import dead_unwrapped as _plain
from torchdiv._taylor.cache import named


def transforming() -> None:
    """An engine is about to evaluate ``f`` under ``torch.func`` transforms (nothing to note
    inside a region Dynamo traces, which would break its graph at the context variable)."""
    if torch.compiler.is_compiling():
        return
    reached = settings.calls_modules()  # (the public call's: a ``_Reached``, if any)
    if isinstance(reached, _Reached):
        reached.transformed = True


class PlainAttributes:
    """One public call of ``f``: made before it, ``close()`` after it (also after an error).
    Nothing inside a region Dynamo traces (whose transforms it traces: no wrapper is left)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.reached: _Reached | None = None
        self.token: Token[Any] | None = None
        if not torch.compiler.is_compiling():
            # (for ``_core.settings``: the plain values of these modules, put back with the
            # tensors f wrote where an evaluation is made again; and for ``transforming``,
            # which marks it: one context variable set, not two, a public call's every call)
            self.reached = _Reached(f)
            self.token = settings.calling(self.reached)

    def close(self) -> None:
        if self.token is None or self.reached is None:
            return
        settings.ended(self.token)
        if not self.reached.transformed:
            return
        for module in modules_of(self.f):
            _unwrap(vars(module))


class _Reached:
    """``list(modules_of(f))``, walked when first asked for (most calls never ask: no
    evaluation is made again) and kept for the rest of the call. A ``functools.cache`` of a
    lambda, made anew for every public call, cost more than the call's use of it: building an
    ``lru_cache`` wrapper and ``update_wrapper``'s copies of the lambda's names.
    ``transformed``: an engine of the call evaluated ``f`` under ``torch.func`` transforms
    (``transforming``)."""

    __slots__ = ("f", "found", "transformed")

    def __init__(self, f: Any) -> None:
        self.f = f
        self.found: list[torch.nn.Module] | None = None
        self.transformed = False

    def __call__(self) -> list[torch.nn.Module]:
        if self.found is None:
            self.found = list(modules_of(self.f))
        return self.found


def unwrap_between_evaluations() -> None:
    """The dead wrappers among the plain attributes of the modules the public call's ``f``
    reaches replaced by what they wrap, between two evaluations of ``f`` in one call (chunks):
    a buffer ``f`` sets anew on its first forward (normflows' ``ActNorm``:
    ``self.data_dep_init_done = torch.ones(1)``, made under the first evaluation's
    transforms) was read dead by the next, which raised PyTorch's internal assert ("level
    escaped?"). Nothing inside a compiled call: its graph holds no wrappers, and Dynamo cannot
    trace the lookup of the modules (a ``ContextVar``)."""
    if torch.compiler.is_compiling():
        return
    for module in settings.modules():
        _unwrap(vars(module))


def modules_of(f: Any) -> Iterator[torch.nn.Module]:
    """The modules ``f`` is or reaches (``named``) and their submodules, each once."""
    roots = [f] if isinstance(f, torch.nn.Module) else named(f)
    # (a raising proxy: none; a ``weakref.proxy``: its module, which ``Settings`` and the
    # watch refer to weakly: the proxy took no weak reference, every call raised)
    stack = [_read(root) for root in roots if instance(root, torch.nn.Module)]
    seen = {id(None)}  # (a proxy dead or unread: ``_read``)
    # each module once: a walk of the ``_modules`` dictionaries (``modules()`` took 25 us
    # for a 3-layer MLP), read from ``__dict__`` (a stand-in claiming to be a module has none)
    while stack:
        module = stack.pop()
        if id(module) not in seen:
            seen.add(id(module))
            yield module
            children = vars(module).get("_modules") or {}
            stack += [
                child if type(child) not in PROXIES else _read(child)
                for child in children.values()
                if child is not None
            ]


def _read(module: Any) -> Any:
    """``module``, or the module a ``weakref.proxy`` ``module`` stands for (``referent``);
    ``None`` for a dead proxy or one whose target cannot be read (``referent`` gives it
    back: ``Settings`` refers to modules weakly, a proxy takes no weak reference)."""
    found = referent(module)
    return None if type(found) in PROXIES else found


def _unwrap(attributes: dict[str, Any]) -> None:
    """Each dead wrapper in a module's ``__dict__`` replaced by what it wraps, and so in its
    buffers (``self.buf = t`` for a registered buffer sets ``_buffers``) and in the lists
    and dictionaries it holds (``self.hs.append(h)``, a cache of edge indices:
    ``_unwrap_held``). Parameters cannot be set to a computed tensor; a caller's live
    transform's wrappers stay. A wrapper's class is ``torch.Tensor`` itself: a dictionary
    without one, the usual case, is passed over by searches in C (a Python loop over a
    module's 20 entries: 1-2 us), as are buffers without a dead wrapper and modules without a
    list or a dictionary of their own (beyond ``nn.Module``'s; tuples, a convolution's sizes,
    are looked into only inside those; a long list only at its end: ``_unwrap_list``)."""
    types = list(map(type, attributes.values()))
    kinds = set(types)
    if torch.Tensor in kinds:
        _unwrap_values(attributes)
    buffers = attributes.get("_buffers")
    if buffers and _dead_among(buffers.values()):
        _unwrap_values(buffers)
    if list in kinds or types.count(dict) > _OWN:
        for name, value in attributes.items():
            if type(value) in _CONTAINERS and name not in _MODULE_OWN:  # (not its parameters,
                _unwrap_held(value, _DEPTH)  # buffers, submodules, hooks)


_SHORT = 64  # a list this long is searched whole; a longer one from its end (``_unwrap_list``)
_CONTAINERS = frozenset((list, dict))  # (a module's own tuples, a convolution's sizes, not)
_HELD = frozenset((list, dict, tuple))  # ... but tuples inside them
_SEARCHED = _HELD | {torch.Tensor}  # a tuple holding none of these is passed over (in C)
_DEPTH = 3  # containers searched inside containers (EDM's edges: a dict of dicts of lists)
_MODULE_OWN = frozenset(vars(torch.nn.Module()))  # ``_parameters``, ``_modules``, hooks, ...
_OWN = list(map(type, vars(torch.nn.Module()).values())).count(dict)  # ... of them dictionaries


def _unwrap_held(held: Any, depth: int) -> Any:
    """``held`` (a list or a dictionary a module holds, or a tuple inside one) with the dead
    wrappers in it, and in the lists, dictionaries and tuples it holds ``depth - 1`` levels
    down, replaced by what they wrap: lists and dictionaries in place (the module's own,
    shared with its code), a tuple made again where one changed (else ``held`` itself). A
    long list or dictionary (over ``_SHORT`` entries) only at its end, where this call's
    appends and new keys are."""
    if type(held) is list:
        _unwrap_list(held)
        tail = held[-_SHORT:]
        if depth == 1 or not _HELD & set(map(type, tail)):  # (searched in C: a list of sizes)
            return held
        values: Any = enumerate(tail, max(len(held) - _SHORT, 0))
    elif type(held) is dict:
        values = list(islice(reversed(held.items()), _SHORT))  # (the last, newest first)
        kinds = {type(v) for _, v in values}
        if torch.Tensor in kinds:
            for key, value in values:
                if type(value) is torch.Tensor and maybe_get_level(value) == _DEAD:
                    held[key] = _plain(value)
        if depth == 1 or not _HELD & kinds:
            return held
    else:
        items = [_plain(v) if type(v) is torch.Tensor else v for v in held]
        if depth > 1:
            items = [_unwrap_held(v, depth - 1) if _searched(v) else v for v in items]
        return held if all(a is b for a, b in zip(items, held, strict=True)) else tuple(items)
    for key, value in values:
        if _searched(value):
            kept = _unwrap_held(value, depth - 1)
            if kept is not value:
                held[key] = kept
    return held


def _searched(value: Any) -> bool:
    """Whether ``_unwrap_held`` looks into ``value``: a list or a dictionary, or a tuple that
    holds a tensor or a container (not a tuple of sizes or settings: a module's dictionary of
    20 such tuples cost 30 us a call searched by Python calls, 100 modules 3 ms)."""
    kind = type(value)
    return kind in _CONTAINERS or (kind is tuple and not _SEARCHED.isdisjoint(map(type, value)))


def _unwrap_list(held: list[Any]) -> None:
    """The dead wrappers of a module's list replaced by what they wrap, in place. A long one
    (a memory of 100,000 tensors: +22 ms a call searched whole) is searched from its end to
    the first element that is no dead wrapper: ``f``'s appends of this call (those of earlier
    calls were replaced at their end); one written into its middle stays."""
    if len(held) <= _SHORT:
        if torch.Tensor in map(type, held):
            _unwrap_values(held)
        return
    for i in range(len(held) - 1, -1, -1):
        value = held[i]
        if type(value) is not torch.Tensor or maybe_get_level(value) != _DEAD:
            return
        held[i] = _plain(value)


def _dead_among(buffers: Any) -> bool:
    """Whether a dead wrapper is among a module's ``buffers`` (searched in C; one set to
    ``None``, which has no level, by a loop)."""
    try:
        return _DEAD in map(maybe_get_level, buffers)
    except TypeError:
        return any(b is not None and maybe_get_level(b) == _DEAD for b in buffers)


def _unwrap_values(held: dict[str, Any] | list[Any]) -> None:
    """Each dead wrapper among the values of ``held`` replaced by what it wraps, in place."""
    for key, value in held.items() if isinstance(held, dict) else enumerate(held):
        if type(value) is torch.Tensor and maybe_get_level(value) == _DEAD:
            held[key] = _plain(value)  # type: ignore[index]  # (same key: the size stays)
