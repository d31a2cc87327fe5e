"""A chain plan traced by Dynamo: a compiled training step of the structured engine in one graph.

The structured engine records ``f`` (a dispatch mode), which Dynamo cannot trace, so a call
Dynamo traces ran eagerly: one graph break, the user's compiled step split into three graphs
whose guards, wrappers and frame switches cost ~0.2 ms a step (compiled/eager 1.3-1.4 on a
small MLP, issue 14). Here, where ``f`` is a module whose plan is a *chain*
(``factors``: shared matrices and per-sample diagonals), the call is traced instead:

1. While Dynamo traces, ``_recorded`` runs eagerly (``assume_constant_result``: Dynamo calls
   it with the real ``f`` and ``x`` and bakes its result, a key, into the graph): it records
   ``f`` at ``x`` as an eager call would and keeps what a replay needs (``Replay``): the
   recorded ATen calls, with ``f``'s parameters and buffers named instead of held, and the
   routes of the chain.
2. The traced code replays those calls on ``x`` and the parameters read from ``f`` by name
   (graph inputs read at every call: a parameter replaced by another object is the one
   used), makes the chain's factors along the routes (``factors.followed``) and takes the
   trace or the diagonal (``cycle``): plain tensor ops, one graph with the step around it.
3. It also calls ``f(x)``, whose result is unused (removed from the graph): Dynamo's guards
   on ``f`` (its submodules, flags, hooks, code, as for any compiled model) are then this
   graph's, so that a change of ``f`` recompiles, which records ``f`` again. A replay never
   outlives the structure it was recorded from.

Not replayed (the call then runs eagerly, as before): ``f`` not a module; a tensor ``f``
reads that is not its parameter or buffer (a closure's: it could be rebound unseen); what an
eager template would not keep (writes, random draws, ops without rules); calls that read
values on the host; plans other than a chain (colourings, columns), or a chain through a
data-movement factor (its index map is made on the host); ``f`` whose forward breaks the
graph (a call Dynamo does not trace): ``f(x)`` is then traced apart, its guards not the
replay's. Inside ``torch.inference_mode()`` entered in the compiled code (the replay's
graph failed the backend there and left PyTorch's dispatcher state broken for the process).
Numbers in the calls (view shapes, a float made from the batch size) hold for ``x``'s shape
only: such a replay guards on that shape.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch.autograd import grad_mode as _grad_mode

from torchdiv._core.tie import tied
from torchdiv._structured import cycle, factors
from torchdiv._taylor import RULES, Graph, capture, values
from torchdiv._taylor.cache import template
from torchdiv._taylor.capture import Node, Ref
from torchdiv._taylor.tree import leaves, map_leaves

# the factor rules a traced replay runs (``factors._Walker``; ``_movement`` plans on the host)
KINDS = frozenset({"_first", "_derivative", "_matmul", "_pointwise"})
# non-tensor arguments of a recorded call that do not depend on x's shape (a number can:
# ``3.0 / x.shape[0]``, a float ``dynamic=True`` leaves unguarded)
_PLAIN = (type(None), bool, str, torch.dtype, torch.device, torch.layout)
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
    is among their outputs, the chain's routes, ``x``'s shape where the calls hold
    integers (``None``: any shape), and the columns carried at once where the caller gives no
    ``chunk_size`` (``cycle``'s block size at the recording's batch: made from the traced batch
    size, it was a guard on it, one graph per batch size under ``dynamic=True``)."""

    nodes: tuple[Node, ...]
    output: Ref
    routes: tuple[factors.Route, ...]
    shape: tuple[int, ...] | None
    chunk: int


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
    key = _recorded(f, x, batch_dims, torch.is_grad_enabled())
    if key < 0:
        return None
    plan: Replay = getattr(_Read, f"k{key}")
    if plan.shape is not None and tuple(x.shape) != plan.shape:  # (a guard on the shape)
        return None
    n, chunk = x.shape[:batch_dims].numel(), plan.chunk if chunk is None else chunk
    graph, kept = _replay(plan, f, x)
    chain = factors.followed(list(plan.routes), graph, kept, x, n)
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


def _replay(plan: Replay, f: torch.nn.Module, x: torch.Tensor) -> tuple[Graph, list[list[Any]]]:
    """The recorded calls run again on ``x`` and ``f``'s tensors: the graph (its calls with
    this run's tensors) and every call's outputs."""
    kept: list[list[Any]] = []

    def tensor(a: Any) -> Any:
        return a.of(f) if isinstance(a, Held) else a

    def value(a: Any) -> Any:
        return (x if a.node < 0 else kept[a.node][a.leaf]) if isinstance(a, Ref) else a

    nodes = []
    for node in plan.nodes:
        args, kwargs = map_leaves(tensor, node.args), map_leaves(tensor, node.kwargs)
        kept.append(leaves(node.func(*map_leaves(value, args), **map_leaves(value, kwargs))))
        nodes.append(Node(node.func, args, kwargs, node.depends))
    return cast(Graph, _Calls(nodes)), kept


@torch.compiler.assume_constant_result  # run by Dynamo while tracing, with the real f and x
def _recorded(f: torch.nn.Module, x: torch.Tensor, batch_dims: int, grad: bool) -> int:
    """The key in ``_PLANS`` of ``f``'s replay at ``x`` under grad mode ``grad``, recorded
    now; ``-1`` where it has none (anything ``f`` raises included: the eager call reports
    it)."""
    try:
        if _apart() or _changed_while_traced(f) or _inferred():
            return -1
        with torch.set_grad_enabled(grad):
            plan = _plan(f, x.detach(), batch_dims)
    except Exception:
        return -1
    return -1 if plan is None else keep(plan)


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


def _plan(f: torch.nn.Module, x: torch.Tensor, batch_dims: int) -> Replay | None:
    """``f``'s recording at ``x`` as a ``Replay``, if it is one (module docstring)."""
    graph = capture(f, x, RULES, keep_values=True, batch_dims=batch_dims)
    if template(graph) is None or tuple(graph.output_shape) != tuple(x.shape):
        graph.undo()
        return None
    kept, n = values(graph, x), x.shape[:batch_dims].numel()
    found = factors.paths(graph, kept, x, n)
    if found is None or any(k not in KINDS for route in found[1] for k in route.kinds):
        return None
    if not all(isinstance(v, torch.Tensor) for out in kept for v in out):  # a host read
        return None
    names = {id(t): Held(name, False) for name, t in f.named_parameters(remove_duplicate=False)}
    names.update((id(t), Held(name, True)) for name, t in f.named_buffers(remove_duplicate=False))

    def held(a: Any) -> Any:
        return names[id(a)] if isinstance(a, torch.Tensor) else a

    shaped = False
    nodes = []
    for node in graph.nodes:
        for a in leaves((node.args, node.kwargs)):
            if isinstance(a, torch.Tensor) and id(a) not in names:
                return None  # a closure's tensor (or one f made outside the recording)
            shaped |= not isinstance(a, (torch.Tensor, Ref, *_PLAIN))
        if not node.grad:
            return None
        nodes.append(
            replace(node, args=map_leaves(held, node.args), kwargs=map_leaves(held, node.kwargs))
        )
    widest = max(
        v.numel() // n
        for node, out in zip(graph.nodes, kept, strict=True)
        if node.depends
        for v in out
    )
    chunk = max(1, cycle.BLOCK_ELEMENTS // (n * max(widest, 1)))
    output = cast(Ref, graph.output)
    return Replay(tuple(nodes), output, tuple(found[1]), tuple(x.shape) if shaped else None, chunk)
