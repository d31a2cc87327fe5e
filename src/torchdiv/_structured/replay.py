"""Structured plans traced by Dynamo: a compiled training step of the structured engine, one graph.

The structured engine records ``f`` (a dispatch mode), which Dynamo cannot trace, so a call
Dynamo traces ran eagerly: one graph break, the user's compiled step split into three graphs
whose guards, wrappers and frame switches cost ~0.2 ms a step (compiled/eager 1.3-1.4 on a
small MLP, issue 14). Here, where ``f`` is a module, the call is traced instead:

1. While Dynamo traces, ``_recorded`` runs eagerly (``assume_constant_result``: Dynamo calls
   it with the real ``f`` and ``x`` and bakes its result, a key, into the graph): it records
   ``f`` at ``x`` as an eager call would (watching for sample mixing, as eagerly) and keeps
   what a replay needs (``Replay``): the recorded ATen calls, with ``f``'s parameters and
   buffers named instead of held, and what the eager plan computes on the host from the
   recording, a function of ``f``'s structure and ``x``'s shape: a *chain*'s routes
   (``factors``: shared matrices and per-sample diagonals) with its data-movement matrices
   (``factors.moved``), or else the *colours* (conv nets; every element its own colour
   where the graph is not local: *columns*) with the index tensors that read the diagonal
   (``forward.Readout``).
2. The traced code replays those calls on ``x`` and the parameters read from ``f`` by name
   (graph inputs read at every call: a parameter replaced by another object is the one
   used): it makes the chain's factors along the routes (``factors.followed``) and takes the
   trace or the diagonal (``cycle``), or propagates the colours' directions through the
   calls and reads the diagonal (``forward.read``): plain tensor ops, one graph with the step
   around it; the kept tensors are graph inputs too, never traced again.
3. It also calls ``f(x)``, whose result is unused (removed from the graph): Dynamo's guards
   on ``f`` (its submodules, flags, hooks, code, as for any compiled model) are then this
   graph's, so that a change of ``f`` recompiles, which records ``f`` again. A replay never
   outlives the structure it was recorded from. It also guards on ``x``'s shape after its
   first dimension and on the sizes of that one it serves (``_served``: every size where
   no number in the calls is made from the batch size, else the recorded one).

Not replayed (the call then runs eagerly, as before): ``f`` not a module; a tensor ``f``
reads that is not its parameter or buffer (a closure's: it could be rebound unseen); what an
eager template would not keep (writes, random draws, ops without rules); calls that read
values on the host; a movement or colouring made from index values (a gather's index that is
a parameter or buffer, or computed from ``x``: ``_indices_fixed``); the group norms' split
(``statistics``); ``f`` whose forward breaks the graph (a call Dynamo does not trace):
``f(x)`` is then traced apart, its guards not the replay's. Inside
``torch.inference_mode()`` entered in the compiled code (the replay's graph failed the
backend there and left PyTorch's dispatcher state broken for the process).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from torch.autograd import grad_mode as _grad_mode

from torchdiv._core import batch_sizes
from torchdiv._core.mixing.errors import watched
from torchdiv._core.tie import tied
from torchdiv._structured import colors, cycle, factors, forward, statistics
from torchdiv._taylor import RULES, Graph, capture, values
from torchdiv._taylor.cache import template
from torchdiv._taylor.capture import Node, Ref
from torchdiv._taylor.jet import Context
from torchdiv._taylor.propagate import Plan, autocast_off, autocast_on
from torchdiv._taylor.tree import leaves, map_leaves

# the factor rules a traced replay runs (``factors._Walker``); ``_movement``'s matrices are
# made on the host, while recording (``factors.moved``), and kept with the replay
KINDS = frozenset({"_first", "_derivative", "_matmul", "_pointwise"})
MOVED = KINDS | {"_movement"}
# non-tensor arguments of a recorded call that do not depend on x's shape (a number can:
# ``3.0 / x.shape[0]``, a float ``dynamic=True`` leaves unguarded)
_PLAIN = (type(None), bool, str, torch.dtype, torch.device, torch.layout)
# the gathers whose index values a colouring reads (``locality``)
_GATHERS = frozenset({torch.ops.aten.index.Tensor, torch.ops.aten.index_select.default})
OPTIONS = frozenset({"method", "batch_dims", "chunk_size"})
SIZE = 256


@dataclass(frozen=True)
class Held:
    """A tensor of ``f`` in a recorded call: its parameter or buffer ``name``."""

    name: str
    buffer: bool

    def of(self, module: torch.nn.Module) -> torch.Tensor:
        return module.get_buffer(self.name) if self.buffer else module.get_parameter(self.name)


@dataclass(frozen=True)
class Replay:
    """What a traced call replays: ``f``'s calls (``Held`` for its tensors), where ``f(x)``
    is among their outputs, the chain's routes, and the columns carried at once where the
    caller gives no ``chunk_size`` (``cycle``'s block size at the recording's batch: made from
    the traced batch size, it was a guard on it, one graph per batch size under
    ``dynamic=True``)."""

    nodes: tuple[Node, ...]
    output: Ref
    routes: tuple[factors.Route, ...]
    chunk: int
    readout: forward.Readout | None = None
    propagation: Plan | None = None
    event: tuple[int, ...] = ()  # x's shape after its first dimension (guarded)
    rows: tuple[int, int] = (0, 0)  # the sizes of x's first dimension served (``_served``)
    moved: tuple[tuple[Ref, tuple[factors.Factor, ...]], ...] = ()  # (``factors.moved``)


@dataclass
class _Columns:
    """What ``propagate`` reads of a ``Graph`` (a ``Graph`` made while tracing made its
    ``Verdict``, which Dynamo cannot trace), for a plan of colours: the calls with this
    run's tensors, and the ``propagate.Plan`` made while recording."""

    nodes: list[Node]
    output: Ref
    output_shape: tuple[int, ...]
    plan: Plan | None = None
    overwritten: frozenset[int] = frozenset()


@dataclass(frozen=True)
class _Calls:
    """What ``factors.followed`` reads of a ``Graph``: its calls (a ``Graph`` made while
    tracing made its ``Verdict``, which Dynamo cannot trace)."""

    nodes: list[Node]


# by the key ``_recorded`` gave the trace: the replay and that trace (read eagerly)
_PLANS: dict[int, tuple[Replay, weakref.ref[Any]]] = {}
_KEYS = itertools.count()


class _Read:
    """``_PLANS``'s replays as attributes ``k<key>``, for the trace to read: Dynamo reads a
    dict's keys once per trace, so a second call's key, recorded after the first call read
    the dict, was missing (two calls in one compiled loss: ``Unsupported`` under
    ``fullgraph=True``); a class attribute is looked up where it is read."""


def replayed(trace: bool, f: Any, x: Any, *args: Any, **options: Any) -> torch.Tensor | None:
    """``divergence(f, x, **options)`` (``trace``) or ``jacobian_diagonal``, as plain tensor
    ops for Dynamo to trace, where ``f``'s plan is a chain it can replay (module docstring);
    ``None`` where not (the caller runs the call eagerly). Only where Dynamo traces.

    Returns:
        shape ``x.shape[:batch_dims]`` (``trace``) or ``x.shape``, dtype of ``x``."""
    batch_dims, chunk = options.get("batch_dims", 1), options.get("chunk_size")
    if args or not OPTIONS.issuperset(options):
        return None
    if not isinstance(f, torch.nn.Module) or not isinstance(x, torch.Tensor):
        return None
    if type(batch_dims) is not int or not 1 <= batch_dims < x.dim() or not x.is_floating_point():
        return None
    if chunk is not None and (type(chunk) is not int or chunk < 1):
        return None
    key = _recorded(f, x, batch_dims, chunk, torch.is_grad_enabled())
    if key < 0:
        return None
    plan: Replay = getattr(_Read, f"k{key}")
    if tuple(x.shape[1:]) != plan.event:  # (the served sizes are the first dimension's)
        return None
    if not batch_sizes.serves(plan.rows, x.shape[0]):  # (guards: ``_served``)
        return None
    if plan.readout is not None:
        return _coloured(trace, plan, plan.readout, f, x, batch_dims, key)
    n, chunk = x.shape[:batch_dims].numel(), plan.chunk if chunk is None else chunk
    graph, kept = _replay(plan, f, x)
    chain = factors.followed(list(plan.routes), graph, kept, x, n, dict(plan.moved))
    if chain is None:  # (the routes were made from this very structure)
        return None
    f(x)  # unused: Dynamo's guards on f become this graph's (module docstring)
    if not _traced_with(key):  # (f(x) broke the graph: its guards are not this graph's)
        return None
    if trace:
        out = tied(cycle.trace(chain, x, n, chunk), x).reshape(x.shape[:batch_dims])
    else:
        out = tied(cycle.diagonal(chain, x, n, chunk), x).reshape(x.shape)
    return out.to(x.dtype)  # (as the public functions: a float64 f of a float32 x)


def _coloured(
    trace: bool,
    plan: Replay,
    readout: forward.Readout,
    f: torch.nn.Module,
    x: torch.Tensor,
    batch_dims: int,
    key: int,
) -> torch.Tensor | None:
    """``replayed`` for a plan of colours (or columns: each element its own colour):
    ``forward.read`` along the ``readout`` made while recording (constant index tensors),
    through the recorded calls with ``f``'s tensors of this run."""
    if plan.propagation is None:
        return None
    nodes = []
    for node in plan.nodes:
        args, kwargs = _held_by(f, (node.args, node.kwargs))
        nodes.append(Node(node.func, args, kwargs, node.depends))
    graph = _Columns(nodes, plan.output, tuple(x.shape), plan.propagation)
    diag = forward.read(cast(Graph, graph), x, batch_dims, readout)
    f(x)  # unused: Dynamo's guards on f become this graph's (module docstring)
    if not _traced_with(key):  # (f(x) broke the graph: its guards are not this graph's)
        return None
    out = diag.sum(-1).reshape(x.shape[:batch_dims]) if trace else diag.reshape(x.shape)
    return tied(out, x).to(x.dtype)


def _held_by(f: torch.nn.Module, tree: Any) -> Any:
    """``tree`` with ``f``'s tensors of this run for its ``Held``."""
    return map_leaves(lambda a: a.of(f) if isinstance(a, Held) else a, tree)


def _replay(plan: Replay, f: torch.nn.Module, x: torch.Tensor) -> tuple[Graph, list[list[Any]]]:
    """The recorded calls run again on ``x`` and ``f``'s tensors: the graph (its calls with
    this run's tensors) and every call's outputs."""
    kept: list[list[Any]] = []

    def value(a: Any) -> Any:
        return (x if a.node < 0 else kept[a.node][a.leaf]) if isinstance(a, Ref) else a

    nodes = []

    def calls() -> None:
        for node in plan.nodes:
            args, kwargs = _held_by(f, (node.args, node.kwargs))
            kept.append(leaves(node.func(*map_leaves(value, args), **map_leaves(value, kwargs))))
            nodes.append(Node(node.func, args, kwargs, node.depends))

    # as recorded: below autocast, its casts calls of their own (under the caller's autocast,
    # a float32 block of f's, autocast(enabled=False), was cast to bfloat16 again: rev-c33)
    autocast_off(autocast_on(), calls)
    return cast(Graph, _Calls(nodes)), kept


@dataclass
class _Attempts:
    """What the attempts of one compilation read of ``_recorded`` (``restarted``): the keys
    its first attempt gave, in call order, with their arguments, and how many calls each
    later attempt has read so far."""

    first: list[tuple[Any, int]] = field(default_factory=list)
    again: dict[int, int] = field(default_factory=dict)


# by the compilation (its ``CompileContext``, one object for all its attempts): not by its
# ``CompileId``, which ``torch._dynamo.reset()`` starts again from "0/0": a later
# compilation's restart took the keys of an earlier one of the same id (another module at
# the same ``id`` or the same one changed, a Softplus's ``beta``: the earlier plan's numbers,
# silently wrong), or, its calls unlike, recorded again under a new key at each restart,
# whose floats ``dynamic=True`` made new symbols: a restart per attempt (19 compilations)
_ATTEMPTS: weakref.WeakKeyDictionary[Any, _Attempts] = weakref.WeakKeyDictionary()


def restarted(record: Callable[..., int]) -> Callable[..., int]:
    """``record`` (a ``_recorded``) giving each attempt of a compilation after its first the
    keys the first gave, call by call (the plans again, now for this attempt's trace): Dynamo
    traces a frame again after a graph break and needs every constant as it was, where a
    second recording could differ (``f`` caching a tensor it made, ``functools.lru_cache`` on
    the batch size: its recording reads a tensor made before it and refuses, and Dynamo
    raised ``SpeculationLogDivergence`` at every batch size, where the eager call serves).
    (Private: ``CompileContext``, its ``attempt``, the context as a weak key; where any of
    them cannot be read, ``-1``: the call runs eagerly. The failure left this wrapper,
    outside ``record``'s ``try``, and the whole compiled call raised
    ``InternalTorchDynamoError`` where eager serves. Outside a compilation, or a call that
    ``_called`` cannot identify, records as before.)"""

    @functools.wraps(record)
    def wrapper(*args: Any) -> int:
        called = _called(args)
        if called is None:
            return record(*args)
        try:
            current = _compilation()
        except Exception:
            return -1
        if current is None:
            return record(*args)
        attempts, attempt = current
        if attempt == 0:
            key = record(*args)
            attempts.first.append((called, key))
            return key
        done = attempts.again.get(attempt, 0)
        attempts.again[attempt] = done + 1
        first = attempts.first
        if done >= len(first) or first[done][0] != called or first[done][1] not in _PLANS:
            return record(*args)
        key = first[done][1]
        _PLANS[key] = _PLANS[key][0], weakref.ref(_tracer())
        return key

    return wrapper


def _compilation() -> tuple[_Attempts, int] | None:
    """What the attempts of the compilation now under way read (``_ATTEMPTS``) and the number
    of this attempt, or ``None`` outside a compilation. Raises where Dynamo's private context
    cannot be read as ``restarted`` reads it."""
    from torch._guards import CompileContext

    compilation = CompileContext.try_get()
    if compilation is None or compilation.compile_id is None:
        return None
    attempt = compilation.attempt
    if type(attempt) is not int:
        raise TypeError(f"CompileContext.attempt: {attempt!r}")
    return _ATTEMPTS.setdefault(compilation, _Attempts()), attempt


def _called(args: tuple[Any, ...]) -> Any:
    """What identifies a call of ``_recorded`` (hashable), or ``None``."""
    kept = tuple(
        (tuple(a.shape), a.dtype, a.device, a.requires_grad)
        if isinstance(a, torch.Tensor)
        else ("id", id(a))
        if isinstance(a, torch.nn.Module)
        else a
        for a in args
    )
    try:
        hash(kept)
    except TypeError:
        return None
    return kept


@torch.compiler.assume_constant_result  # run by Dynamo while tracing, with the real f and x
@restarted
def _recorded(
    f: torch.nn.Module, x: torch.Tensor, batch_dims: int, chunk: int | None, grad: bool
) -> int:
    """The key in ``_PLANS`` of ``f``'s replay at ``x`` under grad mode ``grad`` (``chunk``:
    the caller's ``chunk_size``), recorded now; ``-1`` where it has none (anything ``f``
    raises included: the eager call reports it)."""
    try:
        if _apart() or _changed_while_traced(f) or _inferred():
            return -1
        with torch.set_grad_enabled(grad), watched():  # (f mixes samples: eager says, or computes)
            plan = _plan(f, x.detach(), batch_dims, chunk)
        if plan is None or _marked(plan.rows[0] < plan.rows[1]):
            return -1
    except Exception:
        return -1
    return keep(plan)


def keep(plan: Any) -> int:
    """``plan``'s key, kept now for the trace that made it (``_PLANS``, ``_Read``; the
    Taylor engine's replay keeps its plans here too)."""
    key = next(_KEYS)
    _PLANS[key] = plan, weakref.ref(_tracer())
    setattr(_Read, f"k{key}", plan)
    for old in list(_PLANS)[:-SIZE]:  # (each key is read only by the trace that made it)
        del _PLANS[old]
        delattr(_Read, f"k{old}")
    return key


@torch.compiler.assume_constant_result
def _traced_with(key: int) -> bool:
    """Whether the trace that recorded ``key`` is the one tracing now, ``f(x)`` traced in
    between: broken inside ``f(x)``, the code after it is traced apart (a resumed frame),
    which ``_apart`` does not see where Dynamo resumes nested frames in the caller's."""
    try:
        return bool(_PLANS[key][1]() is _tracer())
    except Exception:
        return False


def _tracer() -> Any:
    """The translator of the frame Dynamo traces now (private API: callers take any failure
    as a refusal)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    return InstructionTranslator.current_tx()


def _marked(batch_free: bool) -> bool:
    """Whether an input of the traced frame has a dimension marked dynamic
    (``torch._dynamo.mark_dynamic``) that the replay's guards on ``x``'s shape could
    specialise (Dynamo then raised ``ConstraintViolationError`` where the eager call serves):
    any but a first dimension (``x``'s event may be one, or made from one: ``x * 2``), or any
    where the replay guards on ``x``'s whole shape (``batch_free`` false). (Private: as
    ``_changed_while_traced``.)"""
    for tracked in _tracer().output.tracked_fakes:
        sizes = getattr(tracked.symbolic_context, "constraint_sizes", None) or ()
        for dim, constraint in enumerate(sizes):  # (``dynamic=True``'s: warn only)
            if constraint is not None and not constraint.warn_only and (dim or not batch_free):
                return True
    return False


def _apart(file: str = __file__) -> bool:
    """Whether Dynamo traces a frame of this module on its own: the graph broke inside this
    module's code, as inside ``f(x)`` (a call Dynamo does not trace in ``f``'s forward).
    Dynamo then broke at the caller's call and compiles the frames below apart: a replay
    here would be in a graph without Dynamo's guards on ``f`` (those are ``f(x)``'s frame's),
    and kept its plan after ``f`` changed (a changed slope, a swapped layer: values 0.19 off).
    ``file``: the module whose frames count (the Taylor engine's replay asks for its own).
    (Private: as ``_changed_while_traced``.)"""
    return bool(_tracer().f_code.co_filename == file)


def _inferred() -> bool:
    """Whether the traced code is inside ``torch.inference_mode()`` entered in it (Dynamo
    keeps it off while tracing and enters it in the graph): the replay's graph failed the
    backend there ("Cannot set version_counter for inference tensor", where eager serves) and
    left PyTorch's dispatcher state broken (every later op of the process raised an INTERNAL
    ASSERT). From the graph made so far: an entry not yet exited (private: as
    ``_changed_while_traced``)."""
    enter, leave = _grad_mode._enter_inference_mode, _grad_mode._exit_inference_mode
    nodes = list(_tracer().output.graph.nodes)
    left = {node.args[0] for node in nodes if node.target is leave}
    return any(node.target is enter and node.args[0] and node not in left for node in nodes)


def _changed_while_traced(f: torch.nn.Module) -> bool:
    """Whether the code Dynamo traced before the call changed an object that existed before
    it (a global, a config object's attribute, a closure's cell: ``f`` may read it), or made
    ``f`` or one of its modules or what they hold (``net[1] = nn.ReLU()``, a hook added):
    Dynamo applies such changes to the real objects after the graph, so a recording now would
    see them as they were (a module made in the compiled function was blank: its divergence
    3.23 off, with no gradient; a temperature set in a global config object before the call
    was the previous one, 0.07 off). From Dynamo's record of side effects (private: any
    failure to read it counts as a change)."""
    from torch._dynamo.variables.base import AttributeMutationNew, ValueMutationNew

    effects = _tracer().output.side_effects
    changed = {i: v for i, v in effects.id_to_variable.items() if effects.is_modified(v)}
    new = (AttributeMutationNew, ValueMutationNew)
    if any(not isinstance(v.mutation_type, new) for v in changed.values()):
        return True
    held = [m for module in f.modules() for m in (module, *vars(module).values())]
    return any(id(obj) in changed for obj in held)


def _plan(f: torch.nn.Module, x: torch.Tensor, batch_dims: int, chunk: int | None) -> Replay | None:
    """``f``'s recording at ``x`` as a ``Replay``, if it is one (module docstring)."""
    graph = capture(f, x, RULES, keep_values=True, batch_dims=batch_dims)
    if template(graph) is None or tuple(graph.output_shape) != tuple(x.shape):
        graph.undo()
        return None
    kept, n = values(graph, x), x.shape[:batch_dims].numel()
    if not all(isinstance(v, torch.Tensor) for out in kept for v in out):  # a host read
        return None
    found = factors.paths(graph, kept, x, n)
    routes = [] if found is None else found[1]
    readout, moved = None, None
    if found is None:
        readout = _readout(f, graph, kept, x, batch_dims, chunk)
        if readout is None:
            return None
    elif any(k not in KINDS for route in routes for k in route.kinds):
        moved = factors.moved(routes, graph, kept, x, n)
        if moved is None or any(k not in MOVED for route in routes for k in route.kinds):
            return None
    names = {id(t): Held(name, False) for name, t in f.named_parameters(remove_duplicate=False)}
    names.update((id(t), Held(name, True)) for name, t in f.named_buffers(remove_duplicate=False))

    def held(a: Any) -> Any:
        return names[id(a)] if isinstance(a, torch.Tensor) else a

    nodes = []
    for node in graph.nodes:
        if not node.grad or any(
            isinstance(a, torch.Tensor) and id(a) not in names
            for a in leaves((node.args, node.kwargs))
        ):
            return None  # a closure's tensor (or one f made outside the recording)
        nodes.append(
            replace(node, args=map_leaves(held, node.args), kwargs=map_leaves(held, node.kwargs))
        )
    if (readout is not None or moved is not None) and not _indices_fixed(nodes):
        return None
    output, event = cast(Ref, graph.output), tuple(x.shape[1:])
    rows = _served(graph, f, x, batch_dims)
    if readout is not None:
        colours = max((stop - start for start, stop, *_ in readout.pieces), default=0)
        per_colour = graph.widest // x.shape[0]
        rows = _carried(rows, colours, per_colour, least=8, block=forward.CHUNK_ELEMENTS)
        propagation = Plan(cast(Graph, _Columns(nodes, output, tuple(x.shape))))
        propagation.needs_jac(Context(1, second_order=False))  # (made now, not traced)
        return Replay(tuple(nodes), output, (), 0, readout, propagation, event, rows=rows)
    widest = max(
        v.numel() // n
        for node, out in zip(graph.nodes, kept, strict=True)
        if node.depends
        for v in out
    )
    chunk = max(1, cycle.BLOCK_ELEMENTS // (n * max(widest, 1)))
    movements = () if moved is None else tuple(moved.items())
    columns, per_column = min(chunk, widest), widest * (n // x.shape[0])
    rows = _carried(rows, columns, per_column, least=1, block=cycle.BLOCK_ELEMENTS)
    return Replay(
        tuple(nodes), output, tuple(routes), chunk, event=event, moved=movements, rows=rows
    )


def _carried(
    rows: tuple[int, int], columns: int, per_column: int, least: int, block: int
) -> tuple[int, int]:
    """``rows`` up to the size where the ``columns`` the replay carries at once (the chain's
    ``chunk``, the colours of a ``Readout`` piece: made at the recorded size), ``per_column``
    elements each per row of ``x``'s first dimension, hold ``2 * block`` (the eager call at
    a larger size carries fewer: recorded at 2 samples, a 32-wide MLP carried 3x the block
    at 3000 and a 64-wide one 16x at 4000 where eager carried 1x, memory growing with the
    batch). No bound where ``least`` columns are carried (eagerly the fewest, at any size)."""
    lo, hi = rows
    if columns <= least or per_column <= 0:
        return rows
    return lo, min(hi, max(lo, 2 * block // (columns * per_column)))


def _readout(
    f: torch.nn.Module,
    graph: Graph,
    kept: list[list[Any]],
    x: torch.Tensor,
    batch_dims: int,
    chunk: int | None,
) -> forward.Readout | None:
    """The eager plan's readout of ``f``'s Jacobian diagonal where it is not a chain: by its
    colours, or by columns (``None``: where the eager plan splits group norms' statistics
    instead, ``statistics``)."""
    coloring = colors.colors(graph, kept, x, batch_dims)
    if coloring is None and statistics.planned(f, graph, kept, x, batch_dims) is not None:
        return None
    return forward.readout(graph, x, batch_dims, chunk, coloring)


def _indices_fixed(nodes: list[Node]) -> bool:
    """Whether every index a gather reads (``index``, ``index_select``: their windows are
    part of the colouring, ``locality``) is made by ``f`` from constants alone (reflect
    padding's ``arange``), not read from a parameter or buffer (``Held``: changed in place,
    unseen by any guard, it left a colouring of its old values) or computed from ``x``."""
    fixed: list[bool] = []
    for node in nodes:
        inputs = leaves((node.args, node.kwargs))
        fixed.append(
            not node.depends
            and not any(isinstance(a, Held) for a in inputs)
            and all(fixed[a.node] for a in inputs if isinstance(a, Ref) and a.node >= 0)
            and not any(isinstance(a, Ref) and a.node < 0 for a in inputs)
        )
        if node.func in _GATHERS and not all(
            fixed[a.node] if isinstance(a, Ref) and a.node >= 0 else not isinstance(a, (Held, Ref))
            for a in leaves(node.args[1:])
        ):
            return False
    return True


def _served(graph: Graph, f: torch.nn.Module, x: torch.Tensor, batch_dims: int) -> tuple[int, int]:
    """The sizes of ``x``'s first dimension the replay of ``graph`` serves: those over which
    ``f``'s calls hold the numbers they hold at ``x`` (``batch_sizes.served``: ``f`` run with
    a symbolic batch size; every size for a conv net's padding, a linear layer; the recorded
    one for ``x * (4.0 / N)``, ``view(N, -1)``, ``N // 2 - N // 3``), where the engine's
    recording holds the same numbers at the sizes of ``batch_sizes.others`` too (a
    decomposition of one of ``f``'s calls made from the batch size); the recorded size alone
    where not (a guard on ``x``'s whole shape: one graph per size under ``dynamic=True``)."""
    n, numbers = x.shape[0], _numbers(graph)
    sizes = batch_sizes.served(f, x, affine=False)
    if sizes == (n, n) or not numbers:
        return sizes
    for other in batch_sizes.others(x):
        if not _same_numbers(graph, numbers, f, other, batch_dims):
            return n, n
    return sizes


def _same_numbers(
    graph: Graph, numbers: list[Any], f: torch.nn.Module, x: torch.Tensor, batch_dims: int
) -> bool:
    """Whether ``f`` recorded at ``x`` makes ``graph``'s calls with its ``numbers``."""
    try:
        other = capture(f, x, RULES, batch_dims=batch_dims)
    except Exception:
        return False
    other.undo()
    again = _numbers(other)
    if [n.func for n in graph.nodes] != [n.func for n in other.nodes] or len(again) != len(numbers):
        return False
    return all(type(a) is type(b) and a == b for a, b in zip(numbers, again, strict=True))


def _numbers(graph: Graph) -> list[Any]:
    """The leaves of ``graph``'s calls' arguments that hold numbers (not ``_PLAIN``)."""
    return [
        a
        for n in graph.nodes
        for a in leaves((n.args, n.kwargs))
        if not isinstance(a, (torch.Tensor, Ref, *_PLAIN))
    ]
