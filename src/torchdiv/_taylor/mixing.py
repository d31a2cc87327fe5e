"""Sample mixing at the ``torchdiv._taylor`` level: recording ``f`` once to find where it mixes
samples (for errors that do not say so), and the objects ``f`` already watched at a structure
(``passed_before``), whose later calls the small engines need not watch again."""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import types
import weakref
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from numbers import Number
from typing import Any, NamedTuple

import torch

from torchdiv._core.checks import unwrapped
from torchdiv._core.mixing.errors import BatchInteractionError, allowed, unnamed
from torchdiv._core.mixing.reads import Kept, Verdict
from torchdiv._core.script import global_names, instance
from torchdiv._taylor import RULES, capture
from torchdiv._taylor.cache import (
    TUPLE_ITEMS,
    UNTOLD,
    PlanCache,
    Same,
    by_items,
    contained_tensors,
    items_of,
    named,
    size,
    structure_key,
    walked,
)
from torchdiv._taylor.propagate import AUTOCAST_DEVICES


def recorded_mixing(f: Any, x: torch.Tensor, batch_dims: int) -> str | None:
    """The ``BatchInteractionError`` message of recording ``f`` once (state put back), or
    ``None`` if it does not mix samples where the recorder can see it. For an ``f`` that a
    ``torch.func`` transform refused for updating state (a train-mode batch norm)."""
    if allowed():
        return None
    try:
        capture(f, x, RULES, batch_dims=batch_dims).undo()
    except BatchInteractionError as exc:
        return unnamed(str(exc))
    except Exception:  # f fails otherwise: the original error stands
        return None
    return None


# the functions f (``identity``: not unwrapped, a wrapper may mix what it wraps) whose
# evaluation at a structure (``structure``) was watched without mixing samples, each with its
# ``Passed``
_PASSED = PlanCache(256)

# (site, key) for a PlanCache, the key (what tells f from another with its code: ``identity``,
# cache.structure_key)
Structure = tuple[Any, tuple[Hashable, Hashable]]


@dataclass
class Passed:
    """This very ``f`` passed a watch for sample mixing at a structure; ``plain``: no
    evaluation of it there has shown an op that ``SafeDerivatives`` changes, so the next
    may run outside the mode (``torchdiv._exact.autograd.GraphJacobian.of_function``);
    ``reverse``: ``torch.func``'s reverse mode ran it there (``torchdiv._exact.dispatch``);
    ``chain``: no plain evaluation there has shown a graph that is not a chain
    (``torchdiv._exact.chain``: a square problem larger than ``crossover.ROWS_PROBLEM`` goes
    by plain autograd's rows only while this holds, ``torchdiv._exact.dispatch._engines``);
    ``held``: the parameters and index tensors it holds at (``Verdict.while_held``, where
    ``f``'s modules hold them: ``Owned``; those of ``Verdict.indexed_by`` the key holds;
    ``()``: any), ``current`` where each is alive at its version and values then, in its
    places."""

    plain: bool = True
    reverse: bool = True
    chain: bool = True
    held: tuple[Kept | Owned | Numbers, ...] = field(default=(), repr=False)

    def current(self) -> bool:
        """Whether every tensor the pass holds at is alive at its version and values then,
        in its places."""
        for kept in self.held:  # noqa: SIM110  # (not all() of a generator: every small call)
            if not kept.current():
                return False
        return True


class Owned(NamedTuple):
    """A parameter (or buffer, or plain tensor attribute) a pass holds at (``kept``) and the
    places ``f``'s modules hold it in (weak references to the modules, the dictionary:
    ``_parameters``, ``_buffers`` or ``""``, the module's own, and names): ``current`` while
    each still holds that very tensor there, at its version and values. The structure's key
    does not tell a module's parameters apart: a weight replaced by another ``nn.Parameter``
    object, the old one kept alive by an optimizer, was served by the old one's pass (its
    factorization failing, ``f``'s ``except`` branch mixing samples unwatched) until
    rev-merges17a."""

    places: tuple[tuple[Any, str, str], ...]
    kept: Kept

    def current(self) -> bool:
        """Whether each place holds the tensor, alive at its version and values then."""
        t = self.kept.ref()
        for ref, where, name in self.places:
            module = ref()
            own = None if module is None else vars(module)
            if own is None or (own.get(where, {}) if where else own).get(name) is not t:
                return False
        return self.kept.current()


class Numbers(NamedTuple):
    """The Python numbers (``numbers.Number``: NumPy's scalars too) each module ``f``
    reaches (and each plain object a function ``f`` names) holds as attributes, in a short
    list or tuple, or in a plain object it holds (weak references to the modules, and their
    numbers by name: ``_numbers``), and the modes (``_modes``: autocast's), which the
    structure's key does not hold (a time, a count, a configuration): kept with a pass
    where a factorization read a tensor built from held ones with numbers its ops took
    (``Verdict.numbers``: ``cholesky(W @ W.T + self.eps * I)``; ``self.eps`` set negative,
    the next call's ``except`` branch would mix samples unwatched). ``current`` while each
    is alive and holds the same numbers, under the same modes (a count kept in ``forward``,
    ``self.nfe += 1``: watched at every call, as without the pass).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> net.eps = 1e-3
        >>> numbers = Numbers.of([net])
        >>> net.eps = -1.0
        >>> numbers.current()
        False
    """

    modules: tuple[tuple[Any, tuple[tuple[str, Any], ...]], ...]
    modes: Hashable = None

    @staticmethod
    def of(modules: Iterable[Any]) -> Numbers | None:
        """The numbers each of ``modules`` (or plain objects a function names, ``_objects``)
        holds now, and the modes now (``_modes``); ``None`` where one has no weak
        references (not told: no pass)."""
        try:
            return Numbers(tuple((weakref.ref(m), _numbers(m)) for m in modules), _modes())
        except TypeError:
            return None

    def current(self) -> bool:
        """Whether each module (or object) is alive and holds the same numbers, under the
        same modes."""
        if _modes() != self.modes:
            return False
        for ref, numbers in self.modules:
            module = ref()
            if module is None or _numbers(module) != numbers:
                return False
        return True


def _modes() -> Hashable:
    """What sets a built tensor's values besides its tensors and numbers, which the structure
    key does not hold (``Numbers``): the default dtype (``torch.eye(3)``'s) and, for each
    device type, the autocast dtype where autocast is on (``W @ W.T`` in bfloat16: a
    Cholesky factorization that passed in float32 fails, rev-merges18c)."""
    return torch.get_default_dtype(), tuple(
        torch.get_autocast_dtype(d) if torch.is_autocast_enabled(d) else None
        for d in AUTOCAST_DEVICES
    )


def _numbers(m: Any, depth: int = 1) -> tuple[tuple[str, Any], ...]:
    """The numbers (``int``, ``float``, ``complex``, ``bool``, a NumPy scalar: any
    ``numbers.Number``) ``m`` holds as attributes (``_fields``), by name, with those of a list
    or tuple of at most ``TUPLE_ITEMS`` items (``self.eps = (1e-3, 1e-2)``) and, ``depth``
    levels down, those of a plain object it holds (a configuration's ``self.cfg.eps``, also
    a ``dataclass(slots=True)``'s: not a module, tensor or callable) (``Numbers``). A module's
    own hooks, ``None``s, sets and names are skipped first by type (``_NONE_HELD``)."""
    found: list[tuple[str, Any]] = []
    for k, v in _fields(m).items():
        kind = type(v)
        if kind in _NONE_HELD or (kind is dict and k in _MODULE_DICTS):
            continue
        if isinstance(v, Number):
            found.append((k, v))
        elif kind is list or kind is tuple or kind is dict or by_items(v):
            found.append((k, _contained_numbers(v)))
        elif depth and not callable(v) and not isinstance(v, _NOT_PLAIN):
            found.append((k, _numbers(v, depth - 1)))
    return tuple(found)


def _contained_numbers(v: Any, depth: int = 3) -> tuple[Any, ...]:
    """The numbers in a list, tuple, dictionary (its keys too), named tuple, ``SimpleNamespace``
    or partial a module holds, and in those it holds, ``depth`` levels down, each container
    of up to ``TUPLE_ITEMS`` entries, as the structure key walks them (``cache.items_of``),
    which holds their floats as values (``self.cfg = {"eps": 1e-3}``, ``self.eps = [[1e-3]]``,
    set negative: served by the pass until keyattrs20)."""
    found = items_of(v)
    if found is None or not depth or found[0] > TUPLE_ITEMS:
        return ()
    return tuple(u if isinstance(u, Number) else _contained_numbers(u, depth - 1) for u in found[1])


def _fields(m: Any) -> dict[str, Any]:
    """``m``'s attributes: its ``__dict__``'s and its classes' ``__slots__``' (read without
    ``getattr``'s fallbacks: a proxy's ``__getattr__``; an empty slot: not there)."""
    found = dict(getattr(m, "__dict__", None) or {})
    for kind in type(m).__mro__[:-1]:
        slots = kind.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            slot = kind.__dict__.get(name)
            if isinstance(slot, types.MemberDescriptorType):
                with contextlib.suppress(AttributeError):
                    found[name] = slot.__get__(m, kind)
    return found


def _objects(f: Any) -> list[Any] | None:
    """The objects besides modules whose numbers ``Numbers`` holds for ``f``: the plain
    objects (a configuration: no module, tensor, callable or value ``identity`` tells by
    value) a plain function names (``_named``, also in a tuple), a bound method's object, a
    callable object itself (``identity`` holds each by identity only); ``None`` where ``f``
    holds numbers no weak reference follows (a list's, a dictionary's, a ``partial``'s
    arguments, a callable without attributes): no pass."""
    f = unwrapped(f)
    if isinstance(f, torch.nn.Module):
        return []
    if isinstance(f, types.MethodType):
        return [] if isinstance(f.__self__, torch.nn.Module) else [f.__self__]
    if not isinstance(f, types.FunctionType):
        return None if isinstance(f, functools.partial) or not hasattr(f, "__dict__") else [f]
    found = []
    for v in _named(f)[1]:
        for u in v if type(v) is tuple else (v,):
            if isinstance(u, (list, dict)):
                return None
            if _plain(u):
                found.append(u)
    return found


def _plain(u: Any) -> bool:
    """Whether ``u`` is a plain object (a configuration, a ``TrainState``): no module, tensor,
    callable, Python module or value ``identity`` tells by value. ``identity`` holds it by
    identity alone, whatever its attributes come to hold."""
    return not (type(u) in _VALUES or callable(u) or u is _EMPTY) and not isinstance(
        u, (torch.Tensor, torch.nn.Module, types.ModuleType)
    )


def _aliased(f: Any, depth: int = 3) -> set[int] | None:
    """The ids of the tensors the plain objects (``_plain``) that the function (or
    ``functools.partial``) ``f`` names, or the modules ``f`` reaches hold as attributes,
    hold: in their attributes, the plain objects and tuples, lists and dictionaries there
    (``state.buffers["order"]``, ``self.state.inner.buffers``), ``depth`` levels down,
    through the functions ``f`` names too (``lambda z: step(z)``, ``step`` reading
    ``state.buffers``); ``None`` where one lies deeper (not looked for). A module's tensor
    among them does not vouch for itself (``_holds``, ``_owned``): ``f`` may read it from
    that object, which may hold another at the next call unseen by the key (``torch.func``'s
    ``dict(model.named_buffers())`` kept in a ``TrainState`` for ``functional_call``: a pass
    kept for the module's buffer served edges that cross samples until rev-functional20,
    one in a state in a state, held by a module or four functions down until keyleft21)."""
    todo: list[tuple[Any, int, bool]] = [(f, depth, False)]  # (what, levels left, in an object)
    todo += [(v, depth, False) for m in _modules(f) for v in vars(m).values() if _plain(v)]
    seen: set[tuple[int, bool]] = set()  # (a dictionary f names and its state holds: both)
    found: set[int] = set()
    while todo:
        u, left, inside = todo.pop()
        if (id(u), inside) in seen:
            continue
        seen.add((id(u), inside))
        held: list[Any] = []
        if isinstance(u, types.FunctionType):  # (not torch's own: ``functional_call``)
            own = inside or (u.__module__ or "").startswith("torch")
            held = [] if own else _named(u)[1]
        elif isinstance(u, functools.partial):
            held = [] if inside else [u.func, *u.args, *u.keywords.values()]
        elif by_items(u):
            held = [*(u.values() if type(u) is dict else u)]
        elif _plain(u):  # (its attributes, and their items and objects)
            held, inside = list(_fields(u).values()), True
        for v in held:
            if isinstance(v, torch.Tensor):
                if inside:
                    found.add(id(v))
            elif left and isinstance(v, (types.FunctionType, functools.partial)):
                todo.append((v, left - 1, inside))  # (deeper: "three functions below f")
            elif by_items(v) or _plain(v):
                if not left:
                    return None  # (an object deeper: what it holds is not known)
                todo.append((v, left - 1, inside))
    return found


_NOT_PLAIN = (torch.Tensor, torch.nn.Module, dict)  # (a module's hooks: dictionaries)
# the types of most of a module's own attributes (its hooks, parameters, buffers, submodules,
# ``_non_persistent_buffers_set``), exactly: neither numbers nor a plain object holding some
# (``bool``s are numbers: ``training`` is held): ``_numbers`` skips them before its checks,
# each a Python call (``Numbers.current`` of cayley's six modules, timeit: 81 -> 13 us)
_NONE_HELD = frozenset((collections.OrderedDict, type(None), set, str))
_MODULE_DICTS = frozenset(("_parameters", "_buffers", "_modules"))  # (a module's own)


def passed_before(
    f: Any, x: torch.Tensor, batch_dims: int, at: Structure | None = None
) -> Passed | None:
    """Whether ``f`` (``identity``) passed a watch for sample mixing at the structure of ``x``
    (``passed``; ``at``: that structure, if the caller made it already): it then makes the
    same calls on the same shapes, unless its code branches on state outside the structure;
    the one such state that turns mixing on in practice, a batch norm switched to train mode
    in a submodule, shows in the autograd graph of every call
    (``torchdiv._core.mixing.watch.check_graph``). With detection off (``allowed``), every ``f``
    has passed.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> x = torch.randn(4, 2)
        >>> passed_before(net, x, 1)
        >>> passed(net, x, 1, verdict=Verdict(for_any_x=True, for_any_held=True))
        >>> passed_before(net, x, 1), passed_before(net, x[:3], 1)
        (Passed(plain=True, reverse=True, chain=True), None)
    """
    at = at or structure(f, x, batch_dims)
    found: Passed | None = _PASSED.get(*at)
    loose = _loose(at)
    if found is None and loose is not None:
        found = _PASSED.get(*loose)
    if found is None and allowed():
        found = Passed()
        _PASSED.put(*at, found)
    return found if found is None or found.current() else None


def passed(
    f: Any,
    x: torch.Tensor,
    batch_dims: int,
    at: Structure | None = None,
    plain: bool = True,
    reverse: bool = True,
    *,
    verdict: Verdict,
) -> None:
    """``f`` was watched at the structure of ``x`` (``at``, if made already) and did not mix
    samples; not ``plain``: its evaluation showed an op ``SafeDerivatives`` changes; not
    ``reverse``: ``torch.func``'s reverse mode could not run it (``Passed``). ``verdict``,
    the watch's (``BatchAxes.verdict``, or ``verdicts`` of evaluations another function
    watched; required, so that no caller keeps a pass its watch said holds for those values
    only), says for which other calls it holds: none where values reached Python or
    indices were read along the batch after values decided something (``for_any_x``: those
    indices may come from ``x``, a radius graph built inside ``f`` over a flattened batch,
    ``nonzero(cdist(p, p) < r)``, within each sample at one call, across samples at the next,
    unwatched until a review found it), so every call is watched; any values of the floating
    tensors ``f`` holds (``Held``) where no value decided anything (``for_any_held``); any
    ``x`` while the parameters whose values alone reached Python stay as they were
    (``Verdict.while_held``: ``passed_before`` finds the pass only then); indices read along
    the batch only where the key holds each of them (``Verdict.indexed_by``, ``_holds``)."""
    held = _owned(f, verdict.kept())
    indices = _holds(f, verdict.indexed_by)
    if held is None or indices is None:
        return
    if verdict.numbers:
        objects = _objects(f)
        numbers = None if objects is None else Numbers.of([*_modules(f), *objects])
        if numbers is None:
            return
        held += (numbers,)
    at = at or structure(f, x, batch_dims)
    found: Passed | None = _PASSED.get(*at)
    if found is None:
        found = Passed(plain, reverse)
        _PASSED.put(*at, found)
    found.plain, found.reverse = found.plain and plain, found.reverse and reverse
    found.held = held + indices  # (this watch's: one made at stale versions found no pass)
    loose = _loose(at) if verdict.for_any_held else None
    if loose is not None and _PASSED.get(*loose) is None:
        _PASSED.put(*loose, found)


def _owned(f: Any, held: tuple[Kept, ...] | None) -> tuple[Kept | Owned | Numbers, ...] | None:
    """``held`` (``Verdict.kept``: tensors held before the call a factorization read, or the
    tensor it read was built from), each with the places the modules ``f`` reaches hold it
    in (``Owned``: a parameter, buffer or plain tensor attribute), or as itself where
    ``f``'s ``identity`` holds it by identity instead (a closure cell's, default's or
    global's: replaced, another structure); ``None`` (no pass for other ``x``) if ``held``
    is, or where one is held neither way (a replacement would go unseen: a plain object's
    attribute, a tensor made in ``f`` without an op, ``torch.tensor(...)``), and where ``f``
    names a plain object that holds a weight its modules hold too (``_aliased``)."""
    if not held:
        return held
    f = unwrapped(f)
    keyed: set[int] = set()
    if not inspect.ismethod(f):
        values: list[tuple[Hashable, int]] = []
        others: set[int] = set()
        if _identity(f, 3, values, others)[0] is not f:
            keyed = {hash(same) for same, _ in values} | others  # (``Same``: its object's id)
    places: dict[int, list[tuple[Any, str, str]]] = {}
    aliased = _aliased(f)  # (tensors a plain object f names holds: read from there, maybe)
    if aliased is None:  # (an object deeper: any tensor may be read from there)
        return None
    for m in _modules(f):
        own = vars(m)
        for where, tensors in (("_parameters", m._parameters), ("_buffers", m._buffers), ("", own)):
            for name, t in tensors.items():
                told = where or type(t) is torch.Tensor
                if isinstance(t, torch.Tensor) and told and id(t) not in aliased:
                    places.setdefault(id(t), []).append((weakref.ref(m), where, name))
    found: list[Kept | Owned | Numbers] = []
    for kept in held:
        t = kept.ref()
        if t is not None and id(t) in places:
            found.append(Owned(tuple(places[id(t)]), kept))
        elif t is not None and id(t) in keyed:
            found.append(kept)
        else:
            return None
    return tuple(found)


def _holds(f: Any, indices: tuple[tuple[Kept, Kept | None], ...]) -> tuple[Kept, ...] | None:
    """Those of ``indices`` (integer tensors as they were read, each with the tensor it is a
    view of: ``Verdict.indexed_by``) that ``f``'s structure key (``structure``) holds by
    identity, each still as it was read (one ``f`` wrote after reading it is not), or else
    the tensor it is a view of (``edges[0]`` of a buffer ``edges``: the view's place in it
    follows from ``f``'s code): one its ``identity`` tells (a closure cell's, default's or
    global's, in tuples and nested functions), or a buffer, plain tensor attribute or
    tensor in a container (``cache.contained_tensors``: ``self.edges = (senders,
    receivers)``) of a module it reaches (``cache.named``; ``cache._tensor``) but one a plain
    object ``f`` names holds too (``_aliased``); ``None`` if one is held neither way. A
    neighbour list elsewhere (a plain object's ``self.edges``, a closure dict's entry, PyG's
    ``Data``) may be rebuilt across samples at the same shapes, unseen by the key: ``f`` is
    then watched at every call. The pass keeps the ones returned (``Passed.current``)."""
    if not indices:
        return ()
    found: set[int] = set()
    f = unwrapped(f)
    if not inspect.ismethod(f):
        values: list[tuple[Hashable, int]] = []
        if _identity(f, 3, values, found)[0] is f:
            found.clear()  # (not told by what it holds: none of it is in the key)
    aliased = _aliased(f)  # (tensors a plain object f names holds: read from there, maybe)
    if aliased is None:  # (an object deeper: any index may be read from there)
        return None
    for m in _modules(f):
        tensors = [*m._buffers.values(), *vars(m).values(), *contained_tensors(m)]
        found |= {id(t) for t in tensors if type(t) is torch.Tensor and id(t) not in aliased}
    kept: list[Kept] = []
    for index, base in indices:
        for one in (index, base):
            if one is not None and one.current() and id(one.ref()) in found:
                kept.append(one)
                break
        else:
            return None
    return tuple(kept)


def _modules(f: Any) -> Iterator[torch.nn.Module]:
    """Every module under those ``f``'s structure key holds: ``f`` itself, or what it reaches
    (``cache.named``), with their submodules and the modules their containers hold
    (``cache.walked``: a module in a plain list, whose numbers ``Numbers`` holds too; a
    module reached twice: twice)."""
    for reached in [f] if isinstance(f, torch.nn.Module) else named(f):
        if instance(reached, torch.nn.Module):  # (a proxy raising: no)
            yield from walked(reached)


def _loose(at: Structure) -> Structure | None:
    """``at`` with any floating values its function holds (``Held.values``), or ``None`` if
    it holds none: where ``passed`` keeps what passed for all of them."""
    held, key = at[1]
    if not isinstance(held, Held) or not held.values:
        return None
    return at[0], (Held(held.key, ()), key)


def structure(f: Any, x: torch.Tensor, batch_dims: int) -> Structure:
    """``f`` (``identity``) and ``cache.structure_key``; a bound method (a new object at every
    attribute access, ``model.forward``) by its object, its function in the key (weakly: the
    function of a class made at every call held what it closes over as long as the key was
    kept). Only torchdiv's own wrappers are unwrapped (``checks.unwrapped``): two wrappers of
    one function (``functools.wraps``) may compute different things."""
    f = unwrapped(f)
    key = structure_key(f, x, batch_dims)
    if isinstance(f, types.MethodType):  # (``inspect.ismethod``, a Python call fewer)
        func = f.__func__
        with contextlib.suppress(TypeError):  # (an object without weak references: as it is)
            func = weakref.ref(func)
        return None if key[0] is UNTOLD else f.__self__, (func, key)
    site, held = identity(f)
    if key[0] is UNTOLD or (site is f and isinstance(f, (types.FunctionType, functools.partial))):
        # what it holds is not told (``identity``: a list of more than ``TUPLE_ITEMS`` items,
        # nested too deep, a set; ``structure_key``: such an item in a module's container):
        # no site, nothing kept for it (a kept ``f`` was served by its pass whatever such a
        # list came to hold, ``structure_key`` holding none of its items, until
        # rev-merges19e; a module's, until keyattrs20), so it is watched at every call
        site = None
    return site, (held, key)


def shape_key(at: Structure) -> Hashable:
    """The key of ``at`` (``structure``) without what tells one ``f`` from another with the
    same code (``identity``'s values, a bound method's function): ``cache.structure_key``
    alone, for a cache of decisions kept per code object that functions with the same code
    share (a lambda made anew over another time ``t`` at every step of an ODE solve, or a
    training loop's new tensor, must find the decision kept: keyed by ``identity`` too,
    the Laplacian recorded ``f`` again at every such call only to decide the same loop)."""
    return at[1][1]


def identity(f: Any, depth: int = 3) -> tuple[Any, Hashable]:
    """``f`` as a site and a key for ``_PASSED``: ``f`` itself and ``()``, or for a plain
    Python function its code, and as the key what the code computes with (``Held``): what
    its closure cells, default arguments and the globals it names hold, each object by
    identity (weakly; a tensor also by its version: an index tensor or a branch on values
    can decide whether ``f`` mixes samples), a number, string or ``None`` by value, a tuple
    or a function by this same rule. A lambda written in a loop (``divergence(lambda z:
    net(z), x)``: a new object at every call, closing over the same ``net``) is then one
    function, watched once rather than at every call (0.46 ms of a 1.0 ms divergence at 2
    inputs), also over a ``device`` or ``dtype`` (by value, ``_VALUES``); one closing over
    anything else (another model, config, index tensor or threshold) is another, except
    where only the floating tensors it holds differ, by values (``Held.values``), and its
    watch saw no values decide anything (``Verdict.for_any_held``: a lambda over the time
    ``t`` of an ODE step). A held object that cannot be told so keeps ``f`` as it is: one
    without weak references (a list), a tensor without a version (made under
    ``torch.inference_mode``), a tuple of more than ``TUPLE_ITEMS`` items or nested more than
    ``depth`` deep (walked at every call).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> make = lambda: (lambda z: net(z))
        >>> identity(make()) == identity(make()), identity(make()) == identity(lambda z: z)
        (True, False)
    """
    values: list[tuple[Hashable, int]] = []
    site, held = _identity(f, depth, values)
    if site is f:
        return site, held
    return site, Held(held if len(values) < 2 else (held, _same_as(values)), tuple(values))


def _same_as(values: list[tuple[Hashable, int]]) -> tuple[int, ...]:
    """Which of the floating tensors ``identity`` found (``values``) are one object: for
    each, the place of the first that is (a branch on ``a is b``, no value read, decides
    alike for every value, not for every pairing)."""
    firsts: dict[Hashable, int] = {}
    return tuple(firsts.setdefault(same, i) for i, (same, _) in enumerate(values))


class Held(NamedTuple):
    """What a function computes with (``identity``): ``key``, each floating tensor in it (a
    dense ``torch.Tensor`` or ``Parameter``; a subclass or sparse one is told by identity and
    version as an integer one, as is one with Python attributes) by its dtype, shape, strides,
    device and whether it requires grad, with which of them are one object where several
    (``_same_as``), and those tensors by identity and version (``values``)."""

    key: Hashable
    values: tuple[Hashable, ...]


def _identity(
    f: Any, depth: int, values: list[tuple[Hashable, int]], others: set[int] | None = None
) -> tuple[Any, Hashable]:
    """``identity`` without ``Held``: the floating tensors' identities go to ``values``, the
    ids of the others it tells by identity and version to ``others`` (``_holds``)."""
    if type(f) is functools.partial and depth:
        return _partial(f, depth, values, others)
    if not isinstance(f, types.FunctionType) or depth == 0:
        return f, ()
    found, held = _named(f)
    parts = tuple(_part(v, depth, values, others) for v in held)
    if any(p is None for p in parts):
        return f, ()
    return f.__code__, (found, tuple(f.__kwdefaults__ or {}), parts)


def _partial(
    f: functools.partial[Any],
    depth: int,
    values: list[tuple[Hashable, int]],
    others: set[int] | None,
) -> tuple[Any, Hashable]:
    """``_identity`` of a ``functools.partial`` (``partial(model, t=t)`` made anew at every
    step was watched at every call until leftovers19): the site of its function (a module,
    a function's code, or the function itself where it cannot be told by what it holds) and,
    as the key, that function's key and its arguments' (``_part``; keywords by name)."""
    site, held = _identity(f.func, depth, values, others)
    args = tuple(_part(v, depth, values, others) for v in f.args)
    keywords = tuple(_part(v, depth, values, others) for v in f.keywords.values())
    untold = site is f.func and isinstance(site, (types.FunctionType, functools.partial))
    if untold or any(p is None for p in (*args, *keywords)):
        return f, ()
    return site, (functools.partial, held, args, tuple(f.keywords), keywords)


def _named(f: types.FunctionType) -> tuple[tuple[str, ...], list[Any]]:
    """The globals ``f``'s code names (those bound), and what ``f`` holds: its closure
    cells' contents, its default arguments and those globals' values (``_identity``)."""
    names = f.__globals__
    found = tuple(n for n in global_names(f.__code__) if n in names)
    held: list[Any] = [_cell(c) for c in f.__closure__ or ()]
    held += [*(f.__defaults__ or ()), *(f.__kwdefaults__ or {}).values()]
    return found, held + [names[n] for n in found]


_EMPTY = object()  # an empty closure cell (a name bound later)
# the types ``identity`` tells by value: immutable, hashable, equal only where they compute
# alike; PyTorch's own too (no weak references: a lambda over the training loop's ``device``
# or ``dtype``, ``lambda z: net(z.to(device))``, was watched at every call)
_VALUES = frozenset(
    (bool, int, float, complex, str, bytes, type(None), type(Ellipsis), range, torch.dtype)
) | {torch.device, torch.layout, torch.memory_format}


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:
        return _EMPTY


def _part(
    v: Any, depth: int, values: list[tuple[Hashable, int]], others: set[int] | None = None
) -> Hashable | None:
    """How ``identity`` tells one held object: ``None`` where it cannot."""
    if type(v) in _VALUES:
        return type(v), v
    kind = type(v)
    if by_items(v):
        if size(v) > TUPLE_ITEMS and not _tensors(v):
            return None
        items = [*v, *v.values()] if kind is dict else v  # (a dictionary's keys too)
        told = kind if kind in (tuple, list, dict) else Same(kind)  # (a named tuple's class)
        if depth == 0:  # (a chain of 5000 nested ones: RecursionError) but for values alone
            flat = all(type(u) in _VALUES for u in items)  # (a shape: ``(name, p.shape)``)
            return (told, tuple((type(u), u) for u in items)) if flat else None
        parts = tuple(_part(u, depth - 1, values, others) for u in items)
        return None if any(p is None for p in parts) else (told, parts)
    if _untold(v):
        return None
    if (isinstance(v, types.FunctionType) or type(v) is functools.partial) and depth > 1:
        site, held = _identity(v, depth - 1, values, others)
        return None if site is v else (Same(site), held)  # (not told: neither is ``f``)
    try:
        same = Same(v)
    except TypeError:  # no weak references
        return None
    if not isinstance(v, torch.Tensor):
        return same
    if v.is_inference():  # no version counter (``_version`` raises): a write is unseen
        return None
    if type(v) not in _LOOSE or v.layout != torch.strided or v.__dict__:
        # (a subclass's Python state, a sparse pattern or an attribute set on a plain tensor,
        # ``t.shift = 1``, may decide)
        return same, v._version
    if not (v.is_floating_point() or v.is_complex()):
        if others is not None:
            others.add(id(v))
        return same, v._version
    values.append((same, v._version))  # (strides: a branch on is_contiguous() reads no value)
    return type(v), v.dtype, v.shape, v.stride(), v.device, v.requires_grad


# the longest container of tensors ``_part`` tells by its items (``_tensors``): a parameter
# dictionary (``functional_call(model, params, (x,))``) or a JAX-style list of ``(W, b)``
# layers holds as many as the model has (a 6-layer ``nn.TransformerEncoder``: 72). Telling
# one costs ~2-7 us a tensor at every call, a watch at every call of an ``f`` not told more
# (a 16-layer MLP's 36 tensors: 3.2 ms of a 4.6 ms divergence at 16 samples of 4 elements;
# ``TUPLE_ITEMS`` bounds the other containers, whose items ``f`` may not read at all)
TENSOR_ITEMS = 1024


def _tensors(v: Any) -> bool:
    """Whether ``v`` (a container ``by_items``) holds at most ``TENSOR_ITEMS`` items, each a
    tensor or a tuple or list of at most ``TUPLE_ITEMS`` tensors (a layer's ``(W, b)``), a
    dictionary's keys strings: ``_part`` tells such a one by its items however long.

    Example:
        >>> _tensors({f"{i}.weight": torch.ones(2) for i in range(40)}), _tensors([0] * 40)
        (True, False)
    """
    if size(v) > TENSOR_ITEMS:
        return False
    if type(v) is dict:
        if not all(type(k) is str for k in v):
            return False
        v = v.values()
    return all(isinstance(u, torch.Tensor) or _layer(u) for u in v)


def _layer(u: Any) -> bool:
    """Whether ``u`` is a tuple or list of at most ``TUPLE_ITEMS`` tensors (``(W, b)``)."""
    return (
        type(u) in (tuple, list)
        and len(u) <= TUPLE_ITEMS
        and all(isinstance(t, torch.Tensor) for t in u)
    )


def _untold(v: Any) -> bool:
    """Whether ``v`` (not told by its items) may change unseen by its identity (``_UNTOLD``):
    until rev-merges19e held by identity, what it came to hold served by a stale pass."""
    try:  # (an unbound proxy's ``__class__``, which ``isinstance`` reads, raises: untold;
        held = isinstance(v, _UNTOLD)  # every call of an ``f`` holding one raised until the
    except Exception:  # lead's thirty-first session; ``_part``'s checks after this one
        return True  # read it again only where it was read here)
    if not held and not hasattr(type(v), "__array_interface__"):
        return False
    if type(v) is not frozenset or len(v) > TUPLE_ITEMS:  # (walked at every call)
        return True
    return not all(type(u) in _VALUES for u in v)


# mutable containers ``_part`` cannot tell by their items (``cache.by_items``: exactly a
# tuple, list or dictionary, or a named tuple) and by identity would not see changed: a set of
# switches, a deque or ``OrderedDict`` of modules, a user's list type, a NumPy array (also in
# a list: leftovers19 made such a list tellable), a frozenset's modules (``cache.named`` does
# not walk it for their flags; one of values alone, ``{"relu", "tanh"}``, by identity):
# ``f`` is not told, watched at every call
_UNTOLD = (tuple, list, dict, set, frozenset, collections.deque)

# the tensors held by their values (``Held.values``) where floating and dense: a subclass may
# decide what ``f`` does by state no op reads (an attribute its ``__torch_function__`` uses)
_LOOSE = frozenset({torch.Tensor, torch.nn.Parameter})
