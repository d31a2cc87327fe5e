"""Modes the function-form API runs under: outside inference mode, compiled code run eagerly,
attention as primitives, ops with wrong or missing derivatives replaced (``SafeDerivatives``), and
host-side planning."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import inspect
import math
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
import torch._library.custom_ops as _custom_ops
import torch.autograd.forward_ad as _forward_ad
import torch.nn.utils.parametrize as _parametrize
import torch.utils.checkpoint as _checkpoint
from torch._C._autograd import _top_saved_tensors_default_hooks
from torch._C._dynamo.eval_frame import get_eval_frame_callback
from torch._C._functorch import (
    get_unwrapped,
    is_batchedtensor,
    is_functorch_wrapped_tensor,
    maybe_get_level,
)
from torch.autograd.forward_ad import _set_fwd_grad_enabled, unpack_dual
from torch.fx.operator_schemas import normalize_function
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules import module as _module_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _disable_current_modes,
    any_torch_dispatch_mode_on_stack,
    is_in_any_mode_without_ignore_compile_internals,
)
from torch.utils._pytree import tree_leaves, tree_map

from torchdiv._core import linalg as _linalg
from torchdiv._core.ddp import in_process_group, one_forward, spans_peers
from torchdiv._core.power import plain_exponent, power
from torchdiv._core.script import attribute, cached, call_ended, call_started, cell_contents
from torchdiv._core.subclass import DEAD_LEVEL, plain_unwrapped
from torchdiv._core.versions import slope

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def outside_inference_mode(fn: F) -> F:
    """Decorate ``fn(f, x, ...)`` so that it works when called under ``torch.inference_mode()``,
    leaves the caller's compiled code compiled (``CompiledCodeEager``) and is one forward pass
    of the DistributedDataParallel and FSDP2 modules ``f`` calls (``_core.ddp.one_forward``).

    The call runs ``outside_inference``: an inference-tensor ``x`` is cloned into a normal one;
    the caller's ``x`` is not touched.

    Where Dynamo traces the call under a process group, the call runs eagerly as a whole (a
    graph break at it): ``one_forward``'s handling of DDP and FSDP2 modules (their buffer
    broadcast, outside the transforms; the reducer's bookkeeping) cannot be traced, and traced
    without it a DDP module's buffer broadcast under the transforms raised, or plain
    autograd's fallback gave a compiled loss the divergence's value but none of its parameter
    gradients.
    """

    @functools.wraps(fn)
    def wrapper(f: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():  # Dynamo traces the call: no mode checks to break on
            if in_process_group():
                return eager(f, x, *args, **kwargs)
            _materialized_zero_tangents()
            return fn(f, x, *args, **kwargs)
        return _eager_call(fn, f, x, args, kwargs)

    eager = cast(Callable[..., Any], torch.compiler.disable(wrapper))  # untyped in torch
    return wrapper  # type: ignore[return-value]


def _eager_call(
    fn: Callable[..., T], f: Any, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> T:
    """``outside_inference_mode``'s call of ``fn(f, x, *args, **kwargs)`` outside a region
    Dynamo traces."""
    started = call_started(f)  # TorchScript in f: run as written (with the flag below)
    guards = _fabric_guards_off()
    trackers = _trackers_off()
    try:
        with CompiledCodeEager():
            if not spans_peers():  # no process group (or an outer call's): nothing to share
                if not (args or kwargs or _inferring((f, x))):  # (a call without options:
                    return fn(f, x)  # ``outside_inference``'s usual case, a frame fewer)
                return outside_inference(fn, f, x, *args, **kwargs)
            with one_forward() as call:
                result = outside_inference(fn, f, x, *args, **kwargs)
                return result if call is None else call.finish(result, getattr(x, "grad_fn", None))
    finally:
        call_ended(started)
        _fabric_guards_on(guards)
        _trackers_on(trackers)


def _kept(t: torch.Tensor) -> torch.Tensor:
    return t.detach()  # (not ``t``: the saved output's node would hold itself, a cycle)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def saves_apart() -> contextlib.AbstractContextManager[Any]:
    """Inside the caller's non-reentrant ``torch.utils.checkpoint`` region: saved-tensor hooks
    of torchdiv's own for a block, which keep what it saves as it is (elsewhere none).

    For the generic engines (``_exact.dispatch.evaluate``, its explicit forward and reverse
    modes too: forward mode refuses a checkpoint's hooks, meant for one in ``f``), the
    grad-of-grad loop (``_laplacian.loop``: a selective checkpoint allows one backward pass
    through its region) and flows' check for stopped gradients (``_stopped``: its backward
    passes through ``f``'s own checkpoint nested a recomputation): the checkpoint's hooks hand a
    saved tensor back only by recomputing the whole region, so every backward pass such an
    engine took inside it (plain autograd's rows, the estimators' products) set off that
    recomputation in the middle of the region's forward (PyTorch's ``CheckpointError`` or
    its internal "early_stop is set" assertion: ``"auto"`` on small problems, ``jacobian``'s
    fallback, Hutch++, XTrace), and an engine taking another path at the recomputation
    saved other tensors. Kept apart, their saves are their own (kept as without the
    checkpoint), the checkpoint's those of the rest of the region, alike in both passes. The
    structured and Taylor engines take no backward pass inside the call: their saves stay
    the checkpoint's (recomputed, as the caller asked)."""
    if torch.compiler.is_compiling():  # (Dynamo traces the call: its graph, no hooks read)
        return _NOTHING
    hooks = _top_saved_tensors_default_hooks(True)
    if hooks is None or getattr(hooks[0], "__module__", None) != _checkpoint.__name__:
        return _NOTHING  # (the usual case; nested: already apart)
    return torch.autograd.graph.saved_tensors_hooks(_kept, _same)


_NOTHING = contextlib.nullcontext()


def checkpointed() -> bool:
    """Whether the call runs inside ``torch.utils.checkpoint(..., use_reentrant=False)`` (its
    forward, or its recomputation in the backward pass; an engine's saves kept apart:
    ``saves_apart``). There no plan is read or kept (``PlanCache``): the first call at a
    structure recorded ``f`` (or watched it) and its recomputation found the recording kept
    and took another path. Not while Dynamo traces."""
    if torch.compiler.is_compiling():
        return False
    hooks = _top_saved_tensors_default_hooks(True)
    return hooks is not None and (
        hooks[0] is _kept or getattr(hooks[0], "__module__", None) == _checkpoint.__name__
    )


# PyTorch's module trackers (``torch.utils.module_tracker.ModuleTracker``, which
# ``torch.utils.flop_counter.FlopCounterMode`` enters; ``torch.distributed._tools.mod_tracker.
# ModTracker``, ``CommDebugMode``'s and ``MemTracker``'s) hook, by global forward hooks, every
# module input and output that requires grad with a hook of all their gradients: at the first
# of them in an ``autograd.grad`` pass it asks the engine which of them it will reach, which
# PyTorch refuses for a leaf (``x``'s, ``torch.func``'s inputs: "A leaf node was passed to
# _will_engine_execute_node", pytorch#131753); their ``requires_grad`` reads stopped the
# recording engines, and ``CommDebugMode``'s global full backward pre-hook (an
# ``autograd.Function`` around every module) the transforms
_TRACKERS_BY_MODULE = {
    "torch.utils.module_tracker": "ModuleTracker",
    "torch.distributed._tools.mod_tracker": "ModTracker",
}


_FORWARD_HOOKS = (_module_hooks._global_forward_pre_hooks, _module_hooks._global_forward_hooks)
_BACKWARD_HOOKS = (_module_hooks._global_backward_pre_hooks, _module_hooks._global_backward_hooks)
_INSIDE = threading.local()  # ``depth``: this thread's calls inside with the trackers lifted

# what ``_untracked`` lifted: the forward hooks' stand-ins, each backward dictionary's items
# before and the keys removed from it
_Lifted = tuple[list["LiftedHook"], list[tuple[dict[int, Any], list[tuple[int, Any]], set[int]]]]


def _trackers_off() -> bool:
    """Lift the module hooks of every module tracker (``FlopCounterMode``'s) for the threads
    inside a call (``_TRACKERS`` counts the calls of every thread); whether this call holds
    them (``_trackers_on`` lets go). Another thread's modules stay tracked meanwhile (its
    counter's module breakdown was lost, or kept a module its forward entered before the
    lift and left during it). The tracker's dispatch mode still sees every op the call runs:
    a FLOP counter counts them, under the modules around the call rather than ``f``'s own."""
    if not _module_hooks._global_forward_pre_hooks:
        return False  # the usual case: no global hooks
    _TRACKERS.enter(_untracked)
    _INSIDE.depth = getattr(_INSIDE, "depth", 0) + 1
    return True


class LiftedHook:
    """A tracker's global forward (pre-)hook, skipped in the threads inside a call, under its
    key: a tracker that exits meanwhile (another thread's counter) removes it by its key."""

    def __init__(self, hook: Any) -> None:  # (a bound method)
        self.hook = hook

    def __call__(self, *args: Any) -> Any:
        return None if getattr(_INSIDE, "depth", 0) else self.hook(*args)


def _untracked() -> _Lifted:
    """Replace each module tracker's global forward hooks by ``LiftedHook`` stand-ins, and
    remove its backward ones (``CommDebugMode``'s): a non-empty dictionary of those wraps
    every module in a full backward hook (an ``autograd.Function`` that ``torch.func``
    refuses), so they are off in every thread meanwhile."""
    modules = sys.modules
    trackers = tuple(
        getattr(modules[name], cls) for name, cls in _TRACKERS_BY_MODULE.items() if name in modules
    )
    stand_ins = []
    for hooks in _FORWARD_HOOKS:
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), trackers):
                hooks[key] = stand_in = LiftedHook(hook)  # (same keys: no resize under a reader)
                stand_ins.append(stand_in)
    removed = []
    for hooks in _BACKWARD_HOOKS:
        before = list(hooks.items())
        keys = {k for k, hook in before if isinstance(getattr(hook, "__self__", None), trackers)}
        for key in keys:
            del hooks[key]
        if keys:
            removed.append((hooks, before, keys))
    return stand_ins, removed


def _trackers_on(held: bool) -> None:
    """Where the call held the module trackers lifted (``_trackers_off``), let go: the last
    call to leave puts back those the first lifted."""
    if held:
        _INSIDE.depth -= 1
        _TRACKERS.exit(_tracked)


def _tracked(lifted: _Lifted) -> None:
    """Put the trackers' hooks back: a forward hook where its stand-in still is, a backward
    one in its place among the hooks there now (those registered meanwhile last, those
    removed meanwhile left out) where its tracker's forward hooks are still there. A tracker
    that exited meanwhile (another thread's ``with FlopCounterMode()``) removed its stand-ins:
    putting its hooks back kept a dead tracker hooking every module for good (a later plain
    ``autograd.grad`` of a module raised pytorch#131753's error)."""
    stand_ins, removed = lifted
    live: set[int] = set()
    for hooks in _FORWARD_HOOKS:
        for key, hook in list(hooks.items()):
            if isinstance(hook, LiftedHook) and hook in stand_ins:
                hooks[key] = hook.hook
                live.add(id(hook.hook.__self__))
    for hooks, before, keys in removed:
        now = dict(hooks)
        hooks.clear()
        for key, hook in before:
            if key in now or (key in keys and id(hook.__self__) in live):
                hooks[key] = now.pop(key, hook)
        hooks.update(now)


# Lightning Fabric's module wrapper (either package) hooks every output of a module set up
# by Fabric that requires grad with a guard (``_backward_hook``): where the precision or the
# strategy has a backward of its own (``bf16-mixed``, FSDP, DeepSpeed) it raises in any
# backward pass not started by ``fabric.backward`` (its flag ``_in_fabric_backward``)
_FABRIC_WRAPPERS = ("lightning.fabric.wrappers", "lightning_fabric.wrappers")


def _fabric_guards_off() -> bool:
    """Switch Fabric's guards off (``_in_fabric_backward`` set) while this call, or a call of
    another thread that overlaps it, is inside (``_FABRIC``); whether the call holds them off
    (``_fabric_guards_on`` puts them back). torchdiv's own backward passes through a Fabric
    module's outputs are not the caller's loss backward the guard checks (they raised
    Fabric's "requires you to call fabric.backward(loss)"). A guard registered in a plain
    evaluation of the call stays on the result's graph: it guards the caller's backward
    pass. Held by a count, not by each call: the first of two threads' calls to end switched
    the guards back on under the other's backward passes, which raised Fabric's error."""
    modules = sys.modules
    if _FABRIC_WRAPPERS[0] not in modules and _FABRIC_WRAPPERS[1] not in modules:
        return False  # the usual case: 0.2 us a call (0.4 us by the loop; 0.7 us with it)
    _FABRIC.enter(_switched_off)
    return True


def _switched_off() -> list[Any]:
    """Fabric's wrapper modules (either package's) whose guard flag was off, now set."""
    off: list[Any] = []
    for name in _FABRIC_WRAPPERS:
        wrappers: Any = sys.modules.get(name)
        if wrappers is not None and getattr(wrappers, "_in_fabric_backward", True) is False:
            wrappers._in_fabric_backward = True
            off.append(wrappers)
    return off


def _fabric_guards_on(held: bool) -> None:
    """Where the call held Fabric's guards off (``_fabric_guards_off``), let go: the last
    call to leave switches back on those the first switched off."""
    if held:
        _FABRIC.exit(_switched_on)


def _switched_on(off: list[Any]) -> None:
    for wrappers in off:
        wrappers._in_fabric_backward = False


def fabric_guards_off(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate ``fn`` (the graph form: its backward passes walk the caller's ``y``) to run
    with Lightning Fabric's guards off (``_fabric_guards_off``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        guards = _fabric_guards_off()
        try:
            return fn(*args, **kwargs)
        finally:
            _fabric_guards_on(guards)

    return wrapper


def entry(*outer: Callable[[F], F]) -> Callable[[F], F]:
    """Decorate a public ``fn(f, x, *, **options)`` with ``outside_inference_mode`` and above
    it the decorators ``outer`` (outermost first: ``eager_when``, ``compiled_like_f``), in one
    Python frame where the call is eager and ``f`` is not ``torch.compile``d: there each of
    ``outer`` only passes the call on (``is_compiling`` false, ``_compiled_parts`` ``None``),
    so the call goes straight to what ``outside_inference_mode`` runs eagerly. Elsewhere the
    whole chain runs, as stacked. Three wrappers and two ``is_compiling`` checks (each two
    Python calls) fewer in every eager call: a tiny problem's call is mostly Python, run
    with its objects out of the caches by ``f``'s kernels (issue 19)."""

    def decorate(fn: F) -> F:
        chain: Callable[..., Any] = outside_inference_mode(fn)
        for decorator in reversed(outer):
            chain = decorator(chain)

        @functools.wraps(fn)
        def wrapper(f: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling() or _compiled_parts(f) is not None:
                return chain(f, x, *args, **kwargs)
            return _eager_call(fn, f, x, args, kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def outside_inference(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` outside inference mode, with the caller's grad mode, each
    inference tensor among ``args`` and ``kwargs`` (``sigma=``, ``probes=``, ...) cloned into
    a normal one (the caller's is not touched).

    Derivatives need autograd, which inference mode switches off (silently: ``enable_grad``
    does not undo it), and an inference tensor cannot be saved for a backward pass: probes
    drawn once under ``torch.inference_mode()`` (an evaluation loop's) and passed to a
    training call as ``probes=``, or a ``sigma=`` made there, raised PyTorch's "Inference
    tensors cannot be saved for backward"."""
    if not _inferring((*args, *kwargs.values())):
        return fn(*args, **kwargs)  # the usual case
    grad_mode = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad_mode):
        args = tuple(_normal(a) for a in args)
        kwargs = {name: _normal(value) for name, value in kwargs.items()}
        return fn(*args, **kwargs)


def _inferring(values: tuple[Any, ...]) -> bool:
    """Whether inference mode is on or one of ``values`` is an inference tensor."""
    inference = torch.is_inference_mode_enabled()
    for value in values:  # (a loop: a generator is three frames more)
        inference = inference or (isinstance(value, torch.Tensor) and value.is_inference())
    return inference


def _normal(value: T) -> T:
    """``value``, or a normal clone of it where it is an inference tensor."""
    if isinstance(value, torch.Tensor) and value.is_inference():
        return cast(T, value.clone())
    return value


_DRAWS = ("num_probes", "generator", "rtol", "atol")  # options of calls that draw probes


def compiled_like_f(
    records: Callable[..., bool] | None = None,
    watch: Callable[[str, Any, Any, dict[str, Any]], bool] | None = None,
) -> Callable[[F], F]:
    """Decorate ``fn(f, x, ...)`` (outside ``outside_inference_mode``) so that a
    ``torch.compile``d ``f`` (module or function) runs compiled where that pays: ``fn`` is
    compiled as ``f`` was (same backend and ``dynamic``) and called with ``f``'s uncompiled
    original, or, where ``eager_call`` says so, ``fn`` runs eagerly with the original.

    A compiled function called inside ``torch.func`` transforms runs eagerly (Dynamo cannot
    trace under them); transforms inside a compiled call are traced, so the products run as
    compiled code. ``records(f, x, **options)``: whether the call's engine records ``f``
    when Dynamo traces the call (the predicate of ``eager_when``; ``None``: never).
    ``watch(name, original, x, options)``: called before a compiled call of ``fn`` (its
    ``__name__``) with ``f``'s original, it raises where ``f`` mixes samples, or returns
    ``False`` where the call is to run eagerly instead (``torchdiv._api.compiled``: the
    dispatch modes that watch ``f`` in an eager call see nothing of a traced one).
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(f: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            parts = None if torch.compiler.is_compiling() else _compiled_parts(f)
            if parts is None:  # not compiled, or Dynamo traces the call: f as it is
                return fn(f, x, *args, **kwargs)
            original, backend, dynamic = parts
            if spans_peers() or eager_call(original, x, kwargs, records):
                return fn(original, x, *args, **kwargs)
            if watch is not None:
                with CompiledCodeEager():  # (as an eager call runs f)
                    passes = watch(fn.__name__, original, x, kwargs)
                if not passes:  # the watched evaluation failed: the eager call tells why
                    return fn(original, x, *args, **kwargs)
            if fn in _FAILED.get(original, ()):  # its traced call broke or failed to compile
                return fn(original, x, *args, **kwargs)
            return _compiled_or_eager(fn, backend, dynamic, original, x, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _modes_skip_dynamo() -> bool:
    """Whether Dynamo skips every frame here, as it decides: a dispatch mode is on that does
    not ignore compile internals (``FlopCounterMode``, a user's ``TorchDispatchMode``). The
    call compiled with ``fullgraph`` then raised "torch.compile with fullgraph=True found no
    compiled frames", where the compiled ``f`` called alone runs eagerly."""
    from torch._dynamo import config

    if config.inline_torch_dispatch_torch_compile:
        return any_torch_dispatch_mode_on_stack()
    return is_in_any_mode_without_ignore_compile_internals()


def eager_call(
    f: Any, x: Any, options: dict[str, Any], records: Callable[..., bool] | None
) -> bool:
    """Whether a torchdiv call whose ``f`` was ``torch.compile``d runs eagerly as a whole, with
    ``f``'s uncompiled original (compiled functions in it run compiled; ``f`` stays compiled).
    Always, before this is asked, under a process group (``spans_peers``): compiled around a
    ``DistributedDataParallel`` or ``fully_shard`` module (``torch.compile(DDP(net))``), the
    call would bypass what ``torchdiv._core.ddp`` does for one forward pass per call (the
    gradients were not averaged across ranks, and the next step failed). Otherwise:

    - under inference mode or with an inference-tensor ``x`` (left before ``fn`` runs);
    - when it draws probes (``num_probes=``, ``generator=``, ``rtol=``/``atol=``): compiled
      random numbers differ from eager ones, and "same generator state, same estimate" holds;
    - when ``records(f, x, **options)``: its engine records ``f`` (structured, Taylor,
      grad-of-grad), which runs eagerly by design. Compiled, the call would still be entered
      and guarded at every call and break the graph at the engine, around an eager engine:
      1.04-1.14x the same call with the uncompiled model, now 0.97-1.04x
      (bench/compile_model_call.py);
    - under a dispatch mode Dynamo does not trace under (``FlopCounterMode``, a logging
      mode: ``_modes_skip_dynamo``), where ``f`` itself runs eagerly.
    """
    if torch.is_inference_mode_enabled() or (isinstance(x, torch.Tensor) and x.is_inference()):
        return True
    if _modes_skip_dynamo():
        return True
    if any(options.get(name) is not None for name in _DRAWS):
        return True
    return records is not None and records(f, x, **options)


def _compiled_parts(f: Any) -> tuple[Callable[..., Any], Any, bool | None] | None:
    """What ``torch.compile`` made ``f`` from: the original callable, the backend, ``dynamic``
    (read from Dynamo's private attributes: ``None`` where they are not as expected). Without
    Dynamo imported nothing is compiled; a module is compiled only as an ``OptimizedModule``
    (asked first: a missing attribute of a module costs an exception in ``__getattr__``). A
    compiled module with hooks of its own: ``None`` (it runs as it is, eagerly, hooks included;
    its original would drop them: a hook doubling the output gave half the divergence)."""
    frames = sys.modules.get("torch._dynamo.eval_frame")
    if frames is None:
        return None
    compiled_module = getattr(frames, "OptimizedModule", torch.nn.Module)
    if isinstance(f, torch.nn.Module) and not isinstance(f, compiled_module):
        return None
    if isinstance(f, torch.nn.Module) and _own_hooks(f):  # the original's call would skip them
        return None
    original = attribute(f, "_torchdynamo_orig_callable")
    if original is None:
        return None
    if isinstance(f, compiled_module):  # the module, whose call runs its hooks, not its forward
        original = _called_module(f)
    context = getattr(f, "dynamo_ctx", None)  # a compiled module
    cells = getattr(f, "__closure__", None) or ()  # a compiled function's wrapper
    for cell in cells if context is None else ():
        if type(cell.cell_contents).__name__ == "OptimizeContext":
            context = cell.cell_contents
    backend: Any = getattr(context, "callback", None)
    while hasattr(backend, "_torchdynamo_orig_backend"):  # Dynamo's wrappers around it
        backend = backend._torchdynamo_orig_backend
    if context is None or backend is None or not callable(original):
        return None
    return original, backend, getattr(context, "_dynamic", None)


def _called_module(module: torch.nn.Module) -> Any:
    """The module whose call a compiled module's call runs (``None`` where that cannot be
    told): Dynamo binds the wrapper's ``forward`` to its ``_orig_mod``'s call when it makes
    the wrapper, so a module assigned to ``_orig_mod`` since (``model._orig_mod = other``) is
    not what ``model(x)`` computes. Differentiating ``_orig_mod`` then gave the derivatives of
    another model than ``f``, silently."""
    wrapper = module.__dict__.get("_forward", module.__dict__.get("forward"))  # (lazy: _forward)
    inner = attribute(wrapper, "_torchdynamo_orig_callable")
    bound = attribute(inner, "__self__")  # the module's bound __call__
    if bound is not None:
        held = [bound]
    else:  # torch.nn's own modules: a function whose closure holds the module
        held = cell_contents(inner) if isinstance(inner, types.FunctionType) else []
    called = [m for m in held if isinstance(m, torch.nn.Module)]
    return called[0] if len(called) == 1 else None


def _own_hooks(module: torch.nn.Module) -> bool:
    """Whether hooks are registered on ``module`` itself (a compiled module's wrapper, not the
    module it compiled): its call runs them, its ``_orig_mod``'s does not."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(module, name, None) for name in hooks)


_COMPILED: dict[tuple[Any, int, bool | None], tuple[Any, Callable[..., Any]]] = {}
# the originals whose traced call (by the torchdiv functions held) broke or failed to compile
_FAILED: weakref.WeakKeyDictionary[Any, set[Callable[..., Any]]] = weakref.WeakKeyDictionary()


def _compiled_or_eager(
    fn: Callable[..., Any],
    backend: Any,
    dynamic: bool | None,
    original: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``fn(original, *args, **kwargs)`` compiled as one graph (``fullgraph``), or eagerly
    where that cannot be (raised while compiling, before anything ran), from then on for this
    ``original`` and ``fn``: where ``f`` breaks the graph (a ``torch.compiler.disable``d part:
    traced around the break, ``"auto"`` took plain backward passes through ``f``'s parts
    compiled apart, and refused their parameter gradients), the backend fails (a model with
    a non-reentrant checkpoint under the engines' transforms) or Dynamo cannot trace ``f``
    (a radius graph's ``nonzero`` sizes the products: a data-dependent guard). PyTorch's
    failed compile left ``torch.func``'s ban on saved-tensor hooks on: every later backward
    pass through a checkpoint in the process raised ("torch.func ... don't yet support saved
    tensor hooks"), plain autograd's included, and ``attention_as_primitives``'s math-only
    attention backends on (every later fused-attention call in the process ran the math
    kernel); both are put back, as where ``f`` raises as the compiled graph runs (an index
    out of range), which leaves them, and a forward-AD level, as the graph had entered them
    (every later ``torch.func.jvp`` of the process raised "Nested forward mode AD is not
    supported"), or a ``KeyboardInterrupt``: the error is raised then. Past Dynamo's
    recompile limit: eagerly, this call only. Where the eager call raises too (``f``'s own
    error, at a wrong input), nothing is marked: later calls are compiled again."""
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

    put_back = _process_settings()
    frames: Any = sys.modules["torch._dynamo.eval_frame"]
    held = _compiled_call_stance(frames)
    try:
        return _compiled(fn, backend, dynamic)(original, *args, **kwargs)
    # (fullgraph: raised tracing, before any op ran; the recompile limit's is no
    # TorchDynamoException: it crashed the call)
    except Exception as error:
        if not isinstance(error, (TorchDynamoException, FailOnRecompileLimitHit)) and not (
            _raised_tracing(error)
        ):
            # (f's error as the graph ran: what it had entered is left entered; not a level
            # it could not enter, another thread's graph holding the process's one)
            put_back(ran=not _nested_level(error))
            raise
        put_back()
        result = fn(original, *args, **kwargs)  # (eagerly: f's errors named as in eager calls)
        # (marked once the eager call is right: one that raised f's own error, met tracing
        # at a wrong input, left every later call of f at right ones eager)
        if not isinstance(error, FailOnRecompileLimitHit):  # (a limit of the call's)
            _FAILED.setdefault(original, set()).add(fn)
        return result
    except BaseException:  # (a KeyboardInterrupt as the graph ran: as f's error)
        put_back(ran=True)
        raise
    finally:
        if held:
            _compiled_call_let_go()


def _compiled_call_stance(frames: Any) -> bool:
    """Under a caller's stance that torchdiv's compiled call cannot run under
    (``_FOR_COMPILED_CALLS``), set Dynamo's stance to the one it runs under (the caller's
    stance's other settings kept), unless a ``CompiledCodeEager`` block of any thread holds
    "force_eager"; whether the call holds it (``_compiled_call_let_go`` lets go). The
    caller's stance is the one held as ``_STANCE.prior`` while any call holds one
    (``_Stance``). torchdiv's call of a compiled ``f`` is compiled by torchdiv (``_compiled``),
    not by the caller:

    - under "fail_on_recompile" Dynamo raises wherever it would compile a frame: torchdiv's
      first call of an operator (or at a batch size, a grad mode) raised "Detected recompile"
      naming torchdiv's ``wrapper``, where the caller's model compiled nothing new. It runs
      under "eager_on_recompile": the graphs compiled before, and otherwise eagerly with
      ``f``'s original;
    - under "eager_then_compile" Dynamo runs a frame's first call eagerly with its callback
      on, and compiles every frame called inside it from that frame's second call: torchdiv's
      own helpers and ``f`` under the engines' transforms (PyTorch's "Guard failed on the
      same frame it was created" assertion at the first call, a guard of the walk of ``f``'s
      objects on ``weakref.finalize``'s registry, which the walk changes). It runs under
      "default", compiled whole (fullgraph), as "aot_eager_then_compile"'s too."""
    stance = _STANCE
    now: Any = getattr(frames, "_stance", None)
    if not (stance.count or stance.compiled) and getattr(now, "stance", None) not in _CALLERS:
        return False  # (the usual case: no lock taken)
    with stance.lock:
        inside = stance.count or stance.compiled
        caller: Any = stance.prior if inside else getattr(frames, "_stance", None)
        name = _FOR_COMPILED_CALLS.get(str(getattr(caller, "stance", "")))
        if name is None:
            return False
        if not inside:
            stance.prior = caller
        if not stance.compiled:
            stance.for_compiled = frames.DynamoStance(
                name, caller.skip_guard_eval_unsafe, caller.backend
            )
        stance.compiled += 1
        if not stance.count:  # (else "force_eager" held: kept until the blocks leave)
            frames._stance = stance.for_compiled
    return True


# the caller's stances that torchdiv's compiled call runs under another (``_compiled_call_stance``)
_FOR_COMPILED_CALLS = {
    "fail_on_recompile": "eager_on_recompile",
    "eager_then_compile": "default",
    "aot_eager_then_compile": "default",
}
_CALLERS = frozenset(_FOR_COMPILED_CALLS)


def _compiled_call_let_go() -> None:
    """Let go of ``_compiled_call_stance``'s stance: the caller's back where no call holds
    one, "force_eager" kept while a ``CompiledCodeEager`` block holds it."""
    stance = _STANCE
    with stance.lock:
        stance.compiled -= 1
        if not (stance.compiled or stance.count):
            _put_stance(stance.prior)


def _raised_tracing(error: BaseException) -> bool:
    """Whether Dynamo raised ``error`` while it traced (it marks every such error with its
    tracer's output), outside its own exception types: a higher-order op's speculation of
    its subgraph under the engines' transforms (``nested_compile_region``'s
    ``invoke_subgraph``: "AssertionError: Expected FakeTensor", PyTorch 2.13) left the
    traced call without torchdiv's context or a way out, where the eager call is right."""
    return getattr(error, "_torch_dynamo_tracer_output", None) is not None


def _process_settings() -> Callable[..., None]:
    """A function that puts back the process-wide settings a traced call changes and a
    failed compile, or an error as its graph runs, leaves changed: ``torch.func``'s ban on
    saved-tensor hooks, the enabled attention backends and their priority order, the fast
    path of ``nn``'s attention, and, given ``ran`` (an error as the graph ran: a failed
    trace enters none), a forward-AD level entered (where none was before: PyTorch has one
    at most). A level open when the graph could not enter one is another thread's graph's:
    exited by a failed compile or by that error until rev-late32, that call raised
    PyTorch's internal ``TypeError``. (Another thread's compiled forward-mode call in flight
    as this call's graph raises another error still loses its level: PyTorch keeps no
    record of which thread entered it.)"""
    from torch._C._autograd import (
        _saved_tensors_hooks_disable,
        _saved_tensors_hooks_enable,
        _saved_tensors_hooks_get_disabled_error_message,
    )
    from torch.nn.attention import _cur_sdpa_kernel_backends, _sdpa_kernel

    ban = _saved_tensors_hooks_get_disabled_error_message()
    backends, order = _cur_sdpa_kernel_backends(), torch._C._get_sdp_priority_order()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    dual = _forward_ad._current_level  # (-1: no level, as usual)

    def put_back(ran: bool = False) -> None:
        if ban is None:
            _saved_tensors_hooks_enable()
        else:
            _saved_tensors_hooks_disable(ban)
        _sdpa_kernel(backends)
        torch._C._set_sdp_priority_order(order)
        torch.backends.mha.set_fastpath_enabled(fastpath)
        # (the graph enters its level by PyTorch's C call, which the module's count misses:
        # one counted is another thread's ``dual_level()`` block, left alone)
        if ran and dual == -1 and _forward_ad._current_level == -1:
            with contextlib.suppress(RuntimeError):  # (none left: PyTorch's error)
                torch._C._exit_dual_level(level=0)

    return put_back


def _nested_level(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch's refusal of a second forward-AD level: the graph could
    not enter its own, the one open is another's (``_process_settings``)."""
    return isinstance(error, RuntimeError) and "Nested forward mode AD" in str(error)


def _compiled(fn: Callable[..., Any], backend: Any, dynamic: bool | None) -> Callable[..., Any]:
    """One ``torch.compile`` of ``fn`` (``fullgraph``: ``_compiled_or_eager``) per backend
    object (kept alive with it: its id is the key; backends need not be hashable), each of a
    code object of its own (``_own_code``)."""
    key = (fn, id(backend), dynamic)
    if key not in _COMPILED:
        call = torch.compile(_own_code(fn), backend=backend, dynamic=dynamic, fullgraph=True)
        _COMPILED[key] = backend, call
    return _COMPILED[key][1]


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a decorated operator: ``outside_inference_mode``'s ``wrapper``, one code object
    for every operator) with a copy of its code object, its own. Dynamo keeps compilations,
    and counts recompilations, per code object: compiled as it is, every operator's call
    (``divergence``, ``laplacian``, ...) was a recompilation of one function, so a first
    ``laplacian`` of a compiled model after its ``divergence`` raised under
    ``torch.compiler.set_stance("fail_on_recompile")`` (naming torchdiv's ``wrapper``) and
    all the operators' calls shared one recompile limit (past it: eagerly)."""
    if not isinstance(fn, types.FunctionType):
        return fn
    own = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    own.__kwdefaults__ = fn.__kwdefaults__
    return functools.update_wrapper(own, fn)


@torch.compiler.assume_constant_result  # Dynamo runs it when tracing, instead of tracing it
def _materialized_zero_tangents() -> bool:
    """Have inductor build the zeros that forward-mode formulas use for tensors without a
    tangent (a model's parameters) as ordinary tensors (``aten._efficientzerotensor``).

    Inductor runs that op as a fallback kernel, which returns an immutable ``ZeroTensor``, and
    then reuses its buffer as the ``out=`` of a later kernel: "ZeroTensors are immutable" in
    the backward of every compiled JVP through a hidden layer (PyTorch 2.13). The same values
    as ordinary zeros; run whenever Dynamo traces a torchdiv call. Inductor reads a copy of its
    table made when it first compiled something (``fast_random_decomps``, cached): the copy is
    dropped, or a process that compiled anything before torchdiv's first trace kept the op."""
    from torch._inductor import decomposition

    op = torch.ops.aten._efficientzerotensor.default
    if op in decomposition.decompositions:
        return True

    def zeros(size: list[int], **options: Any) -> torch.Tensor:
        return torch.zeros(size, **{k: v for k, v in options.items() if v is not None})

    decomposition.decompositions[op] = zeros
    clear = getattr(getattr(decomposition, "fast_random_decomps", None), "cache_clear", None)
    if clear is not None:
        clear()
    return True


class _Held:
    """A process-wide setting overridden while at least one call (of any thread) is inside,
    and put back when the last one leaves: calls that overlap in threads leave it as the
    first found it, whatever order they end in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.prior: Any = None

    def enter(self, override: Callable[[], Any]) -> None:
        """``override()`` sets the setting and returns its prior value (first call only)."""
        with self.lock:
            if self.count == 0:
                self.prior = override()
            self.count += 1

    def exit(self, restore: Callable[[Any], Any]) -> None:
        with self.lock:
            self.count -= 1
            if self.count == 0:
                restore(self.prior)


class _Stance(_Held):
    """Dynamo's stance, one process-wide global: "force_eager" while at least one
    ``CompiledCodeEager`` block (of any thread: ``count``) is inside, else the stance of
    torchdiv's compiled calls under the caller's (``compiled``, ``for_compiled``:
    ``_compiled_call_stance``) while one is, and the caller's (``prior``) put back when the
    last leaves. Two holders of the one global, each putting back what it had found, left it
    changed where two threads' calls overlapped: a compiled call that ended inside another
    thread's block put the caller's "fail_on_recompile" back under that block's ``f``, and the
    block then put back "eager_on_recompile", which it had found, for good."""

    def __init__(self) -> None:
        super().__init__()
        self.compiled = 0
        self.for_compiled: Any = None


_STANCE = _Stance()  # Dynamo's stance while torchdiv runs
# ``torch.nn.utils.parametrize.cached()``'s cache, read-only while torchdiv runs f
# (``_uncached``)
_PARAMETRIZE = _Held()
_FASTPATH = _Held()  # nn.MultiheadAttention's fast path, off while torchdiv runs f
# scaled_dot_product_attention's backends (process-wide flags), the math one alone meanwhile
_SDPA = _Held()
_FABRIC = _Held()  # Lightning Fabric's guards (``_fabric_guards_off``), off while torchdiv runs
_TRACKERS = _Held()  # module trackers' forward hooks (``_trackers_off``), off while torchdiv runs


class CompiledCodeEager(contextlib.ContextDecorator):
    """Run ``torch.compile``d code that ``f`` calls eagerly for the duration of the block
    (or of every call of a function decorated with ``@CompiledCodeEager()``).

    torchdiv evaluates ``f`` under ``torch.func`` transforms and dispatch modes, where Dynamo
    cannot compile; a compiled model called there is not only run eagerly: Dynamo marks its
    code objects "skip", so that every later call of the model, outside torchdiv too, runs
    eagerly (measured: 0 compiled-graph executions after one ``divergence`` call). Dynamo's
    "force_eager" stance runs compiled code eagerly without marking anything. Nothing is done
    when Dynamo was never imported (no compiled code exists) or inside a compiled region
    (Dynamo is tracing torchdiv itself).

    TorchScript code (a ``torch.jit.script`` module) runs unoptimized too: from its second
    call on, the profiling executor's optimized graph carries no forward-mode tangents,
    ``torch.func`` levels or dispatch-mode recording, and every engine saw a constant (zeros,
    parameter gradients gone). The flag is the executor's own (``torch.jit.optimized_execution``,
    thread-local), set by the first block of a thread to enter and put back by the last to
    leave, in whatever order they leave (``_Unoptimized``); an executor that optimized its plan
    already ignores it (``torchdiv._core.script.forget_plans``).

    ``torch.nn.utils.parametrize.cached()``'s cache is read-only too (``_uncached``).
    """

    def _recreate_cm(self) -> CompiledCodeEager:  # a decorated function: one per call
        return type(self)()

    def __enter__(self) -> None:
        # (``_Unoptimized.enter`` and ``_Held.enter`` inlined, one Python call each fewer: a
        # tiny problem's call enters one block, whose cost is a few percent of it)
        local = _UNOPTIMIZED
        if local.count == 0:
            local.prior = _executor_optimizes()
            _set_executor_optimizes(False)
        local.count += 1
        self.uncached = bool(_parametrize._cache_enabled or _PARAMETRIZE.count) and (
            not torch.compiler.is_compiling()  # (a traced call: no wrappers kept, no lock)
        )
        if self.uncached:
            _PARAMETRIZE.enter(_uncached)
        self.held = False
        frames: Any = sys.modules.get("torch._dynamo.eval_frame")  # its private global
        if frames is None or not hasattr(frames, "_stance"):  # no Dynamo, or torch < 2.6
            return
        if torch.compiler.is_compiling():  # Dynamo traces the call: nothing to protect
            return
        if get_eval_frame_callback() in (None, False):
            stance = _STANCE
            with stance.lock:
                if stance.count == 0:  # what Dynamo's ``_set_stance`` does, without its
                    # check that no compiled region runs (made above) and its import
                    if not stance.compiled:  # (else the caller's is held already)
                        stance.prior = frames._stance
                    frames._stance = _force_eager(frames)
                stance.count += 1
            self.held = True

    def __exit__(self, *exc: object) -> None:
        local = _UNOPTIMIZED
        local.count -= 1
        if local.count == 0:
            _set_executor_optimizes(local.prior)
        if self.uncached:
            _PARAMETRIZE.exit(_recached)
        if self.held:
            stance = _STANCE
            with stance.lock:
                stance.count -= 1
                if stance.count == 0:
                    _put_stance(stance.for_compiled if stance.compiled else stance.prior)


class _Unoptimized(threading.local):
    """TorchScript's executor optimization (a thread-local flag) off while at least one
    ``CompiledCodeEager`` block of this thread is inside, put back when the last one leaves:
    blocks that leave out of order (a generator's, or entered and left by hand) left it off
    for the rest of the process when each put back what it had found."""

    def __init__(self) -> None:
        self.count = 0
        self.prior = True


_UNOPTIMIZED = _Unoptimized()  # (entered and left by ``CompiledCodeEager`` itself)
_executor_optimizes = torch._C._get_graph_executor_optimize
_set_executor_optimizes = torch._C._set_graph_executor_optimize


class _ReadOnly(dict[tuple[int, str], Any]):
    """``parametrize.cached()``'s cache while torchdiv runs ``f`` (``_uncached``): the weights
    cached before the call, read; and those ``f``'s evaluations compute (``made``), read by
    the same evaluation (``f``'s own ``cached()`` block: an RNN's recurrent weight, once per
    forward) until ``f``'s state is put back for another evaluation
    (``forget_computed_weights``), never as a transform's dead wrapper. Each thread's apart
    (PyTorch's cache is one for the process): another thread's plain block, running meanwhile
    on its own model, lost its weights at the call's next put-back and computed them again
    (a train-mode spectral norm's power iteration twice in one block, until rev-optim27)."""

    def __init__(self, cache: dict[tuple[int, str], Any]) -> None:
        super().__init__(cache)
        self.threads: dict[int, dict[tuple[int, str], Any]] = {}  # ``made`` of each thread

    @property
    def made(self) -> dict[tuple[int, str], Any]:
        """The weights this thread computed (``threading.get_ident``)."""
        return self.threads.setdefault(threading.get_ident(), {})

    def get(self, key: tuple[int, str], default: Any = None) -> Any:  # type: ignore[override]
        if key in self:
            return self[key]
        made = self.made.get(key)
        if made is None or maybe_get_level(made) == DEAD_LEVEL:  # (a transform that has ended)
            return default
        return made

    def __setitem__(self, key: tuple[int, str], value: Any) -> None:
        self.made[key] = value


def _uncached() -> dict[tuple[int, str], Any]:
    """Make ``parametrize.cached()``'s cache read-only; return the cache itself.

    A parametrized weight (``weight_norm``, ``orthogonal``) first computed inside the
    engines' ``torch.func`` transforms was kept there, a transform's wrapper: a later
    evaluation's nested transforms (forward over reverse, a chunk or a call later) failed
    PyTorch's internal assert ("level <= current_level"). So a weight ``f`` computes inside
    the call is read by that evaluation alone: each evaluation computes it from the state
    the first found (``_exact.state``). One cached before the call is read, as a plain
    evaluation inside the block reads it, and one the call computed is cached after it
    (``_recached``) for the block's later forwards: with the cache off
    (until optim27), a training step that ran the model's forward and torchdiv in one block
    differentiated two weights where computing one changes state (a train-mode
    ``parametrizations.spectral_norm`` ran its power iteration once more: a divergence 8e-7
    off, parameter gradients 2e-5, ``u`` and ``v`` 2e-3, in either order)."""
    cache = _parametrize._cache
    _parametrize._cache = _ReadOnly(cache)
    return cache


def forget_computed_weights() -> None:
    """The parametrized weights the call's evaluations computed so far are forgotten: the
    state they were computed from was put back (``_exact.state.Changes``, the recording's
    ``put_back``), for another evaluation, which computes them again (it read them: its
    power iteration did not run, and it left ``u``, ``v`` as they were put back), or for
    good (``check_batch_independence`` leaves ``f``'s state as before, which a weight cached
    after the call would contradict)."""
    held = _parametrize._cache
    if type(held) is _ReadOnly:
        held.made.clear()


def _recached(cache: dict[tuple[int, str], Any]) -> None:
    """Put ``_uncached``'s cache back (unless the last ``cached()`` block left meanwhile,
    another thread's, which emptied it), with the weights the call's last evaluation
    computed that it lacks, as a plain evaluation would have cached them (the state after
    the call is the last evaluation's): what the transforms' dead wrappers wrap
    (one that cannot be told, a ``vmap``'s, is left out: the next forward computes it);
    detached under the caller's ``no_grad``. Those another thread's plain block computed
    meanwhile are kept as they are (computed under that thread's grad mode)."""
    held = _parametrize._cache
    if type(held) is not _ReadOnly:
        return
    if not _parametrize._cache_enabled:
        _parametrize._cache = {}
        return
    ours = threading.get_ident()
    # (copied whole first: another thread may add to them meanwhile)
    for thread, made in list(held.threads.items()):
        for key, value in list(made.items()):
            value = plain_unwrapped(value) if isinstance(value, torch.Tensor) else None
            if key not in cache and value is not None:
                detach = thread == ours and not torch.is_grad_enabled()
                cache[key] = value.detach() if detach else value
    _parametrize._cache = cache


@contextlib.contextmanager
def cache_read_only() -> Iterator[None]:
    """``parametrize.cached()``'s cache read-only (``_uncached``), as inside a public call of
    ``f``, for a function torchdiv calls several times outside one (``estimate_trace``'s
    ``matmat``): each call starts from the state the first found, so one that read the
    weight the first computed (its power iteration skipped) wrote other values than the
    first and was refused ("f wrote other values")."""
    held = bool(_parametrize._cache_enabled or _PARAMETRIZE.count)
    held = held and not torch.compiler.is_compiling()
    if held:
        _PARAMETRIZE.enter(_uncached)
    try:
        yield
    finally:
        if held:
            _PARAMETRIZE.exit(_recached)


def _put_stance(prior: Any) -> None:
    frames: Any = sys.modules["torch._dynamo.eval_frame"]
    frames._stance = prior


@functools.cache
def _force_eager(frames: Any) -> Any:
    """Dynamo's "force_eager" stance, made once (Dynamo never changes one in place)."""
    return frames.DynamoStance("force_eager")


def eager_when(
    records: Callable[..., bool] | None = None,
    replayed: Callable[..., Any] | None = None,
) -> Callable[[F], F]:
    """Decorate a public ``fn(f, x, *, **options)`` (outermost, over ``compiled_like_f``) so
    that a call Dynamo traces runs eagerly as a whole where
    ``records(f, x, **options)`` says its engine is ``recorded`` (runs eagerly anyway; ``None``:
    never) and ``replayed(f, x, **options)`` gives no traceable replay of its plan (``None``;
    ``_structured.replay``: the call's result, traced, the step then one graph), or where it
    draws probes from the caller's ``generator``: Dynamo cannot trace a
    generator (a graph break inside the batched products, whose resumed frame the backend
    failed on), and "same generator state, same estimate" holds only eagerly. The one
    graph break is then at the caller's call of ``fn``, not deep inside it.

    Broken inside, Dynamo resumes every frame between the caller and the engine (the
    decorators', the public function's, the dispatch's) as a compiled frame of its own, whose
    guards run at every call, and compiles what follows the engine in those frames (a reshape)
    as a graph of its own, with a backward node of its own: measured 0.2-0.3 ms per training
    step on a 2-core CPU, a tenth of a small MLP's step. Run eagerly, ``fn`` is exactly the
    eager call (batch-interaction detection included)."""

    def decorate(fn: F) -> F:
        eager = cast(Callable[..., Any], torch.compiler.disable(fn))  # untyped in torch

        @functools.wraps(fn)
        def wrapper(f: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            if not torch.compiler.is_compiling():
                return fn(f, x, *args, **kwargs)
            if kwargs.get("generator") is not None:
                return eager(f, x, *args, **kwargs)
            if records is not None and records(f, x, **kwargs):
                result = None if replayed is None else replayed(f, x, *args, **kwargs)
                return eager(f, x, *args, **kwargs) if result is None else result
            return fn(f, x, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def recorded(fn: F) -> F:
    """Run ``fn`` eagerly when Dynamo traces its caller: an engine that records ``f``'s ops and
    plans from them (structured, Taylor) or differentiates a graph already built
    (``autograd.grad``) is one graph break inside a compiled region, not a failed trace."""
    eager = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return eager(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run attention as primitives: ``scaled_dot_product_attention`` on PyTorch's math
    backend, whose primitives have forward-mode and second-order derivatives (and Taylor
    rules; the fused CPU kernel has neither), and ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` off their fused fast path (``_transformer_encoder_layer_fwd``,
    ``_native_multi_head_attention``, taken in eval mode with frozen parameters), which has
    no derivatives at all. The caller's settings are restored afterwards, when the last
    thread inside leaves (``_Held``: both are the process's, not a thread's; each thread's
    ``sdpa_kernel`` put back what it had found, so that threads leaving out of order left the
    math backend alone for the rest of the process, and a thread still inside ran the fused
    kernels). Inside a compiled region only the SDPA backend is set: Dynamo cannot trace the
    fast-path switch."""
    if torch.compiler.is_compiling():
        with sdpa_kernel([SDPBackend.MATH]):
            yield
        return
    _FASTPATH.enter(_fastpath_off)
    _SDPA.enter(_math_backend)
    try:
        yield
    finally:
        _SDPA.exit(_put_backends)
        _FASTPATH.exit(torch.backends.mha.set_fastpath_enabled)


def _fastpath_off() -> bool:
    prior = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    return prior


def _math_backend() -> tuple[contextvars.Context, contextlib.AbstractContextManager[Any]]:
    """``sdpa_kernel([SDPBackend.MATH])`` entered in a context of its own, where
    ``_put_backends`` exits it, from whichever thread leaves last (torch 2.15's resets a
    ``ContextVar``, which raises in any other context); it holds the prior backends. An empty
    context: a copy of the caller's would keep what its variables hold alive."""
    kernel, context = sdpa_kernel([SDPBackend.MATH]), contextvars.Context()
    context.run(kernel.__enter__)
    return context, kernel


def _put_backends(held: tuple[contextvars.Context, contextlib.AbstractContextManager[Any]]) -> None:
    context, kernel = held
    context.run(kernel.__exit__, None, None, None)


class DispatchMode(TorchDispatchMode):
    """A ``TorchDispatchMode`` whose calls (``dispatch(func, args, kwargs)``) run with Dynamo
    off, as ``TorchDispatchMode`` runs every subclass's ``__torch_dispatch__``, turning it off
    only where it is on. PyTorch wraps each subclass's ``__torch_dispatch__`` in
    ``torch._disable_dynamo``, which sets and restores the frame evaluation callback at every
    ATen call, in eager code too where none is set: ~5 us a call (a template check of a
    3-layer MLP, 8 calls: 35-60 us of 1 ms). Here the callback is read (one C call) and the
    wrapper taken only when one is set."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no wrapper around __torch_dispatch__: it turns Dynamo off itself

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is _MUL_SCALAR and args[0]._is_zerotensor():
            return _zero_times_scalar(*args)
        if getattr(func, "_overloadpacket", None) is _PINV and args[0].is_complex():
            with _conjugating():
                return self._dispatch(func, args, kwargs)
        return self._dispatch(func, args, kwargs)

    def _dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if get_eval_frame_callback() is not None:  # Dynamo on: it must not compile the mode
            return _without_dynamo(self.dispatch, func, args, kwargs)
        return self.dispatch(func, args, kwargs)

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError


# PyTorch runs a kernel called from a TorchDispatchMode with the ``Conjugate`` and
# ``Negative`` keys excluded: a conjugate view made inside the kernel is read as the plain
# tensor. The complex ``linalg_pinv`` kernel's ``Vh.mH() * S^+`` gave ``conj(V) S^+ U^H``
# (values 100 % off; ``"auto"``'s watched Jacobians, rev-complex25); no other kernel found
_PINV = torch.ops.aten.linalg_pinv
_MUL_SCALAR = torch.ops.aten.mul.Scalar


def _zero_times_scalar(zero: torch.Tensor, scalar: Any) -> torch.Tensor:
    """``mul.Scalar`` of an efficient zero tensor (forward mode's tangent of a tensor without
    one): another, as PyTorch's ``ZeroTensor`` kernel gives it. Called from a
    ``TorchDispatchMode``, the dense kernel ran on its null data instead and the process
    died (SIGSEGV): the forward-mode formula of ``addmm``, ``addmv``, ``addbmm``,
    ``baddbmm`` and ``addr`` with ``beta != 1`` (``maybe_multiply(self_t, beta)``) where the
    added tensor has no tangent (a bias), under any watch of ``f``'s ops (a later
    ``jacobian`` of a layer ``torch.addmm(b, h, W.t(), beta=0.7)`` wider than its input)."""
    dtype = torch.result_type(zero, scalar)
    out: torch.Tensor = torch.ops.aten._efficientzerotensor.default(
        list(zero.shape), dtype=dtype, device=zero.device
    )
    return out


_CONJUGATE_KEYS = (torch._C.DispatchKey.Conjugate, torch._C.DispatchKey.Negative)


@contextlib.contextmanager
def _conjugating() -> Iterator[None]:
    """The ``Conjugate`` and ``Negative`` keys back in the thread's dispatch (see ``_PINV``)."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in _CONJUGATE_KEYS:
        excluded = excluded.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded):
        yield


@torch.compiler.disable(recursive=True)
def _without_dynamo(dispatch: Callable[..., Any], *args: Any) -> Any:
    return dispatch(*args)


class WrongDerivatives(NotImplementedError):
    """An op in ``f`` whose PyTorch derivatives of the order an engine needs are wrong, with no
    equivalent here that is right (the public function names itself in front; ``named``: it
    has, and a torchdiv call around that one, ``biharmonic``'s inner ``laplacian``, leaves
    the name as it is)."""

    named = False


# torch.special's functions that have no derivative in PyTorch (2.13) at all: autograd returns
# their output as a constant (no grad_fn) and torch.func's transforms as one without tangents,
# so every engine of PyTorch derivatives would give 0 through them, silently
# torch 2.15 differentiates these (checked against their recurrences in float64: first and
# second derivatives, forward and reverse mode, right to round-off); asked of the running
# torch, whose version does not say it (a 2.15 nightly from before the change)
_DERIVED_FROM_2_15 = (
    "bessel_j0",
    "bessel_j1",
    "bessel_y0",
    "bessel_y1",
    "modified_bessel_i0",
    "modified_bessel_i1",
    "modified_bessel_k0",
    "modified_bessel_k1",
)
UNDERIVABLE_NAMES = (
    "airy_ai",
    *(name for name in _DERIVED_FROM_2_15 if slope(getattr(torch.special, name), 1.0) is None),
    "scaled_modified_bessel_k0",
    "scaled_modified_bessel_k1",
    "spherical_bessel_j0",
    *(f"{p}chebyshev_polynomial_{k}" for p in ("", "shifted_") for k in "tuvw"),
    "hermite_polynomial_h",
    "hermite_polynomial_he",
    "laguerre_polynomial_l",
    "legendre_polynomial_p",
)
_UNDERIVABLE = {getattr(torch.special, name): name for name in UNDERIVABLE_NAMES}
# their ATen overloads, as a dispatch mode sees them
UNDERIVABLE_OPS = {
    getattr(packet, overload): name
    for name in UNDERIVABLE_NAMES
    for packet in [getattr(torch.ops.aten, f"special_{name}")]
    for overload in packet.overloads()
}


def refuse_underivable(name: str | None, differentiated: bool) -> None:
    """Raise ``WrongDerivatives`` where ``f`` applies ``torch.special.<name>``, one of
    ``UNDERIVABLE_NAMES`` (``None``: another op), to a tensor being ``differentiated``."""
    if name is not None and differentiated:
        raise WrongDerivatives(
            f"torch.special.{name} in f has no derivative in PyTorch (autograd takes its output "
            "for a constant), so every derivative through it would be 0; write it from "
            "differentiable ops (spherical_bessel_j0(r) = sin(r) / r; Chebyshev polynomials "
            "as cos(n acos t) or by their recurrence)"
        )


_OPS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)
_TRUSTED = ("aten", "prims")  # PyTorch's own ops: one without a forward rule raises
# the dispatch keys at which an op's derivatives are defined: without a kernel at any of them
# PyTorch's autograd fallback differentiates it ("warn": silently wrong, as PyTorch says)
_AUTOGRAD_KEYS = ("Autograd", "AutogradCPU", "AutogradCUDA", "CompositeImplicitAutograd")


@torch.compiler.assume_constant_result
def _op_name(func: Any) -> str:
    """``namespace::name[.overload]`` of an op overload or packet (``torch.ops.aten.add.Tensor``:
    ``aten::add.Tensor``, ``torch.ops.aten.add``: ``aten::add``), read from plain attributes. A
    constant to Dynamo, which cannot trace a method of the name (``str.split``; on torch 2.15
    ``x.T`` reaches the mode as the packet ``aten.numpy_T``, and every ``torch.ops`` call in
    ``f`` did on 2.13 already)."""
    return func._name if isinstance(func, torch._ops.OpOverload) else func._qualified_op_name


@torch.compiler.assume_constant_result
def _namespace(func: Any) -> str:
    """The namespace of an op overload or packet (``aten``, ``prims``, a custom op's library),
    a constant to Dynamo (``_op_name``)."""
    return _op_name(func).partition("::")[0]


@torch.compiler.assume_constant_result
def underived(op: Any) -> bool:
    """Whether ``op`` (an op overload or packet, or its name ``"ns::name"``) is a
    ``torch.library.custom_op`` with no derivative registered (``register_autograd`` never
    called: a NumPy kernel): PyTorch's backward pass through it raises ("no autograd formula
    was registered"), so no method, plain autograd's included, differentiates it. ``False``
    for any other op. A constant to Dynamo (which cannot trace the registry, a weak
    dictionary)."""
    name = op if isinstance(op, str) else _op_name(op)
    # (PyTorch's private registry, read defensively: a release without it names 'auto')
    opdef = getattr(_custom_ops, "OPDEFS", {}).get(name.partition(".")[0])
    return opdef is not None and getattr(opdef, "_backward_fn", True) is None


def underived_refusal(op: str) -> str:
    """What a refusal says of a custom op ``op`` without a derivative (``underived``)."""
    return (
        f"the custom op {op} in f has no derivative (torch.library.custom_op without "
        "register_autograd), so no method differentiates f through it, plain autograd's "
        "backward pass neither (method='auto' runs f only where its output does not depend "
        f"on the op's result); register_autograd for {op}, or write it in differentiable "
        "torch ops"
    )


@torch.compiler.assume_constant_result
def differentiated_by_autograd(func: Any) -> bool:
    """Whether the op ``func`` (overload or packet) has a kernel at an autograd key
    (``_AUTOGRAD_KEYS``), a constant to Dynamo (``_op_name``)."""
    name = _op_name(func).partition(".")[0]
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(name, k) for k in _AUTOGRAD_KEYS)


@torch.compiler.assume_constant_result
def _written_positions(func: Any) -> tuple[int, ...]:
    """The positions of the arguments the op ``func`` writes to (``Tensor(a!)`` in its
    schema; a packet's ``default`` overload's), a constant to Dynamo (``_op_name``)."""
    overload = func if isinstance(func, torch._ops.OpOverload) else getattr(func, "default", None)
    schema = getattr(overload, "_schema", None)
    arguments = [] if schema is None else schema.arguments
    return tuple(i for i, a in enumerate(arguments) if a.alias_info and a.alias_info.is_write)


@torch.compiler.assume_constant_result
def _argument_name(func: Any, i: int) -> str:
    overload = func if isinstance(func, torch._ops.OpOverload) else func.default
    return str(overload._schema.arguments[i].name)


def _derived(t: Any) -> bool:
    """Whether ``t`` is a tensor that carries derivatives: it requires grad, carries a
    forward-mode tangent, or carries a ``torch.func`` transform's (``_carries_derivatives``)."""
    if not isinstance(t, torch.Tensor):
        return False
    if t.requires_grad or unpack_dual(t).tangent is not None:
        return True
    # (where Dynamo traces, it models the transforms' wrappers itself: no unwrapping to trace)
    return not torch.compiler.is_compiling() and _carries_derivatives(t)


def _floating(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _real_way_out(way_out: str, name: str, args: Any) -> str:
    """``way_out`` without ``'taylor'`` where the op takes a complex tensor (the Taylor engine
    has no complex rules: it would refuse the op again), or is ``torch.linalg.eigh`` (its rule
    is for the eigenvalues only: f's use of the eigenvectors was refused again, rev-a34)."""
    complex_args = any(isinstance(t, torch.Tensor) and t.is_complex() for t in tree_leaves(args))
    if not complex_args and name != "torch.linalg.eigh":
        return way_out
    return way_out.replace("'taylor' or ", "").replace(" or 'taylor'", "")


def refuse_untracked_custom_op(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> None:
    """Raise ``WrongDerivatives`` naming ``func``, an op outside ``aten``/``prims`` (a
    ``torch.library`` op) that ``f`` applied to tensors carrying derivatives, where autograd
    cannot follow it: every engine's derivatives through it would be silently wrong.

    - No kernel at an autograd key (``_AUTOGRAD_KEYS``; ``torch.library.Library.impl`` at
      ``"CPU"`` alone) and a floating result: PyTorch's autograd fallback differentiates what
      the kernel happens to record (divergences 3.1 off, Laplacians 7.7 off, tanh MLP).
    - It writes to a floating argument (``mutates_args``; ``Tensor(a!)`` in its schema) that
      carries no derivatives after the call while it returns none that do: the written
      result is a constant to autograd and forward mode (Jacobians 3.4 off, all of them 0).
    """
    if not isinstance(func, _OPS) or _namespace(func) in _TRUSTED:
        return
    if not any(_derived(t) for t in tree_leaves((args, kwargs))):
        return
    results = [t for t in tree_leaves(out) if _floating(t)]
    if results and not differentiated_by_autograd(func):
        raise WrongDerivatives(
            f"the custom op {_op_name(func)} in f has no autograd kernel (registered for a "
            "backend alone, as torch.library.Library.impl(..., 'CPU') does), so PyTorch's "
            "autograd fallback would differentiate it silently wrong; register its derivative "
            "(torch.library.register_autograd, or an implementation at the "
            "'CompositeImplicitAutograd' key, made of differentiable torch ops)"
        )
    if any(_derived(t) for t in results):
        return
    for i in _written_positions(func):
        name = _argument_name(func, i)
        written = kwargs[name] if name in kwargs else args[i] if i < len(args) else None
        if any(_floating(t) and not _derived(t) for t in tree_leaves(written)):
            raise WrongDerivatives(
                f"the custom op {_op_name(func)} in f writes its result into an argument "
                "(mutates_args), which autograd does not track: every derivative through it "
                "would be 0; return the result from the op instead (mutates_args=()) and give "
                "it a derivative (torch.library.register_autograd)"
            )


_REQUIRES_GRAD = torch._C.TensorBase.__dict__["requires_grad"]  # (its getter's __self__)


def read_requires_grad_false(func: Any, out: Any) -> bool:
    """Whether the call a ``TorchFunctionMode`` handled (``func``, result ``out``) read a
    tensor's ``requires_grad`` and got ``False``: forward mode and the recorders read
    ``False`` where plain autograd reads ``True``, and ``f`` may branch on it (a deep
    equilibrium model registers its gradient hook only ``if z.requires_grad``)."""
    return out is False and getattr(func, "__self__", None) is _REQUIRES_GRAD


def read_by_torchdiv() -> bool:
    """Whether the tensor attribute a ``TorchFunctionMode`` is handling (``requires_grad``)
    was read by torchdiv's own code (a torchdiv call inside ``f``: ``biharmonic``'s inner
    Laplacian), not by ``f`` (called from a handler, or a helper of one: ``reader``)."""
    return reader_module().startswith("torchdiv.")


def reader_module() -> str:
    """The module (``__name__``) of the code whose call a ``TorchFunctionMode`` is handling:
    the first frame below the modes' ``__torch_function__`` handlers (called from a handler,
    or a helper of one; ``""`` if none). ``torch.utils.hooks`` for a module's full backward
    hook, which reads ``requires_grad`` of the module's inputs to decide whether to wrap them
    in its ``autograd.Function``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != "__torch_function__":
        frame = frame.f_back  # type: ignore[assignment]  # (up to the handler)
    while frame is not None and frame.f_code.co_name == "__torch_function__":
        frame = frame.f_back  # type: ignore[assignment]  # (past every mode's handler)
    return "" if frame is None else str(frame.f_globals.get("__name__", ""))


def refuse_gradient_hook(func: Any, args: Sequence[Any]) -> bool:
    """Raise ``WrongDerivatives`` where ``f`` registers a gradient hook of its own
    (``Tensor.register_hook``) on a tensor that requires grad or carries a transform's
    tangents: the engines of backward passes run the hook, forward mode and the recording
    engines never see it, so the methods would disagree without a word.

    Neither derivative is right in general: a deep equilibrium model's hook (its fixed point
    solved under ``no_grad``, one differentiable step, the backward fixed point solved in the
    hook) holds the only derivative of the function ``f`` computes (the step's own is the
    one-step "phantom" Jacobian), while a gradient-clipping or scaling hook changes no value
    of ``f``. Hooks of PyTorch's own (FSDP's pre-backward hooks on a module's outputs,
    ``register_multi_grad_hook``'s: ``_PYTORCH_S_HOOKS``) are left alone: they change no
    gradient. Returns whether the hook is Lightning Fabric's guard on its modules' outputs
    (``_fabric_guards_off``), which the caller drops (``dropped_hook``): registered on a
    forward-mode output (whose ``requires_grad`` it reads as true), it raised."""
    if func is not torch.Tensor.register_hook or not args:
        return False
    hook = args[1] if len(args) > 1 else None
    while isinstance(hook, functools.partial):  # (FSDP1's pre-backward hook is one)
        hook = hook.func
    module = getattr(hook, "__module__", None) or ""
    if module in _FABRIC_WRAPPERS:
        return True
    if module.startswith(_PYTORCH_S_HOOKS) or not _differentiated(args[:1]):
        return False
    name = getattr(hook, "__qualname__", None) or type(hook).__name__
    raise WrongDerivatives(
        f"f registers a gradient hook ({name}) with Tensor.register_hook on a tensor it "
        "computes; backward passes run it, forward mode and the recording engines do not, so "
        "the methods would give different derivatives (for an implicit layer's backward, a "
        "deep equilibrium model's, only the hook's are those of f's values; for gradient "
        "clipping or scaling, only the forward code's). Every method refuses it: register the "
        "hook only outside the call (behind a flag of your model), which differentiates f's "
        "forward code (a DEQ's one-step Jacobian), or write the implicit step as a "
        "torch.autograd.Function with setup_context, backward and jvp (both from the implicit "
        "function theorem), which method='auto', 'forward' and 'reverse' follow"
    )


# the packages whose hooks on tensors computed in a forward change no gradient (the
# multi-grad hooks, FSDP's pre-backward hooks, DDP's and tensor parallelism's syncs); not all
# of ``torch.``: ``y.register_hook(F.normalize)`` changes the gradient
_PYTORCH_S_HOOKS = ("torch.autograd.", "torch.distributed.", "torch.nn.parallel.")


def dropped_hook() -> torch.utils.hooks.RemovableHandle:
    """The handle ``Tensor.register_hook`` returns for a hook not registered
    (``refuse_gradient_hook``): removing it does nothing."""
    return torch.utils.hooks.RemovableHandle(collections.OrderedDict())


def _differentiated(args: Any) -> bool:
    """Whether a tensor among ``args`` requires grad or carries a ``torch.func`` transform's
    tangents or batch (a wrapped tensor)."""
    return any(
        isinstance(a, torch.Tensor) and (a.requires_grad or is_functorch_wrapped_tensor(a))
        for a in tree_leaves(args)
    )


_PYTHON_KEY = torch._C.DispatchKey.Python


def subclass_like(t: Any) -> bool:
    """Whether PyTorch's derivative formulas take ``t`` for a tensor subclass beside the
    dispatch modes (``isTensorSubclassLike``): a ``torch.func`` wrapper (``functionalize``'s
    too) or a ``__torch_dispatch__`` subclass (DTensor, ``torch.export``'s functional
    tensors). 0.2 us for a plain tensor."""
    if not isinstance(t, torch.Tensor):
        return False
    if is_functorch_wrapped_tensor(t):
        return True
    return type(t) is not torch.Tensor and torch._C._dispatch_keys(t).has(_PYTHON_KEY)


def plain_derivatives(*tensors: Any) -> bool:
    """Whether PyTorch takes the derivatives of an op on ``tensors`` run here by its formulas
    for plain tensors: no dispatch mode on the stack (torchdiv's own included), none of
    ``tensors`` a ``torch.func`` wrapper or a tensor subclass, no Dynamo tracing. Else
    its backward formulas take their forms for tensor subclasses (``isTensorSubclassLike``),
    whose third derivative of ``det`` is ``nan`` where the second backward pass, or the
    first two, run so (``UNDER_MODES``). Checked when the op runs, for the backward passes
    after it: torchdiv's passes of one call run under the modes its evaluation of ``f`` ran
    under (a caller's mode around the call, ``Once``'s around a whole part) or inside the same
    transforms, but batched second-level passes (``SafeDerivatives``' ``batched``), which
    count too. Measured
    (``tests/core/test_det26.py``): ``nan`` where the second pass runs so, at some matrices
    (float32 Slater determinants with two electrons 0.1 to 1e-6 apart), always where the
    first runs so too; a first pass run so alone (a batched VJP), or the caller's third
    alone under a mode, left it right.
    About 0.5 us for one plain tensor."""
    if torch._C._len_torch_dispatch_stack() or torch.compiler.is_compiling():
        return False
    return not any(subclass_like(t) for t in tensors)


def svd_formula_unstable(a: torch.Tensor, det: torch.Tensor) -> bool:
    """Whether PyTorch's derivatives of ``det = det(a)`` (``a``: ``(..., n, n)``) by backward
    passes are off for plain tensors: with grad mode on its backward takes its SVD formula
    where ``|det| < 100 eps`` of the dtype (``linalg_det_backward``), whose derivatives divide
    by ``s_i^2 - s_j^2``: ``nan`` at two equal singular values (``det(s^2 I)`` of an isotropic
    covariance in float32 for ``s < 0.15``), 2.4e-3 and 1.3e-2 off (parameter gradients of a
    float32 Laplacian) at relative gaps of 5e-5 and 4e-6, where ``sign * exp(log|det|)`` was
    within 2e-6 (``tests/core/test_merges26b.py``). Its error grows as ``1 / gap``,
    ``sign * exp(log|det|)``'s with the condition number ``s_max / s_min`` (near a node of a
    Slater determinant: gaps >= 0.01, ``s_min / s_max`` <= 2e-3, where PyTorch's was 6-180x
    more accurate, det26): so true where a matrix below the threshold has a gap, relative to
    ``s_max``, under ``s_min / s_max``, i.e. ``min_i (s_i - s_i+1) < s_min``. One comparison
    per call; ``svdvals`` of the matrices below the threshold only."""
    if a.shape[-1] < 2:
        return False
    with torch.no_grad():
        small = det.abs() < 100 * torch.finfo(det.dtype).eps
        if not bool(small.any()):
            return False
        s = torch.linalg.svdvals(a.detach()[small])  # (k, n), descending
        return bool(((s[:, :-1] - s[:, 1:]).amin(-1) < s[:, -1]).any())


@dataclass(frozen=True)
class Replacement:
    """What ``SafeDerivatives`` does with an op whose PyTorch derivatives are wrong: run
    ``run`` instead (same values, derivatives right at every order), or, if ``None``, refuse
    it with ``why``. ``forward``: the lowest derivative order that is wrong for an engine
    taking any derivative through forward mode (forward over reverse: measured as such);
    ``reverse``: for one of backward passes only; ``None``: right at every order measured.
    ``subclasses_only``: ``reverse`` is wrong only where PyTorch takes the op's derivatives
    as for tensor subclasses (``plain_derivatives`` false: ``det``'s third, ``UNDER_MODES``)."""

    name: str
    forward: int | None
    reverse: int | None
    run: Callable[..., Any] | None
    why: str = ""
    nodes: tuple[str, ...] = ()  # the autograd nodes it leaves (type names, without the 0)
    subclasses_only: bool = False

    def applies(self, order: int, forward_mode: bool, plain: bool = False) -> bool:
        """Whether an engine taking derivatives up to ``order`` (through forward mode or
        not) must not use PyTorch's own; ``plain``: where its derivatives are taken as for
        plain tensors (``plain_derivatives``; ``False``: the row's widest reach)."""
        first = self.forward if forward_mode else self.reverse
        if first is None or first > order:
            return False
        return forward_mode or not (plain and self.subclasses_only)


class SafeDerivatives(TorchFunctionMode):
    """Run ``f`` with the ops in ``REPLACEMENTS`` whose derivatives of order ``order`` or
    lower are wrong in PyTorch replaced by right equivalents, or refused (``WrongDerivatives``
    naming ``way_out``). With ``forward_mode=False`` (an engine of backward passes only) the
    ops whose reverse-mode derivatives are right are left as they are.

    The order counts every derivative taken of ``f``: the forward engine's products are first
    derivatives and their gradients with respect to parameters second ones; the Laplacian's
    nested methods take second derivatives, and a Laplacian's gradient is a third.

    Found by experiment in float64 against finite differences of first derivatives and
    grad-of-grad loops (PyTorch 2.13; ``tests/taylor/test_linalg_rules.py``, ``test_norms.py``):

    - ``layer_norm`` (fused ``native_layer_norm``): third derivative wrong (its backward
      treats the saved mean and inverse standard deviation as constants; pytorch#175754),
      and through forward mode already the second (the forward engine's divergence
      gradients off by 38-3900%, ``jacobian(method="auto")`` on a tall Jacobian by 69-150%).
      ``instance_norm`` with the input's statistics (``native_batch_norm`` over a reshaped
      input): the same, parameter gradients of the Laplacian off by 8-234%; replaced (with
      ``track_running_stats`` in training too: the forward engine's Jacobian gradients were
      off, ``jacobian(method="auto")`` of a tall one included; opinfo33).
    - ``prod``, ``cumprod`` at an exact zero factor: ``nan`` derivatives through forward mode
      (prod's from the third order, cumprod's from the second); ``householder_product``
      (``orgqr``): derivatives of its forward-mode formula wrong (14-640%). Replaced by
      products (``_prod``, ``_cumprod``, ``_core.linalg.householder_product``).
    - ``slogdet``, ``logdet``, ``det``, ``solve``, ``solve_ex``: first derivatives right;
      derivatives of the forward-mode formula wrong (forward engine: parameter and ``x``
      gradients of ``jacobian``/``divergence``, off by 2-240%; forward-over-reverse, hessian
      and Hutchinson by HVPs: gradients of the Laplacian, off by 2-90%). Reverse over reverse
      is right, but ``det``'s third derivative by backward passes is ``nan`` where its second
      (at some float32 matrices) or its first two run under any ``TorchDispatchMode``, inside
      ``torch.func`` or batched (PyTorch's formula for tensor subclasses;
      ``weighted_laplacian``'s parameter gradients with an indefinite ``diffusion``, whose
      whole part runs under ``_exact.state.Once``'s mode; the loop's batched second-level
      passes): ``det`` from the third order by backward passes too, but only there
      (``plain_derivatives``, ``batched``; det26: elsewhere PyTorch's, whose float32
      Laplacian near a node of a Slater determinant is 6-180x more accurate than
      ``sign * exp(log|det|)``'s). Replaced by ``torchdiv._core.linalg``.
    - ``cholesky_inverse``: even its first forward-mode derivative is wrong (Jacobians by the
      forward engine off by 6%, Laplacian values by 200%). Replaced by ``inv(C C^T)``.
    - ``eigvalsh``: gradients of the Laplacian by forward over reverse are ``nan``; ``eigh``
      (with eigenvectors): every second derivative through forward mode is ``nan``. Refused
      (reverse over reverse is right for both).
    - ``cdist``: no forward-mode derivative and no double backward (``_cdist_backward``),
      ``torch.func.jacrev`` of it (batched pullbacks) wrong (relative error ~1), and above 25
      points PyTorch takes ``sqrt(|a|^2 + |b|^2 - 2 a.b)``, whose derivatives are infinite at
      zero distance (``cdist(r, r)``'s diagonal). Replaced by ``_cdist`` from order 1: every
      engine and the Taylor engine's recording run ``f`` at least under ``SafeDerivatives(1)``.

    - ``pdist``: no forward-mode derivative and no double backward (``_pdist_backward``):
      every engine but the loop's first order raised (a Jastrow factor over
      ``torch.pdist(r_b)``). Replaced by ``_pdist`` (differences and norms), from order 1
      through forward mode and order 2 by backward passes.

    - ``logcumsumexp``: its third derivative by reverse mode is ``nan`` (its backward takes
      logarithms of the incoming gradient's positive and negative parts); Laplacian values
      right, their gradients ``nan`` by the grad-of-grad loop. Its forward-mode formula
      normalises by the maximum over the whole dimension, so a prefix far below a later
      maximum loses every digit: JVPs wrong from the first order (17% in float64 at spreads
      of ~100, the nested methods' Laplacian by 20-960%). Replaced by ``_logcumsumexp``
      (from order 1 through forward mode: the Taylor engine records the prefixes too).

    - Norms: ``linalg.vector_norm`` (``p`` other than 0, 1, ±inf) and every op over it
      (``norm``, ``Tensor.norm``, ``linalg.norm``, ``linalg.matrix_norm('fro')``,
      ``F.normalize``, ``cosine_similarity``, ``pairwise_distance``), ``dist``, ``renorm``,
      ``std``, ``std_mean``: their backward formulas mask zeros in place (``masked_fill_``),
      which forward mode cannot differentiate: the gradient of a Laplacian by forward over
      reverse, the Hessian or Hutchinson's products raised "modified by an inplace
      operation" (values right). Replaced by ``_core.linalg.vector_norm`` (elementwise powers,
      a sum, a root; 0 derivatives at a zero entry and a zero vector, as PyTorch's first ones)
      and the ops over it, ``std`` by the root of ``var``. The 2-norm's from the second order
      through forward mode too: at a zero vector that depends on the parameters (``(x @ w) *
      0``, a padding atom's features) its JVP's derivative is ``0 / 0``, so the forward
      engine's parameter gradients were ``nan`` (rev-fuzz24).
    - ``copysign``: its backward divides by the input, so second derivatives are ``nan`` where
      an entry is 0, by reverse mode too (the reverse engine's divergence gradients, a second
      derivative taken under ``SafeDerivatives(1)``): replaced by ``|a|`` signed by ``other``
      from order 1.
    - ``sinc`` at an exact 0: PyTorch takes the constant 1 there (its formulas mask the slope
      to 0), so its second derivatives there were 0 through forward mode (a Laplacian by the
      Taylor engine, forward over reverse or the Hessian missing ``-pi^2/3`` per zero) and
      ``nan`` by backward passes, and ``sin(t)/t``'s derivatives cancel near 0: replaced by
      ``_sinc`` (its Taylor series where ``|pi a| < 1/2``)
      from order 1 through forward mode (the recorders see it) and order 2 by backward passes.
    - ``prelu`` at an exact 0 (zero padding, a masked input, a ReLU before it): its backward
      takes the slope ``weight`` there, its forward-mode formula and its double backward
      take 1 (``>= 0``), so ``method="forward"`` gave another divergence than ``"reverse"``
      (3.0 against 0.6 for three zeros at slope 0.2), the divergence's parameter gradients by
      reverse mode were a mix, and the Laplacian of ``prelu(z)^2 + prelu(z)`` at ``z = 0``
      was 0.24 (Taylor), 1.2 (grad-of-grad) or 6.0 (forward over reverse): replaced by
      ``a`` times a slope that is 1 where ``a > 0``, else ``weight``, from order 1: the
      backward's slope at every order.
    - ``hardsigmoid``: ``hardsigmoid_backward`` has no derivative (the parameter gradient of
      any divergence through it raised, ``"auto"`` too), and in float64 its slope is 1/6
      rounded to float32; ``glu``: its forward-mode formula (``glu_jvp``) has none (the
      forward engine's parameter gradients, the nested Laplacians). Replaced by
      ``hardtanh(a + 3, 0, 6) / 6`` and ``a1 * sigmoid(a2)`` from order 2.
    - ``celu``: its derivatives take ``1 / alpha`` rounded to float32, so in float64 they
      were off by ~1e-8 relative in every engine of PyTorch's derivatives (1.5e-8 at
      TorchANI's ``alpha = 0.1``: its Laplacians by forward over reverse, divergences and
      Jacobians by both modes); replaced by ``elu(a, alpha, 1, 1 / alpha)`` from order 1.
    - The ``torch.special`` functions of ``UNDERIVABLE_NAMES`` have no derivative at all
      (autograd returns their output as a constant: every engine gave 0 through them):
      refused (``refuse_underivable``) at any order where an argument is being differentiated;
      ``Watching`` refuses them too, for the engines that evaluate ``f`` outside this mode,
      and so does the recorder of the structured and Taylor engines (``capture``).
    - ``pow`` of a tensor to a tensor exponent (polynomial features ``h[..., None] **
      self.powers``): its forward-mode formula holds the exponent's term ``a^e log(a) de``
      with a zero tangent, whose derivatives are ``nan`` at a negative base: the parameter
      gradients of forward-mode divergences and of forward-over-reverse and Hessian
      Laplacians were ``nan`` (values right). By backward passes its derivatives are ``nan``
      at an exact 0 base from the second order where the exponent is 0 (``0 * inf``), from
      the third where it is 1: the parameter gradients of ``"reverse"`` and ``"auto"``
      divergences and of the loop's Laplacians (``"auto"`` at D = 3) through features
      ``h ** torch.arange(4)`` at an ``h`` of 0. Replaced by ``_core.power.power`` from order
      2 (both kinds of engine) where the exponent is a plain tensor not differentiated (one
      ``f`` holds: a buffer, a closure's constant); one computed inside ``f`` under the
      engines' transforms cannot be told from a differentiated one and keeps PyTorch's.
    - ``group_norm``: its forward-mode formula views the input, which fails on a transposed
      view (an attention block's output in diffusers' U-Nets): run on a contiguous copy.
    - ``cosine_similarity`` clamps its norms in place under ``no_grad``, a write no replay
      reproduces: the recorders (``recording=True``) run its composite at any order, so the
      Taylor and structured engines record it (they refused it, ``"auto"`` fell back).
    - ``std`` and ``std_mean`` at a zero variance (equal entries): PyTorch's first derivatives
      are 0 there (the root of ``var`` masked, ``_std``), its second ones by backward passes
      ``nan`` (the loop's Laplacian gradients, ``"auto"`` at one input): replaced from the
      second order, as the 2-norm (rev-fuzz24), and through forward mode (its JVP's
      derivative at a zero variance that depends on the parameters is ``0 / 0``: the forward
      engine's parameter gradients were ``nan``, rev-merges24d). The recorders record
      PyTorch's op, whose Taylor rule masks the root as ``_std`` (``_taylor.composite``; as
      ``sqrt(var)``, ``sqrt``'s rule was infinite there: ``nan`` Laplacians).
    - ``scaled_dot_product_attention`` inside ``torch.autocast``: on the math backend
      (``math_attention``) below ``torch.func.vjp`` its pullback raised a dtype mismatch
      (bfloat16 on CPU), so every engine of backward passes refused a valid ``f``; run as
      autocast runs it, its arguments cast first (``_autocast_attention``), from order 1;
      ``nn.MultiheadAttention``'s function, which calls it out of this mode's reach, runs
      with that one inside (``_autocast_multi_head_attention``).

    ``inv``, ``cholesky``, ``solve_triangular``, ``cholesky_solve``, ``lu_factor``/``lu_solve``,
    ``qr``, ``svdvals``, ``matrix_exp``, ``pinv``, ``lstsq`` were right in every engine.
    """

    def __init__(
        self,
        order: int,
        way_out: str,
        forward_mode: bool = True,
        recording: bool = False,
        batched: bool = False,
    ):
        super().__init__()
        self.order, self.way_out, self.forward_mode = order, way_out, forward_mode
        # the engine's second backward pass batches its cotangents (``is_grads_batched``, the
        # loop's ``Settings.batched``), or its cotangents are a tensor subclass (``f``'s
        # output): PyTorch's formulas take them as tensor subclasses there, as under a
        # dispatch mode (``plain_derivatives``)
        self.batched = batched
        # the caller's ``forward_ad`` level (dual parameters, a ``torch.func.jvp`` around the
        # call): its tangents differentiate the engine's backward passes in forward mode, one
        # order more, so the rows wrong through forward mode from the second order are replaced
        # too (``dual_order``; det, slogdet, logdet, solve, cholesky_inverse: the tangents of a
        # reverse divergence and the loop's Laplacian were 3-84% off; gradcheck34)
        self.dual = _forward_ad._current_level >= 0
        # the recorders' evaluation (``torchdiv._taylor.capture.recording``): the ops of
        # ``RECORDED`` are replaced at any order
        self.recording = recording
        # tensors written below torch.func's transforms, with their values before: put back
        # if the evaluation fails (``_written_below_transforms``)
        self.written: list[tuple[torch.Tensor, torch.Tensor]] = []
        # whether a replacement with nodes ran: a plain evaluation of f would show its op
        self.replaced = False
        # whether f took a backward pass with a graph (``inner_backward``): its ops'
        # derivatives are then taken one order higher than the engine's own (not ``inner``:
        # TorchFunctionMode's own attribute)
        self.backward_inside = False

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        super().__exit__(kind, error, traceback)
        if error is not None and self.written:  # an evaluation that did not finish
            with torch.no_grad(), torch._C._DisableFuncTorch():
                for tensor, before in reversed(self.written):
                    tensor.copy_(before)
        self.written = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self.backward_inside = self.backward_inside or inner_backward(func, args, kwargs)
        if refuse_gradient_hook(func, args):
            return dropped_hook()
        if type(func) is _METHOD_WRAPPER and func.__self__ is _DATA:
            return _data(func, *args)
        if func in _BATCH_NORMS and not torch.compiler.is_compiling():
            _refuse_statistics_in_transforms(func, args, kwargs)
        if func in MIXED_PRECISION_NORMS:
            widened = _widened_norm(args, kwargs)
            if widened is not None:  # (the widened call through this mode's replacements)
                out = self.__torch_function__(func, types, widened, kwargs)
                if func is torch.native_layer_norm:  # (its mean and rstd stay wide: PyTorch's)
                    return (out[0].to(args[0].dtype), *out[1:])
                return cast(torch.Tensor, out).to(args[0].dtype)
        # ``**``: looked up as ``Tensor.pow`` (Dynamo cannot guard a dict holding the
        # ``functools.wraps`` function ``Tensor.__pow__`` as a key: torch.compile failed)
        # ``Tensor.norm`` by identity: Dynamo's guard on it as a key of the dict failed on
        # the frame that made it (``AssertionError``: torch.compile of every forward engine
        # through ``x.norm()`` failed, qmc27)
        entry = (
            _TENSOR_NORM_ENTRY
            if func is _TENSOR_NORM
            else REPLACEMENTS.get(torch.Tensor.pow if func is _POW_OPERATOR else func)
        )
        if entry is None and func in _UNDERIVABLE:
            refuse_underivable(_UNDERIVABLE[func], _differentiated((args, kwargs)))
        plain = (
            entry is not None
            and entry.subclasses_only
            and not self.batched
            and plain_derivatives(*args, *kwargs.values())
        )
        if (
            entry is None
            or not (
                entry.applies(self.order, self.forward_mode, plain)
                or (self.recording and func in _RECORDED_AS_REPLACED)
                or (self.dual and dual_order(entry, self.order))
            )
            or _underived(args, kwargs)
        ):
            try:
                out = func(*args, **kwargs)
            except RuntimeError as error:
                return self._written_below_transforms(func, args, kwargs, error)
            refuse_untracked_custom_op(func, args, kwargs, out)
            if not (
                plain  # (det's, kept: not where PyTorch's SVD formula is off, below)
                and entry is not None
                and entry.applies(self.order, self.forward_mode)
                and not _underived(args, kwargs)
                and svd_formula_unstable((*args, *kwargs.values())[0], out)
            ):
                return out
        assert entry is not None  # (None returned above)
        if entry.run is None:
            way = _real_way_out(self.way_out, entry.name, args)
            raise WrongDerivatives(f"{entry.name} in f: {entry.why}; use {way}")
        self.replaced = self.replaced or bool(entry.nodes)  # (no nodes: a plain one is right)
        args, kwargs = _by_position(func, entry.run, args, kwargs)
        return entry.run(*args, **kwargs)

    def _written_below_transforms(
        self, func: Any, args: Any, kwargs: dict[str, Any], error: Exception
    ) -> Any:
        """A call that ``torch.func``'s transforms refused (``error``) as an in-place write to a
        tensor ``f`` did not make (a buffer), run below the transforms as a plain evaluation of
        ``f`` runs it (the transforms refuse before writing): where nothing it reads carries
        their derivatives (``_carries_derivatives``: a module counting its calls, ``steps +=
        1``; a fake-quantize observer's range of a frozen weight), or under ``no_grad``, where the
        values it reads are constants (a running mean of activations), unless one is batched.
        A write of a value computed from ``x`` with grad on is refused, naming the way out.
        What it wrote (its first argument, or ``out``) is put back if the evaluation fails."""
        if _CAPTURED not in str(error):
            raise error
        plain = tree_map(_unwrapped, (args, kwargs))
        values, given = tree_leaves(plain), tree_leaves((args, kwargs))
        if not any(v is _BATCHED for v in values) and (
            not any(map(_carries_derivatives, given)) or not torch.is_grad_enabled()
        ):
            target = plain[0][0] if plain[0] else None  # an in-place method's, or out=
            written = [t for t in (target, plain[1].get("out")) if isinstance(t, torch.Tensor)]
            self.written += [(t, t.detach().clone()) for t in written]
            with torch._C._DisableFuncTorch(), _set_fwd_grad_enabled(False):
                return func(*plain[0], **plain[1])
        raise RuntimeError(
            f"{getattr(func, '__name__', func)} in f writes in place to a tensor f did not make "
            "(a buffer, a parameter's .data) a value computed from x, which torch.func's "
            f"transforms forbid (PyTorch: '{_CAPTURED}'); write it under torch.no_grad(), call "
            "f(x) once before where f initialises from its first batch (an ActNorm), or use "
            "method='auto' (plain autograd runs it; not inside your own torch.func transform, "
            "which refuses the write as well: a batch norm there needs model.eval())"
        ) from None


def _carries_derivatives(t: Any) -> bool:
    """Whether ``t`` carries a derivative of the transforms: at the innermost (its outermost
    wrapper) a gradient (``requires_grad`` of ``vjp``'s wrapper) or a tangent (``jvp``'s), at
    the outer ones a gradient. Every value an op makes under a transform is wrapped, constants
    too (a fake-quantize observer's range of a frozen weight, ``weight.detach().aminmax()``):
    wrapped alone does not mean computed from ``x``, and such a write (``min_val.copy_(v)``)
    was refused by ``"forward"``/``"reverse"``. ``detach()`` cuts every level, as in PyTorch."""
    innermost = True
    while isinstance(t, torch.Tensor) and is_functorch_wrapped_tensor(t):
        if t.requires_grad or (innermost and unpack_dual(t).tangent is not None):
            return True
        innermost, t = False, get_unwrapped(t)
    return False


_CAPTURED = "would mutate a captured Tensor"  # torch.func's refusal of such a write
_DATA = vars(torch._C.TensorBase)["data"]  # ``Tensor.data``: its ``__set__`` is ``t.data = v``
_METHOD_WRAPPER = type(_DATA.__set__)


def _data(method: Any, tensor: torch.Tensor, *value: Any) -> Any:
    """``tensor.data`` (``method``: ``Tensor.data.__get__``) or ``tensor.data = value``
    (``__set__``: ``_set_data``) in ``f``. A tensor ``f`` did not make (a parameter) gets its
    ``.data`` below ``torch.func``'s transforms: a plain alias with a version counter of its
    own, as in a plain evaluation. Under the transforms and a dispatch mode (``Changes``
    watching the first of several evaluations), PyTorch made it a wrapper whose in-place
    writes (``p.data.clamp_()``) moved the parameter's own counter, at that evaluation
    only: its graph, saved at the version after, raised "modified by an inplace operation"
    on the parameter gradients once the others ran."""
    if method.__name__ == "__set__":
        return _set_data(method, tensor, *value)
    if method.__name__ == "__get__" and not is_functorch_wrapped_tensor(tensor):
        with torch._C._DisableFuncTorch():
            return method(tensor, *value)
    return method(tensor, *value)


def _set_data(set_data: Any, tensor: torch.Tensor, value: Any) -> None:
    """``tensor.data = value`` in ``f``, set below ``torch.func``'s transforms.

    A data-dependent initialisation sets its parameters so on the first forward (normflows'
    ``ActNorm``: ``self.s.data = s_init.data``; FrEIA's ``ActNorm``: ``self.scale.data = ...``)
    from the batch's statistics. Under the engines' transforms ``value`` is their wrapper, and
    setting it as a tensor's data crashed the process (a segmentation fault; plain
    ``torch.func.vjp`` of such a module too). A tensor ``f`` did not make (a parameter) gets
    the value under the wrappers, as a plain evaluation of ``f`` sets it (``.data`` is a
    constant: nothing to differentiate); one that ``vmap`` batches has no such value and is
    refused, naming the way out."""
    plain = _unwrapped(value)
    if plain is value or is_functorch_wrapped_tensor(tensor):
        return set_data(tensor, value)  # (PyTorch's own: a plain value, or f's own tensor)
    if plain is _BATCHED:
        raise ValueError(
            "f sets a tensor's .data to a value vmap batches (a data-dependent "
            "initialisation on the first forward, such as an ActNorm's): call f(x) once "
            "before the torchdiv call, so that it initialises outside it"
        )
    return set_data(tensor, plain)


_aten = torch.ops.aten
# the ATen batch norms an exported or fx-traced graph calls directly (``torch.export`` of a
# train-mode model: ``aten.batch_norm``; after ``run_decompositions``, the functional one), as
# ``F.batch_norm``: in train mode (``_batch_norm_with_update``: always) they update running
# statistics from their input
_ATEN_BATCH_NORMS = {
    _aten.batch_norm.default,
    _aten.native_batch_norm.default,
    _aten._native_batch_norm_legit.default,
    _aten._native_batch_norm_legit_functional.default,
    _aten._batch_norm_with_update.default,
    _aten._batch_norm_with_update_functional.default,
}
_BATCH_NORMS = {torch.nn.functional.batch_norm, *_ATEN_BATCH_NORMS}
_BATCH_NORM = inspect.signature(torch.nn.functional.batch_norm)


def _batch_norm_arguments(func: Any, args: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a call of ``F.batch_norm`` or of an ATen batch norm by name
    (``training`` true for ``_batch_norm_with_update``, which has none)."""
    if func not in _ATEN_BATCH_NORMS:
        return _BATCH_NORM.bind(*args, **kwargs).arguments
    names = [a.name for a in func._schema.arguments]
    return {"training": True, **dict(zip(names, args, strict=False)), **kwargs}


def _refuse_statistics_in_transforms(func: Any, args: Any, kwargs: dict[str, Any]) -> None:
    """A train-mode batch norm that updates running statistics from a tensor ``torch.func``
    transforms (``x`` or one computed from it): the transforms do not refuse that write, as
    they refuse others (``_written_below_transforms``), and forward mode then gave zeros
    (PyTorch 2.13). Raised as that refusal, which the public functions report as sample
    mixing (``_api.reporting``; ``"auto"`` falls back to plain autograd). Not while Dynamo
    traces (``__torch_function__``): it cannot trace ``is_functorch_wrapped_tensor``; the
    graph broke inside the mode, ``f`` was compiled apart and plain autograd took that
    graph's derivatives again without an error (a divergence's parameter gradient through a
    batch norm by batch statistics 100% off: f's part missing). A traced write raises there
    (Dynamo's error)."""
    first = args[0] if args else kwargs.get("input")
    if not (isinstance(first, torch.Tensor) and is_functorch_wrapped_tensor(first)):
        return  # (no transform: the signature is not bound, which costs microseconds)
    bound = _batch_norm_arguments(func, args, kwargs)
    if bound.get("training") and isinstance(bound.get("running_mean"), torch.Tensor):
        raise RuntimeError(
            f"a batch norm in train mode in f updates its running statistics from x inside "
            f"torch.func's transforms (PyTorch: '{_CAPTURED}'); use method='auto'"
        )


# the norms whose CPU kernels take a lower-precision input with wider parameters or running
# statistics (mixed precision: a model under ``torch.autocast``, whose linear layers and
# convolutions hand a bfloat16 or float16 input to float32 norms), giving the input's dtype
MIXED_PRECISION_NORMS = {
    torch.nn.functional.batch_norm,
    torch.nn.functional.instance_norm,
    torch.nn.functional.group_norm,
    torch.group_norm,
    torch.nn.functional.layer_norm,
    torch.layer_norm,
    # (out in the input's dtype, mean and rstd in the wider one; until rev-b33 opinfo33's
    # composite gave out float32 and the statistics bfloat16: f's next bfloat16 op refused)
    torch.native_layer_norm,
}


def _widened_norm(args: Any, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The arguments of a call of one of ``MIXED_PRECISION_NORMS`` with its CPU input cast to
    the one wider dtype of its floating tensors (weight, bias, running statistics), or
    ``None`` where they are not all of one dtype wider than the input's (a norm of one dtype;
    PyTorch's error for another mix).

    The mixed kernels compute in the parameters' dtype and round the result to the input's
    once, as the call on the widened input rounded to the input's dtype does (the same values,
    up to the order of the wider dtype's sums), but their derivatives under ``torch.func``
    fail (PyTorch 2.13, CPU, bfloat16 and float16 alike): ``vmap`` over the pullback of the
    batch and layer norms hands their backward kernels a float32 cotangent with the
    lower-precision input ("expected scalar type BFloat16 but found Float": an eval-mode
    ``nn.BatchNorm1d`` under Accelerate's ``mixed_precision="bf16"`` by
    ``method="reverse"``; plain autograd's batched backward runs), and the forward-mode
    formulas of the batch, group, instance and layer norms give a float32 tangent to a
    bfloat16 value, which the next convolution refuses ("Input type (torch.FloatTensor) and
    weight type (CPUBFloat16Type) should be the same": a group-norm U-Net by ``"forward"``,
    ``"taylor"``, the forward-over-reverse Laplacian). On the widened input both are
    PyTorch's float32 derivatives, and the cast's. Not on other devices, where a norm on
    ``torch.autocast``'s float32 list returns the wider dtype (CUDA's layer and group
    norms: not measured)."""
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or first.dtype not in _REDUCED:
        return None  # (the usual case, read first: a float32 norm pays this line alone)
    dtypes = {
        t.dtype
        for t in tree_leaves((args[1:], kwargs))
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    }
    if len(dtypes) != 1 or first.device.type != "cpu":
        return None
    (wide,) = dtypes
    if wide == first.dtype or torch.promote_types(first.dtype, wide) != wide:
        return None
    return (first.to(wide), *args[1:])


_REDUCED = (torch.bfloat16, torch.float16)  # the inputs of PyTorch's mixed-precision norms


_BATCHED = object()  # a tensor vmap batches: no one value a plain evaluation would write


def _unwrapped(t: Any) -> Any:
    """The value under ``torch.func``'s wrappers (``_BATCHED`` for a batched one), or ``t``."""
    while isinstance(t, torch.Tensor) and is_functorch_wrapped_tensor(t):
        if is_batchedtensor(t):
            return _BATCHED
        t = get_unwrapped(t)
    return t


def _underived(args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether a call cannot be differentiated at all, so PyTorch's op serves: an integer or
    bool input (prod promotes it to int64 there), or an ``out=`` tensor."""
    first = args[0] if args else None
    integral = isinstance(first, torch.Tensor) and not (
        first.is_floating_point() or first.is_complex()
    )
    return integral or kwargs.get("out") is not None


_CDIST_MODES = (
    None,
    "use_mm_for_euclid_dist_if_necessary",
    "use_mm_for_euclid_dist",
    "donot_use_mm_for_euclid_dist",
)


def _cdist(
    x1: torch.Tensor, x2: torch.Tensor, p: float = 2.0, compute_mode: str | None = None
) -> torch.Tensor:
    """``torch.cdist`` from differences: ``d_ij = ||x1_i - x2_j||_p`` (memory ``P R M`` per
    batch element instead of ``P R``). At zero distance, where the distance is not
    differentiable, every derivative is 0 (PyTorch's first-order convention; exact for a
    point's distance to itself, ``cdist(r, r)``'s diagonal, which is 0 for every ``r``).
    PyTorch's op where it refuses the call (fewer than 2 dimensions, another number of
    columns, which the difference would broadcast, a negative ``p``, an unknown mode)."""
    if (
        x1.dim() < 2
        or x2.dim() < 2
        or x1.shape[-1] != x2.shape[-1]
        or not p >= 0
        or compute_mode not in _CDIST_MODES
    ):
        mode = {} if compute_mode is None else {"compute_mode": compute_mode}
        return torch.cdist(x1, x2, p, **mode)  # (raises PyTorch's error)
    return _linalg.vector_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), p, -1)


def _pdist(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``torch.pdist`` from differences: ``||a_i - a_j||_p`` for ``i < j`` in row order, as
    ``_cdist`` computes distances (every derivative 0 at zero distance, PyTorch's first-order
    convention). PyTorch's op where it refuses the call (not a matrix, a negative ``p``)."""
    if a.dim() != 2 or not p >= 0:
        return torch.pdist(a, p)  # (raises PyTorch's error)
    i, j = torch.triu_indices(len(a), len(a), 1, device=a.device)
    return _linalg.vector_norm(a[i] - a[j], p, -1)


def _normalized(a: torch.Tensor, dims: tuple[int, ...], eps: float) -> torch.Tensor:
    """``(a - mean) / sqrt(var + eps)`` over ``dims`` (the biased variance), as primitives
    whose derivatives are right at every order."""
    centred = a - a.mean(dims, keepdim=True)
    return centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)


def _layer_norm(
    a: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *_: Any,
) -> torch.Tensor:
    """``F.layer_norm`` by mean and variance over the trailing ``normalized_shape``; PyTorch's
    op where it refuses the call (a shape that is not ``a``'s trailing one, a weight or bias
    of another shape: the composite would normalise over other dimensions, or broadcast)."""
    shape = tuple(normalized_shape) if isinstance(normalized_shape, list | tuple) else ()
    given = [t.shape for t in (weight, bias) if t is not None]
    if not shape or a.shape[a.dim() - len(shape) :] != shape or any(s != shape for s in given):
        return torch.nn.functional.layer_norm(a, normalized_shape, weight, bias, eps)
    out = _normalized(a, tuple(range(-len(shape), 0)), eps)
    out = out if weight is None else out * weight
    return out if bias is None else out + bias


def _native_layer_norm(
    a: torch.Tensor,
    normalized_shape: Any,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.native_layer_norm``'s ``(out, mean, rstd)``: ``out`` as ``_layer_norm``,
    ``mean`` and ``rstd = 1 / sqrt(var + eps)`` over the trailing ``normalized_shape``, kept as
    singleton dimensions (PyTorch's shapes); the fused op where ``_layer_norm`` keeps it."""
    shape = tuple(normalized_shape) if isinstance(normalized_shape, list | tuple) else ()
    given = [t.shape for t in (weight, bias) if t is not None]
    if not shape or a.shape[a.dim() - len(shape) :] != shape or any(s != shape for s in given):
        return torch.native_layer_norm(a, normalized_shape, weight, bias, eps)
    dims = tuple(range(-len(shape), 0))
    mean = a.mean(dims, keepdim=True)
    rstd = torch.rsqrt((a - mean).square().mean(dims, keepdim=True) + eps)
    out = _layer_norm(a, normalized_shape, weight, bias, eps)
    return out, mean, rstd


def _instance_norm(
    a: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.instance_norm`` by mean and variance over each ``(sample, channel)``'s positions
    where it normalises by the input's statistics, the running statistics, if any, moved by
    the fused op without a graph (``track_running_stats=True`` in training: until opinfo33 and
    nnsweep33 the fused op, whose derivatives through forward mode are wrong, a divergence's
    parameter gradients by ``"forward"`` 0.3-62 off); else the fused op (normalising by running
    statistics; a statistic of another dtype than ``a``; a weight or bias not one per
    channel, which PyTorch refuses and the composite would broadcast; one position per
    ``(sample, channel)``, which ``F.instance_norm`` refuses only after handing the call to
    this replacement: the composite normalised a ``(N, C)`` input as one sample, a ``(N, C,
    1)`` one to 0)."""
    stats = (running_mean, running_var)
    wrong = not _per_channel(a, weight, bias) or math.prod(a.shape[2:]) == 1
    other = any(t is not None and t.dtype != a.dtype for t in stats)
    if not use_input_stats or other or wrong:
        options = (weight, bias, use_input_stats, momentum, eps)
        return torch.nn.functional.instance_norm(a, running_mean, running_var, *options)
    if any(t is not None for t in stats):
        with torch.no_grad():
            torch.nn.functional.instance_norm(
                a.detach(), running_mean, running_var, None, None, True, momentum, eps
            )
    return _channel_affine(_normalized(a, tuple(range(2, a.dim())), eps), weight, bias)


def _per_channel(a: torch.Tensor, *given: torch.Tensor | None) -> bool:
    """Whether each of ``given`` is ``None`` or holds one value per channel (dimension 1 of
    ``a``), as PyTorch's norms check: reshaped, another size would broadcast."""
    return all(t is None or t.numel() == a.shape[1] for t in given)


def _channel_affine(
    out: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``out * weight + bias`` with one weight and bias per channel (dimension 1)."""
    channels = (1, -1) + (1,) * (out.dim() - 2)
    out = out if weight is None else out * weight.reshape(channels)
    return out if bias is None else out + bias.reshape(channels)


def _batch_norm(
    a: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` by mean and (biased) variance over every dimension but the channels'
    (dimension 1) where it normalises by the input's statistics (``training``, or no running
    statistics); the running statistics, if any, moved by the fused op without a graph
    (exactly PyTorch's update). The fused op on ``a``'s first channel, without statistics or
    parameters, stays in the graph at weight 0, added to ``a``: it makes PyTorch's checks, its
    node is what the checks for sample mixing look for in a graph nobody watched
    (``_core.mixing.watch.check_graph``), and a watch reads it first (its message names a batch
    norm); it adds nothing at any order. Else the fused op (eval mode: an affine map of
    ``a``, whose derivatives are right), as where a parameter or statistic has another dtype
    than ``a`` (mixed precision off the CPU: the fused kernel computes in the wider one; on
    the CPU ``SafeDerivatives`` casts ``a`` to it first, ``_widened_norm``)."""
    stats = (running_mean, running_var)
    given = [t for t in (weight, bias, *stats) if t is not None]
    fused = (not training and None not in stats) or any(t.dtype != a.dtype for t in given)
    if fused or not _per_channel(a, weight, bias):  # (the latter: PyTorch's error)
        return torch.nn.functional.batch_norm(a, *stats, weight, bias, training, momentum, eps)
    first = a[:, :1]  # (one channel suffices for the marker)
    marker = torch.nn.functional.batch_norm(first, None, None, None, None, training, momentum, eps)
    if training and any(t is not None for t in stats):
        with torch.no_grad():
            torch.nn.functional.batch_norm(a.detach(), *stats, None, None, True, momentum, eps)
    dims = (0, *range(2, a.dim()))
    # (read first: a watch names it; compiled, a custom Function would leave a backward that
    # AOTAutograd cannot differentiate again)
    unread = marker * 0 if torch.compiler.is_compiling() else _Unread.apply(marker)
    out = _normalized(a + unread, dims, eps)
    return _channel_affine(out, weight, bias)


class _Unread(torch.autograd.Function):
    """``0 * t`` with no derivative at all: autograd never runs the backward of the op that
    made ``t``, which ``0 * t`` ran at every order (from torch 2.14 on, a batch norm's third
    derivative with respect to its input raises; ``_batch_norm``'s marker made every third
    derivative through a replaced batch norm raise)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(t: torch.Tensor) -> torch.Tensor:
        return t * 0

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> None:  # type: ignore[override]
        return None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return tangent * 0


def _group_norm(a: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.group_norm`` (whose leading arguments are ``F.group_norm``'s) of a contiguous
    copy of ``a``: PyTorch's forward-mode formula views the input, which fails on a permuted
    one ("view size is not compatible"; diffusers' attention blocks hand their output on as
    a transposed view). The same values and derivatives."""
    return torch.group_norm(a.contiguous(), *args, **kwargs)


def _functional_group_norm(a: torch.Tensor, num_groups: int, *args: Any, **kwargs: Any) -> Any:
    """``F.group_norm`` as ``_group_norm``, after the checks ``F.group_norm`` makes only once
    ``SafeDerivatives`` has taken the call (fewer than 2 dimensions, one value in all:
    ``torch.group_norm`` normalised that to 0 where PyTorch raises)."""
    if a.dim() < 2 or a.shape[0] * a.shape[1] // num_groups * math.prod(a.shape[2:]) == 1:
        return torch.nn.functional.group_norm(a, num_groups)  # (raises PyTorch's error)
    return _group_norm(a, num_groups, *args, **kwargs)


def _std(a: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``torch.std`` (any overload) as the root of ``torch.var`` (same arguments), derivatives
    0 where the variance is 0, as PyTorch's first ones; a float16 or bfloat16 ``a`` in float32,
    rounded once, as PyTorch's (a float16 variance overflows from 65504: a std of 256)."""
    if a.dtype in _REDUCED:
        return _std(a.float(), *args, **kwargs).to(a.dtype)
    return _linalg.root(torch.var(a, *args, **kwargs), 2)


def _std_mean(a: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.std_mean`` as ``_std`` with ``torch.var_mean``."""
    if a.dtype in _REDUCED:
        std, mean = _std_mean(a.float(), *args, **kwargs)
        return std.to(a.dtype), mean.to(a.dtype)
    var, mean = torch.var_mean(a, *args, **kwargs)
    return _linalg.root(var, 2), mean


def _copysign(a: torch.Tensor, other: Any) -> torch.Tensor:
    """``torch.copysign``: ``|a|`` with the sign (bit) of ``other``; derivatives those of
    ``|a|`` (0 at ``a = 0``), none with respect to ``other`` (PyTorch's are zeros)."""
    negative = torch.signbit(torch.as_tensor(other, device=a.device))
    magnitude = a.abs()
    dtype = torch.result_type(a, other)
    return torch.where(negative, -magnitude, magnitude).to(dtype)


def _sgn(a: torch.Tensor) -> torch.Tensor:
    """``torch.sgn``: of a complex ``a``, ``a / |a|`` (0 where ``|a| = 0``, the masked branch a
    constant: derivatives 0 there, as PyTorch's); real ``a`` goes to ``torch.sgn``. PyTorch's
    forward-mode derivative of ``sgn_backward`` writes (``masked_fill_``) into a tensor its
    own graph saved: the gradient of a forward-over-reverse Laplacian through a complex
    ``sgn`` raised "modified by an inplace operation" (opinfoc33)."""
    if not a.is_complex():
        return torch.sgn(a)
    magnitude = a.abs()
    zero = magnitude == 0
    return torch.where(zero, 0, a / torch.where(zero, 1, magnitude))


def _mvlgamma(a: torch.Tensor, p: int) -> torch.Tensor:
    """``torch.mvlgamma``: ``Σ_{j<p} lgamma(a - j/2) + p (p - 1)/4 log π``, the same values
    (PyTorch's own op run first on ``a.detach()`` for its domain check, ``a > (p - 1)/2``).
    PyTorch's ``mvlgamma_backward`` writes in place (``digamma_``) into a tensor whose
    tangent is an immutable zero under nested forward mode: a biharmonic by forward over
    reverse (``"auto"`` where ``f`` has an op without a Taylor rule) through ``mvlgamma`` of a
    tensor that depends on a parameter raised PyTorch's bare "ZeroTensors are immutable"
    (opinfohi34)."""
    torch.mvlgamma(a.detach(), p)
    halves = torch.arange(p, dtype=a.dtype, device=a.device) / 2
    return torch.lgamma(a.unsqueeze(-1) - halves).sum(-1) + p * (p - 1) / 4 * math.log(math.pi)


def _prelu(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.prelu``: ``a`` times its slope, 1 where ``a > 0``, else ``weight`` (one slope, or one
    per channel, dimension 1 of ``a``); the slope is a constant of ``a`` (a mask), so the
    derivatives at ``a = 0`` are those of ``weight * a`` at every order, as PyTorch's first
    backward has them. The same values; faster than PyTorch's op where it is differentiated
    twice (a 3-layer PReLU MLP's divergence and its parameter gradients: 0.6-0.8x the time;
    ``where(a > 0, a, weight * a)`` made the call 1.3-1.4x slower under ``vmap``). Anything
    else PyTorch's ``prelu`` checks (a slope per channel of another length, another dtype)
    goes to it."""
    slopes = weight.numel()
    if weight.dim() > 1 or weight.dtype != a.dtype or (slopes != 1 and a.dim() < 2):
        return torch.prelu(a, weight)
    if slopes == 1:
        return a * torch.where(a > 0, 1.0, weight.reshape(()))
    if a.shape[1] != slopes:
        return torch.prelu(a, weight)
    return a * torch.where(a > 0, 1.0, weight.reshape(slopes, *[1] * (a.dim() - 2)))


def _hardsigmoid(a: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid``: ``hardtanh(a + 3, 0, 6) / 6``, the same values and the same first
    derivative (``1/6`` strictly inside ``(-3, 3)``, else 0), whose own derivatives PyTorch
    has at every order (``hardsigmoid_backward`` has none: the gradient of any divergence
    through it raised)."""
    out = torch.nn.functional.hardtanh(a + 3, 0.0, 6.0) / 6
    return a.copy_(out) if inplace else out


def _celu(a: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """``F.celu``: ``elu(a, alpha, 1, 1 / alpha)``, the op PyTorch's ``celu`` computes, with
    the reciprocal in double precision; PyTorch's derivatives of ``celu`` round it to float32
    (``1.0/alpha.toFloat()``), so in float64 every derivative was off by that rounding (1.5e-8
    relative at TorchANI's ``alpha = 0.1``), those of ``elu`` are right at every order.
    PyTorch's own op at ``alpha = 0`` (raises its error)."""
    if alpha == 0:
        return torch.celu(a, alpha)
    if inplace:  # (``a.copy_(elu(a))`` overwrote what elu's backward reads: every pullback raised)
        return torch.ops.aten.elu_(a, alpha, 1.0, 1.0 / alpha)
    return torch.ops.aten.elu(a, alpha, 1.0, 1.0 / alpha)


def _constant_power(func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (``torch.pow``, ``Tensor.pow``, ``**``) by ``_core.power.power`` where the
    exponent is a tensor not differentiated, PyTorch's op otherwise (``out=`` too). The
    arguments by position or by name (``torch.pow(input=h, exponent=p)``).

    Where Dynamo traces the call (a compiled loss, a compiled ``f``), whether the exponent
    carries a transform's tangents cannot be traced (``is_functorch_wrapped_tensor``), so a
    tensor exponent not requiring grad is looked at eagerly: a graph break at the op (Dynamo
    runs the transform around it eagerly). Traced with PyTorch's op, the parameter gradients
    of compiled forward-mode divergences, Jacobians and Laplacians (``laplacian``'s default
    ``"auto"`` too) were ``nan`` at a negative base; under ``fullgraph=True`` Dynamo raises,
    naming ``_EAGER_POWER``. Engines of backward passes take it from order 2 too (``nan`` at a
    zero base), so their compiled calls break there as well."""

    def run(*args: Any, **kwargs: Any) -> Any:
        named = dict(zip(("input", "exponent"), args, strict=False)) | kwargs
        if named.keys() == {"input", "exponent"}:
            a, exponent = named["input"], named["exponent"]
            if plain_exponent(a, exponent) and not exponent.requires_grad:
                if torch.compiler.is_compiling():
                    return eager(*args, **kwargs)
                if not _differentiated(exponent):
                    return power(a, exponent)
        return func(*args, **kwargs)

    eager = torch.compiler.disable(run, reason=_EAGER_POWER)
    return run


_EAGER_POWER = (
    "torchdiv: pow of a tensor to a tensor exponent not requiring grad runs eagerly inside "
    "torchdiv's derivatives (PyTorch's second derivatives of it are nan at a negative base "
    "through forward mode, at a zero base by backward passes; whether the exponent is "
    "differentiated can only be told eagerly); for one graph, raise to Python numbers "
    "(torch.stack([h ** k for k in range(4)], -1) for h[..., None] ** torch.arange(4))"
)


def _celu_(a: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``torch.celu_``: ``_celu`` in place."""
    return _celu(a, alpha, inplace=True)


def _sinc(a: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.sinc``: ``sin(t) / t`` with ``t = pi a``, and where ``|t| < 1/2`` its Taylor
    series ``sum_n (-1)^n t^(2n) / (2n + 1)!`` to ``t^16`` (at ``|t| = 1/2`` the truncation
    is below a float64 rounding up to the fifth derivative, a biharmonic's parameter
    gradients, and the float32 cancellation above the switch costs ``1e-6`` relative in
    second derivatives, ``2e-4`` in fourth). PyTorch's op takes the constant 1 at an exact 0
    (its forward-mode formula masks the slope to 0): second derivatives there were 0 through
    forward mode and ``nan`` by backward passes (sinc interpolation ``sinc(a (x - k))`` at a
    grid point); and the derivatives of ``sin(t) / t`` cancel near 0 (the k-th loses
    ``eps / |t|^(k+1)``: a Laplacian of -8 for -5.56 at ``x = 1e-8`` in float64, 2e9 in
    float32). The values agree with PyTorch's to a rounding; PyTorch's op for ``out=`` and
    inputs that are not floating."""
    if out is not None or not a.is_floating_point():
        return torch.sinc(a, out=out) if out is not None else torch.sinc(a)
    t = math.pi * a
    near = t.abs() < 0.5
    far = torch.where(near, torch.ones_like(t), t)  # (no cancelling or 0/0 in unused branches)
    s = torch.where(near, t, torch.zeros_like(t)) ** 2
    series = torch.full_like(t, _SINC_SERIES[-1])
    for c in reversed(_SINC_SERIES[:-1]):  # (Horner in s = t^2)
        series = series * s + c
    return torch.where(near, series, torch.sin(far) / far)


# sin(t) / t = sum_n (-1)^n t^(2n) / (2n + 1)!, n = 0 .. 8
_SINC_SERIES = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(9))


def _sinc_(a: torch.Tensor) -> torch.Tensor:
    """``torch.sinc_``/``Tensor.sinc_``: ``_sinc`` in place."""
    return a.copy_(_sinc(a))


def _glu(a: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``F.glu``: the first half of ``a`` along ``dim`` times the sigmoid of the second;
    PyTorch's forward-mode formula (``glu_jvp``) has no derivative. PyTorch's own op where it
    refuses ``a`` (a scalar, ``dim`` out of range, an odd size: ``chunk`` would broadcast)."""
    if a.dim() == 0 or not -a.dim() <= dim < a.dim() or a.shape[dim] % 2:
        return torch.nn.functional.glu(a, dim)  # (raises PyTorch's error)
    first, second = a.chunk(2, dim)
    return first * torch.sigmoid(second)


def _prod(
    a: torch.Tensor, dim: int | None = None, keepdim: bool = False, *, dtype: Any = None
) -> torch.Tensor:
    """``torch.prod`` as a tree of elementwise products (``log2 n`` multiplications): their
    derivatives are right at every order, also at exact zeros, where PyTorch's derivative of
    its forward-mode formula for ``prod`` is ``nan``."""
    a = a if dtype is None else a.to(dtype)
    if dim is None:
        return _product_of_last(a.reshape(-1))
    if a.dim() == 0:
        return a.clone()
    out = _product_of_last(a.movedim(dim, -1))
    return out.unsqueeze(dim % a.dim()) if keepdim else out


def _product_of_last(a: torch.Tensor) -> torch.Tensor:
    """The product over the last dimension, by halves."""
    if a.shape[-1] == 0:
        return torch.ones(a.shape[:-1], dtype=a.dtype, device=a.device)
    while a.shape[-1] > 1:
        if a.shape[-1] % 2:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        a = a[..., 0::2] * a[..., 1::2]
    return a[..., 0]


def _cumprod(a: torch.Tensor, dim: int, *, dtype: Any = None) -> torch.Tensor:
    """``torch.cumprod`` as a scan of elementwise products (``log2 n`` steps, each element
    times the one ``2^k`` before it): derivatives right at every order, also at exact zeros,
    where PyTorch's through forward mode are ``nan`` from the second order on."""
    if a.dim() == 0:
        return a.clone() if dtype is None else a.to(dtype)
    moved = (a if dtype is None else a.to(dtype)).movedim(dim, -1)
    step, n = 1, moved.shape[-1]
    while step < n:
        before = torch.cat([torch.ones_like(moved[..., :step]), moved[..., :-step]], -1)
        moved = moved * before
        step *= 2
    return moved.movedim(-1, dim)


_PREFIX_BLOCK = 1 << 22  # elements of one block of masked prefixes in _logcumsumexp


def _logcumsumexp(a: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.logcumsumexp`` as a logsumexp over each prefix, ``out_i = log Σ_{j≤i} exp(a_j)``
    along ``dim``: a masked ``(n, n)`` square per position of the other dimensions, made in
    blocks of rows of at most ``_PREFIX_BLOCK`` elements (memory ``O(n^2)`` work). Values as
    stable as the fused op's (each row shifted by its own maximum); derivatives softmax
    weights, right at every order (PyTorch's own third derivative of it is ``nan``)."""
    if a.dim() == 0:
        return a.clone()
    moved = a.movedim(dim, -1)
    n = moved.shape[-1]
    per_row = max(moved.numel(), 1)
    step = max(1, _PREFIX_BLOCK // per_row)
    parts = []
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = torch.arange(start, stop, device=a.device)[:, None]
        later = torch.arange(stop, device=a.device) > rows  # (rows, stop): past each prefix
        # (``where``, not ``masked_fill``: that copies a permuted view contiguous first, an op
        # the Taylor engine has no rule for, so it refused every dim but the last)
        masked = torch.where(later, -math.inf, moved[..., None, :stop])
        parts.append(torch.logsumexp(masked, -1))
    if not parts:
        return a.clone()
    return torch.cat(parts, -1).movedim(-1, dim)


@contextlib.contextmanager
def host_planning() -> Any:
    """Bookkeeping of a plan on small CPU index tensors (index maps, colours), which reads
    their values but never waits for the device: hidden from the caller's dispatch modes, so
    that a counter of host synchronisations sees only work on the data."""
    with _disable_current_modes():
        yield


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A plan's CPU tensor on ``device`` without making the host wait: to a GPU, copied
    asynchronously from pinned memory (a copy from ordinary memory synchronises)."""
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _table(
    wrong: tuple[int | None, int | None],
    run: Callable[..., Any] | None,
    why: str,
    nodes: tuple[str, ...],
    *funcs: Any,
) -> dict[Any, Replacement]:
    """``wrong``: the first wrong order through forward mode and by backward passes only
    (where PyTorch's derivatives are taken as for tensor subclasses only, if ``nodes`` is
    ``UNDER_MODES``)."""
    under = nodes is UNDER_MODES
    return {f: Replacement(_name(f), *wrong, run, why, nodes, under) for f in funcs}


def _name(func: Any) -> str:
    module = getattr(func, "__module__", None)
    module = module if module == "torch.nn.functional" else "torch"
    module = "torch.Tensor" if "Tensor" in getattr(func, "__qualname__", "") else module
    return f"{module}.{func.__name__}".replace("linalg_", "linalg.")


# replaced at any order where the Taylor and structured engines record ``f`` (module docstring)
_RECORDED_AS_REPLACED = (torch.cosine_similarity,)
# the nodes of the replacements whose PyTorch derivatives differ only at a kink (an exact 0):
# a graph the caller built with them is not refused (``_api.graph``)
AT_KINKS = ("PreluKernelBackward",)
# a tensor to a tensor exponent: by backward passes wrong only at an exact 0 base (``nan``
# second derivatives where the exponent is 0, third where it is 1), through forward mode at
# every negative base
POW_NODES = ("PowBackward1",)
# sinc's differ at an exact 0 (PyTorch takes the constant 1 there: second derivatives 0
# through forward mode, nan by backward passes) and near 0 (sin(t)/t's derivatives cancel)
AT_ZEROS = ("SincBackward",)
# ... and those whose PyTorch derivatives are off by a float32 rounding only (in float64)
ROUNDED = ("CeluBackward",)
# det's, whose PyTorch third derivative by backward passes is wrong only under a dispatch mode
# or torch.func (its formula for tensor subclasses): replaced by backward passes only where
# ``plain_derivatives`` is false; a graph the caller built is not refused
UNDER_MODES = ("LinalgDetBackward",)
_SLOGDET = ("LinalgSlogdetBackward",)  # logdet too
_SOLVE = ("LinalgSolveExBackward",)  # solve, solve_ex, tensorsolve
_EIGHN = ("LinalgEighBackward",)  # eigh and eigvalsh
_NORM = ("LinalgVectorNormBackward",)  # every norm over vector_norm, cosine similarity
# the nodes whose PyTorch derivatives by backward passes differ only at a zero vector (the
# 2-norm's second ones are nan there: a dense distance matrix's diagonal; replaced from the
# second order, a graph the caller built with them is not refused)
AT_ZERO_VECTORS = (*_NORM, "NormBackward", "StdBackward", "StdMeanBackward")  # std: variance 0
_POW_OPERATOR = torch.Tensor.__pow__  # ``a ** e``: run by ``Tensor.pow``'s entry
_TENSOR_NORM = torch.Tensor.norm  # looked up by identity (``SafeDerivatives``)
_EIGH = "PyTorch's derivatives of it through forward mode are nan at this order"


def _autocast_attention(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` inside ``torch.autocast``, cast as autocast casts it
    (its floating arguments but float64 to the autocast dtype: the op is on autocast's
    lower-precision list) and run with autocast off, which is what autocast runs. PyTorch's
    math backend (``math_attention``) inside autocast and below ``torch.func.vjp`` gave a
    pullback that raised "expected scalar type BFloat16 but found Float" (PyTorch 2.13, CPU,
    bfloat16: TarFlow's attention under its training autocast): ``method="reverse"``,
    ``"forward-over-reverse"`` and ``"hessian"`` refused such an ``f``; plain autograd and
    the same math backend on arguments cast beforehand do not. The same values."""
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return torch.nn.functional.scaled_dot_product_attention(query, *args, **kwargs)
    dtype = torch.get_autocast_dtype(device)

    def lowered(t: Any) -> Any:
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point()
        return t.to(dtype) if eligible and t.dtype != torch.float64 else t

    args, kwargs = tree_map(lowered, (args, kwargs))
    with torch.autocast(device, enabled=False):
        return torch.nn.functional.scaled_dot_product_attention(lowered(query), *args, **kwargs)


def _autocast_multi_head_attention(query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``'s, with
    ``need_weights=False``: ``nn.TransformerEncoderLayer``'s) inside ``torch.autocast``, its
    attention run as ``_autocast_attention``: PyTorch's own function, whose global
    ``scaled_dot_product_attention`` is that (``_attention_cast_inside``), since this mode
    sees the outer call only. The same values (autocast's casts, bit for bit)."""
    forward = torch.nn.functional.multi_head_attention_forward
    if torch.is_autocast_enabled(query.device.type):
        forward = _attention_cast_inside(forward)
    return forward(query, *args, **kwargs)


def _attention_cast_inside(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with the global name ``scaled_dot_product_attention`` bound to
    ``_autocast_attention`` (a new function over the same code; the module is untouched),
    or ``function`` itself where its code does not name it (another PyTorch). Built at each
    call (about 5 us), over the module's globals as they are then: a copy kept from the first
    call went on calling a ``torch.nn.functional.linear`` patched at that time (a LoRA or
    counting wrapper) after the patch was undone, and missed patches made later."""
    code = function.__code__  # type: ignore[attr-defined]
    if "scaled_dot_product_attention" not in code.co_names:
        return function
    names = {**function.__globals__, "scaled_dot_product_attention": _autocast_attention}  # type: ignore[attr-defined]
    copy = types.FunctionType(code, names, code.co_name, function.__defaults__)  # type: ignore[attr-defined]
    copy.__kwdefaults__ = function.__kwdefaults__  # type: ignore[attr-defined]
    return functools.update_wrapper(copy, function)


REPLACEMENTS: dict[Any, Replacement] = {
    **_table(
        (2, 3),
        _layer_norm,
        "",
        ("NativeLayerNormBackward",),
        torch.nn.functional.layer_norm,
        torch.layer_norm,
    ),
    # the fused op called directly (PyTorch's OpInfo ``native_layer_norm``; opinfo33): the
    # same derivatives, its mean and rstd outputs computed beside
    **_table((2, 3), _native_layer_norm, "", ("NativeLayerNormBackward",), torch.native_layer_norm),
    **_table(
        (2, 3), _instance_norm, "", ("NativeBatchNormBackward",), torch.nn.functional.instance_norm
    ),
    **_table((2, 3), _batch_norm, "", ("NativeBatchNormBackward",), torch.nn.functional.batch_norm),
    **_table(
        (1, 3),
        _logcumsumexp,
        "",
        ("LogcumsumexpBackward",),
        torch.logcumsumexp,
        torch.Tensor.logcumsumexp,
    ),
    **_table((3, None), _prod, "", ("ProdBackward",), torch.prod, torch.Tensor.prod),
    # no nodes: the copy changes no value and no derivative, only what forward mode sees; an
    # evaluation outside the mode (the engines of backward passes) computed the same
    **_table((1, None), _group_norm, "", (), torch.group_norm),
    **_table((1, None), _functional_group_norm, "", (), torch.nn.functional.group_norm),
    **_table((2, 2), _linalg.vector_norm, "", _NORM, torch.linalg.vector_norm),
    **_table((2, 2), _linalg.norm, "", _NORM, torch.norm),
    **_table((2, 2), _linalg.tensor_norm, "", _NORM, torch.Tensor.norm),
    **_table((2, 2), _linalg.linalg_norm, "", _NORM, torch.linalg.norm),
    **_table((2, 2), _linalg.matrix_norm, "", _NORM, torch.linalg.matrix_norm),
    **_table((2, 2), _linalg.normalize, "", _NORM, torch.nn.functional.normalize),
    **_table((2, 2), _linalg.cosine_similarity, "", _NORM, torch.cosine_similarity),
    **_table((2, 2), _linalg.pairwise_distance, "", ("NormBackward",), torch.pairwise_distance),
    **_table((3, None), _linalg.dist, "", ("DistBackward",), torch.dist, torch.Tensor.dist),
    **_table((3, None), _linalg.renorm, "", ("RenormBackward",), torch.renorm, torch.Tensor.renorm),
    **_table((2, 2), _std, "", ("StdBackward",), torch.std, torch.Tensor.std),
    **_table((2, 2), _std_mean, "", ("StdMeanBackward",), torch.std_mean),
    **_table((2, 2), _hardsigmoid, "", ("HardsigmoidBackward",), torch.nn.functional.hardsigmoid),
    **_table((2, None), _glu, "", ("GluBackward",), torch.nn.functional.glu),
    **_table((2, 2), _constant_power(torch.pow), "", POW_NODES, torch.pow),
    **_table((2, 2), _constant_power(torch.Tensor.pow), "", POW_NODES, torch.Tensor.pow),
    **_table((1, 1), _celu, "", ROUNDED, torch.nn.functional.celu, torch.celu),
    **_table((1, 1), _celu_, "", ROUNDED, torch.celu_),
    **_table((1, 2), _sinc, "", AT_ZEROS, torch.sinc, torch.special.sinc, torch.Tensor.sinc),
    **_table((1, 2), _sinc_, "", AT_ZEROS, torch.sinc_, torch.Tensor.sinc_),
    **_table((1, 1), _copysign, "", ("CopysignBackward",), torch.copysign, torch.Tensor.copysign),
    **_table((1, 1), _prelu, "", AT_KINKS, torch.prelu, torch.Tensor.prelu),
    # an in-place write in the forward-mode derivative of its backward (_mvlgamma)
    **_table(
        (3, None),
        _mvlgamma,
        "",
        ("MvlgammaBackward",),
        torch.mvlgamma,
        torch.Tensor.mvlgamma,
        torch.special.multigammaln,
    ),
    # complex sgn: a forward-mode derivative of its backward that writes in place (_sgn)
    **_table((3, None), _sgn, "", ("SgnBackward",), torch.sgn, torch.Tensor.sgn),
    **_table((2, None), _cumprod, "", ("CumprodBackward",), torch.cumprod, torch.Tensor.cumprod),
    **_table((1, 1), _cdist, "", ("CdistBackward", "EuclideanDistBackward"), torch.cdist),
    **_table((1, 2), _pdist, "", ("PdistBackward",), torch.pdist),
    # no nodes: the values and derivatives of autocast's own cast and call
    **_table((1, 1), _autocast_attention, "", (), torch.nn.functional.scaled_dot_product_attention),
    **_table(
        (1, 1),
        _autocast_multi_head_attention,
        "",
        (),
        torch.nn.functional.multi_head_attention_forward,
    ),
    **_table(
        (2, None),
        _linalg.slogdet,
        "",
        _SLOGDET,
        torch.linalg.slogdet,
        torch.slogdet,
        torch.Tensor.slogdet,
    ),
    **_table((2, None), _linalg.logdet, "", _SLOGDET, torch.logdet, torch.Tensor.logdet),
    **_table(
        (2, 3),
        _linalg.det,
        "",
        UNDER_MODES,
        torch.linalg.det,
        torch.det,
        torch.Tensor.det,
    ),
    **_table((2, None), _linalg.solve, "", _SOLVE, torch.linalg.solve),
    **_table((2, None), _linalg.solve_ex, "", _SOLVE, torch.linalg.solve_ex),
    **_table(
        (2, None),
        _linalg.householder_product,
        "",
        ("LinalgHouseholderProductBackward",),
        torch.linalg.householder_product,
        torch.orgqr,
        torch.Tensor.orgqr,
    ),
    **_table(
        (1, None),
        _linalg.cholesky_inverse,
        "",
        ("CholeskyInverseBackward",),
        torch.cholesky_inverse,
        torch.Tensor.cholesky_inverse,
    ),
    **_table(
        (3, None),
        None,
        _EIGH + " (its Taylor rule and reverse mode are right)",
        _EIGHN,
        torch.linalg.eigvalsh,
    ),
    **_table(
        (2, None),
        None,
        _EIGH + " (backward passes only are right: reverse over reverse)",
        _EIGHN,
        torch.linalg.eigh,
    ),
    **_table(
        (2, None),
        None,
        "it solves by torch.linalg.solve inside PyTorch, out of this mode's reach, whose "
        "derivatives through forward mode are wrong at this order (its Taylor rule and "
        "reverse mode are right)",
        _SOLVE,
        torch.linalg.tensorsolve,
    ),
}
_TENSOR_NORM_ENTRY = REPLACEMENTS[_TENSOR_NORM]


def inner_backward(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    """Whether ``func`` is a backward pass with ``create_graph=True`` (a force field
    ``-grad(E(x).sum(), x, create_graph=True)`` computed inside ``f``): an engine's first
    derivatives of ``f`` are then second derivatives of ``E``'s ops (``InnerBackwards``)."""
    # (compared by identity: Dynamo traces this inside compiled code, and guards on a dict
    # keyed by functions failed for ``Tensor.__pow__``)
    if func is torch.autograd.grad:
        at = 4
    elif func is torch.autograd.backward or func is torch.Tensor.backward:
        at = 3
    else:
        return False
    return bool(kwargs.get("create_graph", args[at] if len(args) > at else False))


class InnerBackwards(TorchFunctionMode):
    """Notes whether ``f`` takes a backward pass with a graph (``backward_inside``), for a plain
    evaluation outside ``SafeDerivatives`` (which notes it too): where it does, the engines
    of backward passes evaluate ``f`` again at ``INNER_ORDER`` (under ``torch.no_grad()``
    their own order is 1, and the 2-norm's second derivative by PyTorch's backward, ``nan``
    at a zero vector, made a force field's divergence ``nan``)."""

    def __init__(self) -> None:
        super().__init__()
        self.backward_inside = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self.backward_inside = self.backward_inside or inner_backward(func, args, kwargs)
        if refuse_gradient_hook(func, args):
            return dropped_hook()
        return func(*args, **kwargs)


# ``SafeDerivatives``' order for an ``f`` that takes a backward pass with a graph, evaluated by
# an engine of backward passes: its derivatives are at least second ones of the ops before it
INNER_ORDER = (3, False)


def _parameters(run: Callable[..., Any]) -> tuple[frozenset[str], int] | None:
    """The keywords ``run`` takes and how many parameters it takes by position (``None``:
    any keyword, a ``**kwargs``); none known without a signature (an autograd.Function's
    apply)."""
    try:
        parameters = inspect.signature(run).parameters.values()
    except (TypeError, ValueError):
        return frozenset(), sys.maxsize
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    by_position = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return (
        frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.POSITIONAL_ONLY),
        sum(p.kind in by_position for p in parameters),
    )


def _by_position(
    func: Any, run: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args, kwargs`` for ``run``, a replacement of ``func``: the leading arguments ``f``
    passed by keywords of ``func``'s own that ``run`` names otherwise (``torch.cumprod(input=h,
    dim=-1)``, ``torch.linalg.solve(A=a, B=b)``; ``run``'s ``a``, ``b``) passed by position
    (``run``'s positions are ``func``'s): they raised ``TypeError`` (rev-b34). ``func``'s
    parameter order from its schema (``normalize_function``), looked up only then."""
    known = _PARAMETERS.get(run)  # (None: not a row of REPLACEMENTS, left as it is)
    if known is None or all(k in known[0] for k in kwargs):
        return args, kwargs
    pair = normalize_function(func, args, kwargs, normalize_to_only_use_kwargs=True)
    if pair is None:
        return args, kwargs
    moved = {k: v for k, v in kwargs.items() if k not in known[0]}
    positional = list(args)
    for name in list(pair.kwargs)[len(args) : known[1]]:  # (func's parameters in order)
        if name not in moved:
            break
        positional.append(moved.pop(name))
    if moved:  # (not leading ones: left for run to refuse)
        return args, kwargs
    return tuple(positional), {k: v for k, v in kwargs.items() if k in known[0]}


# every replacement's, read once here: a dict look-up per replaced call with keywords (one a
# compiled region traces, where a cached signature look-up warned)
_PARAMETERS = {e.run: _parameters(e.run) for e in REPLACEMENTS.values() if e.run is not None}


def dual_order(entry: Replacement, order: int) -> bool:
    """Whether ``entry`` is replaced for an engine of order ``order`` under the caller's
    ``forward_ad`` level: where it has a replacement (``run``) and its forward-mode
    derivatives are wrong at ``order + 1`` or below (at least the second: a first-order
    engine's products differentiated by the caller's tangents). Refusals (``eigvalsh``,
    ``eigh``: measured for forward over reverse, right for the caller's tangents over the
    loop's backward passes) are left to the engine's own order."""
    return entry.run is not None and entry.applies(max(order + 1, 2), True)


def dual_nodes(order: int) -> tuple[str, ...]:
    """The autograd nodes of the ops ``dual_order`` replaces at ``order``."""
    return tuple(
        dict.fromkeys(
            node
            for entry in REPLACEMENTS.values()
            if dual_order(entry, order)
            for node in entry.nodes
        )
    )


def backward_passes_order() -> tuple[int, bool]:
    """``SafeDerivatives``' ``(order, forward_mode)`` for an engine of backward passes (reverse
    mode, plain autograd) called under the caller's current grad mode: order 1 without grad
    (no graph: the products are all), else the third order of backward passes only, since
    the caller may differentiate the result's gradients again (``create_graph=True``: an
    ``x``-gradient penalty then a parameter step, a parameter Hessian-vector product, a
    gradient-norm penalty, MAML). Fused ``layer_norm``'s third derivative by PyTorch's
    backward is wrong (pytorch#175754): such gradients of a divergence were 28-100% off."""
    return (3, False) if torch.is_grad_enabled() else (1, True)


@cached()
def changed_nodes(order: int, forward_mode: bool = True, plain: bool = False) -> tuple[str, ...]:
    """The autograd nodes (type-name prefixes) of the ops ``SafeDerivatives(order, ...,
    forward_mode)`` changes (``plain``: where PyTorch takes derivatives as for plain tensors,
    ``plain_derivatives``; not ``det``'s by backward passes there). An op whose inputs require
    grad leaves its node in the graph of every result computed from it; one whose inputs do
    not is never differentiated, and its value is the same in the mode. So an evaluation of
    ``f`` outside the mode whose graph holds none of these nodes computed what the mode would
    have, with the same derivatives of every order: engines that evaluate ``f`` outside it
    search the graph (``_core.walk.search``) and evaluate ``f`` again under it only where one
    shows (``tests/core/test_modes.py``: every op of ``REPLACEMENTS`` leaves its nodes)."""
    return tuple(
        dict.fromkeys(
            node
            for entry in REPLACEMENTS.values()
            if entry.applies(order, forward_mode, plain)
            for node in entry.nodes
        )
    )
