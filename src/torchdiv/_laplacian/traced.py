"""A Laplacian call of the recording engines traced by Dynamo: the compiled step in one graph.

The Taylor engine records ``f`` (a dispatch mode) and plans from what it saw, which Dynamo
cannot trace, so a ``laplacian`` (``value_grad_laplacian``) call of it that Dynamo traced ran
eagerly: one graph break, a PINN's compiled training step split into three graphs, whose
guards, wrappers and frame switches made it 1.0-1.4x its eager step (issue 14). Once ``f`` is
recorded and the plan made, though, the engine's sweep is plain ATen calls on ``x`` and ``f``'s
tensors. So, as ``_structured.replay`` does for the structured engine's chains:

1. While Dynamo traces, ``_recorded`` runs eagerly (``assume_constant_result``, with the real
   ``f`` and ``x``): it runs the eager call itself (the public function, compiling switched
   off) under a dispatch mode that records every ATen call it makes (``_Recorder``): ``f``'s
   recording, the engine's sweep, its checks. Each tensor a call reads is ``x``, the output of
   an earlier call, ``f``'s parameter or buffer (by name, ``replay.Held``), or a constant the
   call made from Python numbers (``torch.tensor``); anything else refuses.
2. It runs ``f`` with a symbolic batch size (``batch_sizes.served``): the sizes over which
   ``f``'s numbers are those at ``N`` or affine in it (every size, usually), else ``N``
   alone. Where more than ``N``, it runs the call again at the sizes of
   ``batch_sizes.others`` (``N + 1``, ``N + 2``, ``2N + 5``, ``x``'s rows cycled), else once
   more at ``N``, with every value scaled: the recordings must make the same calls, integers
   in them affine in the batch size (``Sized``: view shapes, ``expand`` sizes) and
   everything else equal. A plan that depends on the batch size in any other way, or on
   values, refuses. The graph serves the sizes ``served`` gave (a guard; another size
   compiles again and records there).
3. The traced code replays the calls (``_run``) on ``x`` and ``f``'s tensors of this run,
   each under the grad mode it was made in: plain tensor ops, one graph with the step around
   it, derivatives by autograd through the same ATen calls as the eager call's (``_Recorder``
   refuses what would differ: a custom ``autograd.Function``, a backward pass, forward mode,
   ``torch.func`` transforms, random draws, writes to tensors the call did not make).
4. It calls ``f(x)``, unused, so that Dynamo's guards on ``f`` are the graph's
   (``_structured.replay``: a changed ``f`` recompiles and records again); the refusals of
   ``_structured.replay._recorded`` (a module made or changed in the compiled code, inference
   mode, a frame traced apart) hold here too.

Not replayed (the call runs eagerly, as before): ``f`` not a module, ``batch_dims`` 0, a
tensor among the options (``coordinates`` as a tensor), a result without a graph where
``x`` or a parameter requires grad (``tie.tied`` gives it one eagerly), and whatever the
recordings refuse. A value read on the host (``item``, ``bool``) refuses; one read without a
dispatched op (``tolist``) makes a constant that differs between the recordings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._C._functorch import is_functorch_wrapped_tensor, peek_interpreter_stack
from torch.utils._python_dispatch import TorchDispatchMode

from torchdiv._core import batch_sizes, walk
from torchdiv._core.mixing.errors import watched
from torchdiv._structured import replay
from torchdiv._structured.replay import Held
from torchdiv._taylor.capture import Before, Ref, put_back
from torchdiv._taylor.propagate import autocast_off, autocast_on
from torchdiv._taylor.tree import leaves, map_leaves

aten = torch.ops.aten
# calls that make a tensor from Python numbers (``torch.tensor``): their argument is a constant
_FRESH = frozenset({aten.lift_fresh.default, aten.lift_fresh_copy.default})
# what a tensor the recorder does not know is recorded as (a closure's): refused
_FOREIGN = object()
# forward-mode calls: a replay outside the dual level they were made in would not run them
_DUAL = frozenset({aten._make_dual.default, aten._unpack_dual.default})
# a constant made from Python numbers is kept as numbers up to this many elements
CONSTANT_ELEMENTS = 4096


@dataclass(frozen=True)
class Sized:
    """An integer of a recorded call, ``scale * x.shape[0] + offset``."""

    scale: int
    offset: int


@dataclass(frozen=True)
class Number:
    """A float of a recorded call: ``Program.numbers[index]``."""

    index: int


@dataclass(frozen=True)
class Constant:
    """A tensor a call made from Python numbers: its values (as ``Program.numbers[index]``
    once merged), dtype and device."""

    values: Any
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class Call:
    """One recorded ATen call: its arguments (``Ref``, ``Held``, ``Sized``, ``Constant``
    for tensors and sizes) and the grad mode it ran under."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    grad: bool


@dataclass(frozen=True)
class Program:
    """The calls of one eager call and where its result comes from (``Ref`` leaves, in a
    ``NamedTuple`` of type ``kind`` where the function returns one), ``x``'s event shape,
    and the floats of the calls (``Number``, ``Constant``): read by the trace from
    ``_numbers`` as constants (read from the plan, ``dynamic=True`` made each a symbol,
    which restarted the trace, which recorded again under a new key: without end), and the
    least and most batch sizes the replay serves (``batch_sizes.served``)."""

    calls: tuple[Call, ...]
    output: Any
    kind: type | None
    event: tuple[int, ...] = ()
    numbers: tuple[Any, ...] = ()
    sizes: tuple[int, int] = (0, 0)


def replayed(public: Callable[..., Any], f: Any, x: Any, *args: Any, **options: Any) -> Any:
    """``public(f, x, **options)`` as plain tensor ops for Dynamo to trace (module
    docstring), or ``None`` where it cannot be replayed (the caller runs it eagerly). Only
    where Dynamo traces; ``public`` is the public function (``laplacian``,
    ``value_grad_laplacian``).

    Returns:
        what ``public`` returns, computed by the replayed calls."""
    if args or not isinstance(f, torch.nn.Module) or not isinstance(x, torch.Tensor):
        return None
    batch_dims = options.get("batch_dims", 1)
    if type(batch_dims) is not int or not 1 <= batch_dims <= x.dim():
        return None
    if any(isinstance(v, torch.Tensor) for v in leaves(list(options.values()))):
        return None
    named = tuple(sorted((k, _plain(v)) for k, v in options.items()))
    key = _recorded(public, f, x, named, torch.is_grad_enabled())
    if key < 0:
        return None
    program: Program = getattr(replay._Read, f"k{key}")
    if tuple(x.shape[1:]) != program.event:  # (a guard on the event's shape)
        return None
    if not batch_sizes.serves(program.sizes, x.shape[0]):  # (guards: ``batch_sizes.served``)
        return None
    out = _run(program, _numbers(key), f, x)
    f(x)  # unused: Dynamo's guards on f become this graph's (module docstring)
    if not replay._traced_with(key):  # (f(x) broke the graph: its guards are not this graph's)
        return None
    return out


def _plain(value: Any) -> Any:
    """An option as a constant Dynamo can pass (a list of coordinates as a tuple)."""
    return tuple(value) if isinstance(value, list) else value


@torch.compiler.assume_constant_result
def _numbers(key: int) -> tuple[Any, ...]:
    """The floats of the ``Program`` kept under ``key``, as constants of the trace."""
    program: Program = getattr(replay._Read, f"k{key}")
    return program.numbers


def _run(program: Program, numbers: tuple[Any, ...], f: torch.nn.Module, x: torch.Tensor) -> Any:
    """The recorded calls run on ``x`` and ``f``'s tensors of this run (``numbers``: the
    program's floats): the result."""
    kept: list[list[Any]] = []
    n = x.shape[0]

    def value(a: Any) -> Any:
        if isinstance(a, Ref):
            return x if a.node < 0 else kept[a.node][a.leaf]
        if isinstance(a, Held):
            return a.of(f)
        if isinstance(a, Sized):
            return a.scale * n + a.offset
        if isinstance(a, Number):
            return numbers[a.index]
        if isinstance(a, Constant):
            return torch.tensor(numbers[a.values], dtype=a.dtype, device=a.device)
        return a

    # the calls as the eager call made them, below autocast (its casts are calls of their
    # own; the sweep ran with autocast off): replayed under the caller's, a float32 sweep was
    # cast to bfloat16 again (rev-c33)
    def calls() -> None:
        for call in program.calls:
            with torch.set_grad_enabled(call.grad):
                out = call.func(*map_leaves(value, call.args), **map_leaves(value, call.kwargs))
            kept.append(leaves(out))

    autocast_off(autocast_on(), calls)
    out = map_leaves(value, program.output)
    return out if program.kind is None else program.kind(*out)


@torch.compiler.assume_constant_result  # run by Dynamo while tracing, with the real f and x
@replay.restarted
def _recorded(
    public: Callable[..., Any],
    f: torch.nn.Module,
    x: torch.Tensor,
    options: tuple[tuple[str, Any], ...],
    grad: bool,
) -> int:
    """The key (``replay.keep``) of the ``Program`` of ``public(f, x, **options)`` under grad
    mode ``grad``, recorded now; ``-1`` where it has none (anything the call raises
    included: the eager call reports it)."""
    try:
        if replay._apart(__file__) or replay._changed_while_traced(f) or replay._inferred():
            return -1
        with watched():  # (f mixes samples: eager says; in allow_batch_interaction too)
            z = x.detach().requires_grad_(x.requires_grad)
            program = _planned(public, f, z, options, grad)
        if program is None or replay._marked(program.sizes[0] < program.sizes[1]):
            return -1
    except Exception:
        return -1
    return replay.keep(program)


def _planned(
    public: Callable[..., Any],
    f: torch.nn.Module,
    x: torch.Tensor,
    options: tuple[tuple[str, Any], ...],
    grad: bool,
) -> Program | None:
    """The ``Program`` of the recordings (module docstring), or ``None``."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in options}
    names = {id(t): Held(name, False) for name, t in f.named_parameters(remove_duplicate=False)}
    names.update((id(t), Held(name, True)) for name, t in f.named_buffers(remove_duplicate=False))
    recordings, n = [], x.shape[0]
    with _eagerly(x), torch.set_grad_enabled(grad):
        sizes = batch_sizes.served(f, x, affine=True)
        more = [x.detach()] if sizes == (n, n) else batch_sizes.others(x)
        scaled = [x] + [
            (z * (1 + k / 16)).requires_grad_(x.requires_grad) for k, z in enumerate(more, 1)
        ]
        for z in scaled:
            program = _recording(public, f, z, kwargs, names)
            if program is None:
                return None
            recordings.append(program)
    merged = _merged(recordings, [z.shape[0] for z in scaled], tuple(x.shape[1:]))
    return None if merged is None else dataclasses.replace(merged, sizes=sizes)


@contextlib.contextmanager
def _eagerly(x: torch.Tensor) -> Iterator[None]:
    """Run as an eager call would: ``torch.compiler.is_compiling()`` false (Dynamo holds it
    true while it compiles, ``_recorded`` included; private flag) and the random number
    generators as they were found after it."""
    compiling = torch.compiler._is_compiling_flag
    torch.compiler._is_compiling_flag = False
    try:
        devices = [] if x.device.type == "cpu" else [x.device]
        with torch.random.fork_rng(devices, device_type=x.device.type):
            yield
    finally:
        torch.compiler._is_compiling_flag = compiling


def _recording(
    public: Callable[..., Any],
    f: torch.nn.Module,
    x: torch.Tensor,
    options: dict[str, Any],
    names: dict[int, Held],
) -> Program | None:
    """The calls of ``public(f, x, **options)``, or ``None`` where one refuses
    (``_Recorder``) or the result would lose its graph."""
    recorder = _Recorder({id(x): Ref(-1), **names})
    try:
        with recorder:
            result = public(f, x, **options)
    finally:
        put_back(recorder.changed)
    kind = type(result) if isinstance(result, tuple) and type(result) is not tuple else None
    results: list[Any] = list(result) if kind is not None else [result]  # (a NamedTuple)
    outputs = [t for t in results if isinstance(t, torch.Tensor)]
    if recorder.refused or len(outputs) != len(results):
        return None
    trained = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for p in f.parameters())
    )
    if trained and not all(t.requires_grad for t in outputs):
        return None  # (tied eagerly: a piecewise linear f's result has no graph of its own)
    if any(_custom(t.grad_fn, set()) for t in outputs):
        return None
    refs = [recorder.refs.get(id(t)) for t in outputs]
    if any(r is None or isinstance(r, Held) for r in refs):
        return None
    return Program(tuple(recorder.calls), tuple(refs) if kind is not None else refs[0], kind)


def _custom(node: Any, seen: set[int]) -> bool:
    """Whether the autograd graph below ``node`` holds a custom ``autograd.Function``, whose
    backward a replay of its forward's ATen calls would not run."""
    stack = [node]
    inner, bound = 0, float(walk._FLOOR)  # (nodes expanded: ``walk.walked``)
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        children = node.next_functions
        if children:
            inner += 1
            if inner > bound:
                bound = walk.walked(inner)
            stack.extend(next_node for next_node, _ in children)
    return False


class _Recorder(TorchDispatchMode):
    """Records every ATen call as a ``Call``; ``refused`` where a replay would not compute
    the same values and derivatives; ``changed``: tensors it did not make, written in
    place (put back)."""

    def __init__(self, known: dict[int, Any]):
        super().__init__()
        self.refs: dict[int, Any] = known
        self.calls: list[Call] = []
        self.alive: list[torch.Tensor] = []  # (ids stay unique)
        self.changed: list[Before] = []
        self.refused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.refused:
            self.refused = self._refuses(func, args, kwargs)
        out = func(*args, **kwargs)
        if self.refused:
            return out
        if func in _FRESH:
            (made,) = args
            if made.numel() > CONSTANT_ELEMENTS:
                self.refused = True
                return out
            call_args: Any = (Constant(_tuples(made.tolist()), made.dtype, made.device),)
            call_kwargs: Any = {}
        else:
            call_args, call_kwargs = map_leaves(self._arg, (args, kwargs))
        if any(a is _FOREIGN for a in leaves((call_args, call_kwargs))):
            self.refused = True  # (a tensor it does not know: a closure's)
            return out
        self.calls.append(Call(func, call_args, call_kwargs, torch.is_grad_enabled()))
        for leaf, o in enumerate(leaves(out)):
            if isinstance(o, torch.Tensor):
                self.refs[id(o)] = Ref(len(self.calls) - 1, leaf)
                self.alive.append(o)
            elif o is not None:
                self.refused = True  # a value on the host (``item``)
        return out

    def _arg(self, a: Any) -> Any:
        """A recorded argument: a tensor's ``Ref`` or ``Held`` (``_FOREIGN``: unknown; a
        ``None`` argument, as ``x[:, i]``'s index list holds, is kept)."""
        return self.refs.get(id(a), _FOREIGN) if isinstance(a, torch.Tensor) else a

    def _refuses(self, func: Any, args: Any, kwargs: Any) -> bool:
        """Whether the call cannot be replayed: random, forward mode, inside a backward
        pass or a ``torch.func`` transform, or writing a tensor the call did not make (kept
        in ``changed`` to put back)."""
        if torch.Tag.nondeterministic_seeded in func.tags or func in _DUAL:
            return True
        if torch._C._current_graph_task_id() != -1 or peek_interpreter_stack() is not None:
            return True
        tensors = [a for a in leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(is_functorch_wrapped_tensor(a) for a in tensors):
            return True
        written = _written(func, args, kwargs)
        foreign = [t for t in written if not isinstance(self.refs.get(id(t)), Ref)]
        foreign += [t for t in written if self.refs.get(id(t)) == Ref(-1)]
        self.changed += [Before.of(t) for t in foreign]
        return bool(foreign)


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors ``func`` writes in place among its arguments."""
    out = []
    named = dict(zip((a.name for a in func._schema.arguments), args, strict=False)) | kwargs
    for argument in func._schema.arguments:
        info = argument.alias_info
        value = named.get(argument.name)
        if info is not None and info.is_write:
            out += [t for t in leaves(value) if isinstance(t, torch.Tensor)]
    return out


def _tuples(values: Any) -> Any:
    """``Tensor.tolist()``'s nested lists as nested tuples (a constant Dynamo passes)."""
    return tuple(_tuples(v) for v in values) if isinstance(values, list) else values


def _merged(programs: list[Program], sizes: list[int], event: tuple[int, ...]) -> Program | None:
    """One ``Program`` from the recordings at batch sizes ``sizes`` and event shape
    ``event``: the same calls, every integer affine in the batch size (``Sized``), all else
    equal, the floats numbered; ``None`` where not."""
    first = programs[0]
    if any(len(p.calls) != len(first.calls) or p.kind is not first.kind for p in programs):
        return None
    if any(leaves(p.output) != leaves(first.output) for p in programs):
        return None
    numbers: list[Any] = []

    def numbered(a: Any) -> Any:
        if isinstance(a, Constant):
            numbers.append(a.values)
            return Constant(len(numbers) - 1, a.dtype, a.device)
        if type(a) is float:
            numbers.append(a)
            return Number(len(numbers) - 1)
        return a

    calls = []
    for same in zip(*(p.calls for p in programs), strict=True):
        if any(c.func != same[0].func or c.grad != same[0].grad for c in same):
            return None
        merged = _merged_leaves([(c.args, c.kwargs) for c in same], sizes)
        if merged is None:
            return None
        args, kwargs = map_leaves(numbered, merged)
        calls.append(Call(same[0].func, args, kwargs, same[0].grad))
    return Program(tuple(calls), first.output, first.kind, event, tuple(numbers))


def _merged_leaves(trees: list[Any], sizes: list[int]) -> Any:
    """``trees[0]`` with its integers that differ across ``trees`` as ``Sized``; ``None``
    where the trees differ otherwise or an integer is not affine in ``sizes``."""
    columns = [leaves(t) for t in trees]
    if any(len(c) != len(columns[0]) for c in columns):
        return None
    out = []
    for values in zip(*columns, strict=True):
        first = values[0]
        if type(first) is int and any(v != first for v in values):
            if any(type(v) is not int for v in values) or sizes[1] == sizes[0]:
                return None  # (at one size: made from values)
            scale = (values[1] - first) // (sizes[1] - sizes[0])
            offset = first - scale * sizes[0]
            if any(scale * s + offset != v for s, v in zip(sizes, values, strict=True)):
                return None
            out.append(Sized(scale, offset))
        elif any(type(v) is not type(first) or not _equal(v, first) for v in values):
            return None
        else:
            out.append(first)
    it = itertools.count()
    return map_leaves(lambda _: out[next(it)], trees[0])


def _equal(a: Any, b: Any) -> bool:
    """Whether two recorded leaves are the same."""
    if isinstance(a, Constant):
        return bool(a.values == b.values and a.dtype == b.dtype and a.device == b.device)
    return bool(a == b)
