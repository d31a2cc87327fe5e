"""Dynamo's decorators (``torch.compiler.disable``, ``torch.compiler.assume_constant_result``)
applied when ``torch._dynamo`` is imported, not when torchdiv is.

Both decorators import ``torch._dynamo``: 1-2 s, most of ``import torchdiv``, paid by every
process (a script, a CLI, each data-loader or DDP worker). What they mark matters only while
Dynamo traces, which it cannot before ``torch._dynamo`` is imported (``torch.compile`` imports
it). So each is applied at once where Dynamo is imported already, and otherwise by an import
hook right after ``torch._dynamo`` has run (``_Watch``): before anything can be traced. Not at a
torchdiv call instead: the first one may be inside a compiled function, where Dynamo would trace
the call of ``torch.compiler.disable`` itself (a graph break of its own), and a function marked
constant only once traced would have been traced already.

Example::

    @compiler_disabled  # the module's _refused is torch.compiler.disable(_refused) by then
    def _refused(out, message): ...
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_DYNAMO = "torch._dynamo"
_LOCK = threading.Lock()
_PENDING: list[Callable[[types.ModuleType], object]] = []  # run when Dynamo is imported
_WATCHING: list[bool] = []  # whether the import hook is installed


def when_imported(act: Callable[[types.ModuleType], object]) -> None:
    """``act(torch._dynamo)`` now where Dynamo is imported, or right after it is (once).

    Pending first, then Dynamo looked for: an import another thread is running is waited for
    (``import_module``) and the pending acts run here, or, where it starts after the watch was
    installed, by its loader (``_Then``); either runs them once (``_run_pending`` takes them
    under the lock)."""
    with _LOCK:
        _PENDING.append(act)
        if not _WATCHING:  # (installed once, never taken out: other threads iterate the list)
            sys.meta_path.insert(0, _Watch())
            _WATCHING.append(True)
    if _DYNAMO in sys.modules:  # imported, or being imported
        dynamo = importlib.import_module(_DYNAMO)
        if not getattr(dynamo.__spec__, "_initializing", False):  # (not this thread's import)
            _run_pending(dynamo)


def disable_later(fn: F, put: Callable[[F], object], *, reason: str | None = None) -> None:
    """``put(torch.compiler.disable(fn, reason=reason))`` (recursive) now or when Dynamo is
    imported: ``put`` rebinds the name a caller calls, a closure's (``nonlocal``) or a class's
    attribute; until then, without Dynamo, ``fn`` runs as the disabled version would (no frame
    is traced)."""
    when_imported(lambda dynamo: put(dynamo.disable(fn, recursive=True, reason=reason)))


def compiler_disabled(fn: F) -> F:
    """Decorate a module-level function: its module's name for it is rebound to
    ``torch.compiler.disable(fn)`` (recursive) now or when Dynamo is imported. Callers must
    look the name up in the module when they call it (no ``from module import fn``)."""
    namespace = fn.__globals__  # type: ignore[attr-defined]
    if fn.__qualname__ != fn.__name__:
        raise TypeError(f"compiler_disabled: {fn.__qualname__} is not a module-level function")
    bound = [fn]  # what the decorated ``def`` binds: disabled already where Dynamo is imported

    def put(disabled: F) -> None:
        bound[0] = namespace[fn.__name__] = disabled

    disable_later(fn, put)
    return bound[0]


def constant_when_traced(fn: F) -> F:
    """``torch.compiler.assume_constant_result(fn)`` now or when Dynamo is imported (it marks
    ``fn`` itself: Dynamo runs it at trace time, its result a constant of the graph)."""
    when_imported(lambda dynamo: dynamo.assume_constant_result(fn))
    return fn


def _run_pending(dynamo: types.ModuleType) -> None:
    with _LOCK:
        acts = list(_PENDING)
        _PENDING.clear()
    for act in acts:
        act(dynamo)


class _Watch(importlib.abc.MetaPathFinder):
    """Finds ``torch._dynamo`` as the finders after it do, with a loader that runs the pending
    acts once the module has run (``_Then``)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _DYNAMO:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if isinstance(spec.loader, importlib.abc.Loader) and (
                    hasattr(spec.loader, "exec_module")
                ):
                    spec.loader = _Then(spec.loader)
                return spec
        return None


class _Then(importlib.abc.Loader):
    """``loader``, then the pending acts (after the module ran; not if it raised). The
    module's ``__loader__`` and its spec's are ``loader`` again before it runs."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        _run_pending(module)
