"""DistributedDataParallel and FSDP2 (``fully_shard``) modules inside torchdiv's computations.

Both wrap a module with per-step work around its forward pass, which torchdiv's way of
evaluating ``f`` breaks:

- DDP's ``forward``, before the module: the buffer broadcast (an in-place copy, a
  collective), the one-time bucket rebuild (a collective), the reducer's bookkeeping; after it,
  ``prepare_for_backward`` on the outputs (with ``find_unused_parameters``, a search of their
  graph for the parameters that will get gradients) and, with ``find_unused_parameters`` or
  ``static_graph``, the custom ``autograd.Function`` ``_DDPSink`` around them.
- FSDP2's forward hooks: before, the all-gather of the parameters into storage that
  resharding frees; after, the reshard and hooks on the outputs whose backward unshards again
  and queues the reduce-scatter as a callback of the *current* backward pass.

torchdiv evaluates ``f`` many times per call, under ``torch.func`` transforms and recording
dispatch modes: the transforms refuse the buffer copy ("mutate a captured Tensor") and the sink
(no ``setup_context``), the structured and Taylor engines refuse both, the bucket rebuild and
FSDP's storage swaps meet wrapped tensors (errors, segmentation faults), and an ODE solver's
data-dependent number of evaluations would issue a different number of collectives on each
rank. And torchdiv's own backward passes (VJPs) would run the callbacks that belong to the
caller's ``loss.backward()``: with ``static_graph=True`` the gradient all-reduce then fired
before any gradient existed and every rank silently kept its own (relative errors 0.3-1.3).

Function form (``one_forward``, around every public call): the call is *one* forward of every
DDP or FSDP2 module ``f`` calls, whose output is the call's result. The pre-forward work runs
once, outside the transforms and modes, when ``f`` first calls the module; every evaluation
runs the wrapped module itself (FSDP2's parameters stay unsharded); the post-forward work runs
on the result. Evaluations that belong to a finished call (``torchdiv.flows``' adjoint solve,
in the caller's backward pass, as many as each rank's solver takes) run DDP's wrapped module
bare (``one_forward(bare=True)``): no collective. Graph form (``Peers``: the caller
evaluated the wrapped module): torchdiv's passes keep the callbacks from being queued, and the
result carries what the caller's backward needs (DDP's sink, FSDP2's pre-backward function).

Parameters of the module that the result does not depend on: a loss made of the divergence
alone leaves the last layer's bias without gradient (``None`` in one process). DDP with
``find_unused_parameters=True`` (and no ``static_graph``) finds them in the function form's
result as it finds them in any output, and leaves their gradient ``None``, as in one process
and as for an ordinary loss that does not use a parameter. Otherwise they get an exact zero
gradient edge (``ZeroGradients``): DDP without that search stops on a parameter without
gradient ("Expected to have finished reduction", as it does for an ordinary loss) and, in
the graph form, DDP searched the caller's ``y``, which reaches them; that derivative is
exactly zero, so DDP reduces a zero, and the gradient is a zero tensor where one process has
``None`` (optimizers that skip ``None``, AdamW's weight decay, then differ).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack
from torch.utils._python_dispatch import (
    _disable_current_modes,
    _get_current_dispatch_mode_stack,
    _pop_mode,
    _push_mode,
)

from torchdiv._core.walk import nodes


def in_process_group() -> bool:
    """Whether a default process group is up (read by Dynamo as a constant)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class Call:
    """One public call in flight: the DDP modules and FSDP2 states ``f`` has called. A
    ``bare`` one does no pre-forward work (see ``one_forward``)."""

    def __init__(self, bare: bool = False) -> None:
        self.bare = bare
        # the caller's dispatch modes (a CommDebugMode counting a step's collectives): DDP's
        # and FSDP2's pre-forward work runs under them, as in the caller's own forward
        self.modes = _get_current_dispatch_mode_stack()
        self.ddps: list[Any] = []
        self.fsdp_states: list[Any] = []
        self._swapped: list[tuple[dict[int, Any], int, Any]] = []

    def enter_ddp(self, ddp: Any) -> None:
        """The first call of ``ddp``: its pre-forward work, outside transforms and modes."""
        if not self.bare and not any(known is ddp for known in self.ddps):
            with _plain_level(self.modes):
                ddp._pre_forward()
            self.ddps.append(ddp)

    def enter_fsdp(self, module: Any, inputs: Any) -> None:
        """A global forward pre-hook: each FSDP2 root ``f`` calls (the first module of a tree;
        a sharded child called without its root is a root of its own) unshards
        every module of its tree outside the transforms and modes, as its forward would, and
        their post-forward hooks (which would reshard and hook the inner outputs) pass for
        the rest of the call. The modules' own pre-forward hooks then find them unsharded in
        the forward state and do nothing."""
        if isinstance(module, _fsdp1()[0]):
            raise TypeError(_FSDP1)
        if _CURRENT.get() is not self:
            return
        get_state = getattr(module, "_get_fsdp_state", None)
        if get_state is None:
            return
        root = get_state()
        if any(root is known for known in self.fsdp_states):
            return
        with _plain_level(self.modes):
            root._pre_forward(module, (), {})
            known = self.fsdp_states
            new = [s for s in root._state_ctx.all_states if not any(s is k for k in known)]
            for state in new:
                if state is not root:
                    state._pre_forward(state._modules[0], (), {})
        self.fsdp_states.extend(new)
        for state in new:
            handle = state._post_forward_hook_handle  # a group's: one pre and post per module
            for one in getattr(handle, "handles", (handle,)):
                hooks = one.hooks_dict_ref()
                if any(hooks is module._forward_hooks for module in state._modules):
                    self._swapped.append((hooks, one.id, hooks[one.id]))
                    hooks[one.id] = _nothing

    def _restore(self) -> None:
        for hooks, key, hook in self._swapped:
            hooks[key] = hook
        self._swapped.clear()

    def abandon(self) -> None:
        """After an error: FSDP2 modules reshard, as after a forward without output."""
        self._restore()
        for state in reversed(self.fsdp_states):
            state._post_forward(state._modules[0], (), ())

    def finish(self, result: Any, stop: Any = None) -> Any:
        """``result`` as the output of one forward of every module ``f`` called; with nothing
        differentiable in it, as a forward without grad (no backward is to come, which DDP's
        reducer must not wait for). ``stop``: ``x.grad_fn`` of the call's ``x`` (``used``)."""
        self._restore()
        differentiable = torch.is_grad_enabled() and any(t.requires_grad for t in _tensors(result))
        if self.fsdp_states and differentiable:  # FSDP2 hooks views only with a warning
            result = _rebuild(result, iter([_owned(t) for t in _tensors(result)]))
        keep_writes(self.fsdp_states)
        for state in reversed(self.fsdp_states):
            outputs = tuple(_tensors(result)) if differentiable else ()
            tensors = state._post_forward(state._modules[0], (), outputs)
            if differentiable:
                result = _rebuild(result, iter(tensors))
        if not differentiable:
            return result
        for ddp in self.ddps:
            tensors = _tensors(result)
            if not _finds_unused(ddp):
                params = [p for p in ddp.module.parameters() if p.requires_grad]
                tensors = [used(t, params, stop) for t in tensors]
            result = _rebuild(result, iter(ddp._post_forward(tuple(tensors))))
        return result


def keep_writes(states: list[Any]) -> None:
    """Values ``f`` wrote into the unsharded parameters of FSDP2 modules (WGAN's clipping
    ``self.weight.data.clamp_(-c, c)`` in ``forward``), copied into this rank's shard, where
    they differ, before the reshard (``states``: FSDP2's).

    FSDP2 keeps the shard as the parameter and all-gathers it into the unsharded storage;
    a write there is lost on the reshard. After forward, the caller's backward gathers the
    shards again: torchdiv's graphs, which read the weights in the backward pass (the Jacobian
    in a divergence's derivative), then read the values from before the write (parameter
    gradients 2-30% off). Without resharding after forward (FSDP2's root by default) the
    backward reads the write, and the reshard after it drops it (the next step's values 0.5%
    off). Written back, the backward reads what the evaluations read, and the parameter
    holds the written values, as an unwrapped module's does. Each rank writes its own shard
    from the same gathered values: no collective. Element-wise,
    ``shard[i] = unsharded[offset + i]`` where ``unsharded[offset + i] != shard[i]`` in the
    unsharded (compute) dtype; ``offset``: the shard's place in the full parameter (along
    the shard dimension, the rank times the first chunk's length)."""
    from torch.distributed.tensor import DTensor

    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (this rank's shard, its values)
    for group in (group for state in states for group in state._fsdp_param_groups):
        for fsdp_param in group.fsdp_params:
            full = fsdp_param.unsharded_param
            if isinstance(full, DTensor) or full.untyped_storage().size() == 0:
                continue  # (tensor parallelism inside, or not gathered: nothing to compare)
            local = fsdp_param._sharded_local_tensor  # (a plain tensor: no DTensor dispatch)
            dim = fsdp_param.fsdp_placement.dim  # FSDP2's chunks: all as long as the first
            start = fsdp_param.mesh_info.shard_mesh_rank * fsdp_param.padded_sharded_param_size[dim]
            mine = full.detach().narrow(dim, min(start, full.size(dim)), local.size(dim))
            pairs.append((local, mine.to(local.device)))
    with torch.no_grad():
        written = [mine != local.to(mine.dtype) for local, mine in pairs]
        if not written or not bool(torch.stack([w.any() for w in written]).any()):
            return  # (one synchronisation: the usual call writes nothing)
        for (local, mine), mask in zip(pairs, written, strict=True):
            local.copy_(torch.where(mask, mine.to(local.dtype), local))


def _finds_unused(ddp: Any) -> bool:
    """Whether ``ddp`` searches its outputs' graph for the parameters they do not reach
    (``find_unused_parameters=True`` without ``static_graph``) and leaves the gradient of one
    that no rank's output reaches ``None``, as in one process."""
    return bool(ddp.find_unused_parameters) and not ddp.static_graph


_FSDP1 = (
    "FullyShardedDataParallel (FSDP1) is not supported: torchdiv's evaluations and backward "
    "passes break its flat parameters' handles and hooks; shard the model with FSDP2 "
    "(torch.distributed.fsdp.fully_shard) or wrap it in DistributedDataParallel"
)


@functools.cache
def _fsdp1() -> tuple[type, type]:
    """FSDP1's wrapper and its flat parameter (leaves of every graph through it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._flat_param import FlatParameter

    return FullyShardedDataParallel, FlatParameter


_CURRENT: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "torchdiv_call", default=None
)
_LOCK = threading.Lock()
_IN_FLIGHT = [0]  # calls (all threads) while DistributedDataParallel.forward is replaced
_HOOK: list[Any] = []  # the handle of enter_fsdp, registered while calls are in flight
_ORIGINAL: list[Callable[..., Any]] = []  # DistributedDataParallel.forward (kept: a thread
# may call the replacement just after it is put back)


def _ddp_forward(self: Any, *inputs: Any, **kwargs: Any) -> Any:
    """``DistributedDataParallel.forward`` while a torchdiv call is in flight: as usual outside
    it (another thread); inside it, the wrapped module (see ``Call.enter_ddp``)."""
    call = _CURRENT.get()
    if call is None:
        return _ORIGINAL[0](self, *inputs, **kwargs)
    call.enter_ddp(self)
    return self.module(*inputs, **kwargs)


def spans_peers() -> bool:
    """Whether a public call starting now is ``one_forward`` of its own: a process group is
    up and no outer public call holds one (the usual single process: no)."""
    return _CURRENT.get() is None and in_process_group()


@contextlib.contextmanager
def one_forward(bare: bool = False) -> Iterator[Call | None]:
    """The scope of one public call (see the module docstring); ``None`` when there is
    nothing to do: no process group, or a public call nested in another (it shares the
    outer one's). ``bare``: evaluations that belong to a public call already finished, whose
    DDP modules' pre- and post-forward work ran then (``torchdiv.flows``' adjoint solve, in
    the caller's backward pass): DDP modules run the wrapped module alone (no buffer
    broadcast, no collective: each rank's solver takes its own number of steps)."""
    if not spans_peers():
        yield None
        return
    from torch.nn.parallel import DistributedDataParallel

    with _LOCK:
        if _IN_FLIGHT[0] == 0:
            _ORIGINAL[:] = [DistributedDataParallel.forward]
            DistributedDataParallel.forward = _ddp_forward  # type: ignore[method-assign]
            _HOOK[:] = [torch.nn.modules.module.register_module_forward_pre_hook(enter_fsdp)]
        _IN_FLIGHT[0] += 1
    call = Call(bare)
    token = _CURRENT.set(call)
    try:
        yield call
    except BaseException:
        call.abandon()
        raise
    finally:
        _CURRENT.reset(token)
        with _LOCK:
            _IN_FLIGHT[0] -= 1
            if _IN_FLIGHT[0] == 0:
                DistributedDataParallel.forward = _ORIGINAL[0]  # type: ignore[method-assign]
                _HOOK.pop().remove()


def enter_fsdp(module: torch.nn.Module, inputs: Any) -> None:
    """The global forward pre-hook while public calls are in flight: ``Call.enter_fsdp`` of
    this thread's call. One function, registered once, not a hook per call: the structure key
    leaves it out (``_taylor.cache._global_hooks``); a new hook of every call, in the key,
    made each call under a process group a new structure, watched and recorded again."""
    call = _CURRENT.get()
    if call is not None:
        call.enter_fsdp(module, inputs)


@contextlib.contextmanager
def _plain_level(modes: list[Any]) -> Iterator[None]:
    """Leave every ``torch.func`` transform, dispatch mode and ``__torch_function__`` mode
    for the block: FSDP2's unshard (``untyped_storage().size()``, the storage resized and
    ``set_``) seen by a watch's ``Reads`` counted as values read by Python and writes, and
    the watch's pass held for these values only: every call under FSDP2 was watched. Then
    enter ``modes`` again, the caller's (``Call.modes``): a ``CommDebugMode`` around the
    step missed DDP's buffer broadcasts and FSDP2's forward all-gathers."""
    with (
        temporarily_clear_interpreter_stack(),
        _disable_current_modes(),
        torch._C.DisableTorchFunction(),
    ):
        for mode in modes:
            _push_mode(mode)
        try:
            yield
        finally:
            for _ in modes:
                _pop_mode()


class Peers:
    """What of DDP and FSDP2 the graph of ``y`` went through, when the caller evaluated the
    wrapped module itself (the graph form, ``check_batch_independence``), and what torchdiv's
    own backward passes through that graph must leave alone.

    - ``DistributedDataParallel(static_graph=True)``: its sink queues the first iteration's
      gradient all-reduce as a callback of the current backward pass and marks it queued;
      the mark is set during torchdiv's passes and put back after. A loss without ``y``
      itself never passes the sink in the caller's backward (the sink's backward is the
      identity: products built through it carry no node of it), so the products get one.
    - FSDP2: in torchdiv's passes the post-backward callback is kept from being queued,
      post-backward does nothing, and the training states are put back afterwards (the
      parameters stay unsharded); the products get FSDP2's pre-backward function, so the
      caller's backward unshards and queues the callback whether or not its loss has ``y``.
    - Parameters that ``y`` depends on and the products do not get a zero gradient edge,
      where the caller's forward of the DDP module made ``y`` (no public call in flight; in
      one, ``Call.finish`` tells DDP which parameters the result reaches).

    The walks stop at ``x.grad_fn``: torchdiv's passes end at ``x`` and run nothing of its
    history (a DDP or FSDP2 module that made ``x`` is the caller's forward, its hooks the
    caller's backward's). Walked whole, the history of a state carried through a solve
    (FFJORD's graph form, backpropagated through the steps) made every evaluation longer
    than the last under any process group, wrapped module or not (0.4 -> 10 s, 400 steps).
    """

    def __init__(self, y: torch.Tensor, stop: Any = None) -> None:
        """``stop``: ``x.grad_fn`` of the ``x`` the passes differentiate by (``used``)."""
        self.stop = stop
        self.static: list[Any] = []
        self.fsdp_states: list[Any] = []
        self.leaves: list[torch.Tensor] = []
        if not in_process_group():
            return
        seen = _CURRENT.get() is None  # else a public call's own y: Call.finish tells DDP
        groups: list[Any] = []
        for node in nodes(y.grad_fn, stop):
            ref = getattr(node, "ddp_weakref", None)  # only _DDPSink's backward has one
            ddp = ref() if callable(ref) else None
            if ddp is not None and getattr(ddp, "static_graph", False) and ddp not in self.static:
                self.static.append(ddp)
            group = getattr(node, "param_group", None)  # FSDP2's post-backward function
            if group is not None and group not in groups:
                groups.append(group)
            if hasattr(node, "variable") and node.variable.requires_grad:
                if isinstance(node.variable, _fsdp1()[1]):
                    raise TypeError(_FSDP1)
                if seen:
                    self.leaves.append(node.variable)
        if groups:
            root = groups[0].modules[0]._get_fsdp_state()
            self.fsdp_states = list(root._state_ctx.all_states)

    @property
    def inert(self) -> bool:
        """Whether ``inner_backward`` has nothing to do (no DDP static graph, no FSDP2)."""
        return not (self.static or self.fsdp_states)

    @contextlib.contextmanager
    def inner_backward(self) -> Iterator[None]:
        """Run torchdiv's own backward passes through the graph (see the class docstring)."""
        marks = [ddp._static_graph_delay_allreduce_enqueued for ddp in self.static]
        for ddp in self.static:
            ddp._static_graph_delay_allreduce_enqueued = True
        groups = [g for state in self.fsdp_states for g in state._fsdp_param_groups]
        trainings = [(o, o._training_state) for o in (*self.fsdp_states, *groups)]
        context = self.fsdp_states[0]._state_ctx if self.fsdp_states else None
        queued = context.post_backward_final_callback_queued if context else False
        if context is not None:
            context.post_backward_final_callback_queued = True
        for group in groups:
            group.post_backward = _nothing
        try:
            yield
        finally:
            for ddp, mark in zip(self.static, marks, strict=True):
                ddp._static_graph_delay_allreduce_enqueued = mark
            for group in groups:
                del group.post_backward
            for owner, training in trainings:
                owner._training_state = training
            if context is not None:
                context.post_backward_final_callback_queued = queued

    def attach(self, out: torch.Tensor) -> torch.Tensor:
        """A differentiable product of torchdiv's pass, as the caller's backward must see it."""
        if not out.requires_grad:
            return out
        out = used(out, self.leaves, self.stop)
        for ddp in self.static:
            if not ddp._static_graph_delay_allreduce_enqueued:
                from torch.nn.parallel.distributed import _DDPSink

                (out,) = _DDPSink.apply(weakref.ref(ddp), out)
        if self.fsdp_states:
            from torch.distributed.fsdp._fully_shard._fsdp_state import (
                RegisterPreBackwardFunction,
            )

            for state in self.fsdp_states:
                out = RegisterPreBackwardFunction.apply(state, out)
        return out


def used(out: torch.Tensor, params: list[torch.Tensor], stop: Any = None) -> torch.Tensor:
    """``out``, with a zero gradient edge to each of ``params`` its graph does not reach above
    ``stop`` (``x.grad_fn``: ``x``'s history, walked at every call, made a solve that
    backpropagates through its steps quadratic under a process group, 0.4 -> 10-14 s for
    400 evaluations; a parameter reached only there gets a zero edge besides, which adds
    nothing)."""
    if not params or not out.requires_grad or out.grad_fn is None:
        return out
    walked = nodes(out.grad_fn, stop)
    reached = {id(node.variable) for node in walked if hasattr(node, "variable")}
    unreached = [p for p in params if id(p) not in reached]
    return ZeroGradients.apply(out, *unreached) if unreached else out


def joined(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out``, made to depend with a zero gradient on every tensor requiring grad that ``y``
    was computed from, if it depends on none: a rank whose share of work was empty must
    still take part in the backward pass's collectives (``torchdiv.distributed``)."""
    if out.requires_grad or not y.requires_grad:
        return out
    joined_out: torch.Tensor = ZeroGradients.apply(
        out, *[node.variable for node in nodes(y.grad_fn) if hasattr(node, "variable")]
    )
    return joined_out


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy if it is a view (an in-place op on a view would drop a tensor hook)."""
    return t if t._base is None else t.clone()


def _nothing(*args: Any) -> None:
    return None


def _tensors(result: Any) -> list[torch.Tensor]:
    """The tensors of a public call's result: a tensor, a (named) tuple or list, a dataclass."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensors(item)]
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        fields = dataclasses.fields(result)
        return [t for field in fields for t in _tensors(getattr(result, field.name))]
    return []


def _rebuild(result: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """``result`` with its tensors (in ``_tensors``' order) replaced by ``tensors``."""
    if isinstance(result, torch.Tensor):
        return next(tensors)
    if isinstance(result, tuple) and hasattr(result, "_fields"):  # a named tuple
        return type(result)(*(_rebuild(item, tensors) for item in result))
    if isinstance(result, (tuple, list)):
        return type(result)(_rebuild(item, tensors) for item in result)
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        fields = dataclasses.fields(result)
        changes = {field.name: _rebuild(getattr(result, field.name), tensors) for field in fields}
        return dataclasses.replace(result, **changes)
    return result


class ZeroGradients(torch.autograd.Function):
    """The identity on ``out`` (a view), whose backward gives each of ``params`` a zero
    gradient (DDP's parameters a result does not reach; ``_core.tie``)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.params = [(p.shape, p.dtype, p.device) for p in params]
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> tuple[torch.Tensor, ...]:
        zeros = [torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.params]
        return (grad_outputs[0], *zeros)

    @staticmethod
    def jvp(ctx: Any, out_tangent: Any, *param_tangents: Any) -> Any:  # type: ignore[override]
        """Forward mode (dual parameters): ``out``'s tangent; the parameters' add nothing."""
        return out_tangent
