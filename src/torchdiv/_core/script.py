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

import contextlib
import functools
import types
from typing import Any

import torch

_SCRIPTED = (torch.jit.ScriptModule, torch.jit.ScriptFunction)


def forget_plans(f: Any) -> None:
    """Drop the executor plans of every scripted module and function ``f`` reaches (see
    ``scripted``); nothing else is changed."""
    for found in scripted(f):
        method = found if isinstance(found, torch.jit.ScriptFunction) else found.forward
        flush = getattr(method, "_debug_flush_compilation_cache", None)
        if flush is not None:
            flush()


def scripted(f: Any, depth: int = 2) -> list[Any]:
    """The ``torch.jit.ScriptModule``s and ``ScriptFunction``s ``f`` is or reaches: through
    submodules (not into a scripted one: its calls are inlined in its own graph) and their
    classes' ``forward``, bound methods, partials, and a function's closure cells and the
    globals its code names (a scripted activation), ``depth`` functions deep. Each object's
    kind is read from its type once per type (``_kind``): about 0.5 us per module."""
    out: list[Any] = []
    seen: set[int] = set()
    todo = [(f, depth)]
    while todo:
        obj, left = todo.pop()
        kind = _KINDS.get(type(obj)) or _kind(type(obj))
        if kind is _OTHER or id(obj) in seen:
            continue
        seen.add(id(obj))
        if kind is _SCRIPT:
            out.append(obj)
        elif kind is _MODULE:  # its submodules, and what its forward names (a helper)
            todo += [(m, left) for m in obj._modules.values()]
            forward = _forward(type(obj))
            if forward is not None:
                todo.append((forward, left))
        elif kind is _METHOD:
            todo += [(obj.__self__, left), (obj.__func__, left)]
        elif kind is _PARTIAL:
            todo.append((obj.func, left))
        elif left > 0:  # a function
            todo += [(held, left - 1) for held in _named(obj)]
    return out


_SCRIPT, _MODULE, _METHOD, _PARTIAL, _FUNCTION, _OTHER = range(1, 7)  # (never 0: a miss)
_KINDS: dict[type, int] = {}


def _kind(kind: type) -> int:
    """What ``scripted`` does with an object of type ``kind`` (kept per type)."""
    if issubclass(kind, _SCRIPTED):
        found = _SCRIPT
    elif issubclass(kind, torch.nn.Module):
        found = _MODULE
    elif issubclass(kind, types.MethodType):
        found = _METHOD
    elif issubclass(kind, functools.partial):
        found = _PARTIAL
    elif issubclass(kind, types.FunctionType):
        found = _FUNCTION
    else:
        found = _OTHER
    _KINDS[kind] = found
    return found


def cell_contents(fn: Any) -> list[Any]:
    """What the cells of ``fn``'s closure hold (an empty cell, a name bound later: none)."""
    out = []
    for cell in fn.__closure__ or ():
        with contextlib.suppress(ValueError):
            out.append(cell.cell_contents)
    return out


def _named(fn: types.FunctionType) -> list[Any]:
    """What ``fn``'s closure cells hold and the globals its code names that ``scripted``
    follows (the names kept per code object at first sight: ``torch``, ``F`` and constants
    are not looked up again at every call)."""
    out = cell_contents(fn)
    names, code = fn.__globals__, fn.__code__
    kept = _GLOBALS.get(code)
    if kept is None:
        found = (n for n in code.co_names if n in names)
        kept = _GLOBALS[code] = tuple(n for n in found if _kind(type(names[n])) != _OTHER)
    return out + [names[n] for n in kept if n in names]


_GLOBALS: dict[types.CodeType, tuple[str, ...]] = {}
_FORWARDS: dict[type, Any] = {}


def _forward(kind: type) -> Any:
    """The ``forward`` of the module class ``kind`` if it names anything ``scripted``
    follows (``nn.Linear``'s names ``F`` alone: ``None``), kept per class."""
    if kind in _FORWARDS:
        return _FORWARDS[kind]
    forward = getattr(kind, "forward", None)
    follows = isinstance(forward, types.FunctionType) and (
        forward.__closure__ or any(True for _ in _named(forward))
    )
    _FORWARDS[kind] = forward if follows else None
    return _FORWARDS[kind]
