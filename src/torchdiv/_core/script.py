"""TorchScript code that ``f`` reaches, run as written during torchdiv's calls.

From its second call on, TorchScript's profiling executor runs a scripted module or function
through an optimized graph (autodiff subgraphs that detach their inputs, fusions) that carries
no forward-mode tangents, ``torch.func`` levels or dispatch-mode recording: every engine saw a
constant (zeros, parameter gradients gone). ``CompiledCodeEager`` turns the executor's
optimization off for the call (``torch.jit.optimized_execution(False)``), which an executor
that optimized its plan already ignores; ``forget_plans`` drops the plans of the TorchScript
code ``f`` reaches, so that the call runs it unoptimized. The caller's next calls outside
torchdiv profile and optimize it again (about 4 ms for a small MLP, once per torchdiv call).
"""

from __future__ import annotations

import collections
import dis
import functools
import gc
import itertools
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar, Token
from typing import Any, TypeVar

import torch
from torch.nn.modules.lazy import LazyModuleMixin

_SCRIPTED = (torch.jit.ScriptModule, torch.jit.ScriptFunction)

R = TypeVar("R")


def cached(maxsize: int | None = None) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """``functools.lru_cache(maxsize)`` for eager calls; while ``torch.compile`` traces (or
    ``torch.export``), the function itself, uncached. Dynamo ignores a cache wrapper anyway
    and traces the function it wraps, but warns first ("Dynamo detected a call to a
    ``functools.lru_cache``-wrapped function"); under a warnings-as-errors filter (``-W
    error``, pytest's ``filterwarnings = ["error"]``) that warning aborted the compilation
    (``InternalTorchDynamoError``). Tracing the function itself is the same graph, silently;
    it also keeps a value made under a tracer's fake tensors out of the cache, as under the
    caller's ``FakeTensorMode`` (shape-only tracing: a cached fake tensor met in the next
    fake mode raised PyTorch's "Mixing fake modes NYI"). For pure functions of hashable
    arguments only.

    >>> @cached()
    ... def square(n: int) -> int:
    ...     return n * n
    >>> square(3), square.cache_info().hits, square(3), square.cache_info().hits
    (9, 0, 9, 1)
    """

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        cache = functools.lru_cache(maxsize)(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> R:
            if torch.compiler.is_compiling() or faking():
                return fn(*args, **kwargs)
            return cache(*args, **kwargs)

        call.cache_info = cache.cache_info  # type: ignore[attr-defined]
        return call

    return decorate


def per_code(fn: Callable[[types.CodeType], R]) -> Callable[[types.CodeType], R]:
    """``fn(code)`` memoised per code object (one never changes), by its ``id`` (hashing a code
    object hashes its constants: a third of a lookup), at most ``_PER_CODE`` of them (all
    forgotten past that); uncached while ``torch.compile`` traces (see ``cached``). For the
    names a code reads, looked up ~25 times in each walk of zuko's CNF velocity (``scripted``,
    and the structure key's ``global_names``): 0.7 us through ``cached``'s wrapper, 0.2 here."""
    table: dict[int, tuple[types.CodeType, R]] = {}

    @functools.wraps(fn)
    def call(code: types.CodeType) -> R:
        if torch.compiler.is_compiling():
            return fn(code)
        held = table.get(id(code))
        if held is not None and held[0] is code:
            return held[1]
        if len(table) >= _PER_CODE:
            table.clear()
        found = fn(code)
        table[id(code)] = (code, found)
        return found

    return call


# how many code objects ``per_code`` remembers (a function defined anew at every call, a
# notebook's cells: each a new code object)
_PER_CODE = 4096


def faking() -> bool:
    """Whether a ``FakeTensorMode`` is active: tensors made now hold no values."""
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def forget_plans(f: Any) -> bool:
    """Drop the executor plans of every scripted module and function ``f`` reaches (see
    ``scripted``); nothing else is changed. Returns whether no module the walk met holds
    uninitialized parameters (a lazy module): the walk meets every module of ``f``'s tree (or
    its object's, or those its closure, defaults and globals reach, through a partial's
    function and arguments and a callable object's attributes: the walk
    ``checks.check_initialized`` makes of anything but a module or its method), so that check
    need not walk it again before ``f`` runs (``initialized``)."""
    lazy: list[Any] = []
    for found in scripted(f, lazy=lazy):
        if isinstance(found, torch.jit.ScriptModule):
            _flush_module(found)
        else:  # a ScriptFunction, a ScriptMethod
            _flush(found)
    return not lazy


def _flush(method: Any) -> None:
    flush = getattr(method, "_debug_flush_compilation_cache", None)
    if flush is not None:
        flush()


def _flush_module(module: torch.jit.ScriptModule) -> None:
    """Drop the plans of every method of ``module`` and of its submodules: each has an
    executor of its own, run where Python calls it (``f`` calling ``scripted.encode(z)``, an
    exported method, or a child, ``scripted.block(z)``: their optimized plans ran, forward
    mode's divergence 0; the module's own ``forward`` inlines them)."""
    stack = [module]
    while stack:
        m = stack.pop()
        c = getattr(m, "_c", None)
        if c is None:  # (not a RecursiveScriptModule: its forward alone)
            _flush(getattr(m, "forward", None))
            continue
        for name in c._method_names():
            _flush(c._get_method(name))
        stack += [s for s in m._modules.values() if isinstance(s, torch.jit.ScriptModule)]


# [the ``f`` whose walk found no lazy module] of the public call in flight (``initialized``)
_INITIALIZED: ContextVar[list[Any] | None] = ContextVar("_INITIALIZED", default=None)


def call_started(f: Any) -> Token[list[Any] | None]:
    """``forget_plans(f)`` at the start of a public call, whose ``checks.check_initialized``
    of this very ``f`` then reads the walk's finding (``initialized``) instead of walking
    ``f``'s modules again (about 5 us of a tiny problem's call). Returns the token for
    ``call_ended`` (a plain function pair: a generator's context manager costs ~2 us)."""
    return _INITIALIZED.set([f] if forget_plans(f) else None)


def call_ended(token: Token[list[Any] | None]) -> None:
    _INITIALIZED.reset(token)


def initialized(f: Any) -> bool:
    """Whether the public call in flight found no lazy module with uninitialized parameters
    in ``f``'s tree before it first ran ``f`` (``call_started``). Read once: a later check
    of ``f`` in the same call (after ``f`` ran, which may add modules) walks again."""
    if torch.compiler.is_compiling():  # (Dynamo cannot trace a ContextVar; nothing was set)
        return False
    held = _INITIALIZED.get()
    if held is None or held[0] is not f:
        return False
    held[0] = None
    return True


# how many functions deep ``scripted`` follows what a function names (its callees' callees...)
_FUNCTION_DEPTH = 3


def scripted(f: Any, lazy: list[Any] | None = None) -> list[Any]:
    """The ``torch.jit.ScriptModule``s and ``ScriptFunction``s ``f`` is or reaches: through
    submodules (not into a scripted one: its calls are inlined in its own graph), their
    classes' ``forward`` (or one set on the module: ``seq.forward = g``) and their forward
    hooks and pre-hooks (also every module's), the functions a module holds as attributes
    (``self.act = torch.jit.script(fn)``), bound methods (and what a ``functools.wraps``-
    decorated method's own body reads: ``_wrapped``; a wrapper's and an ``lru_cache``d
    function's ``__wrapped__`` at their own depth), partials and the arguments they
    bind, callable objects (their class's ``__call__`` and the functions they hold), and a
    function's closure cells, default arguments and the globals its code and the functions
    defined in it name (a scripted activation), ``_FUNCTION_DEPTH`` functions deep; and one level of
    what holds objects (``_held``): a list, tuple, dictionary, deque, set, mapping proxy or
    dictionary view there (its first ``_HELD_ITEMS`` items: ``partial(run, [scripted])``; and
    what the holders among them hold, ``_HELD_ITEMS`` items in all: ``_nested``), what an
    ``lru_cache``d function has cached (``_cached``), what a weak reference or proxy refers
    to (``target``: a ``WeakValueDictionary``'s values too), a plain object (a bound method's
    ``self``, ``holder.net(z)``) and a class of the user's (``Holder.net(z)``, a module
    class's attribute), each while functions are left to follow, what they hold one fewer
    down. Every object is walked with the most functions left it can be met with: one stack
    per functions-left level, emptied from the most left down (a function met first one
    function deeper, by a longer way or through another method's globals in the order the
    names' hashes met it, missed what it reached at the last depth: fuzzscript30, rev-lead30;
    divergence 0). A scripted method (``scripted.encode``) is found as such.
    Each object's kind is read from its type once per type (``_kind``): about 1 us per
    module. ``lazy``: the modules met with uninitialized parameters (lazy modules) are
    appended to it, and the AOTInductor models met (``ahead_of_time``), which cannot be
    differentiated either."""
    out: list[Any] = []
    seen: set[int] = set()
    # the module classes whose ``forward`` was pushed (not ``seen``: a class met first as a
    # holder, ``isinstance(net, Net)`` in ``f``, had its instances' ``forward`` skipped), each
    # with the attribute names its ``forward`` and the helper methods it calls read
    forwards: dict[int, set[str]] = {}
    # what is met with ``left`` functions left to follow, one stack each, emptied from the
    # most left down: an object is first met by its way of fewest functions (a function met
    # first three deep and then two deep, its callee's script was missed: fuzzscript30)
    levels: list[list[Any]] = [[] for _ in range(_FUNCTION_DEPTH)] + [[f]]
    if _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1]:  # (every module's forward runs them)
        levels[-1] += (*_GLOBAL_HOOKS[0].values(), *_GLOBAL_HOOKS[1].values())
    kinds = _KINDS
    for left in range(_FUNCTION_DEPTH, -1, -1):
        todo = levels[left]
        below = levels[left - 1] if left else todo  # (never pushed to at 0)
        while todo:
            obj = todo.pop()
            kind = kinds.get(id(type(obj))) or _kind(type(obj))
            if kind is _OTHER or id(obj) in seen:
                continue
            seen.add(id(obj))
            if kind is _SCRIPT:
                out.append(obj)
            elif kind is _AHEAD:
                if lazy is not None:
                    lazy.append(obj)
            elif kind is _MODULE or kind is _OWN_MODULE:  # its submodules, what forward names
                children = obj._modules  # (a helper) and holds; (most have none: no list made)
                if children:
                    todo += children.values()
                state = obj.__dict__  # (its forward hooks and pre-hooks, run by its call, and
                hooks, pre = state["_forward_hooks"], state["_forward_pre_hooks"]  # a forward
                if hooks or pre:  # set on it, ``net.forward = g``: missed on a PyTorch class's
                    todo += (*hooks.values(), *pre.values())  # object until rev-late30)
                if kind is _MODULE and "forward" in state:
                    todo.append(state["forward"])
                if lazy is not None and isinstance(obj, LazyModuleMixin):
                    held: Any = obj  # (torch types the lazy mixin's self as a protocol)
                    if held.has_uninitialized_params():
                        lazy.append(held)
                    obj = held  # (not narrowed below: the module's own forward is read)
                if kind is _OWN_MODULE:  # a class of the user's: its forward, its attributes
                    cls = type(obj)  # (the methods forward reads too: ``self.block(z)``;
                    names = forwards.get(id(cls))  # once per class: their walk is ~2 us)
                    if names is None:
                        names = forwards[id(cls)] = {"forward"}
                        todo += _methods(cls, ("forward",), names)
                        todo.append(cls)
                    for k in state.keys() - _MODULE_STATE:  # (not nn.Module's own: its
                        v = state[k]  # hooks' dictionaries; most modules have none)
                        what = kinds.get(id(type(v))) or _kind(type(v))
                        if what is not _OTHER:
                            todo.append(v)
                            if k in names and what in _READ_OFF:  # what its methods read off
                                # it (``self.state.run(z)``, ``run`` a partial: missed until
                                # rev-merges31, divergence off)
                                todo += _read(v, names)
            elif kind is _METHOD:
                todo += (obj.__self__, obj.__func__)
                func = obj.__func__
                if type(func) is _CACHED:  # (a bound ``lru_cache``d method: its body's reads
                    func = attribute(func, "__wrapped__")  # off self, missed until rev-late31)
                if type(func) is types.FunctionType:  # (``self.helper(z)`` in it)
                    todo += _read(obj.__self__, attribute_names(func.__code__))
                    if getattr(func, "__wrapped__", None) is not None:  # (decorated)
                        todo += [
                            v
                            for c in _wrapped(func)
                            for v in _read(obj.__self__, attribute_names(c))
                        ]
            elif kind is _PARTIAL:  # its function and the arguments it binds
                todo.append(obj.func)
                bound = [v for v in (*obj.args, *obj.keywords.values()) if _followed(v)]
                todo += bound
                holders = [v for v in bound if _read_off(v)]  # (what its function reads off
                code = attribute(obj.func, "__code__") if holders else None  # one: ``config.
                if type(code) is types.CodeType:  # net(z)``, ``net`` a partial: missed
                    read = attribute_names(code)  # until rev-merges31, divergence off)
                    todo += [v for held in holders for v in _read(held, read)]
            elif kind is _OBJECT:  # its class's __call__, what it reads and holds
                held = _namespace(obj)
                call = _unwrapped(_resolved(type(obj), "__call__"))  # (a metaclass's lookup
                todo.append(call)  # may raise)
                code = attribute(call, "__code__")  # (a function's; replaced since by another
                if type(code) is types.CodeType:  # callable on the class: none)
                    todo += _read(obj, attribute_names(code))
                    if type(call) is types.FunctionType:  # (a decorated ``__call__``)
                        todo += [v for c in _wrapped(call) for v in _read(obj, attribute_names(c))]
                else:  # (a decorator object's function: ``_functions``)
                    todo += [
                        v for c in _functions(call) for v in _read(obj, attribute_names(c.__code__))
                    ]
                if issubclass(type(held), dict):
                    todo += [v for v in held.values() if _followed(v)]
            elif kind is _CACHE:  # (the function it wraps, at the same depth: C's wrapper
                todo.append(attribute(obj, "__wrapped__"))  # read as ``functools``' until
                # rev-late31, its body's globals never read: divergence off)
                todo += _held(_cached(obj), _CONTAINER)  # (what it has cached: a getter's
                # loaded script, missed until walk32)
            elif kind is _REFERENCE:  # what a weak reference or proxy refers to, at the same
                todo.append(target(obj, False))  # depth (a registry's references, a
                # callback's ``weakref.ref(net)``: missed until rev-merges32, divergence off)
            elif left <= 0:
                continue
            elif kind is _FUNCTION:
                inner = getattr(obj, "__wrapped__", None)  # (a ``functools.wraps`` wrapper's
                if inner is not None:  # function, at the same depth: each decorator took one
                    todo.append(inner)  # until rev-late31, three hid the body's globals)
                named = _named(obj)
                below += named
                if named:  # (what it reads off them: ``runner.state.net(z)``)
                    read = attribute_names(obj.__code__)
                    below += [v for held in named for v in _read(held, read)]
            else:  # a holder: a container, a plain object, a class
                below += _held(obj, kind)
    return out


def _held(obj: Any, kind: int) -> list[Any]:
    """What the holder ``obj`` (a ``_CONTAINER``, ``_PLAIN`` object or ``_CLASS``) holds that
    ``scripted`` follows: a container's first ``_HELD_ITEMS`` items (a dictionary's values)
    and, of the holders among them, what they hold within a budget (``_nested``); the
    attributes of a plain object or a class of the user's (PyTorch's are not followed) that
    are modules, scripts or containers."""
    kinds = _KINDS
    if kind is _CONTAINER:
        out, holders = _sorted_out(_items(obj, _HELD_ITEMS), _IN_CONTAINERS)
        return out + _nested(holders, {id(obj)}) if holders else out
    if kind is _CLASS and _foreign(obj):
        return []
    values = _namespace(obj)
    if not issubclass(type(values), _NAMESPACES):
        return []
    return [v for v in values.values() if (kinds.get(id(type(v))) or _kind(type(v))) in _IN_OBJECTS]


def _nested(holders: list[Any], seen: set[int]) -> list[Any]:
    """What the holders a container holds (``[[net]]``, ``{"nets": [net]}``, ``[Holder(net)]``:
    a container's items, an object's or a class's attributes, ``_namespace``) hold, and the
    holders among those in turn, breadth first, each level's smallest first (``_size``), each
    once (``seen``), ``_HELD_ITEMS`` items in all: the container's items that ``scripted``
    follows (``_IN_CONTAINERS``) and the objects' scripts and modules. The budget bounds the
    cost by the container's own: a list of 64 lists of numbers reads 128 items, not 4160
    (~360 us a call followed in full, the cost that kept nested holders unread until walk32:
    each such script's optimized plan ran, forward mode's divergence off). Smallest first: a
    training state ``{"config": <70 numbers>, "models": {"flow": net}}`` spent the budget on
    its configuration until rev-merges32 (divergence off). A script past the budget is not
    found (documented)."""
    kinds = _KINDS
    out: list[Any] = []
    spare = _HELD_ITEMS
    level = holders
    while level and spare > 0:
        if len(level) > 1:  # (built-in containers alone, the most met: by ``len``, C's)
            exact = all(type(held) in _LENGTH_OF for held in level)
            level.sort(key=len if exact else _size)
        below: list[Any] = []
        for held in level:
            if spare <= 0:
                break
            if id(held) in seen:
                continue
            seen.add(id(held))
            kind = kinds.get(id(type(held))) or _kind(type(held))
            if kind is _CONTAINER:
                items, wanted = _items(held, spare), _IN_CONTAINERS
            elif kind is _CLASS and _foreign(held):
                continue
            else:  # (a plain object, a class of the user's)
                values = _namespace(held)
                if not issubclass(type(values), _NAMESPACES):
                    continue
                items, wanted = list(itertools.islice(values.values(), spare)), _IN_OBJECTS
            spare -= len(items)
            found, holders = _sorted_out(items, wanted)
            out += found
            below += holders
        level = below
    return out


def _sorted_out(items: list[Any], wanted: frozenset[int]) -> tuple[list[Any], list[Any]]:
    """``items`` sorted out by their kinds (``_kind``): those followed as ``wanted`` says, and
    the holders (``_HOLDERS``) whose own items ``_nested`` reads; the rest dropped."""
    kinds = _KINDS
    found: list[Any] = []
    holders: list[Any] = []
    for v in items:
        what = kinds.get(id(type(v))) or _kind(type(v))
        if what in _HOLDERS:
            holders.append(v)
        elif what in wanted:
            found.append(v)
    return found, holders


def _size(held: Any) -> int:
    """How many items the holder ``held`` shows, by its built-in class's own ``__len__`` (C's:
    not a subclass's, nor a mapping proxy's, which asks the mapping it shows); for an object
    or a class, how many attributes (``_namespace``, as ``_nested`` reads them: an
    ``argparse.Namespace`` of 70 hyperparameters beside ``{"flow": net}`` in a tuple spent
    the budget, read first as of size 0, until rev-late32: divergence off); 0 for a mapping
    proxy."""
    kind = type(held)
    length = _LENGTH_OF.get(kind)  # (a built-in's: the most met, no ``issubclass`` of each)
    if length is not None:
        return length(held)
    for base, length in _LENGTHS:
        if issubclass(kind, base):
            return length(held)
    if issubclass(kind, _VIEWS):
        return 0
    values = _namespace(held)  # (a class's: a mapping proxy of its dictionary, C's length)
    return len(values) if issubclass(type(values), _NAMESPACES) else 0


def _items(obj: Any, n: int) -> list[Any]:
    """The first ``n`` items of the container ``obj``, by the built-in's own methods (not a
    subclass's, which may raise or compute: a lazy mapping's ``values`` importing modules): a
    dictionary's values, a view's or a mapping proxy's (``_viewed``), the others' items.
    Taken before their kinds are told: telling one registers a ``weakref.finalize``, whose
    registry, a dictionary walked here, then changed size during the iteration (a
    RuntimeError)."""
    if isinstance(obj, dict):
        every: Iterable[Any] = dict.values(obj)
    elif isinstance(obj, _VIEWS):
        every = _viewed(obj)
    else:
        every = _iterate(obj)
    return list(itertools.islice(every, n))


def _viewed(view: Any) -> Iterable[Any]:
    """What a ``types.MappingProxyType`` or a dictionary's ``keys()``/``values()``/``items()``
    view shows, read off the dictionary it refers to, found by ``gc.get_referents`` (C's
    traversal of the view: its one referent; no code of the user's runs): a dictionary's
    values (a proxy's, a values view's), keys (a keys view's) or both (an items view's); a
    proxy of another mapping: that mapping, read as an object (never through its own
    ``values``, which may compute). Until walk32 each was an object without attributes: a
    script a ``MappingProxyType`` or ``dict.values()`` held ran its optimized plan."""
    referents = gc.get_referents(view)
    mapping = referents[0] if len(referents) == 1 else None
    if not isinstance(mapping, dict):
        return () if mapping is None else (mapping,)
    if isinstance(view, _KEYS):
        return dict.keys(mapping)
    if isinstance(view, _ITEMS):
        return itertools.chain(dict.values(mapping), dict.keys(mapping))
    return dict.values(mapping)


def weakly_held(obj: Any) -> Iterable[Any]:
    """What a ``weakref.WeakValueDictionary``, ``WeakKeyDictionary`` or ``WeakSet`` holds, read
    off its ``data`` by the built-ins' own methods (not its own, which drop dead references
    and may be a subclass's): the weak references (``_REFERENCE``, followed to their targets
    at the same depth), a ``WeakKeyDictionary``'s values too. Read as a plain object until
    rev-late32, its ``data`` took one level more than a dictionary's items: a registry read
    by a getter ``f`` calls (``get("flow")(z)``) was past the walk's depth, and a
    ``WeakKeyDictionary``'s keys were never read (each script's optimized plan ran,
    divergence off)."""
    values = _namespace(obj)
    data = values.get("data") if issubclass(type(values), dict) else None
    if type(data) is dict:
        if issubclass(type(obj), weakref.WeakKeyDictionary):
            return itertools.chain(dict.keys(data), dict.values(data))
        return dict.values(data)
    return set.__iter__(data) if type(data) is set else ()


def _cached(wrapper: Any) -> list[Any]:
    """What the ``functools.lru_cache`` wrapper ``wrapper`` has cached (``functools.cache``'s
    too), by ``gc.get_referents`` (C's traversal of the wrapper, no code of the user's): a
    bounded cache visits each entry's key and result, an unbounded one its cache dictionary
    (the results its values); classes and the wrapper's own ``__dict__`` besides (the function
    it wraps, ``__wrapped__``: already followed). Read as a list's items by ``_held`` (the
    first ``_HELD_ITEMS``): a getter's result (``@cache def model(): return
    torch.jit.load(...)``, whose body names none of it) ran its optimized plan until
    walk32. A bounded cache of more than ``_HELD_ITEMS`` entries is not read (its entries are
    reached only by traversing all of them: ~90 us for 4096, 5 ms for 100000; documented),
    told by C's ``cache_info`` (the type's own method)."""
    info = _CACHED.cache_info(wrapper)
    if info.maxsize is not None and info.currsize > _HELD_ITEMS:
        return []
    out: list[Any] = []
    for v in gc.get_referents(wrapper):
        if type(v) is dict:
            out += itertools.islice(dict.values(v), _HELD_ITEMS)
        elif not isinstance(v, type):
            out.append(v)
    return out


def _read(held: Any, names: tuple[str, ...] | set[str], nested: bool = True) -> list[Any]:
    """What a function reaches through the attributes ``names`` it reads off ``held`` (a value
    it names: a global, a closure cell, its ``self``; ``attribute_names`` of its code): of a
    plain object, a class (any metaclass's: an ``Enum``), a module or a ``NamedTuple`` of the
    user's, the methods of its classes it reads (``holder.run(z)``, ``_methods``: a property's
    getter among them, and the helper methods they read in turn) and, of a plain object or a
    class, the attributes that it or those methods read that ``scripted`` follows, plain
    objects included (``runner.state.net(z)``: ``state``, whose ``net`` is then found; read
    in a helper, ``self.step(z)`` running ``self.state.net(z)``: missed until rev-merges31).
    Only the names read are looked up: a trainer's other methods and objects are not."""
    kind = _KINDS.get(id(type(held))) or _kind(type(held))
    if kind is _REFERENCE:  # (``holder.net(z)`` through a proxy, ``ref().net(z)`` through a
        held = target(held, False)  # reference: its target's attributes; a reference's
        kind = _KINDS.get(id(type(held))) or _kind(type(held))  # missed until rev-late32)
    if issubclass(type(held), type):  # (a class whose metaclass has a ``__call__``: an
        # ``Enum``'s; by its type: ``isinstance`` reads a proxy's ``__class__``, which raised)
        kind = _CLASS
    elif kind is _CONTAINER and type(held) not in _BUILT_IN_CONTAINERS:
        kind = _OWN_CONTAINER  # (a ``NamedTuple``'s methods: ``params.run(z)``)
    elif kind is not _PLAIN and kind is not _OWN_MODULE and kind is not _OBJECT:
        return []
    if not names:
        return []
    cls = held if kind is _CLASS else type(held)
    read: set[str] = set()  # (those the methods found read too: ``_methods``)
    out: list[Any] = _methods(cls, names, read) if not _foreign(cls) else []
    wanted = read or names
    if kind is _PLAIN or kind is _CLASS or kind is _OBJECT:  # (a module's: walked as its own)
        values = _namespace(held)
        if issubclass(type(values), _NAMESPACES):
            out += [v for n in values.keys() & wanted if _followed(v := values[n]) or _is_plain(v)]
            if nested:  # (a plain object read: what the code reads off it, one level down:
                # ``runner.state.net(z)`` with ``net`` a function or a partial)
                out += [w for v in out if _read_off(v) for w in _read(v, wanted, False)]
    return out


def _namespace(obj: Any) -> Any:
    """``obj``'s attributes by name: its ``__dict__`` and, for an object of a class of the
    user's with ``__slots__`` (a ``dataclass(slots=True)``), its slots that are set, each read
    by its class's own member descriptor (C's: no code of the user's runs; ``_members``).
    Until rev-merges31 an object without a ``__dict__`` was read as one without attributes,
    until rev-late31 one with both (a slotted class's subclass without ``__slots__``) as its
    ``__dict__`` alone: a callable object's ``self.net``, a slotted config's ``cfg.net``,
    their scripted module's optimized plan ran (forward mode's divergence off). ``None``
    where neither (a built-in object)."""
    values = attribute(obj, "__dict__")
    members = _members(type(obj))
    if not members:
        return values
    out = dict(values) if type(values) is dict else {}
    for name, member in members:  # (after the ``__dict__``: a slot is a data descriptor)
        try:
            out[name] = member.__get__(obj)
        except (AttributeError, TypeError):  # (a slot not set; another class's descriptor
            continue  # held by the class, ``alias = Other.y``: "doesn't apply", rev-late31)
    return out or None


def _members(cls: type) -> tuple[tuple[str, Any], ...]:
    """The slots' member descriptors of the classes of ``cls``'s method resolution order that
    are not built in (by their flags: ``_foreign``), each name's first, read once per class
    (kept until it is freed: a class's slots are fixed when it is made)."""
    held = _MEMBERS.get(id(cls))
    if held is None:
        found: dict[str, Any] = {}
        for c in _MRO(cls):
            flags = _FLAGS(c)
            if flags & _HEAP_TYPE and not flags & _IMMUTABLE_TYPE:
                for name, member in _DICT(c).items():
                    if type(member) is _MEMBER:
                        found.setdefault(name, member)
        held = tuple(found.items())
        _remember(_MEMBERS, cls, held)
    return held


# a ``__slots__`` name's descriptor on its class (``_namespace``); each class's (``_members``)
_MEMBER = types.MemberDescriptorType
_MEMBERS: dict[int, tuple[tuple[str, Any], ...]] = {}


def _is_plain(v: Any) -> bool:
    return (_KINDS.get(id(type(v))) or _kind(type(v))) is _PLAIN


def _read_off(v: Any) -> bool:
    """Whether what code reads off ``v`` is looked up (``_read``): a plain object, or a weak
    reference or proxy (its target's: ``self.owner().state.net(z)``, ``owner`` a
    ``weakref.ref`` a hook or module keeps against a cycle, was missed until rev-late32 where
    ``self.owner.state.net(z)`` was found: the script's optimized plan ran)."""
    kind = _KINDS.get(id(type(v))) or _kind(type(v))
    return kind is _PLAIN or kind is _REFERENCE


def _methods(cls: type, names: Iterable[str], names_read: set[str] | None = None) -> list[Any]:
    """The functions named ``names`` in the user's classes of ``cls``'s method resolution
    order (not PyTorch's: ``nn.Module``'s; not the built-in ones, ``_foreign``), and those
    named by what they read in turn: a module's ``forward`` and the helper methods it calls
    (``self.block(z)``), a base class's ``forward`` that ``super().forward(z)`` runs. Read at
    every call (a method replaced on the class is followed), each namespace's names met by
    one set intersection (in C: most names a method reads are not the class's, ``self.lin``);
    the names each code reads are remembered (``attribute_names``). ``names_read``: given, the
    names those functions read are added to it (``_read``)."""
    # (type's own descriptors: a metaclass's ``__getattribute__`` may raise or compute)
    dicts = [_DICT(c) for c in _MRO(cls) if not _foreign(c)]
    out: list[Any] = []
    todo, done = set(names), set()
    while todo and dicts:
        done |= todo
        read: list[str] = []
        for held in dicts:
            for name in held.keys() & todo:
                found = _functions(held[name])
                for v in found:
                    out.append(v)
                    read += attribute_names(v.__code__)
                    if getattr(v, "__wrapped__", None) is not None:  # (a decorated method)
                        read += [n for c in _wrapped(v) for n in attribute_names(c)]
                # (a class attribute read off an instance: ``act = staticmethod(scripted)``)
                if not found and _followed(v := _unwrapped(held[name])):
                    out.append(v)
        todo = set(read) - done
    if names_read is not None:
        names_read |= done
    return out


def _wrapped(fn: types.FunctionType) -> list[types.CodeType]:
    """The code objects of the functions ``fn`` wraps (``functools.wraps`` sets ``__wrapped__``),
    ``_FUNCTION_DEPTH`` deep at most: a decorated method's own body, which reads ``self``'s
    attributes (``self.state.run(z)``) where its wrapper only calls it (the wrapped function
    itself is met through the wrapper's closure, but not what it reads off ``self``: missed
    until walk31, divergence off). None for an undecorated function (most)."""
    out: list[types.CodeType] = []
    inner = getattr(fn, "__wrapped__", None)
    while type(inner) is types.FunctionType and len(out) < _FUNCTION_DEPTH:
        out.append(inner.__code__)
        inner = getattr(inner, "__wrapped__", None)
    return out


def _functions(v: Any) -> list[types.FunctionType]:
    """The Python functions a class attribute runs when read or called: a method's own, a
    static or class method's, a property's getter (its code, never run: ``self.act(z)``), a
    partial method's, cached property's or ``functools.lru_cache``d method's function, a
    ``functools.singledispatchmethod``'s registered functions, or the function a decorator
    object of the user's wraps (``functools.update_wrapper``: its ``__wrapped__``, read off
    its attributes by ``_namespace``); none for anything else (a plain function, the most
    met, told first: no ``isinstance`` of the others). The last two were missed until
    rev-late31: what their bodies read off ``self`` (``self.state.run(z)``) was never looked
    up, divergence off."""
    if type(v) is types.FunctionType:
        return [v]
    kind = type(v)  # (told by its type: ``isinstance`` reads ``__class__``, which a proxy's
    if issubclass(kind, _STATIC):  # ``__getattribute__`` may raise: every call raised, rev-late31)
        v = v.__func__
    elif issubclass(kind, property):
        v = v.fget
    elif issubclass(kind, _WRAPPING):
        v = v.func
    if type(v) is _CACHED:  # (``functools.cache``: its body, missed until rev-merges31; a
        v = v.__wrapped__  # static or class method's, until rev-late31)
    elif type(v) is types.FunctionType:  # (a static or class method's: the most met)
        return [v]
    elif issubclass(type(v), functools.singledispatchmethod):
        registry = attribute(attribute(v, "dispatcher"), "registry")
        held = registry.values() if issubclass(type(registry), _NAMESPACES) else ()
        return [f for f in held if type(f) is types.FunctionType]
    elif not _foreign(type(v)):  # (a decorator object: none of PyTorch's or C's)
        held = _namespace(v)
        v = held.get("__wrapped__") if type(held) is dict else None
    return [v] if type(v) is types.FunctionType else []


def _unwrapped(v: Any) -> Any:
    """What a class attribute ``v`` runs: a static or class method's callable
    (``staticmethod(partial(...))``); ``v`` itself otherwise."""
    return v.__func__ if issubclass(type(v), _STATIC) else v  # (not ``isinstance``: a proxy)


# (tuples made once: ``staticmethod | classmethod`` in a call built a ``types.UnionType`` at
# each, ~0.15 us; the walk tells ~60 values a call)
_STATIC = (staticmethod, classmethod)
_WRAPPING = (functools.partialmethod, functools.cached_property)
_NAMESPACES = (dict, types.MappingProxyType)
# a dictionary's views; with a mapping proxy, containers since walk32, read off their
# dictionary (``_viewed``)
_KEYS: type = type({}.keys())
_VALUES: type = type({}.values())
_ITEMS: type = type({}.items())
_VIEWS = (types.MappingProxyType, _KEYS, _VALUES, _ITEMS)
_CACHED = type(functools.lru_cache(None)(len))  # (``functools._lru_cache_wrapper``)


# what a class's ``__call__`` or a module class's ``forward`` may be besides a Python function,
# followed by the walk (``_told``, ``_own``; ``_callable``, told by the type: no kind read
# within a kind's reading, a class whose ``__call__`` is its own instance)
_CALLABLES = (functools.partial, types.MethodType, *_SCRIPTED, torch.ScriptMethod, torch.nn.Module)


# a class's method resolution order and namespace, read by ``type``'s own descriptors
_MRO = type.__dict__["__mro__"].__get__
_DICT = type.__dict__["__dict__"].__get__
# the built-in containers, whose methods are not the user's (``_read``)
_BUILT_IN_CONTAINERS = frozenset((list, tuple, dict, collections.deque, set, frozenset, *_VIEWS))


# the instructions that read an attribute (``self.block``, ``super().forward``: Python 3.12's
# ``LOAD_SUPER_ATTR``; 3.10-3.11's ``LOAD_METHOD``)
_ATTRIBUTE_READS = frozenset(("LOAD_ATTR", "LOAD_METHOD", "LOAD_SUPER_ATTR"))


@per_code
def attribute_names(code: types.CodeType) -> tuple[str, ...]:
    """The attribute names ``code`` and the code objects defined in it read.

    Example:
        >>> attribute_names((lambda z: runner.state.net(z)).__code__)
        ('state', 'net')
    """
    own = (i.argval for i in dis.get_instructions(code) if i.opname in _ATTRIBUTE_READS)
    inner = (attribute_names(c) for c in code.co_consts if isinstance(c, types.CodeType))
    return tuple(dict.fromkeys((*own, *sum(inner, ()))))


# (never 0: a miss); _OWN_MODULE: a module whose class has a forward of the user's (``_own``)
_SCRIPT, _MODULE, _OWN_MODULE, _METHOD, _PARTIAL, _FUNCTION, _OBJECT, _OTHER = range(1, 9)
# holders (``_held``): a list, tuple or dictionary; an object of the user's with attributes
# but no ``__call__`` of its own; a class of the user's (``_kind``)
_CONTAINER, _PLAIN, _CLASS = range(9, 12)
# (``_read`` only) a container of a class of the user's: a ``typing.NamedTuple``
_OWN_CONTAINER = 12
# a ``functools.lru_cache``d (``cache``d) function, C's wrapper: the function it wraps
_CACHE = 13
# an AOTInductor model (``ahead_of_time``): no autograd, refused (``scripted``'s ``lazy``)
_AHEAD = 14
# a weak reference or a ``weakref.proxy``: what it refers to (``target``)
_REFERENCE = 15
# what a container's items are followed as (not holders: a list of lists of numbers is data)
_IN_CONTAINERS = frozenset(
    (
        _SCRIPT,
        _MODULE,
        _OWN_MODULE,
        _METHOD,
        _PARTIAL,
        _FUNCTION,
        _OBJECT,
        _CACHE,
        _AHEAD,
        _REFERENCE,
    )
)
# the holders whose items or attributes a container's holders are read for (``_nested``)
_HOLDERS = frozenset((_CONTAINER, _PLAIN, _CLASS))
# the kinds ``_read`` reads attributes or methods off (a module's attributes: ``scripted``)
_READ_OFF = frozenset((_PLAIN, _CLASS, _OBJECT, _OWN_MODULE, _CONTAINER, _REFERENCE))
# what a plain object's or a class's attributes are followed as (not its methods, nor the
# objects it holds: a trainer's graph of objects)
_IN_OBJECTS = frozenset((_SCRIPT, _MODULE, _OWN_MODULE, _CONTAINER, _AHEAD, _REFERENCE))
# the attributes every module has (its parameters, buffers, submodules, hooks: dictionaries)
_MODULE_STATE = frozenset(vars(torch.nn.Module()))
# the forward hooks and pre-hooks registered for every module (``scripted``)
_GLOBAL_HOOKS = (
    torch.nn.modules.module._global_forward_hooks,
    torch.nn.modules.module._global_forward_pre_hooks,
)
# how many items of a container are looked at (a long list of tensors or numbers: the walk
# is made at every call)
_HELD_ITEMS = 64
# each type's kind by its id, forgotten when the type is freed (``_kind``)
_KINDS: dict[int, int] = {}


def _kind(kind: type) -> int:
    """What ``scripted`` does with an object of type ``kind``, kept by the type's ``id`` until
    the type is freed: a class made at every call (a model factory's class, each
    ``torch.fx.GraphModule``'s own class), kept as a key, stayed alive for the rest of the
    process with what its methods close over (tensors too). A class of the user's whose kind
    a ``forward`` or ``__call__`` set on it later changes (a subclass of a PyTorch module
    without a ``forward`` of its own, an object without ``__call__``: ``_WATCHED``) is kept
    with what it resolves that name to, and told again where that changed (a ``forward``
    set on an ``nn.Sequential`` subclass after a call, its scripted activation's optimized
    plan ran: fuzzscript30)."""
    watched = _WATCHED.get(id(kind))
    if watched is not None and _resolved(kind, watched[1]) is watched[2]:
        return watched[0]
    found = _told(kind)
    name = _DECIDED_BY.get(found)
    if name is not None and not _foreign(kind):
        _remember(_WATCHED, kind, (found, name, _resolved(kind, name)))
    else:
        _remember(_KINDS, kind, found)
    return found


def _callable(v: Any) -> bool:
    """Whether a class's ``__call__`` or a module class's ``forward`` that is no Python function
    is followed by the walk: a script, partial, bound method or module (``_CALLABLES``, told by
    its type: no kind read within a kind's reading), or an object wrapping a function
    (``_functions``: a class-based decorator, missed until rev-late31)."""
    return issubclass(type(v), _CALLABLES) or bool(_functions(v))


def _resolved(cls: type, name: str) -> Any:
    """What ``name`` is in the first namespace of ``cls``'s method resolution order holding it
    (``None``: none), read by ``type``'s own descriptors (a metaclass's may raise)."""
    for c in _MRO(cls):
        found = _DICT(c).get(name)
        if found is not None:
            return found
    return None


# the kinds that the class attribute named here, set on a class of the user's later, changes
# (``_kind``); such classes' kinds by their id, with that attribute's value then
_DECIDED_BY = {_MODULE: "forward", _PLAIN: "__call__", _CONTAINER: "__call__"}
_WATCHED: dict[int, tuple[int, str, Any]] = {}


def _told(kind: type) -> int:
    """``_kind``'s reading of the class ``kind``."""
    if issubclass(kind, (*_SCRIPTED, torch.ScriptMethod)):
        found = _SCRIPT
    elif ahead_of_time(kind):
        found = _AHEAD
    elif issubclass(kind, _WEAK):  # (before callable objects: a reference is called)
        found = _REFERENCE
    elif issubclass(kind, torch.nn.Module):
        found = _OWN_MODULE if _own(kind) else _MODULE
    elif issubclass(kind, types.MethodType):
        found = _METHOD
    elif issubclass(kind, functools.partial):
        found = _PARTIAL
    elif issubclass(kind, types.FunctionType):
        found = _FUNCTION
    elif kind is _CACHED:  # (C's ``lru_cache`` wrapper: no subclass can be made)
        found = _CACHE
    elif type(attribute(kind, "__call__")) is types.FunctionType and not (  # (else:
        attribute(kind, "__module__") or ""  # type's own; a metaclass may raise for either)
    ).startswith("torch."):
        found = _OBJECT  # a callable object of the user's (not PyTorch's: torch.ops packets)
    elif _callable(_unwrapped(_resolved(kind, "__call__"))) and not _pytorchs(kind):
        found = _OBJECT  # (its class's ``__call__`` a script, partial or module, a static
        # method's: ``__call__ = torch.jit.script(fn)``, or a decorator object's function:
        # read by the walk)
    elif issubclass(kind, _CONTAINERS) or issubclass(kind, WEAK_CONTAINERS):
        found = _OTHER if _pytorchs(kind) else _CONTAINER  # (torch.Size: not followed)
    elif issubclass(kind, type):
        found = _CLASS  # (PyTorch's classes: not followed, ``_held``)
    elif issubclass(kind, types.SimpleNamespace):
        found = _PLAIN  # (a holder of attributes, as an ``argparse.Namespace``)
    elif (
        not _pytorchs(kind)
        and attribute(kind, "__module__") not in _NOT_PLAIN
        and not issubclass(kind, types.ModuleType)  # (a library's lazy module: its names)
    ):
        found = _PLAIN  # (one without a ``__dict__``: its slots, ``_namespace``)
    else:
        found = _OTHER
    return found


def ahead_of_time(kind: type) -> bool:
    """Whether ``kind`` is the class (or a subclass) of an AOTInductor model: what
    ``torch._inductor.aoti_load_package`` returns (``AOTICompiledModel``), or one of the C++
    runners of ``torch._C._aoti`` (``torch._export.aot_load``'s). Such a model runs compiled
    C++ kernels without autograd: under every engine its outputs are constants of ``x``, and
    its derivatives read as zeros (PyTorch's C++ printing an error under ``torch.func``)."""
    for c in _MRO(kind):
        module = attribute(c, "__module__")
        if module == "torch._C._aoti" or (
            attribute(c, "__name__") == "AOTICompiledModel" and _pytorchs(c)
        ):
            return True
    return False


def _remember(table: dict[int, Any], kind: type, value: Any) -> None:
    """``table[id(kind)] = value`` until the class ``kind`` is freed (its ``id`` may then be
    another class's)."""
    key = id(kind)
    if key not in table:
        weakref.finalize(kind, table.pop, key, None)
    table[key] = value


def _foreign(cls: type) -> bool:
    """Whether the class ``cls`` holds nothing of the user's that ``scripted`` follows: a
    built-in class (a static type, or one whose namespace cannot be set: ``functools.partial``;
    C's methods, never a Python function nor one the user put there) or PyTorch's
    (``_pytorchs``). Read once per class and ``__module__`` (``_FOREIGN``): a class's
    ``__module__`` can be set (``Cls.__module__ = "torch.nn"`` and back), and a class kept
    as PyTorch's after it became the user's again was never followed (its scripted code's
    optimized plan ran: forward mode's divergence 0, rev-lead30)."""
    held = _FOREIGN.get(id(cls))
    if held is _BUILT_IN:
        return True
    try:
        module = _MODULE_NAME(cls)
    except AttributeError:  # (a class made by ``exec`` without a ``__name__``: none)
        module = None
    if held is not None and held[0] is module:
        return held[1]
    flags = _FLAGS(cls)
    if flags & _IMMUTABLE_TYPE or not flags & _HEAP_TYPE:  # (for good: flags never change)
        _remember(_FOREIGN, cls, _BUILT_IN)
        return True
    found = _pytorchs(cls)
    _remember(_FOREIGN, cls, (module, found))
    return found


# ``_foreign`` of each class by its id, with the ``__module__`` it was told under, forgotten
# when the class is freed; a class's flags (read by ``type``'s own descriptor) and CPython's
# flags of a class whose namespace cannot be set (Python 3.10 on) and of one not made
# statically in C (every class statement's)
_FOREIGN: dict[int, tuple[Any, bool]] = {}
_BUILT_IN = (None, True)  # (a built-in class's entry, whatever its ``__module__``)
_FLAGS = type.__dict__["__flags__"].__get__
_MODULE_NAME = type.__dict__["__module__"].__get__
_IMMUTABLE_TYPE, _HEAP_TYPE = 1 << 8, 1 << 9


def attribute(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)``, also ``None`` where ``obj``'s ``__getattr__`` raises another
    error than ``AttributeError`` (a proxy's ``KeyError``): for the attributes torchdiv reads
    off the caller's ``f`` to tell what it is (``__self__``, a compiled function's original)."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def instance(v: Any, kinds: type | tuple[type, ...]) -> bool:
    """``isinstance(v, kinds)`` (a proxy by what it stands for), false where reading ``v``'s
    ``__class__`` raises: a dead ``weakref.proxy``, an unbound context-local proxy held by
    ``f`` (a partial's argument, a closure cell, a class's ``__call__``, a frame's ``self``)
    made every call of ``f`` raise its error until the lead's thirty-first session
    (rev-late31's reproducer), or the watch's message, taken for an engine that cannot run,
    ran ``f`` per sample unwatched (rev-lead31)."""
    try:
        return isinstance(v, kinds)
    except Exception:
        return False


# the types of ``weakref.proxy`` objects (``referent``)
PROXIES = frozenset(weakref.ProxyTypes)


def referent(v: Any, strict: bool = True) -> Any:
    """``v``, or what a ``weakref.proxy`` ``v`` stands for, read off a method bound to it
    through the proxy: an object's ``__getattribute__``, a class's ``mro`` (a class's own
    ``__getattribute__`` is its instances', unbound: no ``__self__``); ``None`` where it is
    dead; ``v`` itself where its target cannot be read so (an object whose
    ``__getattribute__`` raises: until rev-merges32 every call of ``f`` raised; until
    rev-late32 ``None``, which the structure key told as a flag, a module swapped in behind
    it served the old pass) or gives another object's method (one forwarding every
    attribute read to another: the other's state was keyed for it until rev-late32; not
    ``strict``: the other, for the TorchScript walk, where reading more is safe: a lazy
    object proxy's ``__getattribute__`` forwards to the object that runs). A proxy takes no
    weak reference and hides its target's closure and globals.

    >>> import weakref
    >>> net = torch.nn.Linear(2, 2)
    >>> referent(weakref.proxy(net)) is net
    True
    """
    if type(v) not in PROXIES:
        return v
    try:
        bound = v.mro if instance(v, type) else v.__getattribute__
        found = bound.__self__
    except ReferenceError:  # (dead)
        return None
    except Exception:  # (the target's own error: not read)
        return v
    # (what the target's attribute lookup gave: the target only where ``v`` refers to it, by
    # C's list of its weak references, no code of the user's; an object whose
    # ``__getattribute__`` forwards to another gave the other, whose state the structure key
    # then read for the target's, until rev-late32)
    if not strict or any(r is v for r in weakref.getweakrefs(found)):
        return found
    return v


def target(v: Any, strict: bool = True) -> Any:
    """What the weak reference or ``weakref.proxy`` ``v`` refers to (``None``: dead): a
    reference's by ``weakref.ref``'s own ``__call__`` (C's, not a subclass's), told by its
    type (``isinstance`` reads a proxy's ``__class__``, its target's, which may raise); a
    proxy's by ``referent``; a ``weakref.WeakMethod``'s bound method (the standard library's
    ``__call__``: a reference's own gives the method's object, not its function).
    ``strict``: ``referent``'s."""
    kind = type(v)
    if issubclass(kind, weakref.WeakMethod):
        return weakref.WeakMethod.__call__(v)
    return weakref.ref.__call__(v) if issubclass(kind, weakref.ref) else referent(v, strict)


# the weak references (a ``WeakValueDictionary``'s ``KeyedRef``, a ``WeakSet``'s) and proxies
_WEAK: tuple[type, ...] = (weakref.ref, *weakref.ProxyTypes)
# the containers of weak references, read as containers (``weakly_held``)
WEAK_CONTAINERS = (weakref.WeakValueDictionary, weakref.WeakKeyDictionary, weakref.WeakSet)


def cell_contents(fn: Any) -> list[Any]:
    """What the cells of ``fn``'s closure hold (an empty cell, a name bound later: none)."""
    out = []
    for cell in fn.__closure__ or ():
        try:  # (not ``contextlib.suppress``: a context manager per cell, ~0.4 us)
            held = cell.cell_contents
        except ValueError:
            continue
        out.append(held)
    return out


# the built-in containers whose items ``_held`` follows (a ``collections.deque``, a set: read
# as plain objects until walk31, none of their items followed) and each one's own iterator,
# by the built-in's own method (not a subclass's, which may raise or compute)
_CONTAINERS = (list, tuple, dict, collections.deque, set, frozenset, *_VIEWS)
_ITERATORS: tuple[tuple[type, Callable[[Any], Iterator[Any]]], ...] = (
    (list, list.__iter__),
    (tuple, tuple.__iter__),
    (collections.deque, collections.deque.__iter__),
    (set, set.__iter__),
    (frozenset, frozenset.__iter__),
)


# each built-in container's (and dictionary view's) own ``__len__`` (``_size``)
_SIZED: tuple[Any, ...] = (
    dict,
    list,
    tuple,
    collections.deque,
    set,
    frozenset,
    _KEYS,
    _VALUES,
    _ITEMS,
)
_LENGTHS: tuple[tuple[type, Callable[[Any], int]], ...] = tuple(
    (base, base.__len__) for base in _SIZED
)
_LENGTH_OF: dict[type, Callable[[Any], int]] = dict(_LENGTHS)


def _iterate(obj: Any) -> Iterator[Any]:
    """An iterator over the items of the container ``obj`` (not a dictionary) by its built-in
    class's own ``__iter__``; a weak container's references (``weakly_held``; told last:
    ``issubclass`` of an ``ABCMeta`` class, ``WeakValueDictionary``, runs Python's
    ``__subclasscheck__``: ~0.2 us a list or tuple, read before them)."""
    for base, iterate in _ITERATORS:
        if isinstance(obj, base):
            return iterate(obj)
    if issubclass(type(obj), WEAK_CONTAINERS):
        return iter(weakly_held(obj))
    return iter(())


# the modules of types whose objects are not plain holders (numbers, strings, functions'
# parts, modules: ``_kind``)
_NOT_PLAIN = frozenset(("builtins", "types", "functools", "numpy", "enum", "typing"))


def _pytorchs(kind: type) -> bool:
    """Whether the class ``kind`` is PyTorch's (``torch`` or a module below it)."""
    module = attribute(kind, "__module__")
    return isinstance(module, str) and (module == "torch" or module.startswith("torch."))


def _followed(v: Any) -> bool:
    """Whether ``scripted`` follows a value a module, partial or callable object holds: a
    module (a partial's argument, ``partial(run, net)``, or an object's attribute: a holder's
    scripted submodule ran its optimized plan, forward mode's divergence 0 and parameter
    gradients gone), a function, method, partial or script."""
    return (_KINDS.get(id(type(v))) or _kind(type(v))) is not _OTHER


def _named(fn: types.FunctionType) -> list[Any]:
    """What ``fn``'s closure cells and default arguments hold and the globals its code names
    that ``scripted`` follows, read at every call: a global bound to ``None`` (or anything
    else) at one call and to a scripted function at a later one is followed there (its
    optimized plan dropped parameter gradients); ``def f(z, act=scripted)`` too. ``torch``,
    ``F`` and constants are skipped by their type's kind."""
    names = fn.__globals__  # (a dictionary's ``get`` mapped in C: no generator)
    found = list(map(names.get, global_names(fn.__code__)))
    if fn.__defaults__ or fn.__kwdefaults__:  # (most functions have none)
        found += (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values())
    kinds = _KINDS
    held = [v for v in found if (kinds.get(id(type(v))) or _kind(type(v))) is not _OTHER]
    return cell_contents(fn) + held if fn.__closure__ else held


# the instructions that read a global name (a class body's ``LOAD_NAME`` may; Python 3.12's
# ``LOAD_FROM_DICT_OR_GLOBALS`` in one with annotations)
_GLOBAL_READS = frozenset(("LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"))


@per_code
def global_names(code: types.CodeType) -> tuple[str, ...]:
    """The global names ``code`` and the code objects defined in it (an inner lambda) read:
    ``lambda z: (lambda w: m(w))(z)`` names the global ``m`` in its inner code only. Not the
    attributes it reads, which ``co_names`` holds too: ``lambda z: net(z)[state.order]``
    beside a global ``order`` (the one ``state.order`` was set from) held that global, and
    the watch's key took the index tensor in it for the one ``f`` reads, a pass kept for it
    serving calls after ``state.order`` was replaced (rev-functional20).

    Example:
        >>> global_names((lambda z: net(z)[state.order]).__code__)
        ('net', 'state')
    """
    own = (i.argval for i in dis.get_instructions(code) if i.opname in _GLOBAL_READS)
    inner = (global_names(c) for c in code.co_consts if isinstance(c, types.CodeType))
    return tuple(dict.fromkeys((*own, *sum(inner, ()))))


def _own(kind: type) -> bool:
    """Whether the ``forward`` of the module class ``kind`` is a Python function that can reach
    TorchScript (what it names is read at every call, ``_named``). PyTorch's own layers
    (``nn.Linear``'s forward names ``F``) are not followed, nor their attributes: their
    globals are PyTorch's, and walking them and their ``__dict__`` at every call made it
    ~3.5x dearer (an MLP of PyTorch's layers: 3.6 -> 12.5 us)."""
    forward = _unwrapped(_resolved(kind, "forward"))  # (not by a metaclass's lookup: may raise)
    if type(forward) is not types.FunctionType:  # (a script, a partial set as forward, by
        return _callable(forward) and not _pytorchs(kind)  # user, a decorator object: followed)
    module = attribute(forward, "__module__") or ""  # (None: made by exec)
    return not module.startswith("torch.")
