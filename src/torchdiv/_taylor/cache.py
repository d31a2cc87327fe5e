"""Recordings kept across calls: what ``f`` computes, checked again instead of recorded again.

Recording ``f`` (``capture``) costs far more than evaluating it: every ATen call goes through
the recorder's bookkeeping (references, storages, writes, the batch dimensions of
``torchdiv._mixing``), about 1 ms on top of a 1 ms forward pass of a 3-layer MLP. Along an
ODE solve, or a training loop, ``f`` computes the same calls at every evaluation; only the
values change. So a successful recording is kept as a ``Template``: its structure alone (the
ATen calls in order, which earlier output each reads, the integer, boolean and type arguments,
the shape, dtype, device and ``requires_grad`` of every outside tensor, which calls depend on
``x``), never a tensor. The next time, ``f`` is evaluated under a light mode (``_Checker``)
that compares each call with the template as it runs; if everything matches, it gives the
``Graph`` that ``capture`` would have given, with this evaluation's own arguments and values
(parameters, times, activations: nothing is reused but the structure). On the first
difference (another op, a write to a buffer, a random draw, a changed shape, ``no_grad``
inside ``f``, train mode switching a batch norm to batch statistics) the check hands over to
a recorder, which takes the calls matched so far as recorded and records the rest of this
evaluation (``_Checker.hand_off``): a structure change costs no second evaluation, so state
outside the modules that ``f`` changes (a key/value cache it grows) changes once per call,
and never gives a stale plan. Where no recorder can take over (a lean check while ``f``
runs; an in-place write among the calls matched), ``f`` runs on to its end unwatched, what
it changed outside itself is put back (the buffers it wrote, the random generators), and
the caller records ``f`` again.

What a template certifies is what ``capture``'s analysis derived from structure alone: no
unsupported op, no writes or random draws (graphs with those are never kept), and no mixing of
samples (``torchdiv._mixing`` follows shapes and op arguments, all part of the template; whether
mixing detection is on is part of the key; a graph whose verdict read index values along the
batch, ``x[perm]``, is never kept: a closure's ``perm`` changed in place after the first call
went unwatched). Planning on values (chains, colours) is done again on every call; what a
planner derives from the structure alone may be kept with the template (``Template.derived``).

``PlanCache`` is the store: least recently used entries beyond ``size`` are dropped, entries
are looked up by a *site* (what ``f`` is: the module, or a function's code object) and a key
(shapes and modes), and a site that has been freed is never matched by a new object that
reuses its ``id``. Any plan made from ``f`` at ``x`` may be kept there (``torch.compile``
results too), as long as it is checked, or keyed by everything it depends on.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import pathlib
import sys
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Container, Hashable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from numbers import Integral, Number
from typing import Any

import torch
import torch.nn.modules.module as _module_hooks
from torch._C._functorch import peek_interpreter_stack
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from torchdiv._core.checks import unwrapped
from torchdiv._core.ddp import enter_fsdp
from torchdiv._core.mixing.errors import allowed
from torchdiv._core.mixing.reads import VALUE_FREE
from torchdiv._core.modes import DispatchMode, LiftedHook, checkpointed
from torchdiv._core.script import PROXIES as _PROXIES
from torchdiv._core.script import WEAK_CONTAINERS as _WEAK_CONTAINERS
from torchdiv._core.script import (
    attribute,
    cell_contents,
    global_names,
    instance,
    target,
    weakly_held,
)
from torchdiv._taylor.capture import (
    _BATCH_NORMS,
    _DECOMPOSITIONS,
    Adopted,
    Before,
    Graph,
    Node,
    Ref,
    Storages,
    Strided,
    _facts,
    _random_states,
    _Recorder,
    _storage,
    _written,
    argument,
    capture,
    decomposed_in_place,
    differentiable,
    finished,
    note_rewrite,
    outputs,
    plain,
    put_back,
    recorder_at,
    recording,
    rewritten_by,
    through_view,
    watching,
    written_out_of_place,
)
from torchdiv._taylor.tree import leaves, map_leaves

Function = Callable[[torch.Tensor], Any]


@dataclass(frozen=True)
class Outside:
    """An outside tensor (parameter, buffer, closure) in a template: what it must look like;
    its value is read from each evaluation."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


class Value:
    """A float or complex argument (a time, a scale): a value, read from each evaluation."""


VALUE = Value()
X = Ref(-1)  # x itself


@dataclass(frozen=True)
class _Call:
    """One call of a template, with what a check reads of it made once: whether it reads a
    tensor computed from ``x`` (``touches``; true again whenever its arguments match), whether
    its results may then depend on ``x`` (``touches`` and not ``VALUE_FREE``), and the
    ``Ref`` of each of its results."""

    func: Any
    pattern: tuple[Any, ...]  # the arguments' leaves: Ref, Outside, VALUE or the value itself
    depends: bool
    touches: bool
    may_depend: bool
    outputs: tuple[Ref, ...]


@dataclass(frozen=True)
class Template:
    """The structure of a recorded ``Graph``: no tensors (nothing kept alive). ``derived``
    keeps what a planner made from the structure alone (``torchdiv._structured``'s chain
    routes), by the planner's name, for the graphs checked against it (``Graph.template``)."""

    calls: tuple[_Call, ...]
    output: Ref
    output_shape: tuple[int, ...]
    widest: int
    work: tuple[int, int, int]  # the graph's dependent calls, elements and products
    # checked without the modes that only change ops (``checked``): the recording called
    # none of the functions they change (``Graph.lean``) and no check missed at its site
    lean: bool = True
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class Opaque:
    """An argument compared by nothing (a profiler's ``ScriptObject``, say): never in a
    template."""


OPAQUE = Opaque()


class Handle:
    """A profiler's record-function handle (``torch.profiler.record_function``'s, FSDP2's
    hooks' ``FSDP::pre_forward``), ``_record_function_exit``'s argument: compared by type, as
    it carries no values (compared by nothing, every call of an ``f`` with one, any FSDP2
    module's, was recorded again)."""


HANDLE = Handle()
_HANDLES = frozenset(
    (torch.ops.profiler._record_function_exit.default,
     torch.ops.profiler._record_function_exit._RecordFunction)
)  # fmt: skip
# arguments compared by value (type and ``==``): structure
_PLAIN: tuple[type, ...] = (int, bool, str, type(None), torch.dtype, torch.device)
_PLAIN += (torch.layout, torch.memory_format, torch.Size, Ref)


def _pattern(leaf: Any, func: Any = None) -> Any:
    if func in _HANDLES and isinstance(leaf, torch.ScriptObject):
        return HANDLE
    if isinstance(leaf, torch.Tensor):
        return Outside(leaf.shape, leaf.dtype, leaf.device, leaf.requires_grad)
    if type(leaf) is float or type(leaf) is complex:
        return VALUE
    return leaf if isinstance(leaf, _PLAIN) else OPAQUE


def _same(want: Any, have: Any) -> bool:
    """Whether an argument ``have`` of this evaluation (a tensor of ``f``'s as its ``Ref``)
    fits the template's ``want``."""
    if isinstance(want, Outside):  # field by field: no Outside made at every check
        return (
            isinstance(have, torch.Tensor)
            and have.shape == want.shape
            and have.dtype == want.dtype
            and have.device == want.device
            and have.requires_grad == want.requires_grad
        )
    if want is VALUE:
        return type(have) is float or type(have) is complex
    if want is HANDLE:
        return isinstance(have, torch.ScriptObject)
    return type(want) is type(have) and bool(want == have)  # want is plain (no OPAQUE)


def template(graph: Graph) -> Template | None:
    """``graph``'s structure, or ``None`` if it cannot be checked by structure: an op without
    a rule, writes outside ``f`` or in place, random draws (their outputs are kept), an
    argument that cannot be compared (``OPAQUE``), samples moved along the batch by index
    values (``Graph.indexed``: whether they mix samples depends on the values, which a
    template compares by shape alone)."""
    if graph.unsupported or graph.changed or graph.values is None or graph.indexed:
        return None
    if any(node.kept is not None for node in graph.nodes) or not isinstance(graph.output, Ref):
        return None
    if any(_changes_state(n.func, n.args, n.kwargs) for n in graph.nodes):  # (checks rely on it)
        return None
    if len(graph.values) != len(graph.nodes):
        return None
    # one Ref object per result, shared by the patterns that read it: a check compares
    # the Refs it hands out by identity first
    canonical = {X: X}
    for i, out in enumerate(graph.values):
        canonical.update((Ref(i, j), Ref(i, j)) for j in range(len(out)))
    calls: list[_Call] = []
    for i, n in enumerate(graph.nodes):
        pattern = tuple(
            canonical.get(a, a) if isinstance(a, Ref) else _pattern(a, n.func)
            for a in leaves((n.args, n.kwargs))
        )
        touches = any(isinstance(a, Ref) and (a.node < 0 or calls[a.node].depends) for a in pattern)
        may_depend = touches and n.func not in VALUE_FREE
        outputs = tuple(canonical[Ref(i, j)] for j in range(len(graph.values[i])))
        calls.append(_Call(n.func, pattern, n.depends, touches, may_depend, outputs))
    if any(p is OPAQUE for call in calls for p in call.pattern):
        return None
    work = (graph.dependent_calls, graph.elements, graph.products)
    output = canonical.get(graph.output, graph.output)
    return Template(tuple(calls), output, graph.output_shape, graph.widest, work, lean=graph.lean)


class PlanCache:
    """Plans by site and key, the ``size`` most recently used kept (see the module docstring).
    One thread at a time reads or changes the order (a lock): a look-up's move to the end met
    another thread's eviction of the entry, and raised ``KeyError``.

    Example:
        >>> cache = PlanCache(2)
        >>> net = torch.nn.Linear(2, 2)
        >>> cache.put(net, ("float32",), "plan")
        >>> cache.get(net, ("float32",)), cache.get(net, ("float64",))
        ('plan', None)
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[int, Hashable], tuple[weakref.ref[Any], Any]] = (
            OrderedDict()
        )
        self._lock = threading.RLock()  # (re-entrant: a finalizer run by a collection inside)

    def get(self, site: Any, key: Hashable) -> Any:
        """The plan stored for ``site`` and ``key``, or ``None`` (always inside a
        non-reentrant checkpoint: ``checkpointed``)."""
        if checkpointed():
            return None
        with self._lock:
            entry = self._entries.get((id(site), key))
            if entry is None or entry[0]() is not site:  # freed, its id now another object's
                return None
            self._entries.move_to_end((id(site), key))
            return entry[1]

    def put(self, site: Any, key: Hashable, plan: Any) -> None:
        """Keep ``plan`` for ``site`` and ``key`` (nothing if ``site`` cannot be weakly
        referenced: a freed site's ``id`` could then match a new object, nor inside a
        non-reentrant checkpoint: ``checkpointed``)."""
        if checkpointed():
            return
        try:
            ref = weakref.ref(site)
        except TypeError:
            return
        with self._lock:
            self._entries[(id(site), key)] = (ref, plan)
            self._entries.move_to_end((id(site), key))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class Refusals:
    """The structures at which a recording engine found no rule for an op of ``f``
    (``Graph.unsupported``: an FFT, a write into shared memory, a backward pass inside ``f``),
    each with what ``"auto"`` ran instead, by ``where`` (the caller's ``site``) and
    ``refusal_key``: a later call there runs that without recording ``f`` again (an FNO's
    recording cost ~13 ms per call, thrown away at every call). Only a refusal by the ops
    alone belongs here: a rule failing on values (``c ** x`` with ``c <= 0``) is tried again.
    The engine run instead must watch every call for sample mixing, as the recording did.

    Only a site with a refusal makes the key (10-25 us) to look a call up; any other call
    costs one dictionary look-up.

    Example:
        >>> refusals = Refusals()
        >>> net = torch.nn.Linear(2, 2)
        >>> x = torch.randn(4, 2)
        >>> refusals.put(net, net, x, 1, "the generic engines")
        >>> refusals.get(net, net, x, 1), refusals.get(net, net, x[:, :1], 1)
        ('the generic engines', None)
    """

    def __init__(self, size: int = 256) -> None:
        self._found = PlanCache(size)
        self._sites = PlanCache(size)  # True for each site with a structure in ``_found``

    def get(self, where: Any, f: Function, x: torch.Tensor, batch_dims: int) -> Any:
        """What ``put`` kept for ``f`` at ``x`` under ``where``, or ``None`` (``where`` is
        ``None``, or Dynamo traces the call)."""
        if where is None or torch.compiler.is_compiling() or not self._sites.get(where, None):
            return None
        return self._found.get(where, refusal_key(f, x, batch_dims))

    def put(self, where: Any, f: Function, x: torch.Tensor, batch_dims: int, plan: Any) -> None:
        """Keep ``plan`` (what runs instead of the recording) for ``f`` at ``x``."""
        self._found.put(where, refusal_key(f, x, batch_dims), plan)
        self._sites.put(where, None, True)


def refusal_key(f: Function, x: torch.Tensor, batch_dims: int) -> Hashable:
    """What a refusal (``Refusals``) depends on: ``structure_key`` of the caller's ``f`` (the
    modules it holds or reaches, their train modes, flags, functions, hooks and which
    parameters require grad; ``x``'s shape, dtype, device, batch dimensions, grad mode) and
    the identity and dtype of every parameter of those modules (a parameter replaced or
    cast: recorded again). A closure's plain tensors are values: one changed still finds the
    refusal, which at worst costs speed (the engines run instead are exact for every ``f``)."""
    f = unwrapped(f)
    # (a proxy raising: no module, ``_module``)
    modules = [f] if isinstance(f, torch.nn.Module) else [m for m in named(f) if _module(m)]
    parameters = tuple((id(p), p.dtype) for m in modules for p in m.parameters())
    return structure_key(f, x, batch_dims), parameters


RECORDINGS = PlanCache(64)


def site(f: Any) -> Any:
    """What identifies ``f`` across calls: a module itself; a function (or bound method) by its
    code, so that a lambda written in a loop, a new object each time, is found again."""
    if isinstance(f, torch.nn.Module):
        return f
    code = attribute(attribute(f, "__func__") or f, "__code__")
    return f if code is None else code


def structure_key(f: Any, x: torch.Tensor, batch_dims: int) -> tuple[Hashable, ...]:
    """``key`` of ``x`` and, for a module ``f``, which submodules it holds (a swapped one is
    another object), each one's flags (its train mode, ``if self.mix:``: ``_held``), the
    functions it holds (a replaced ``forward``) and
    forward hooks (and those of every module), and which of their parameters require
    grad: what an ``f``'s computation depends on, as far as it
    can be told without running it. For any other callable, the same of every module it
    reaches (``named``: ``lambda x: model(x)`` after ``model.train()`` is another structure),
    which object each other callable it reaches is (a rebound closure, ``torch.tanh`` for
    ``torch.flipud``), and the value of each flag it reaches (``_FLAGS``: ``if mix:``,
    ``mean(dim)``). Floats (a time, a scale) and tensors are values, not structure; so are
    the integers an object holds (``_MODULE_FLAGS``), but not those of a module's containers
    (``_contained``). Led by ``UNTOLD`` where such a container holds what it cannot tell."""
    hooks = _global_hooks()
    if isinstance(f, torch.nn.Module):
        return (*_held(f), *hooks, key(x, batch_dims))
    return (*_reached(f), *hooks, key(x, batch_dims))


def _global_hooks() -> tuple[Any, ...]:
    """The forward hooks registered for every module (``register_module_forward_hook``, its
    pre-hook too), by their handles' ids; ``()`` without any. Not torchdiv's own, which a
    call under a process group registers (``_core.ddp.enter_fsdp``), nor a module tracker's
    lifted while a call runs (``_core.modes.LiftedHook``: each ``FlopCounterMode`` entered
    was another structure, watched again)."""
    pre, post = _module_hooks._global_forward_pre_hooks, _module_hooks._global_forward_hooks
    if not (pre or post):  # (the usual case: two comprehensions fewer at every call)
        return ()
    users = [k for k, hook in pre.items() if hook is not enter_fsdp and not _lifted(hook)]
    after = [k for k, hook in post.items() if not _lifted(hook)]
    return ((*users, None, *after),) if users or after else ()


def _lifted(hook: Any) -> bool:
    """Whether a global module hook is a tracker's, lifted while a call runs."""
    return isinstance(hook, LiftedHook)


class Same:
    """An object by identity, held weakly: equal only to a ``Same`` of that very object, while
    it lives (a freed object's ``id`` taken by a new one is another object)."""

    __slots__ = ("_id", "_ref")

    def __init__(self, obj: Any):
        self._ref = weakref.ref(obj)
        self._id = id(obj)

    def __hash__(self) -> int:
        return self._id

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Same) or other._id != self._id:
            return False
        obj = self._ref()
        return obj is not None and obj is other._ref()


# the types of the objects a key holds by value: what a branch or an axis in ``f`` reads (a
# set: ``type(v) in`` it costs half of a tuple's, read for every attribute of every module);
# a module's own are read without ``int``: a count kept in ``forward`` (``self.nfe += 1``,
# torchdiffeq's examples) would make every call a new structure, watched and recorded again
# (1.4-1.9x the time of a tiny call)
_FLAGS = frozenset((bool, int, str, type(None)))
_MODULE_FLAGS = frozenset((bool, str, type(None)))
# but a module's own numbers, by type and value (``True == 1 == 1.0``): an integer or a float
# that sets an index or a branch (``h.roll(int(self.shift), 0)``, ``h.mean(self.dim)``, ``if
# self.alpha > 0.5:``), changed, was served by the pass of the old value until keyleft21; a
# count kept in ``forward`` (``self.nfe += 1``) or a time set on the module at every call
# makes every call another structure, watched again
_MODULE_NUMBERS = frozenset((int, float, complex))
# the functions a module holds as attributes, by identity (weakly): one put in place of its
# method (``net.forward = g``: a forward that mixes samples went unwatched) or held as one
# (``self.act = torch.tanh``, swapped for ``torch.flipud``); with the flags, what ``_held``
# keeps of a module's own attributes
_MODULE_FUNCTIONS = frozenset((types.FunctionType, types.MethodType, types.BuiltinFunctionType))
# (a bound method by what it is bound to too, ``_item``: another module's, a plain object's,
# ``self.act = helper.apply``, whose ``helper.shift`` set went unseen until keyleft21)
_PLAIN_FUNCTIONS = frozenset((types.FunctionType, types.BuiltinFunctionType))
# and the plain tensors it holds as attributes (``_tensor``)
_MODULE_HELD = _MODULE_FLAGS | _MODULE_NUMBERS | _MODULE_FUNCTIONS | {torch.Tensor}
# and the containers it holds, told by their items (``_contained``; a ``functools.partial``
# too, by its function and arguments): ``self.ops = [torch.tanh, torch.sin]`` with a function
# swapped for a roll of the batch, a flag set in ``self.cfg = {"centre": False}``, a module
# held in a plain list set to mix were served by the first call's pass until keyattrs20
_MODULE_CONTAINERS = frozenset((list, tuple, dict, types.SimpleNamespace, functools.partial))


def _tensor(t: torch.Tensor) -> Hashable:
    """A module's buffer or plain tensor attribute in ``_held``'s key: an integer or boolean
    one (an index, a mask) by identity, weakly (``Same``), and, unless a scalar, its version
    (writes in place count: ``self.perm.copy_(p)``, ``load_state_dict``, ``idx[0] = 3``): one
    put in place of another, ``net.perm = torch.randperm(n)`` read as ``y[self.perm]``, or
    rewritten, moves samples along the batch. A scalar is a count (batch norm's
    ``num_batches_tracked``, ``self.step += 1`` in ``forward``): by its version, every call
    would be a new structure, watched again (2.2x the time of a D = 2 divergence through a
    train-mode batch norm under ``allow_batch_interaction``). A floating one by its dtype and
    shape, its values being values (``weight_norm``'s weight, computed anew before every
    forward, would make every call a new structure; changed in place: batch norm's running
    statistics, spectral norm's power iteration). An inference tensor keeps no version. A
    boolean scalar is a switch, not a count (``register_buffer("centre", torch.tensor(False))``
    loaded by ``load_state_dict``: served by its old value's pass until rev-merges25b): by
    its version."""
    if t.is_floating_point() or t.is_complex():
        return t.dtype, t.shape
    if (not t.dim() and t.dtype is not torch.bool) or t.is_inference():
        return Same(t)
    return Same(t), t._version


def _reached(f: Any, depth: int = 3) -> tuple[Any, ...]:
    """``_held`` of the modules ``f`` reaches (``named``), each module once, the flags it
    reaches by value and the other callables, ``depth`` levels down: functions and classes
    weakly (equal to another only while alive: a global function defined again, a notebook
    cell run again, took the ``id`` of one freed before, and a key that held the ``id`` found
    the old one's entries: its sample mixing went unwatched), the others by ``id``."""
    out: list[Any] = []
    untold = False
    for held in named(f, depth):
        if _module(held):
            try:  # (a stand-in that is not one; ``try``, not ``contextlib.suppress``: three
                found = _held(held)  # Python calls fewer per module, at every call)
            except Exception:
                continue
            untold = untold or found[0] is UNTOLD or _standing_in(held)
            out += found
        elif type(held) in _FLAGS:
            out.append(held)
        elif instance(held, _WEAKLY):
            out.append(weakref.ref(held))
        else:  # (one whose class cannot be read: untold, ``unread``; a proxy's target not
            untold = untold or held is UNTOLD or unread(held)  # read: ``named``)
            out.append(id(held))
    return (UNTOLD, *out) if untold else tuple(out)


_WEAKLY = (types.FunctionType, type)  # hashed and compared by identity, weakly referenced


def named(f: Any, depth: int = 3) -> Iterator[Any]:
    """What ``f`` reaches (``_contents``: a function's closure cells, default arguments and
    the globals its code names; a partial's function and arguments; a bound method's object;
    a callable object's attributes), and what the callables among those reach, ``depth``
    levels down: the modules (each once), the other callables and the flags (``_FLAGS``).
    Only functions, partials, methods, callable objects and plain objects (``_plain_object``)
    are looked into, by their ``__dict__`` (never ``getattr``: a config whose
    ``__getattr__`` raises, a proxy); modules by ``_held``."""
    seen: set[int] = set()  # callables, containers and modules already given
    todo = [(f, depth, False)]  # (what, levels left, a container an object holds)
    while todo:
        fn, left, owned = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        items = by_items(fn)  # (its flags: see _CONTAINERS)
        # (an object's containers: none of its own in ``identity``'s key, see _CONTAINERS)
        owned = owned if items else not instance(fn, (types.FunctionType, functools.partial))
        for held in _items(fn) if items else _contents(fn):
            # a weak reference, proxy or weak container read as what it stands for (dead:
            # ``None``; ``_dereferenced``): a function swapped in a global that a proxied
            # function names was served the old one's pass; a reference by its ``id`` too,
            # as before rev-late32 (what it refers to may be what ``named`` does not read)
            if type(held) in _WEAK:
                if type(held) in _REFERENCES:
                    yield held
                held = _dereferenced(held)
                if type(held) in _PROXIES:  # (its target unread: ``referent``)
                    yield UNTOLD
                    continue
            if type(held) in _FLAGS:
                if not items or (owned and type(held) in _MODULE_FLAGS):
                    yield held
            elif by_items(held):
                if left and size(held) <= TUPLE_ITEMS:
                    todo.append((held, left - 1, owned))
            elif _module(held):
                if id(held) not in seen:
                    seen.add(id(held))
                    yield held
            elif callable(held):  # a class too, by its id, looked into where the user's
                yield held  # (``_read_class``)
                if left and (not instance(held, type) or _read_class(held)):
                    todo.append((held, left - 1, False))
            elif unread(held):  # (not callable: ``_reached`` tells the key untold)
                yield held
            elif left and _plain_object(held):  # (a trainer's ``self``, a ``TrainState``)
                todo.append((held, left - 1, False))


def _dereferenced(v: Any) -> Any:
    """What the weak reference, proxy or container of weak references ``v`` (``_WEAK``) holds,
    for ``named``: a proxy's target (``referent``), a reference's (``None``: dead), a
    ``WeakMethod``'s method as its object and function (the bound method is made anew at
    each read: by its ``id``, every call another structure), a container's items as a list,
    its references read so (its first ``TUPLE_ITEMS`` and one: a longer one is not read,
    as a longer list is not). Until rev-late32 a reference was told by its ``id``, and a
    container by its references' (a ``WeakSet``'s not at all): ``net.mix = True`` or
    ``net.train()`` behind one kept the key, the old pass served (divergence silently off)."""
    if type(v) in _WEAK_CONTAINERS:  # (past ``TUPLE_ITEMS``: not read, as a longer list)
        held = list(itertools.islice(weakly_held(v), TUPLE_ITEMS + 1))
        if len(held) > TUPLE_ITEMS:
            return held
        return [_dereferenced(u) if type(u) in _WEAK else u for u in held]
    if type(v) is weakref.WeakMethod:
        method = target(v)
        return None if method is None else (method.__self__, method.__func__)
    return target(v)


_REFERENCES = frozenset((weakref.ref, weakref.KeyedRef, weakref.WeakMethod))
# the weak references, proxies and containers of weak references ``named`` reads through
# (``_dereferenced``; exactly these types: the most met, one lookup at each item)
_WEAK = _REFERENCES | _PROXIES | frozenset(_WEAK_CONTAINERS)


# the containers ``named`` looks into for modules and callables (exactly these types: a
# subclass may compute its items), of at most ``TUPLE_ITEMS`` items: an ODE function's list of
# layers, a dictionary of modules, a partial's list argument (a mixing module swapped into one,
# a flag set on a module in one: served by the first call's pass until leftovers19). Not their
# numbers, strings or length (``mixing.identity`` tells those by value, where it tells ``f``):
# a list ``f`` appends to at every call (``calls.append(...)``) would make every call another
# refusal key (``refusal_key``), recorded again only to be refused again. But the ``bool``,
# ``str`` and ``None`` items (``_MODULE_FLAGS``) of those a callable object or a bound
# method's object holds: ``identity`` holds such an ``f`` by itself, so its key is this one
# alone (a switch set in ``self.opts = {"mix": False}`` was served by the first call's pass
# until rev-merges19e; its integers are left out as its own integer attributes are)
_CONTAINERS = frozenset((tuple, list, dict))
# the longest container ``named`` and ``mixing.identity`` tell by their items (each ~0.8 us at
# every call: a lambda naming a global tuple of 10k integers spent 7.8 ms a call telling it)
TUPLE_ITEMS = 32


def by_items(v: Any) -> bool:
    """Whether ``named`` and ``mixing.identity`` tell ``v`` by its items: a tuple, list or
    dictionary exactly (``_CONTAINERS``), or a named tuple (a tuple subclass iterated as one;
    a named tuple's module set to mix was served by the first call's pass, its flags unread,
    until rev-merges19e)."""
    kind = type(v)
    return kind in _CONTAINERS or (issubclass(kind, tuple) and kind.__iter__ is tuple.__iter__)


def size(v: tuple[Any, ...] | list[Any] | dict[Any, Any]) -> int:
    """How many items a container ``by_items`` accepts holds: a tuple subclass's by
    ``tuple.__len__``, as its own ``__len__`` may raise (e3nn's ``Irrep`` and ``Irreps``: a
    Gate, or a function closing over irreps, crashed with ``NotImplementedError`` until
    rev-merges20d)."""
    return tuple.__len__(v) if isinstance(v, tuple) else len(v)


def _items(container: tuple[Any, ...] | list[Any] | dict[Any, Any]) -> list[Any]:
    """What a container holds (``named``): a dictionary's keys and values (a tuple subclass's
    items by its iterator: ``size``)."""
    if type(container) is dict:
        return [*container.keys(), *container.values()]
    return [*iter(container)]


def _contents(fn: Any) -> list[Any]:
    """What ``fn`` names (``named``); a bound method's module object, or its function and the
    attributes of a plain object."""
    if instance(fn, types.FunctionType):
        names, code = fn.__globals__, fn.__code__
        held = cell_contents(fn) + [names[n] for n in global_names(code) if n in names]
        return held + list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    if instance(fn, functools.partial):
        return [fn.func, *fn.args, *fn.keywords.values()]
    if instance(fn, types.MethodType):
        own = fn.__self__
        told = _module(own) or unread(own)  # (a proxy unread: held, for ``_reached``)
        return [own] if told else [fn.__func__, *_attributes(own)]
    if instance(fn, type):  # a class of the user's (``_read_class``): its own attributes
        held = _CLASS_DICT(fn).items()  # as a plain object's, told by their types alone, not
        return _kept(  # Python's (``__annotations__``, a dataclass's fields: ~25 us a key)
            [  # (and the plain objects it holds, for their modules: ``Registry.state.net``,
                v  # missed until rev-final32, its ``net.mix = True`` served the old pass)
                for k, v in held
                if (
                    (t := type(v)) in _CLASS_HELD
                    or issubclass(t, _MODULES)
                    or (not callable(v) and _plain_object(v))
                )
                and k[:2] != "__"
            ]
        )
    if not callable(fn):  # a plain object (``_plain_object``): its flags, modules, containers
        return _kept(_attributes(fn))  # (and the modules of the plain objects it holds)
    call = type(fn).__call__  # a callable object's, if in Python
    return [call, *_attributes(fn)] if instance(call, types.FunctionType) else []


def _kept(own: list[Any]) -> list[Any]:
    """What ``named`` reads of a plain object's (or a class's) attributes ``own``: its flags,
    modules and containers, and the modules of the plain objects among them; a weak
    reference, proxy or weak container read as what it refers to (``_dereferenced``: one a
    plain object held was dropped until rev-late32, a module behind it set to mix served the
    old pass; a plain object behind one for its modules alone, as one held itself), a
    reference by its ``id`` too (an integer, as ``_reached`` tells a reference)."""
    refs: list[Any] = []  # (by their ids: ``named`` would read what they refer to again)
    if any(type(v) in _WEAK for v in own):  # (most hold none)
        refs = [id(v) for v in own if type(v) in _REFERENCES]
        own = [_dereferenced(v) if type(v) in _WEAK else v for v in own]
    inner = [v for o in own if _plain_object(o) for v in _modules_in(o)]
    return [v for v in own if type(v) in _FLAGS or _holding(v)] + inner + refs


def _holding(v: Any) -> bool:
    """Whether ``v`` is a module or a container ``named`` looks into for modules."""
    return _module(v) or by_items(v)


def _read_class(cls: Any) -> bool:
    """Whether ``named`` looks into the class ``cls`` (its own attributes, as a plain
    object's: ``Registry.model(z)``, ``Registry.models["flow"](z)``): one of the user's made
    by ``type`` itself (not an ``Enum``, an ``ABC``, an ``autograd.Function``, nor torch's,
    an installed library's or one of more than ``CLASS_ITEMS`` attributes: ``_classes``,
    kept per class). Told by its identity alone until rev-late32: a module it holds swapped,
    or set to mix, was served the old pass."""
    if type(cls) is not type:
        return False
    kind = weakref.ref(cls)
    known = _CLASSES.get(kind)
    classes = known[1] if known is not None and known[0] == id(cls.__mro__) else None
    if classes is None:
        classes = _classes(kind)
    return bool(classes) and classes[0]() is cls


_CLASS_DICT = type.__dict__["__dict__"].__get__  # (a class's namespace, by type's descriptor)
# the attributes of a class ``named`` reads (``_contents``): its flags (not its integers, as a
# plain object's), containers, weak references (``_WEAK``) and modules (a class's methods
# and descriptors, most of it, by one set lookup and one ``issubclass``: ~1 us a class)
_CLASS_HELD = _MODULE_FLAGS | _CONTAINERS | _WEAK
_MODULES = torch.nn.Module


def _module(v: Any) -> bool:
    """Whether ``v`` is a module (a proxy of one too); not where reading its ``__class__``
    raises: a ``weakref.proxy`` whose object is gone, held by a trainer's ``self``, made
    every call through it raise ``ReferenceError`` until rev-merges23c."""
    return instance(v, torch.nn.Module)


def unread(v: Any) -> bool:
    """Whether reading ``v``'s ``__class__`` raises (``instance`` is false for it): a proxy
    whose ``__getattribute__`` raises yet whose type's slots (``__call__``, ``__getitem__``)
    run what it stands for; nothing of that can be told, so a key reaching one is untold,
    ``f`` watched at every call (told by its ``id`` alone, a module or function swapped in
    behind it was served the old one's pass, silently, from the lead's thirty-first session
    until rev-lead31; it had raised before)."""
    try:
        v.__class__  # noqa: B018 (the read is the check)
    except Exception:
        return True
    return False


def _standing_in(v: Any) -> bool:
    """Whether ``v``, a module by ``isinstance``, is a proxy claiming its target's class (a
    hand-written one's ``__class__``, ``wrapt.ObjectProxy``): ``_held`` reads its own type
    and ``__dict__``, the target's state only where forwarded, so its target swapped for a
    module of the same parameters that mixes samples kept the key, the old one's pass served
    (rev-lead31): untold. Not a ``weakref.proxy``, bound to one module for life."""
    kind = type(v)
    return not issubclass(kind, torch.nn.Module) and kind not in weakref.ProxyTypes


def _modules_in(obj: Any) -> list[Any]:
    """The modules among the attributes of ``obj``, a plain object a plain object holds
    (``self.state.model``); none of a module's own (``_held`` reads those)."""
    if _module(obj):
        return []
    values = _attributes(obj)
    try:  # (one call, not ``_module`` per attribute: ~25 us a key with a trainer's state)
        return [v for v in values if isinstance(v, torch.nn.Module)]
    except Exception:  # (a dead ``weakref.proxy`` among them)
        return [v for v in values if _module(v)]


def _plain_object(v: Any) -> bool:
    """Whether ``named`` looks into ``v``, not callable, for the flags and modules its
    attributes and their tuples, lists and dictionaries hold (``self.nets = [g, d]``): an
    object with a ``__dict__`` (a training loop's ``self``, a ``TrainState``, a config), not
    a tensor or a Python module. They are ``f``'s as much as a callable object's: ``lambda
    z: self.model(z)`` in a trainer's method, the model switched to training mode (a
    hand-written batch norm centring over the batch), hooked or rebound after eval calls had
    passed, was served their pass unwatched until rev-train23, as was ``if cfg.centre:``
    set on a configuration a lambda names. Not its functions, nor the plain objects it holds
    (a trainer's optimizer and data loader, their hooks, samplers and the globals of their
    functions: 8 -> 62 us a key; with its modules alone 8 -> 24, as a lambda over the model
    itself) but for their modules (``self.state.model`` set to mix after a pass was served
    it until rev-merges23c; not their flags: a progress bar's postfix set at every step
    would make every call another structure, watched again)."""
    kind = type(v)
    return kind.__dictoffset__ != 0 and not issubclass(kind, (torch.Tensor, types.ModuleType))


def _attributes(obj: Any) -> list[Any]:
    """The values in ``obj``'s ``__dict__`` (none without one, or where reading it raises: a
    ``__slots__`` class whose ``__getattr__`` raises ``KeyError``, a proxy), but integers: as
    a module's (``_MODULE_FLAGS``), an object's own are counts as often as switches."""
    attributes = None
    with contextlib.suppress(Exception):
        attributes = obj.__dict__
    if not isinstance(attributes, dict):
        return []
    return [v for v in attributes.values() if type(v) is not int]


def _held(f: torch.nn.Module) -> tuple[Any, ...]:
    """Every module under ``f`` (``f`` included) as its id, type (a freed submodule's id may
    come back, on another module), flags (``_MODULE_FLAGS``: the train mode, as
    ``model[0].train()`` alone switches a batch norm to batch statistics, and the switches of
    its ``forward``, ``if self.mix:``), the functions it holds (``_MODULE_FUNCTIONS``: a
    replaced ``forward``), its tensors, buffers (``None`` or a tensor) and plain attributes
    (``_tensor``: ``register_buffer("perm", None)``, then ``net.perm = torch.randperm(n)``
    read as ``y[self.perm]``, mixed samples unwatched), its containers by their items
    (``_contained``; the modules they hold walked as its submodules) and forward hooks (one
    may mix samples), flat, and whether each of their parameters requires grad; ``UNTOLD``
    first where a container held an item ``_contained`` cannot tell. The type as a weak
    reference (equal to another only while its type is alive): held, a class made at every
    call (a model factory's, each ``torch.fx.GraphModule``'s own) stayed alive with what its
    methods close over as long as a cache kept the key.
    One walk of the ``_modules`` and ``_parameters`` dictionaries (a ``torch.jit.trace``d
    module's, whose ``__dict__`` has neither, through its attributes), each module once: a key is
    made at every call of a small problem, where ``named_modules`` and ``parameters`` (two
    walks of generators) cost 10-25 us, and nested tuples a third more than flat ones."""
    held: list[Any] = []
    grads: list[bool] = []
    seen: set[int] = set()
    stack = [f]
    untold: list[bool] = []  # (an item ``_contained`` cannot tell: one entry)
    unread: list[bool] = []  # (``untold`` of an ``_OTHER_VALUES`` item: not read, below)
    walked_classes: set[Any] = set()  # (each class's state once: ``_class_state``)
    while stack:
        m = stack.pop()
        i = id(m)
        if i in seen:  # a module held twice (tied layers): once, as modules() does
            continue
        seen.add(i)
        attributes = m.__dict__
        held.append(i)  # (appended, not a tuple of the three: ~10% of the walk)
        kind = weakref.ref(type(m))
        held.append(kind)
        known = _CLASSES.get(kind)  # (told again where its bases were set since: ``_classes``)
        classes = known[1] if known is not None and known[0] == id(type(m).__mro__) else None
        if classes is None:
            classes = _classes(kind)
        if classes:  # (a class of torch's own: none)
            held += [_class_state(c, stack) for c in classes if c not in walked_classes]
            walked_classes.update(classes)
        buffers = attributes.get("_buffers")
        parameters, children = attributes.get("_parameters"), attributes.get("_modules")
        compiled_with = attributes.get(_COMPILE_KWARGS)
        # its attributes but a module's own (``_MODULE_OWN``: its dictionaries of parameters,
        # buffers and submodules, read below, its hooks' and its set of non-persistent
        # buffers), picked in C: a loop over 3 of a ``Linear``'s 19 (the comprehension over
        # all 19 cost a fifth of the key's walk)
        for name in attributes.keys() - _MODULE_OWN:
            v = attributes[name]
            t = type(v)
            if t in _MODULE_FLAGS:
                held.append(v)
            elif t in _MODULE_NUMBERS:
                held.append((t, v))
            elif t is torch.Tensor:
                held.append(_tensor(v))
            elif t in _PLAIN_FUNCTIONS:
                held.append(weakref.ref(v))
            elif t is tuple and _VALUE_TUPLES.get(id(v)) is v:
                held.append(v)
            elif t is types.MethodType:
                held.append(_item(v, stack, untold, 3))
            elif t in _MODULE_CONTAINERS:
                # (not one of its own dictionaries held again, nor Lightning's record of
                # ``torch.compile``'s arguments, ``_COMPILE_KWARGS``: another type of
                # attribute of that name is told, rev-merges22b)
                own = (parameters, buffers, children, compiled_with)
                if t is not dict or not any(v is d for d in own):
                    held.append(_contained(v, stack, untold))
            # (by its type: ``isinstance`` reads an HF configuration's ``__class__`` through
            # its ``__getattribute__``, in Python)
            elif (
                issubclass(t, _OTHER_VALUES)
                or (issubclass(t, tuple) and hasattr(t, "_fields"))
                or _numpy_bool(t)
            ):
                held.append((name, _item(v, stack, unread, 3)))
        pre, post = attributes.get("_forward_pre_hooks"), attributes.get("_forward_hooks")
        if pre or post:  # by their handles' ids (a counter: never reused)
            held.append((*(pre or ()), None, *(post or ())))
        if parameters is None or children is None:  # a torch.jit.trace'd module's C++ module
            # holds them (KeyError: crashed; its buffers unread, one written in place or
            # replaced moved samples unwatched)
            parameters, children, buffers = m._parameters, m._modules, m._buffers
        if buffers:  # (never a hooks' tuple, of ints)
            held.append(tuple(None if b is None else _tensor(b) for b in buffers.values()))
        if parameters:  # (loops, not comprehensions: a frame fewer each, per module)
            for p in parameters.values():
                if p is not None:
                    grads.append(p.requires_grad)
        if children:
            for c in children.values():
                if c is not None:
                    stack.append(c)
    return (tuple(held), tuple(grads)) if not untold else (UNTOLD, tuple(held), tuple(grads))


# Lightning (imported, it wraps ``torch.compile``) keeps the arguments of ``torch.compile(net,
# **kwargs)`` on ``net`` as ``_compile_kwargs``, a deep copy read only to compile again: a
# backend object there (``backend=Counting()``: a plain object, not told) made every call of
# such a model a structure without a pass kept, watched again (a test's compiled
# model watched twice once another test had imported Lightning, twenty-second session). Not
# part of the key.
_COMPILE_KWARGS = "_compile_kwargs"

# the attributes every module holds that ``_held`` does not read by name (its dictionaries of
# parameters, buffers and submodules, read as such, its hooks' ``OrderedDict``s, its set of
# non-persistent buffers): every other attribute is read, by its type
_MODULE_OWN = frozenset(
    name for name, v in vars(torch.nn.Module()).items() if type(v) not in _MODULE_HELD
)


# what ``_held`` tells of a module's attributes besides those of ``_MODULE_HELD``'s and
# ``_MODULE_CONTAINERS``' types, by name: a dictionary of another type (an ``OrderedDict``, a
# ``defaultdict``, diffusers' ``FrozenDict`` configuration, Lightning's ``AttributeDict``
# hyperparameters: served by the pass of their old items until keyleft21) or a set, by their
# items (``_item``), and as ``_item`` tells them the values of other types (a named tuple, a
# ``frozenset``, an ``Enum`` member, an ``IntEnum``, a NumPy float; ``h.roll(self.cfg.shift,
# 0)`` served by the old value's pass until rev-merges21d). Not a plain object (an HF
# configuration: documented), nor one in such a dictionary (torch's composable API keeps
# FSDP2's state so, an ``OrderedDict`` of ``FSDPState``: a ``None`` in its place, not
# ``UNTOLD``, as for a plain object held). And named tuples: not other tuple subclasses,
# e3nn's ``Irreps`` nested three deep, whose walk at every call doubled a ``Gate``'s key
_OTHER_VALUES = (dict, set, frozenset, range, slice, Enum, Number)


# the classes of a module's type (by a weak reference to it) whose attributes ``_held`` reads
# (``_classes``, weakly: a class made at every call must be freed with its module), kept until
# ``_CLASSES_KEPT`` types, with the ``id`` of the method resolution order they were read from;
# ``()`` for torch's own
_CLASSES: dict[Any, tuple[int, tuple[Any, ...]]] = {}
_CLASSES_KEPT = 4096
# a class of more attributes is a library's base class (HF's ``PreTrainedModel``, Lightning's
# ``LightningModule``: a few hundred); its attributes are not read (documented)
CLASS_ITEMS = 64


def _classes(kind: Any) -> tuple[Any, ...]:
    """The classes of a module's type (``kind``: a weak reference to it) whose attributes
    ``_class_state`` tells, kept in ``_CLASSES`` (as weak references): those of its method
    resolution order but torch's own, ``object`` and those of more than ``CLASS_ITEMS``
    attributes. Kept with the ``id`` of that order (``__bases__`` set makes another: a base
    replaced and freed was read through its dead reference, ``AttributeError`` from every
    later call, and a live one's attributes were read for the new base's: rev-late30)."""
    if len(_CLASSES) >= _CLASSES_KEPT:
        _CLASSES.clear()
    mro = kind().__mro__
    found = tuple(
        weakref.ref(c)
        for c in mro
        if c is not object
        and not str(c.__dict__.get("__module__", "")).startswith(("torch.", "builtins"))
        and len(c.__dict__) <= CLASS_ITEMS
        and not _installed(c)
    )
    _CLASSES[kind] = id(mro), found
    return found


_INSTALLED = ("site-packages", "dist-packages")


def _installed(c: type) -> bool:
    """Whether ``c`` is an installed library's class (its module's file under
    ``site-packages``): its attributes are not read, as torch's are not (HF's BERT layers,
    diffusers' blocks, e3nn's: 18 classes and 130 attributes a BERT call, 87 -> 167 us a
    key, rev-merges21d); the caller's own classes, in a script, a notebook or a repository
    (an editable install too), are."""
    module = sys.modules.get(str(c.__dict__.get("__module__", "")))
    path = str(getattr(module, "__file__", None) or "")
    return any(part in _INSTALLED for part in pathlib.PurePath(path).parts)


def _class_state(ref: Any, stack: list[Any]) -> tuple[Any, ...]:
    """The attributes of a module's class (``ref``: a weak reference to it, ``_classes``), for
    ``_held`` (``stack``: its walk's): what its
    ``forward`` may read as ``type(self).shift`` or ``self.shift``, and its methods
    (``Net.forward = g``): served by the pass of the old ones until keyleft21. Values as
    ``_item`` tells them, functions weakly, containers by their items (by identity where
    they hold what ``_item`` cannot tell: a class's list of patterns), other objects (a
    property, a ``staticmethod``) by identity."""
    return ref, *[
        v
        if (t := type(v)) in _CLASS_VALUES
        else weakref.ref(v)
        if t is types.FunctionType
        else _class_item(v, stack)
        for v in ref().__dict__.values()
    ]


_CLASS_VALUES = frozenset((str, type(None)))  # (its name and documentation: a fast path)


def _class_item(v: Any, stack: list[Any]) -> Any:
    """An attribute of a module's class (``_class_state``): values, containers, bound methods
    and modules as ``_item`` tells them (a module, or a bound method's, walked from
    ``stack``: ``act = helper.apply`` or ``act = Rolled()`` on the class, its ``shift`` set,
    served by the old pass until rev-merges21d), anything else (a property, a
    ``staticmethod``, a container holding what ``_item`` cannot tell) by identity."""
    if type(v) not in _CLASS_TOLD and not issubclass(type(v), torch.nn.Module):
        return id(v)
    untold: list[bool] = []
    told = _item(v, stack, untold, 3)
    return id(v) if untold else told


class Untold:
    """Leads a structure key (``structure_key``) where a module held an item ``_contained``
    cannot tell: no pass is kept for such an ``f`` (``mixing.structure``), so every call of
    it is watched."""


UNTOLD = Untold()

# the items of a module's containers told by value (``_contained``): immutable, equal only
# where they compute alike (an integer too: ``h.roll(self.cfg["shift"], 0)``; counts are
# rarer in containers than as a module's own attributes, and one kept there, ``calls[0] += 1``,
# makes every call another structure, watched again)
_ITEM_VALUES = frozenset(
    (bool, int, float, complex, str, bytes, type(None), type(Ellipsis), range, torch.dtype)
) | {torch.device, torch.layout, torch.memory_format, torch.Size}
# those told with their type: equal to others of other types (``True == 1 == 1.0``)
_TYPED = frozenset((bool, float, complex))
# the items of a configuration told however many (up to ``VALUE_ITEMS``): values and tuples or
# lists (diffusers' ``UNet2DConditionModel`` config, ~100 keys and values with its block types:
# past ``TUPLE_ITEMS``, untold, the model would be watched at every call)
_CONFIGURATION = _ITEM_VALUES | {tuple, list}
_ITEM_FUNCTIONS = _MODULE_FUNCTIONS | {type}  # (by identity, weakly)
_TENSORS = frozenset((torch.Tensor, torch.nn.Parameter))
# the attributes of a class ``_class_item`` tells through ``_item`` (modules too)
_CLASS_TOLD = _ITEM_VALUES | _MODULE_CONTAINERS | {types.MethodType}


# the tuples of values (``_ITEM_VALUES``) ``_contained`` met, by id, each kept alive (so that
# its id is its own): a tuple cannot change, so ``_held`` holds one found here as it is,
# without a call (a convolution's five tuples of sizes: ~3 us a call otherwise)
_VALUE_TUPLES: dict[int, tuple[Any, ...]] = {}
_VALUE_TUPLES_KEPT = 4096
# the longest container of values alone ``_contained`` tells (in C: ~2 us for 1024 integers)
VALUE_ITEMS = 1024


def _contained(v: Any, stack: list[Any], untold: list[bool], depth: int = 3) -> Any:
    """A container a module holds (``_MODULE_CONTAINERS``: ``_held``), or one inside it, in
    the key, by its type and items (``items_of``: tuples, lists, dictionaries with their keys,
    named tuples, ``SimpleNamespace``s, ``functools.partial``s), ``depth`` levels down, each
    item as ``_item`` tells it; ``None`` with a note in ``untold`` where it holds more than
    ``TUPLE_ITEMS`` items or is nested deeper. One of values alone (``_ITEM_VALUES``: a
    convolution's sizes, an LSTM's weight names, a ``torch.fx`` module's line numbers) is
    told without a call per item, up to ``VALUE_ITEMS`` of them, as is one of tensors alone
    (``_tensor`` each)."""
    kind = type(v)
    if issubclass(kind, dict) and dict.__len__(v) > VALUE_ITEMS:  # (not copied: ``items_of``)
        return _told(untold)
    found = items_of(v)
    if found is None or found[0] > VALUE_ITEMS:  # (none longer is told: not a walk of its
        # items' types at every call, 10 ms for a class's table of 100k integers, 6 ms for
        # an ``OrderedDict`` vocabulary of 100k, until rev-merges21d)
        return _told(untold)
    n, items = found
    told = kind if kind in _MODULE_CONTAINERS else weakref.ref(kind)  # (a named tuple's class)
    kinds = set(map(type, items))
    if _ITEM_VALUES.issuperset(kinds):  # (at any depth: nothing below to walk)
        if n > VALUE_ITEMS:
            return _told(untold)
        if not _TYPED.isdisjoint(kinds):
            # (``True == 1``: ``if cfg[0] is True:``, set to 1, was served mixed)
            return told, tuple(iter(items)), tuple(map(type, items))
        if kind is not tuple:
            return told, tuple(iter(items))  # (not ``len``: ``items_of``)
        if len(_VALUE_TUPLES) >= _VALUE_TUPLES_KEPT:
            _VALUE_TUPLES.clear()
        _VALUE_TUPLES[id(v)] = v
        return v
    if not depth:  # (e3nn's ``Irreps`` in a tuple, its ``(mul, (l, p))`` items 4 deep, kept)
        return _told(untold)
    if _TENSORS.issuperset(kinds) and n <= VALUE_ITEMS:
        # (``DistributedDataParallel``'s list of its module's parameters, often more than 32)
        return told, tuple([_tensor(u) for u in items])
    if n > TUPLE_ITEMS and (n > VALUE_ITEMS or not _CONFIGURATION.issuperset(kinds)):
        return _told(untold)
    return told, tuple(
        [
            u
            if (t := type(u)) in _ITEM_VALUES and t not in _TYPED
            else (t, u)
            if t in _TYPED
            else _tensor(u)
            if t is torch.nn.Parameter or t is torch.Tensor
            else _item(u, stack, untold, depth - 1)
            for u in items
        ]
    )


def walked(root: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Every module ``_held`` walks under ``root`` (``root`` too), each once: its submodules
    and the modules its and their containers hold (``_contained``: a module in a plain list,
    a bound method's)."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        stack += [c for c in m._modules.values() if c is not None]
        for v in vars(m).values():
            if type(v) in _MODULE_CONTAINERS:
                _contained(v, stack, [])


def contained_tensors(m: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors in the containers ``m`` holds (``_contained`` holds each in the key, an
    integer one by identity and version, or the key is led by ``UNTOLD``): an index tensor
    kept in ``self.edges = (senders, receivers)``."""
    found: list[torch.Tensor] = []
    todo = [(v, 3) for v in vars(m).values() if type(v) in _MODULE_CONTAINERS]
    while todo:
        v, depth = todo.pop()
        items = items_of(v)
        if items is None or not depth:
            continue
        for u in items[1]:
            if isinstance(u, torch.Tensor):
                found.append(u)
            elif items_of(u) is not None:
                todo.append((u, depth - 1))
    return found


def _item(v: Any, stack: list[Any], untold: list[bool], depth: int) -> Any:
    """An item of a container a module holds (``_contained``): integers, flags, enumerations
    and other immutable values by value (``_ITEM_VALUES``); floats and complex numbers as
    values (by type: a scale, a time, as a module's own); tensors as a module's (``_tensor``);
    functions, bound methods and classes by identity, weakly; a module by its id, put on
    ``stack`` (its flags, submodules and hooks join the key), as is a bound method's module;
    a weak reference by what it refers to (``nn.LSTM``'s to its weights); a container by
    ``_contained``. Anything else (a plain object, a set) is noted in ``untold``: the key
    cannot see it change."""
    kind = type(v)
    if kind in _ITEM_VALUES:
        return v if kind not in _TYPED else (kind, v)  # (``True == 1 == 1.0``: told apart)
    if kind is weakref.ref:
        return kind, _item(v(), stack, untold, depth)
    if isinstance(v, torch.Tensor):
        return _tensor(v)
    if kind in _ITEM_FUNCTIONS:
        own = getattr(v, "__self__", None) if kind is types.MethodType else None
        if isinstance(own, torch.nn.Module):
            stack.append(own)
        elif own is not None and not isinstance(own, type):
            # a plain object's bound method reads that object's state: by its class and
            # attributes (``self.steps = [torch.tanh, helper.apply]`` or ``self.act =
            # helper.apply``, ``helper.shift`` set: served mixed until rev-merges20d and
            # keyleft21), or not told where it has no ``__dict__``
            state = None
            with contextlib.suppress(Exception):  # (a ``__slots__`` class whose
                state = own.__dict__  # ``__getattr__`` raises: crashed until rev-merges21d)
            if type(state) is not dict:
                return _told(untold)
            told = _contained(state, stack, untold, depth)
            return weakref.ref(v), weakref.ref(type(own)), told
        return weakref.ref(v)
    if isinstance(v, torch.nn.Module):
        stack.append(v)
        return id(v)
    if kind in _MODULE_CONTAINERS or by_items(v) or isinstance(v, dict):
        return _contained(v, stack, untold, depth)
    if isinstance(v, Enum) or (kind is frozenset and _ITEM_VALUES.issuperset(map(type, v))):
        return kind, v  # (an ``IntEnum`` member equals its integer)
    if kind is set and len(v) <= VALUE_ITEMS and _ITEM_VALUES.issuperset(map(type, v)):
        return kind, frozenset(v)  # (HF attention's ``self.pruned_heads = set()``)
    if kind is slice and _ITEM_VALUES.issuperset(map(type, (v.start, v.stop, v.step))):
        return kind, v.start, v.stop, v.step  # (e3nn's weight slices)
    if isinstance(v, Integral):  # (a NumPy integer)
        return kind, int(v)
    if isinstance(v, Number):  # (a NumPy float)
        return kind, v
    if _numpy_bool(kind):
        return kind, bool(v)
    if _symbolic(kind):  # (an exported module's ``range_constraints``: ``{s0: VR[0, int_oo]}``)
        return kind, v
    return _told(untold)


def _numpy_bool(kind: type) -> bool:
    """Whether ``kind`` is NumPy's boolean, not a ``numbers.Number`` as its other scalars are:
    a flag read from an array or a data frame (``self.centre = cfg["centre"]``), set to mix
    samples, was served by the pass of its old value until rev-merges25b. NumPy is not
    imported here: where it is not loaded, no such value exists."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and kind is numpy.bool_


def _symbolic(kind: type) -> bool:
    """Whether ``kind`` is one of the immutable values of torch's symbolic shapes, told by
    value (hashable, equal where equal): a SymPy expression or a ``ValueRanges``. A
    ``torch.export``ed module with a dynamic batch holds them in ``range_constraints``; untold,
    its key was led by ``UNTOLD`` and every call watched (``jacobian_diagonal`` 3.8x the
    static export's time, rev-export22). Neither module is imported here: where no such value
    exists, neither is loaded."""
    sympy = sys.modules.get("sympy")
    ranges = sys.modules.get("torch.utils._sympy.value_ranges")
    return (sympy is not None and issubclass(kind, sympy.Basic)) or (
        ranges is not None and kind is ranges.ValueRanges
    )


def _told(untold: list[bool]) -> Hashable:
    """A container or item ``_contained`` cannot tell: noted in ``untold``; ``None``."""
    untold.append(True)
    return None


def items_of(v: Any) -> tuple[int, Any] | None:
    """How many entries ``v`` holds and what ``_contained`` tells it by (``None``: not a
    container it reads): a tuple's or list's items; a dictionary's keys and values, as a
    ``SimpleNamespace``'s; a partial's function, the number of its positional arguments, its
    arguments and keyword names (``partial(g, 1)`` is not ``partial(g, x=1)``)."""
    kind = type(v)
    if kind is tuple or kind is list:
        return len(v), v
    if kind is dict:
        return len(v), [*v, *v.values()]
    if by_items(v):  # a named tuple (``size``: its own ``__len__`` may raise)
        return size(v), v
    if kind is types.SimpleNamespace:
        own = vars(v)
        return len(own), [*own, *own.values()]
    if kind is functools.partial:
        n, keywords = len(v.args), v.keywords
        return n + len(keywords), [v.func, n, *v.args, *keywords, *keywords.values()]
    if isinstance(v, dict):  # (another type of dictionary, read as a dictionary: ``_held``;
        # its own ``__len__`` may compute or raise: crashed until rev-merges21d)
        return dict.__len__(v), [*dict.keys(v), *dict.values(v)]
    return None


def key(x: torch.Tensor, batch_dims: int | None) -> Hashable:
    """What a recording depends on besides ``f``'s calls: ``x``'s shape, dtype, device and
    ``requires_grad``, the batch dimensions, grad mode and whether mixing is detected."""
    return (
        x.shape,
        x.dtype,
        x.device,
        x.requires_grad,
        batch_dims,
        torch.is_grad_enabled(),
        allowed(),
    )


def recorded(
    where: Any,
    f: Function,
    x: torch.Tensor,
    rules: Container[Any],
    batch_dims: int | None,
) -> Graph:
    """``capture(f, x, rules, keep_values=True, batch_dims=batch_dims)``, checked against the
    template kept for ``where`` (``site``) instead of recorded when ``f`` computes the same
    calls again; a recording that can be checked is kept for the next call."""
    k = key(x, batch_dims)
    found = None if where is None else RECORDINGS.get(where, k)
    graph = None if found is None else checked(found, f, x, rules, batch_dims)
    if graph is not None and graph.template is found:
        return graph
    if graph is None:  # (a check that could not record its own evaluation: f once more)
        graph = capture(f, x, rules, keep_values=True, batch_dims=batch_dims)
    kept = None if where is None else template(graph)
    if kept is not None and found is not None:
        # a check missed: f computed the template's calls under other modes than capture's
        # (an op they replace that the recording did not show), or other calls (a changed
        # branch, a cache f grows), which it may change again; the next checks run under
        # all of capture's modes, so that a miss is recorded from the check's own evaluation
        # (``_Checker.hand_off``, which a lean check cannot while f runs): f evaluated once
        kept = replace(kept, lean=False)
    if kept is not None:
        RECORDINGS.put(where, k, kept)
        graph.template = kept
    return graph


def checked(
    found: Template,
    f: Function,
    x: torch.Tensor,
    rules: Container[Any],
    batch_dims: int | None = None,
) -> Graph | None:
    """Evaluate ``f(x)`` comparing each call with ``found``: the ``Graph`` of this evaluation
    if all match (``template`` is ``found``); else, from its first difference on, recorded as
    ``capture(f, x, rules, keep_values=True, batch_dims=batch_dims)`` would record it
    (``_Checker.hand_off``: the calls before it taken as recorded), a new recording; else
    (``hand_off`` cannot take over) ``None`` with what ``f`` changed put back, and the caller
    records again. So a call evaluates ``f`` once: state outside ``f``'s modules that
    ``f`` changes (a key/value cache it grows, a list it appends to), which nothing puts back,
    is changed once, and the result is that of this evaluation.

    A ``lean`` template is checked with grad and forward-mode AD on, as ``capture`` runs
    ``f``, but without its modes that only choose which ops run (attention on the math
    backend, ``SafeDerivatives``' replacements; ~40 us a call): where they would have changed
    an op, ``f`` computes other ops than the template's, and the check fails."""
    if not plain(x) or peek_interpreter_stack() is not None:
        # recorded again: capture names the subclass, or refuses a torch.func transform
        # around the call (the checker's modes see its unwrapped tensors: a kept recording
        # checked there gave results without the transform's derivatives, silently 0)
        return None
    z = argument(x)  # (capture's: a closure over the caller's x is a constant)
    checker = _Checker(found, z, rules, batch_dims)
    outer_grad = torch.is_grad_enabled()
    checker.outer = torch._C._len_torch_function_stack()
    try:
        if found.lean:
            with torch.enable_grad(), _set_fwd_grad_enabled(True), checker:
                checker.inner = checker.outer
                y = f(z)
        else:
            with recording(), checker:
                checker.inner = torch._C._len_torch_function_stack()
                y = f(z)
    except Exception:  # f's own error: as capture's
        checker.modes.close()
        if checker.recorder is not None:
            checker.recorder.graph.undo()
        raise
    checker.modes.close()
    if checker.recorder is None and not checker.tried and checker.same and _ends(checker, y):
        return _graph(checker, y, outer_grad)
    recorder = checker.recorder or (None if checker.tried else checker.hand_off(ahead=False))
    if recorder is not None:
        return finished(recorder, y, outer_grad, keep_values=True)
    checker.undo()
    return None


def _ends(checker: _Checker, y: Any) -> bool:
    """Whether ``f`` returned ``y`` where the template it was checked against ends."""
    found = checker.found
    if checker.i != len(found.calls) or tuple(y.shape) != found.output_shape:
        return False
    return leaves(map_leaves(checker.ref, y)) == [found.output]


def _graph(checker: _Checker, y: torch.Tensor, outer_grad: bool) -> Graph:
    """The ``Graph`` of an evaluation that matched ``checker.found`` throughout."""
    found = checker.found
    calls, elements, products = found.work
    return Graph(
        checker.nodes,
        found.output,
        widest=found.widest,
        dependent_calls=calls,
        elements=elements,
        products=products,
        requires_grad=outer_grad and y.requires_grad,
        output_shape=found.output_shape,
        values=outputs(checker.values, checker.overwritten),
        overwritten=frozenset(checker.overwritten),
        template=found,
    )


_WRITES: dict[Any, bool] = {}  # whether an op writes to an argument, by its schema


def _changes_state(func: Any, args: Any, kwargs: Any) -> bool:
    """Whether ``func`` writes to a tensor or draws random numbers (never in a template)."""
    writes = _WRITES.get(func)
    if writes is None:
        writes = _WRITES[func] = torch.Tag.nondeterministic_seeded in func.tags or any(
            a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments
        )
    return writes or (func in _BATCH_NORMS and len(args) > 5 and bool(args[5]))  # training


class _Checker(DispatchMode):
    def __init__(
        self, found: Template, x: torch.Tensor, rules: Container[Any], batch_dims: int | None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.found, self.x, self.rules, self.batch_dims = found, x, rules, batch_dims
        # each call matched so far as ``_Recorder.adopt`` takes it (func, args, kwargs, its
        # result, grad mode), while it can (``adoptable``: no in-place write among them)
        self.made: list[Adopted] = []
        self.adoptable = True
        # the recorder ``f`` runs under after the first difference (``hand_off``), once tried;
        # the modes entered for it (closed after the check's own); the torch-function modes
        # around the check and inside it (``hand_off``)
        self.recorder: _Recorder | None = None
        self.tried = False
        self.modes = contextlib.ExitStack()
        self.outer = self.inner = 0
        self.depth = 0  # decompositions being checked (``_decomposed``)
        self.calls = found.calls
        self.refs: dict[int, Ref] = {id(x): X}
        self.nodes: list[Node] = []
        self.values: list[list[Any]] = []
        self.i, self.same = 0, True
        self.task = torch._C._current_graph_task_id()
        self.changed: list[Before] = []
        self.rng: list[tuple[Callable[[Any], None], Any]] | None = None
        # in-place writes of values computed from x into f's own tensors, as ``capture``
        # records them (``_Recorder.note_write``, ``overwrite``)
        self.x_storage = _storage(x)
        self.overwritten: set[int] = set()
        self.storages = Storages(self.values)
        self.rewrites: dict[int, list[tuple[int, Strided, str]]] = {}

    def ref(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.refs.get(id(value), value)
        return value

    def swapped(self, tree: Any, pattern: list[Any]) -> Any:
        """``tree`` with ``f``'s own tensors as their ``Ref``s; its leaves appended to
        ``pattern`` (``map_leaves`` and ``leaves`` in one pass, a call per container, not per
        leaf: it runs on every argument of every call ``f`` makes)."""
        refs, kind = self.refs, type(tree)
        if kind is dict:
            return {key: self.swapped(item, pattern) for key, item in tree.items()}
        if kind is not tuple and kind is not list:
            if isinstance(tree, torch.Tensor):
                tree = refs.get(id(tree), tree)
            pattern.append(tree)
            return tree
        items = []
        for item in tree:
            inner = type(item)
            if inner is tuple or inner is list or inner is dict:
                item = self.swapped(item, pattern)
            else:
                if isinstance(item, torch.Tensor):
                    item = refs.get(id(item), item)
                pattern.append(item)
            items.append(item)
        return items if kind is list else tuple(items)

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        i, calls = self.i, self.calls
        if not self.same or i >= len(calls) or calls[i].func is not func:
            return self._other(func, args, kwargs)  # as capture, a decomposed op; or another
        call = calls[i]
        pattern: list[Any] = []
        node_args = self.swapped(args, pattern)
        node_kwargs = self.swapped(kwargs, pattern) if kwargs else {}
        if not self._same_call(call, pattern) or (self.rewrites and self._rewritten(args, kwargs)):
            self.same = False
            return self._unwatched(func, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            outs = [out]
            carries = out.is_floating_point() or out.is_complex()  # (differentiable, inline)
        else:
            outs = leaves(out)
            carries = call.may_depend and differentiable(outs)
        # as capture: results without derivatives (indices) are constants
        depends = call.may_depend and carries and torch.is_grad_enabled()
        self.same = depends == call.depends and len(outs) == len(call.outputs)
        # the grad mode too, as capture: a call under no_grad in f is replayed under no_grad
        self.nodes.append(Node(func, node_args, node_kwargs, depends, grad=torch.is_grad_enabled()))
        refs = self.refs
        for ref, leaf in zip(call.outputs, outs, strict=False):
            if isinstance(leaf, torch.Tensor):
                refs[id(leaf)] = ref
        self.values.append(outs)  # (keeps them alive: ids stay unique while checking)
        self.made.append(Adopted(func, args, kwargs, out, torch.is_grad_enabled()))
        self.i = i + 1
        return out

    def _other(self, func: Any, args: Any, kwargs: Any) -> Any:
        """A call that is not the template's next one: the decomposition ``capture`` would
        have recorded instead (a dependent op without a rule), an in-place op it recorded
        out of place (``_in_place``), or the end of the check."""
        if not self.same:
            return self._unwatched(func, args, kwargs)
        facts = _facts(func)
        if facts.in_place and through_view(func, args, self.refs) is not None:
            return self._out_of_place(func, args, kwargs)
        if facts.in_place and facts.functional is not None and self.i < len(self.calls):
            call = self.calls[self.i]
            if call.depends and call.func is facts.functional:
                return self._in_place(func, call, args, kwargs)
            if decomposed_in_place(func, self.rules):
                return self._out_of_place(func, args, kwargs)
        pattern = [self.ref(a) for a in leaves((args, kwargs))]
        touches = any(
            isinstance(a, Ref) and (a.node < 0 or self.calls[a.node].depends) for a in pattern
        )
        depends = touches and func not in VALUE_FREE and torch.is_grad_enabled()
        if depends and func not in self.rules and func in _DECOMPOSITIONS:
            return self._decomposed(func, args, kwargs)
        self.same = False
        return self._unwatched(func, args, kwargs)

    def _decomposed(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """A call checked as the calls it decomposes into, as ``capture`` records it, kept for
        ``hand_off`` as one call with its parts (a recorder watches it as itself). Where a
        difference comes inside it, the decomposition runs on unrecorded and, where
        ``hand_off`` takes over after it, the recorder makes the call again (as a template's
        calls, its parts write nothing; where one did, nothing takes over)."""
        first = len(self.made)
        self.depth += 1
        try:
            with self:
                out = _DECOMPOSITIONS[func](*args, **kwargs)
        finally:
            self.depth -= 1
        parts = self.made[first:]
        del self.made[first:]
        if self.same:
            self.made.append(Adopted(func, args, kwargs, out, torch.is_grad_enabled(), parts))
            return out
        if self.depth or self.tried:
            return out
        if self.changed or self.rng is not None:
            self.tried = True
            return out
        recorder = self.hand_off()
        return out if recorder is None else recorder.dispatch(func, args, kwargs)

    def _in_place(self, func: Any, call: _Call, args: Any, kwargs: Any) -> Any:
        """An in-place op on its first argument that ``capture`` recorded as its out-of-place
        op (``relu_`` as ``relu``: ``_Recorder.functional``), the template's next call ``call``:
        checked as that call, then run in place, its target taken for the call's output."""
        self.adoptable = False
        pattern: list[Any] = []
        node_args = self.swapped(args, pattern)
        node_kwargs = self.swapped(kwargs, pattern) if kwargs else {}
        fits = self._same_call(call, pattern) and not self._rewritten(args, kwargs)
        if not fits or not self._write(func, args[0], len(self.nodes)):
            self.same = False
            return self._unwatched(func, args, kwargs)
        out = func(*args, **kwargs)
        self.same = (  # as capture: a write of values computed from x (depends)
            out is args[0]
            and call.may_depend
            and differentiable([out])
            and torch.is_grad_enabled()
            and len(call.outputs) == 1
        )
        self.nodes.append(Node(call.func, node_args, node_kwargs, True))
        self.refs[id(out)] = call.outputs[0]
        self.values.append([out])
        self.i += 1
        return out

    def _out_of_place(self, func: Any, args: Any, kwargs: Any) -> Any:
        """An in-place op that ``capture`` recorded as the calls of its out-of-place op
        (``silu_``: ``_Recorder.write_out_of_place``): those checked against the template,
        then the write made, its target taken for their result."""
        self.adoptable = False
        target = args[0]
        first = len(self.nodes)
        result, base, base_after = written_out_of_place(self, func, args, kwargs, self.refs)
        self.overwritten.update(range(first, len(self.nodes)))  # (as capture's: no graph)
        ref = None if result is None else self.refs.get(id(result))
        if not (self.same and ref is not None and self._write(func, target, ref.node)):
            self.same = False
            return self._unwatched(func, args, kwargs)
        out = func(*args, **kwargs)
        self.same = out is target and (base_after is None or id(base_after) in self.refs)
        self.refs[id(target)] = ref
        if base is not None and base_after is not None and self.same:
            self.refs[id(base)] = self.refs[id(base_after)]
        return out

    def _write(self, func: Any, target: Any, node: int) -> bool:
        """Before ``func`` writes values computed from ``x`` into ``target``, recorded as node
        ``node``: whether ``capture`` would have recorded it (a tensor of ``f``'s own, not in
        ``x``'s memory); if so, the nodes whose outputs it changes are noted
        (``overwritten``), and the write too where other tensors share ``target``'s memory
        (``rewrites``: a later read of one of them is not the template's, as ``capture``
        refuses it)."""
        if not isinstance(target, torch.Tensor):
            return False
        storage = _storage(target)
        if id(target) not in self.refs or storage == self.x_storage:
            return False
        found = self.storages.holding(storage)
        self.overwritten.update(found)
        note_rewrite(self.rewrites, func, target, node, (t for i in found for t in self.values[i]))
        return True

    def _rewritten(self, args: Any, kwargs: Any) -> bool:
        """Whether a call reads a tensor whose elements a write noted in ``rewrites`` changed
        after it was made (``capture`` refuses that)."""
        return bool(self.rewrites) and any(
            isinstance(a, torch.Tensor) and rewritten_by(self.rewrites, self.refs, a) is not None
            for a in leaves((args, kwargs))
        )

    def _same_call(self, call: _Call, pattern: list[Any]) -> bool:
        """Whether this call of ``call.func`` is the template's, before running it. (No
        template holds a call that writes or draws random numbers, and a batch norm's training
        flag is part of its pattern: a call that matches changes no state.)"""
        if len(call.pattern) != len(pattern):
            return False
        if torch._C._current_graph_task_id() != self.task:  # a backward pass inside f
            return False
        custom = call.touches and not torch.is_grad_enabled()  # an autograd.Function's forward
        if custom and not torch._C._is_fwd_grad_enabled() and not torch.is_inference_mode_enabled():
            return False
        for want, have in zip(call.pattern, pattern, strict=True):
            if want is not have and not _same(want, have):
                return False
        return True

    def hand_off(self, ahead: bool = True) -> _Recorder | None:
        """After the first difference: a recorder of ``f`` as ``capture`` makes it, with the
        calls matched so far adopted (``_Recorder.adopt``), and, if ``f`` runs on (``ahead``),
        the torch-function modes ``capture`` runs it under that the check did not enter;
        ``None`` (tried once) where it cannot take over: a call matched as an in-place write
        (a recorder sees it otherwise), a ``torch.func`` transform, a torch-function mode
        ``f`` entered and has not left (the modes entered here would leave before it), a
        ``lean`` check with ``f`` still running (under no ``SafeDerivatives``: the call in
        progress may be one it replaces, out of reach now).

        The calls matched so far are the template's: those ``capture`` recorded, under its
        modes, and watched for sample mixing (adopted, they are watched again); a value read
        outside the dispatcher among them (``Reads``: ``tolist()``) is not seen again.
        """
        self.tried = True
        depth = torch._C._len_torch_function_stack()  # (modes whose calls run are popped)
        if not self.adoptable or peek_interpreter_stack() is not None:
            return None
        if ahead and (self.found.lean or not self.outer <= depth <= self.inner):
            return None
        recorder = recorder_at(self.x, self.rules, self.batch_dims)
        recorder.task = self.task
        recorder.graph.lean = self.found.lean  # (the calls adopted ran under its modes or not)
        for call in self.made:
            recorder.adopt(call)
        if ahead:
            self.modes.enter_context(watching(recorder))
        self.recorder = recorder
        return recorder

    def _unwatched(self, func: Any, args: Any, kwargs: Any) -> Any:
        """After the first difference: recorded (``hand_off``), or else run, keeping what it
        changes for ``undo``."""
        recorder = self.recorder if self.tried or self.depth else self.hand_off()
        if recorder is not None:
            return recorder.dispatch(func, args, kwargs)
        if torch.Tag.nondeterministic_seeded in func.tags and self.rng is None:
            self.rng = _random_states(self.x)
            generator = kwargs.get("generator")
            if generator is not None:
                self.rng.append((generator.set_state, generator.get_state()))
        for tensor in _written(func, args, kwargs):
            self.changed.append(Before.of(tensor))
        return func(*args, **kwargs)

    def undo(self) -> None:
        """Put back what ``f`` changed outside itself after the first difference."""
        put_back(self.changed)
        for restore, state in self.rng or []:
            restore(state)
