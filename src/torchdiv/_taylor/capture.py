"""Capture what ``f`` computes at ``x`` as a list of ATen calls.

A ``TorchDispatchMode`` sees every ATen operation ``f`` runs, below autograd, after PyTorch's
own composite functions (``linear``, ``matmul``, ``einsum``, ``reshape``, ...) have been
decomposed into a small set of primitives. Each call is recorded with the tensors it reads:
``x`` itself, outputs of earlier calls (as ``Ref``), or outside tensors (parameters, buffers,
closures), which are kept by reference so that a replay is differentiable with respect to
them. A call *depends* on ``x`` if one of its floating tensor inputs does; only those need a
propagation rule. A dependent call without a rule is decomposed with PyTorch's decomposition
table (core ATen decompositions) if it has one, and otherwise named in ``Graph.unsupported``.

Attention is captured on PyTorch's math backend, whose primitives (``bmm``, ``_safe_softmax``)
have rules, with the transformer fast path off; the fused CPU and CUDA kernels do not
decompose. ``f`` runs under ``_modes.SafeDerivatives(1)``: ``cdist`` is captured as
differences.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NamedTuple

import torch
from torch._C._functorch import peek_interpreter_stack
from torch._decomp import core_aten_decompositions
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import CheckpointFunction

from torchdiv._core.checks import storage_address
from torchdiv._core.mixing.errors import BatchInteractionError
from torchdiv._core.mixing.reads import VALUE_FREE, Verdict, reading
from torchdiv._core.mixing.tracker import BatchAxes
from torchdiv._core.mixing.watch import tracker
from torchdiv._core.mixing.writes import written_arguments
from torchdiv._core.modes import (
    REPLACEMENTS,
    UNDERIVABLE_OPS,
    DispatchMode,
    SafeDerivatives,
    differentiated_by_autograd,
    forget_computed_weights,
    math_attention,
    read_by_torchdiv,
    read_requires_grad_false,
    refuse_underivable,
    underived,
)
from torchdiv._core.settings import Settings
from torchdiv._taylor.tree import leaves, map_leaves

aten = torch.ops.aten


def _as_convolution(*args: Any) -> torch.Tensor:
    """``aten._convolution`` (what ``torch.jit.trace`` records for ``nn.Conv2d``) as the
    ``aten.convolution`` it computes: its first nine arguments are that op's; the rest
    (``benchmark``, ``deterministic``, ``cudnn_enabled``, ``allow_tf32``) pick kernels."""
    return aten.convolution.default(*args[:9])


_DECOMPOSITIONS = {**core_aten_decompositions(), aten._convolution.default: _as_convolution}


class Before(NamedTuple):
    """A tensor about to be written in place: its value and its view of its storage (size,
    stride, offset: ``transpose_`` and ``squeeze_`` change those, not the values)."""

    tensor: torch.Tensor
    value: torch.Tensor
    view: tuple[torch.Size, tuple[int, ...], int]

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Before:
        view = (tensor.shape, tensor.stride(), int(tensor.storage_offset()))
        return cls(tensor, tensor.detach().clone(), view)


def put_back(changed: list[Before]) -> None:
    """Undo the writes ``changed`` kept, the last first: each tensor's view, then its values
    (and forget the parametrized weights computed from them: ``forget_computed_weights``)."""
    forget_computed_weights()
    with torch.no_grad():
        for tensor, value, (size, stride, offset) in reversed(changed):
            if (tensor.shape, tensor.stride(), tensor.storage_offset()) != (size, stride, offset):
                tensor.as_strided_(size, stride, offset)
            tensor.copy_(value)


@dataclass(frozen=True)
class Ref:
    """Output ``leaf`` (in ``tree.leaves`` order) of node ``node``; node ``-1`` is ``x``."""

    node: int
    leaf: int = 0


@dataclass
class Node:
    """One recorded ATen call; tensors produced inside ``f`` appear as ``Ref``."""

    func: torch._ops.OpOverload
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    depends: bool
    kept: list[Any] | None = None  # outputs to reuse instead of replaying (see _kept)
    grad: bool = True  # grad mode at the call: under no_grad in f, replayed under no_grad


@dataclass
class Graph:
    """The calls ``f`` made at ``x``, in order, and where its result comes from."""

    nodes: list[Node] = field(default_factory=list)
    output: Any = None
    unsupported: list[str] = field(default_factory=list)
    # whether f wrote in place, with other arguments computed from x, into a tensor computed
    # from x that an op read before (``b.mul_(torch.tanh(b))``, through views too): forward
    # mode's tangent formulas save the tangent read and then write it in place, so the
    # parameter gradients of forward-mode derivatives raise PyTorch's "modified by an
    # inplace operation" (``torch.func.jvp`` alike); ``"auto"`` falls back to backward passes
    reads_written: bool = False
    widest: int = 1  # elements of the largest tensor computed from x (all samples)
    # the work of the calls computed from x: how many, their output elements, and the
    # multiply-adds of the matrix products and convolutions among them (``_work``)
    dependent_calls: int = 0
    elements: int = 0
    products: int = 0
    # whether f(x) needs a graph (grad mode on, f reads something that requires grad): a
    # result computed from it is differentiated, in training
    requires_grad: bool = False
    output_shape: tuple[int, ...] = ()
    # for which other calls the watch for sample mixing's pass holds (``BatchAxes.verdict``;
    # none, ``Verdict()``, where it was not watched)
    verdict: Verdict = field(default_factory=Verdict)
    # every node's outputs as f computed them (``capture(..., keep_values=True)``); None if f
    # wrote in place other than values computed from x into its own tensors (a buffer, a
    # constant, a random draw: ``_Recorder.mutated``)
    values: list[list[Any]] | None = None
    # the nodes whose outputs in ``values`` are not as they computed them: changed after them
    # by a write of values computed from x recorded out of place (``relu_``), or the calls
    # that write was recorded as (``silu_``: ``write_out_of_place``), made below autograd;
    # ``None`` each in ``values`` (computed again from the others: ``propagate.values``)
    overwritten: frozenset[int] = frozenset()
    # state f changed outside its own tensors (``Before`` each write), and the RNG states
    changed: list[Before] = field(default_factory=list)
    rng: list[tuple[Callable[[Any], None], Any]] = field(default_factory=list)
    # the plain values of f's modules before recording (a flag f sets), put back with them
    settings: Settings | None = field(default=None, repr=False, compare=False)
    # what every replay needs to know about the nodes (``propagate.Plan``), made on first use
    plan: Any = field(default=None, repr=False, compare=False)
    # the ``cache.Template`` this graph was checked against or kept as (plans made from the
    # structure alone are kept with it); None if it is not kept
    template: Any = field(default=None, repr=False, compare=False)
    # whether a check without ``replacing()``'s modes can match the calls recorded: ``f``
    # called no function those modes change (attention, a ``SafeDerivatives`` replacement;
    # ``_InPlaceDetach``): ``cache.Template.lean``
    lean: bool = True
    # whether the watch for sample mixing read index values along the batch (``BatchAxes.
    # indexed``): its verdict holds for them only, so the graph is never kept as a template
    indexed: bool = False
    # the storages of ``changed`` that f did not make (its modules' parameters and buffers,
    # a closure's tensor; not a dropout mask f drew into a tensor of its own, anew at each
    # evaluation)
    outside: set[int] = field(default_factory=set, repr=False)
    # those tensors and their values after the recording, kept by the first ``undo``: a
    # fallback's evaluations must write them again (``_exact.state.wrote_alike``)
    wrote: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    def undo(self) -> None:
        """Put back what recording ``f`` changed outside it (buffers it updated in place, the
        random number generators), for a caller that falls back to evaluating ``f`` again: a
        training-mode batch norm's statistics then move once, not twice. The first undo keeps
        the values the recording wrote (``wrote``)."""
        if self.wrote is None:
            self.wrote = [
                (b.tensor, b.tensor.detach().clone())
                for b in self.changed
                if _storage(b.tensor) in self.outside
            ]
        put_back(self.changed)
        for restore, state in self.rng:
            restore(state)
        if self.settings is not None:
            self.settings.put_back()

    def work_per_call(self) -> float:
        """Arithmetic per call computed from ``x``: output elements plus multiply-adds / 32 (a
        matrix product does about 32 multiply-adds, on two threads, in the time an elementwise
        op takes per element), over the number of such calls; 0 if there are none."""
        return (self.elements + self.products / 32) / max(self.dependent_calls, 1)

    def chunk(self, num_directions: int, budget: int) -> int:
        """Directions per chunk: as few equal chunks as keep the widest ``jac`` (directions
        x elements) within ``budget`` elements; each chunk replays the values, so fewer is
        faster, and unequal chunks measured 8-12% slower than equal ones."""
        largest = max(8, budget // self.widest)
        pieces = -(-num_directions // largest)  # ceil
        return -(-num_directions // pieces) if num_directions else 1


def _replacing(old: torch.Tensor, new: torch.Tensor) -> Callable[[Any], Any]:
    """``a -> new if a is old else a``, for ``map_leaves``."""
    return lambda a: new if a is old else a


_UNSET = object()  # (``_Recorder.given`` when no call is adopted)


class Adopted(NamedTuple):
    """A call ``f`` made that a ``_Recorder`` takes as recorded (``_Recorder.adopt``): its
    arguments, its result, the grad mode it ran under, and, for a call decomposed, the calls
    of its decomposition (``None`` otherwise)."""

    func: Any
    args: Any
    kwargs: dict[str, Any]
    out: Any
    grad: bool
    parts: list[Adopted] | None = None


# how a recording's refusal names an op outside ``aten``/``prims`` (a ``torch.library`` op),
# and one of them without a derivative (``underived``: no method is a way out, ``way_out``)
CUSTOM_OP = "the custom op"
UNDERIVED = "(no derivative registered)"


def _custom(func: Any) -> bool:
    """Whether ``func`` is an op outside ``aten``/``prims`` (a ``torch.library`` op)."""
    return getattr(func, "namespace", "aten") not in ("aten", "prims")


def _unsupported(func: Any) -> str:
    """How a refusal names ``func``, an op without a propagation rule: a custom op as one,
    and as one without a derivative where it has none: a ``custom_op`` without
    ``register_autograd`` (``underived``), or an op with no kernel at any autograd key (a
    ``Library.impl`` at a backend alone), which every method refuses (``WrongDerivatives``:
    PyTorch's autograd fallback would take its result for a constant)."""
    if not _custom(func):
        return str(func)
    none = underived(func) or not differentiated_by_autograd(func)
    return f"{CUSTOM_OP} {func} {UNDERIVED}" if none else f"{CUSTOM_OP} {func}"


class _Recorder(DispatchMode):
    def __init__(self, x: torch.Tensor, rules: Container[Any], axes: BatchAxes | None = None):
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.graph, self.rules, self.axes = Graph(), rules, axes
        self.refs: dict[int, Ref] = {id(x): Ref(-1)}
        self.dependent: set[Ref] = {Ref(-1)}
        self.alive: list[Any] = [x]  # keeps ids unique while recording
        # whether f wrote in place other than a write of values computed from x into its own
        # tensor recorded out of place, whose earlier values are noted in ``overwritten``
        self.mutated = False
        self.overwritten: set[int] = set()
        self.storages = Storages(self.alive, skip=1)
        self.task = torch._C._current_graph_task_id()  # a backward pass f is called from
        # the first op without any derivative in PyTorch (``UNDERIVABLE_OPS``) that f applied
        # to a tensor being differentiated: its output is a constant, a recording cannot tell
        self.underivable: str | None = None
        # by storage: the recorded calls that read it (node, tensor id), and whether a view of
        # it was made or it was written before; writes to x's storage are refused
        self.readers: dict[int, list[tuple[int, int]]] = {}
        self.viewed: set[int] = set()
        # (node, storage): the recorded call only made a view of it, reading no values
        # (``reads_written``)
        self.aliasing: set[tuple[int, int]] = set()
        self.written: set[int] = set()
        self.x_storage = _storage(x)
        self.computed: set[int] = set()  # storages of tensors computed from x
        # storages a recorded call allocated (no argument of it lives there), by that call's
        # node; and the tensors a replay gives their values before an in-place write made
        # through another tensor sharing their memory (``_Recorder.replayed_before``)
        self.fresh: dict[int, int] = {}
        self.sharing: dict[int, list[int]] = {}  # fresh storage -> the tensors made there
        self.stale: set[int] = set()
        # by storage: the in-place writes recorded out of place (``functional``) into a tensor
        # sharing it with others (node, the written elements, the op): a replay would give
        # those others their old values, so a call reading one made before the write is
        # refused (``rewritten``); ``None`` once one was
        self.rewrites: dict[int, list[tuple[int, Strided, str]]] | None = {}
        # by storage: the nodes whose outputs a replay does not compute but takes as recorded
        # (``Node.kept``: random draws, constant in-place writes), the tensor objects f made
        self.kept: dict[int, list[int]] = {}
        # storages f allocated and filled in place with constants (``constant_write``): every
        # later read of them is recorded as a copy of the values it read (``read``)
        self.filled: set[int] = set()
        self.copies: dict[tuple[int, int], torch.Tensor] = {}  # (id, version) -> its copy
        self.given: Any = _UNSET  # the result of a call ``adopt``ed, made before

    def ref(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self.refs.get(id(value), value)
        return value

    def adopt(self, call: Adopted) -> None:
        """Record a call ``f`` made before this recorder watched it as ``dispatch`` would have
        recorded it: a call of a template check before its first difference
        (``torchdiv._taylor.cache``), which writes nothing and draws no random numbers, made
        on the recorder's ``x``."""
        self.given = (call.out, call.parts)
        try:
            with torch.set_grad_enabled(call.grad):
                self.dispatch(call.func, call.args, call.kwargs)
        finally:
            self.given = _UNSET

    def decomposed(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """``func``'s decomposition, recorded (run under this recorder), or, for a call
        adopted (``adopt``), its result, its parts adopted."""
        if self.given is _UNSET:
            with self:
                return _DECOMPOSITIONS[func](*args, **kwargs)
        out, parts = self.given
        if parts is None:  # (checked as one call where this recorder decomposes it)
            self.graph.unsupported.append(f"{func} (not decomposed where it was checked)")
            return out
        self.given = _UNSET
        for part in parts:
            self.adopt(part)
        return out

    def mapped(self, args: Any, kwargs: Any, replayed: bool) -> tuple[Any, Any]:
        """A call's arguments as its node holds them: ``Ref``s, constants, and, where the
        call is ``replayed`` from them, copies of tensors ``f`` filled in place (``read``)."""
        reading = self.read if self.filled and replayed else self.ref
        return map_leaves(reading, args), map_leaves(reading, kwargs)

    def in_filled(self, outs: list[Any]) -> bool:
        """Whether every tensor among a call's outputs lives in a storage ``f`` filled in place
        (a view of it: its node is never read, ``read`` copies it)."""
        return bool(self.filled) and all(
            _storage(t) in self.filled for t in outs if isinstance(t, torch.Tensor)
        )

    def read(self, value: Any) -> Any:
        """``ref``, except for a tensor in a storage ``f`` filled in place with constants
        (``filled``): a copy of its values now, the values the call reads (a replay runs the
        calls that made the storage again, without the writes, which it keeps as their
        results), taken before the call (a write's own target: its values before the write).
        A tensor there that a write of values computed from ``x`` made (recorded out of
        place, ``functional``) is that write's result; one sharing its memory that the write
        changed is refused (``rewritten``). A copy here, below autograd, has no graph: a
        tensor that requires grad otherwise (written with a parameter's values) is refused."""
        if not isinstance(value, torch.Tensor) or _storage(value) not in self.filled:
            return self.ref(value)
        ref = self.refs.get(id(value))
        if ref in self.dependent:  # written there with values computed from x (out of place)
            return ref
        if value.requires_grad:
            self.graph.unsupported.append(
                "a constant f filled in place, read after a write of values that require grad "
                "(a parameter's, or computed from x)"
            )
        if value.is_inference():  # (no version counter: made under inference_mode)
            return value.clone()
        key = (id(value), value._version)  # (a write through any view moves the version)
        if key not in self.copies:
            self.copies[key] = value.detach().clone()
        return self.copies[key]

    def functional(self, func: Any, args: Any) -> Any:
        """For an in-place op on its first argument (``relu_``, ``add_``: ``nn.ReLU(inplace=
        True)``, ``h += x``), the out-of-place op to record instead; otherwise ``func``
        itself. Where other recorded tensors share its memory (a view would see the write;
        a replay could not), the write is noted: a later call reading one of them that has
        elements in common with the written ones is refused (``rewritten``); one that shares
        the memory but not those elements is not: the pieces of an ``unsafe_chunk`` written
        one by one, as PyTorch's ``GRUCell``, ``LSTMCell``, ``nn.GRU`` and float64
        ``nn.LSTM`` write their gates (``chunk[0].add_(other).sigmoid_()``), the whole gate
        tensor never read again. In-place view ops (``transpose_``) change no elements."""
        facts = _facts(func)
        functional = facts.functional
        if not facts.in_place or functional is None:
            return func
        self.note_write(func, args[0], len(self.graph.nodes))
        return functional

    def note_write(self, func: Any, target: torch.Tensor, node: int) -> None:
        """Note (``rewrites``) a write by ``func`` into ``target``, recorded out of place as
        node ``node``, if other recorded tensors share its memory."""
        if self.rewrites is not None:
            note_rewrite(self.rewrites, func, target, node, leaves(self.alive))

    def rewritten(self, a: torch.Tensor) -> str | None:
        """The op of a write noted by ``functional`` that changed some of ``a``'s elements
        through another tensor after ``a`` was made (a replay would read their old values),
        or ``None``."""
        op = rewritten_by(self.rewrites, self.refs, a) if self.rewrites else None
        if op is not None:
            self.rewrites = None  # refused: no more to note or check
        return op

    def depends(self, flat: list[Any]) -> bool:
        """Whether one of the call's arguments (``flat``, their leaves) depends on ``x``."""
        refs, dependent = self.refs, self.dependent
        return any(isinstance(a, torch.Tensor) and refs.get(id(a)) in dependent for a in flat)

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        # under no_grad inside f (capture enables grad around f) results are constants, as
        # reverse mode sees them
        flat = leaves((args, kwargs))
        touches_x = self.depends(flat)
        reads_x = touches_x and func not in VALUE_FREE  # stop-gradient, factories
        depends = reads_x and torch.is_grad_enabled()
        self.refuse(func, touches_x)
        if func in UNDERIVABLE_OPS and self.underivable is None:
            grads = touches_x or any(isinstance(a, torch.Tensor) and a.requires_grad for a in flat)
            self.underivable = UNDERIVABLE_OPS[func] if grads else None
        self.untracked(flat)
        if depends and restrided(func, args):
            return func(*args, **kwargs)  # (the same values: its node stands)
        written = _written(func, args, kwargs)
        if written and depends and not self.graph.reads_written:
            self.graph.reads_written = self.reads_written(written, flat)
        if depends and (
            decomposed_in_place(func, self.rules) or through_view(func, args, self.refs) is not None
        ):
            return self.write_out_of_place(func, args, kwargs)
        if depends and func not in self.rules and func in _DECOMPOSITIONS:
            # recorded as the ops it decomposes into; watched as itself, as the other
            # engines' watches see it (its parts may combine samples with zero weights:
            # the interpolation of a size onto itself)
            axes, self.axes = self.axes, None
            try:
                out = self.decomposed(func, args, kwargs)
            finally:
                self.axes = axes
            if axes is not None:
                axes.after(axes.before(func, args, kwargs), args, out)
            return out
        carry = None if self.axes is None else self.axes.before(func, args, kwargs)
        recorded = self.functional(func, args) if depends else func
        if written:  # kept, not replayed: what it reads does not matter
            self.before_writes(func, written, depends)
        self.keep_generator(func, kwargs)
        # a write of values computed from x replays from its target's values before it; a
        # constant write is kept, not replayed (what it reads does not matter)
        refs = self.mapped(args, kwargs, depends) if written else None
        if self.given is _UNSET:
            out = func(*args, **kwargs)
            if lifted(func, args):  # (f writes into a copy: the node's constant keeps its values)
                out = out.clone()
        else:  # (adopted: a check's call, which a template holds, so never written later)
            out, parts = self.given
            if parts is not None:  # (a check's decomposition, where this recorder has none)
                self.graph.unsupported.append(f"{func} (decomposed where it was checked)")
        if self.axes is not None:
            self.axes.after(carry, args, out)
        outs = leaves(out)
        if not written:
            self.note_reads(flat, outs)
        if depends and written and not differentiable(outs) and _custom(func):
            # a torch.library op writing into an argument (mutates_args): autograd and forward
            # mode take the written result for a constant (modes.refuse_untracked_custom_op)
            self.graph.unsupported.append(f"{func} (writing its result into an argument)")
        depends = depends and differentiable(outs)
        if depends and (recorded not in self.rules or recorded._schema.is_mutable):
            # (a torch.library op named so: forward mode has no rule for it either, which a
            # refusal's way out must not take: ``CUSTOM_OP``)
            self.graph.unsupported.append(_unsupported(func))
        index = len(self.graph.nodes)
        kept = None if depends else _kept(func, outs, bool(written))
        for t in kept or ():
            if isinstance(t, torch.Tensor):
                self.kept.setdefault(_storage(t), []).append(index)
        if refs is None:  # (a view of a filled constant is never read through its node)
            refs = self.mapped(args, kwargs, depends or not self.in_filled(outs))
        self.graph.nodes.append(Node(recorded, *refs, depends, kept, torch.is_grad_enabled()))
        for i, leaf in enumerate(outs):
            if isinstance(leaf, torch.Tensor):
                self.refs[id(leaf)] = Ref(index, i)
                if depends:
                    self.dependent.add(Ref(index, i))
                    self.computed.add(_storage(leaf))
                    self.graph.widest = max(self.graph.widest, leaf.numel())
                    self.graph.elements += leaf.numel()
        if depends:
            self.graph.dependent_calls += 1
            self.graph.products += _products(func, args, outs)
        self.alive.append(out)
        return out

    def write_out_of_place(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        """Record ``func`` (``decomposed_in_place``), a write of values computed from ``x``
        into its first argument ``t``, as its out-of-place op ``r = op(t, ...)`` (by its rule,
        or as the ops it decomposes into), then make the write itself, unrecorded, and take
        ``t`` for ``r`` from here on, as ``functional`` records ``relu_``. The recorded calls
        read ``t``'s node, its values before the write, in a replay too; ``f``'s later calls
        read ``t``, now ``r``'s node. Other tensors sharing ``t``'s memory (a view of it,
        its base) would keep their old values in a replay: reading one later is refused
        (``note_write``, ``rewritten``), as are a target from outside ``f`` (a
        buffer) and ``x`` (``before_writes``), and a result of another shape or dtype
        than ``t`` (where PyTorch promotes out of place and casts back in place). Where ``t``
        is a view of a contiguous tensor ``f`` made (``through_view``), that tensor is
        recorded as ``r`` scattered into it and taken for that from here on. Watched for
        sample mixing as ``func`` itself."""
        target = args[0]
        axes, self.axes = self.axes, None
        first = len(self.graph.nodes)
        try:
            result, base, base_after = written_out_of_place(self, func, args, kwargs, self.refs)
        finally:
            self.axes = axes
        if result is None:
            self.graph.unsupported.append(f"{func} (its result cast back into its argument)")
        # (computed here, below autograd, their outputs carry no graph: computed again)
        self.overwritten.update(range(first, len(self.graph.nodes)))
        ref = self.refs.get(id(result))
        if ref is not None:  # (the write is the result's node)
            self.note_write(func, target, ref.node)
        self.before_writes(func, [target], True)
        carry = None if axes is None else axes.before(func, args, kwargs)
        out = func(*args, **kwargs)
        if axes is not None:
            axes.after(carry, args, out)
        if ref is None or out is not target:  # (never seen: refused rather than guessed)
            self.graph.unsupported.append(f"{func} (its out-of-place result not recorded)")
        else:
            self.refs[id(target)] = ref  # (both alive: the result as its node's output)
        if base is not None and base_after is not None:
            self.refs[id(base)] = self.refs[id(base_after)]
        return out

    def refuse(self, func: Any, touches_x: bool) -> None:
        """Note what no replay can reproduce: a backward pass inside ``f`` (a score function
        ``grad(E(x), x)``: its calls read tensors autograd saved, which are no recorded
        calls' outputs), and a custom ``autograd.Function``, whose ``forward`` runs with
        autograd off like a ``no_grad`` block but, unlike one, with forward-mode AD off too
        (``capture`` turns it on around ``f``)."""
        if torch._C._current_graph_task_id() != self.task:
            self.graph.unsupported.append("a backward pass (autograd.grad) inside f")
        elif (
            touches_x
            and not torch.is_grad_enabled()
            and not torch._C._is_fwd_grad_enabled()
            and not torch.is_inference_mode_enabled()
        ):
            self.graph.unsupported.append(custom_function())

    def untracked(self, flat: list[Any]) -> None:
        """Note the tensors among ``flat`` that no recorded call made but that may hold values
        computed from ``x``, which a replay would take for constants: a ``torch.Tensor``
        subclass (its ``__torch_function__`` wraps every result in a new object, made outside
        ATen: MONAI's ``MetaTensor``, ``as_subclass``), a tensor sharing memory with one
        computed from ``x`` (``Tensor.data``, ``as_subclass(torch.Tensor)``), and one whose
        elements an in-place write through another tensor changed after it was made (a replay
        would read them from before the write: ``rewritten``, ``replayed_before``)."""
        for a in flat:
            if not isinstance(a, torch.Tensor):
                continue
            kind = type(a)
            if kind is not torch.Tensor and kind is not torch.nn.Parameter:
                self.graph.unsupported.append(subclass(kind))
            elif self.rewrites and (op := self.rewritten(a)):
                self.graph.unsupported.append(
                    f"{op} writing into memory shared with a tensor read after it"
                )
            elif self.computed and id(a) not in self.refs and self.made_outside(a):
                self.graph.unsupported.append(
                    "a tensor made outside ATen (Tensor.data, as_subclass) sharing memory "
                    "with one computed from x"
                )
            elif id(a) in self.stale:
                self.graph.unsupported.append(
                    "an in-place write on a tensor f read before (another tensor sharing "
                    "its memory read after the write)"
                )

    def made_outside(self, a: torch.Tensor) -> bool:
        """Whether ``a``, a tensor no recorded call made, shares memory with one computed
        from ``x``; ``x``'s own memory excepted: the caller's ``x`` object read by ``f`` (a
        closure) is a constant, as ``Tensor.data`` of ``x`` is to reverse mode."""
        storage = _storage(a)
        return storage in self.computed and storage != self.x_storage

    def note_reads(self, flat: list[Any], outs: list[Any]) -> None:
        """Remember which storages the call about to be recorded reads (``flat``: the leaves
        of its arguments), and whether its result is a view of one of them."""
        index = len(self.graph.nodes)
        results = [(_storage(t), id(t)) for t in outs if isinstance(t, torch.Tensor)]
        made = {storage for storage, _ in results}
        for a in flat:
            if isinstance(a, torch.Tensor):
                storage = _storage(a)
                self.readers.setdefault(storage, []).append((index, id(a)))
                if storage in made:
                    self.viewed.add(storage)
                    self.aliasing.add((index, storage))
                    made.discard(storage)
        for storage in made:
            self.fresh.setdefault(storage, index)
        for storage, ident in results:
            if storage in self.fresh:
                self.sharing.setdefault(storage, []).append(ident)

    def reads_written(self, written: list[torch.Tensor], flat: list[Any]) -> bool:
        """Whether a call writing values computed from ``x`` into ``written`` (its arguments'
        leaves ``flat``) reads what it writes (``Graph.reads_written``): its other arguments
        depend on ``x``, and a recorded call read the values of a written storage before, or
        one of them lives there (``b.mul_(b[:2])``). A call that only made a view of it (a
        slice saves no tensor for the derivatives) read none: an FNO's ``out =
        zeros_like(f); out[..., :m, :m] = mixed`` writes nothing it read."""
        stores = {_storage(t) for t in written}
        others = [a for a in flat if not any(a is t for t in written)]
        read = any(
            (index, storage) not in self.aliasing
            for storage in stores
            for index, _ in self.readers.get(storage, ())
        ) or any(isinstance(a, torch.Tensor) and _storage(a) in stores for a in others)
        return read and self.depends(others)

    def before_writes(self, func: Any, written: list[torch.Tensor], depends: bool) -> None:
        """Before ``func`` writes in place: keep each written tensor's value for
        ``Graph.undo``. The calls recorded before that read it must see the old value in a
        replay: when they read a tensor from outside ``f`` (a buffer), not a view of it,
        written for the first time, they are given a copy of it; anything harder (a second
        write, a write through a view, a view read later, a write to ``x``) is refused."""
        for tensor in written:
            storage = _storage(tensor)
            own = depends and id(tensor) in self.refs and storage not in self.kept
            if own:
                self.overwrite(tensor, storage)
            else:
                self.mutated = True
            if storage == self.x_storage:
                self.graph.unsupported.append(f"{func} writing to x")
                continue
            if storage not in self.fresh:
                self.graph.outside.add(storage)
            if not depends and self.constant_write(tensor, storage):
                self.graph.changed.append(Before.of(tensor))
                self.readers.pop(storage, None)
                self.written.add(storage)
                continue
            if depends and id(tensor) in self.refs:  # recorded out of place (``functional``)
                if storage in self.kept:
                    self.keep_before(func, storage)
                if storage not in self.fresh:
                    # memory outside f (a view of a parameter's ``.data``: FrEIA's ActNorm,
                    # ``scale.data.view(-1)[:] = ...``), which ``Graph.undo`` puts back: not
                    # kept, a refusal's recording left the layer initialised, its flag unset
                    self.graph.changed.append(Before.of(tensor))
                continue
            if not depends and self.holds_dependent(storage):
                # autograd keeps the tensor's history through a write it does not see (reverse
                # mode differentiates as if the write had not happened; forward mode as if it
                # had): no replay reproduces either
                self.graph.unsupported.append(
                    f"{func} under no_grad (a write autograd does not record)"
                )
                continue
            if depends:  # a call on x that also updates state (training-mode batch norm)
                self.graph.unsupported.append(f"{func} updating a tensor besides its result")
            self.graph.changed.append(Before.of(tensor))
            before = self.graph.changed[-1].value
            readers = self.readers.pop(storage, [])
            simple = (
                id(tensor) not in self.refs
                and tensor._base is None
                and storage not in self.viewed | self.written
                and all(read == id(tensor) for _, read in readers)
            )
            replayed = self.replayed_before(tensor, storage)
            self.written.add(storage)
            if not readers or replayed:
                continue
            if not simple or tensor.requires_grad:
                self.graph.unsupported.append(f"{func} on a tensor f read before")
                continue
            for index, _ in readers:
                node = self.graph.nodes[index]
                node.args, node.kwargs = map_leaves(
                    _replacing(tensor, before), (node.args, node.kwargs)
                )

    def overwrite(self, tensor: torch.Tensor, storage: int) -> None:
        """Note (``overwritten``) the recorded nodes whose outputs live in ``storage``, which
        a write into ``tensor`` of values computed from ``x``, recorded out of place, is
        about to change: their values are no longer those the nodes computed."""
        self.overwritten.update(self.storages.holding(storage))

    def constant_write(self, tensor: torch.Tensor, storage: int) -> bool:
        """Whether a write of constants into ``tensor`` is one into a constant ``f`` made
        itself (a Levi-Civita or Clebsch-Gordan tensor built per call: ``eps = zeros(3, 3,
        3); eps[0, 1, 2] = 1; ...``, ``torch.ones(n, n).fill_diagonal_(0)``, a mask's
        ``masked_fill_``): its storage allocated by a call a replay runs again (not a random
        draw's kept output, ``replayed_before``'s condition), or already ``filled``, holding
        nothing computed from ``x`` (a write under ``no_grad`` there is refused as before).
        It then joins ``filled``: the calls that read it before read the replayed
        allocation, those after a copy of what they read (``read``), so any number of
        writes, through any views, are replayed as ``f`` made them."""
        if storage in self.computed:  # (values from x there: a write under no_grad)
            return False
        if storage in self.filled:
            return True
        made = self.fresh.get(storage)
        if made is None or storage in self.written or tensor.requires_grad:
            return False
        if self.graph.nodes[made].kept is not None:
            return False
        self.filled.add(storage)
        return True

    def keep_before(self, func: Any, storage: int) -> None:
        """Before ``func``, a write of values computed from ``x`` recorded out of place, changes
        ``storage``: the kept outputs there (``Node.kept``, the tensor objects ``f`` made, which
        a replay reads) are kept as copies of their values now, which the calls reading them
        read in ``f`` (``eps = torch.rand_like(h); eps.mul_(std(h))``: the replay read the
        product). A kept output that requires grad (a constant written with a parameter's
        values) cannot be copied here, below autograd: such a write is refused."""
        for index in self.kept.pop(storage):
            node = self.graph.nodes[index]
            kept = node.kept or []
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in kept):
                self.graph.unsupported.append(
                    f"{func} on a tensor that requires grad and a random or in-place call made"
                )
                return
            node.kept = [
                t.clone() if isinstance(t, torch.Tensor) and _storage(t) == storage else t
                for t in kept
            ]

    def replayed_before(self, tensor: torch.Tensor, storage: int) -> bool:
        """Whether a replay gives the calls that read ``storage`` before this first write to
        it, through ``tensor``, their values from before it, without copies: a constant
        allocated inside ``f`` by a call a replay runs again (not a random draw's kept
        output), with every tensor ``f`` got there from a recorded call. The written tensor
        is the write's own result in a replay; the others sharing its memory keep their
        values from before the write there, so reading one later is refused
        (``_Recorder.untracked``). So ``torch.zeros_like(mask, dtype=d).masked_fill_(mask,
        -inf)`` (``nn.MultiheadAttention``'s boolean masks), where PyTorch hands ``f`` a
        ``detach`` of the tensor the recorder keeps, is recorded."""
        made = self.fresh.get(storage)
        if made is None or storage in self.written or tensor.requires_grad:
            return False
        if self.graph.nodes[made].kept is not None:
            return False
        self.stale.update(i for i in self.sharing.get(storage, ()) if i != id(tensor))
        return True

    def holds_dependent(self, storage: int) -> bool:
        """Whether a tensor computed from ``x`` (recorded as depending on it) lives in
        ``storage``."""
        return any(
            isinstance(t, torch.Tensor)
            and self.refs.get(id(t)) in self.dependent
            and _storage(t) == storage
            for t in leaves(self.alive)
        )

    def keep_generator(self, func: Any, kwargs: Any) -> None:
        """A ``torch.Generator`` a random call draws from, for ``Graph.undo``."""
        generator = kwargs.get("generator")
        if (
            generator is not None
            and _facts(func).random
            and all(restore != generator.set_state for restore, _ in self.graph.rng)
        ):
            self.graph.rng.append((generator.set_state, generator.get_state()))


def decomposed_in_place(func: Any, rules: Container[Any]) -> bool:
    """Whether ``func`` is an in-place op on its first argument without a rule, which
    ``dispatch`` would decompose into its out-of-place op and a ``copy_`` (that the
    recording cannot replay), whose out-of-place op has a rule or a decomposition:
    ``silu_``, ``elu_``, ``mish_``, ``hardtanh_``, ``hardswish_`` (``nn.SiLU``,
    ``nn.ELU``/``nn.SELU``/``nn.CELU``, ``nn.Mish``, ``nn.ReLU6``, ... with
    ``inplace=True``), ``addcmul_``, ``lerp_``; also those not decomposed whose
    out-of-place op is (``aten.selu_``), and ``copy_``, ``fill_``, ``zero_`` (``_WRITTEN_AS``).
    Recorded by ``write_out_of_place``. (``relu_``, ``sigmoid_``, ``add_``: their out-of-place
    op by ``functional``.)"""
    if func in rules or torch.Tag.inplace_view in func.tags:
        return False
    if func in _WRITTEN_AS:
        return True
    facts = _facts(func)
    functional = facts.functional
    if not facts.in_place or functional is None or facts.random:  # (one draw, not two)
        return False
    if functional in rules:
        return func in _DECOMPOSITIONS
    return functional in _DECOMPOSITIONS


class OutOfPlace(NamedTuple):
    """An in-place write as ``written_out_of_place`` records it: the out-of-place op's
    ``result`` (``None`` where it does not fit the target: PyTorch promotes out of place and
    casts back in place), and where the target is a view (``through_view``), its ``base``
    and that base with ``result`` scattered into it (``base_after``)."""

    result: torch.Tensor | None
    base: torch.Tensor | None
    base_after: torch.Tensor | None


def written_out_of_place(
    mode: DispatchMode, func: Any, args: Any, kwargs: Any, refs: dict[int, Ref]
) -> OutOfPlace:
    """Under ``mode`` (the recorder, or the template check that must see the same calls):
    the calls that stand for the in-place ``func`` on its first argument ``t``
    (``decomposed_in_place``, ``through_view``): ``r = op(t, ...)`` (``out_of_place``), and,
    where ``t`` is a view of a tensor ``f`` made (``refs``), that tensor with ``r``
    ``scattered`` into it. The write itself is left to the caller."""
    target = args[0]
    with mode:
        result = out_of_place(func)(*args, **kwargs)
    if not isinstance(result, torch.Tensor) or (result.shape, result.dtype, result.device) != (
        target.shape,
        target.dtype,
        target.device,
    ):
        return OutOfPlace(None, None, None)
    base = through_view(func, args, refs)
    if base is None:
        return OutOfPlace(result, None, None)
    placed = placing(base, target)  # (constants, outside the mode)
    with mode:
        return OutOfPlace(result, base, scattered(base, result, *placed))


def note_rewrite(
    rewrites: dict[int, list[tuple[int, Strided, str]]],
    func: Any,
    target: torch.Tensor,
    node: int,
    others: Iterable[Any],
) -> None:
    """Note in ``rewrites`` (by storage) a write by ``func`` into ``target``, recorded out of
    place as node ``node``, where another tensor among ``others`` shares ``target``'s memory
    (a replay would leave its elements as they were: ``rewritten_by`` finds a later read of
    one). In-place view ops (``transpose_``) change no elements. The recorder's
    (``_Recorder.note_write``) and the template check's (``cache._Checker._write``)."""
    storage = _storage(target)
    if torch.Tag.inplace_view in func.tags:
        return
    if any(
        isinstance(t, torch.Tensor) and t is not target and _storage(t) == storage for t in others
    ):
        rewrites.setdefault(storage, []).append((node, strided(target), str(func)))


def through_view(func: Any, args: Any, refs: dict[int, Ref]) -> torch.Tensor | None:
    """For an in-place op on its first argument ``t`` (``h[:, 0] = v``: ``copy_`` on a
    ``select`` of ``h``; ``h[:, :2].mul_(2)``), ``t``'s base ``b`` where a replay can give
    ``b`` the write: ``t`` a view (``t._base``) of ``b``, a tensor ``f`` made of ``t``'s
    dtype whose elements lie apart in memory (contiguous or not: ``(h.t() * 2)`` keeps
    ``h.t()``'s strides; not an ``expand``), sharing its memory; else ``None``. The write is
    then recorded as its out-of-place op and ``b`` as ``scattered``
    (``_Recorder.write_out_of_place``): ``b`` read later (``h`` returned) sees the write, as
    in eager PyTorch."""
    facts = _facts(func)
    if not facts.in_place or facts.random or torch.Tag.inplace_view in func.tags:
        return None
    target = args[0] if args else None
    if not isinstance(target, torch.Tensor) or out_of_place(func) is None:
        return None
    base = target._base
    if base is None or id(base) not in refs or base.dtype != target.dtype:
        return None
    if _storage(base) != _storage(target) or not _apart(base):
        return None
    return base


def restrided(func: Any, args: Any) -> bool:
    """Whether ``func`` is an ``as_strided_`` that keeps its tensor's shape, offset and the
    strides of every dimension of more than one element (only those of size-1 dimensions
    change): each element stays where it was, its value too. ``adaptive_avg_pool2d`` to
    ``1 x 1`` of a channels-last input (torchvision's Swin and ConvNeXt pool a permuted
    ``(B, H, W, C)`` tensor) takes the mean and gives it channels-last strides so."""
    if func is not aten.as_strided_.default:
        return False
    t, size, stride, *offset = args
    if tuple(size) != tuple(t.shape) or (offset and offset[0] not in (None, t.storage_offset())):
        return False
    return all(n == 1 or a == b for n, a, b in zip(t.shape, t.stride(), stride, strict=True))


def _apart(t: torch.Tensor) -> bool:
    """Whether each element of ``t`` has a place in memory of its own: its dimensions of
    more than one element, by increasing stride, each step past the span of those before
    (a contiguous tensor, or one permuted, sliced, or computed elementwise from such, which
    keeps the strides; not an ``expand``, stride 0)."""
    reach = 1
    for stride, size in sorted((k, n) for n, k in zip(t.shape, t.stride(), strict=True) if n > 1):
        if stride < reach:
            return False
        reach = stride * size
    return True


def placing(base: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Constants for ``scattered``: the positions in ``base.reshape(-1)`` of the elements of
    ``view`` (a view of ``base``, whose elements lie apart in memory: ``through_view``;
    elements in ``view``'s order), a mask of them over ``base``'s elements, and zeros of
    ``base``'s size and dtype (``-0.0``: adding a ``-0.0`` written keeps its sign).
    The positions: ``base``'s element order written into ``base``'s places of a scratch
    memory (``as_strided`` with ``base``'s strides), read at ``view``'s places."""
    n, device = base.numel(), base.device
    offset = view.storage_offset() - base.storage_offset()
    order = torch.arange(n, device=device)
    if base.is_contiguous():
        memory = order
    else:
        sizes, strides = base.shape, base.stride()
        span = 1 + sum(max(size - 1, 0) * step for size, step in zip(sizes, strides, strict=True))
        memory = torch.empty(span, dtype=order.dtype, device=device)
        memory.as_strided(sizes, strides).copy_(order.view(sizes))
    positions = memory.as_strided(view.shape, view.stride(), offset).reshape(-1)
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[positions] = True
    return positions, mask, torch.full((n,), -0.0, dtype=base.dtype, device=device)


def scattered(
    base: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    zeros: torch.Tensor,
) -> torch.Tensor:
    """``base`` with the elements of its view written replaced by ``values`` (of the view's
    shape; ``placing`` gave the rest), in ops with rules: ``where(mask, put, base)`` with
    ``put`` the values placed by ``index_put(..., accumulate=True)`` into zeros (each place
    once), flat; ``where``, not ``mask * put + ...``: ``base`` may hold ``inf`` or ``nan``
    there (``torch.empty``)."""
    flat = aten.reshape.default(base, [-1])  # (a copy where base is not contiguous)
    put = aten.index_put.default(zeros, [positions], aten.reshape.default(values, [-1]), True)
    return aten.view.default(aten.where.self(mask, put, flat), list(base.shape))


def _copied(target: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``target.copy_(src)`` out of place: ``src`` broadcast to ``target``'s shape, in its
    dtype (``torch.sinc_``'s replacement, ``SafeDerivatives``, writes ``_sinc(a)`` back so;
    ``torch.empty_like(h).copy_(v)``)."""
    out = src if src.shape == target.shape else aten.expand.default(src, list(target.shape))
    if out.dtype != target.dtype:
        return aten._to_copy.default(out, dtype=target.dtype)
    return aten.clone.default(out)


def _full(target: torch.Tensor, value: Any = 0) -> torch.Tensor:
    """``target.fill_(value)`` (``h[:, 0] = 0.5``), ``target.zero_()`` out of place: a constant."""
    return aten.full.default(list(target.shape), value, dtype=target.dtype, device=target.device)


# in-place ops on their first argument recorded as a function of their arguments where their
# out-of-place op has no rule (``aten.copy`` has no decomposition either, ``aten.fill``'s
# is a ``copy``)
_WRITTEN_AS: dict[Any, Callable[..., torch.Tensor]] = {
    aten.copy_.default: _copied,
    aten.fill_.Tensor: _copied,
    aten.fill_.Scalar: _full,
    aten.zero_.default: _full,
}


def out_of_place(func: Any) -> Callable[..., Any]:
    """What ``write_out_of_place`` records for the in-place ``func`` (``decomposed_in_place``)."""
    return _WRITTEN_AS.get(func) or _facts(func).functional


_CONTRACTIONS = {  # op -> the argument whose last dimension is summed over
    torch.ops.aten.mm.default: 0,
    torch.ops.aten.bmm.default: 0,
    torch.ops.aten.addmm.default: 1,
    torch.ops.aten.baddbmm.default: 1,
}


def differentiable(outs: list[Any]) -> bool:
    """Whether a call's results carry derivatives: floating or complex tensors (eigvals, fft:
    never mistaken for constants); results without them (indices) are constants."""
    return any(
        isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) for t in outs
    )


# why a graph is unsupported where f detaches in place: forward mode ignores it too
IN_PLACE_DETACH = "Tensor.detach_ (a detach in place, which ATen does not see; use .detach())"
# and where f reads requires_grad of a tensor computed from x: False while recording, True
# where plain autograd differentiates f, so f may take another branch there (a deep
# equilibrium model registers its implicit backward's hook only `if z.requires_grad`)
READS_REQUIRES_GRAD = (
    "Tensor.requires_grad read on a tensor computed from x (False while recording: f may "
    "branch on it, as a DEQ registering its gradient hook only if z.requires_grad)"
)


class _InPlaceDetach(TorchFunctionMode):
    """Note ``Tensor.detach_()`` on a tensor computed from ``x`` (``recorder.depends``): the
    autograd layer handles it without an ATen call, so the recording would keep the tensor's
    dependence on ``x`` where every other engine sees a constant. Also note a read of such a
    tensor's ``requires_grad`` that gives ``False`` (``READS_REQUIRES_GRAD``): the recording
    may have followed a branch that plain autograd does not (a frozen DEQ gave its one-step
    Jacobian, 0.12 off its implicit divergence, under ``"auto"``)."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if self.recorder.graph.lean and replaced(func):
            self.recorder.graph.lean = False
        if func is torch.Tensor.detach_ and self.recorder.depends(list(args[:1])):
            self.recorder.graph.unsupported.append(IN_PLACE_DETACH)
        out = func(*args, **(kwargs or {}))
        if (
            read_requires_grad_false(func, out)
            and self.recorder.depends(list(args[:1]))
            and not read_by_torchdiv()
        ):
            self.recorder.graph.unsupported.append(READS_REQUIRES_GRAD)
        return out


def replaced(func: Any) -> bool:
    """Whether ``replacing()`` changes the calls ``func`` makes: attention (on the math
    backend), a ``SafeDerivatives(1)`` replacement (as its ``__torch_function__`` chooses)."""
    entry = REPLACEMENTS.get(func)
    return entry is not None and (entry.applies(1, True) or func is torch.cosine_similarity)


def _products(func: Any, args: Any, outs: list[Any]) -> int:
    """Multiply-adds of a matrix product or convolution (0 for anything else)."""
    out = outs[0] if outs and isinstance(outs[0], torch.Tensor) else None
    if out is None:
        return 0
    if func in _CONTRACTIONS:
        return out.numel() * args[_CONTRACTIONS[func]].shape[-1]
    if func == torch.ops.aten.convolution.default:  # weight: (out, in / groups, *kernel)
        weight = args[1]
        return out.numel() * (weight.numel() // max(weight.shape[0], 1))
    return 0


class Strided(NamedTuple):
    """Where a tensor's elements lie in its storage: ``as_strided``'s arguments, with the
    element size and whether they fill their span (contiguous)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    itemsize: int
    contiguous: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def span(self) -> tuple[int, int]:
        """The first and last storage offsets of its elements (not empty)."""
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True))
        return self.offset, last


def strided(t: torch.Tensor) -> Strided:
    return Strided(
        tuple(t.shape), t.stride(), int(t.storage_offset()), t.element_size(), t.is_contiguous()
    )


# the most storage elements ``overlapping`` marks to tell strided tensors apart (4 MiB of
# flags); beyond it they are taken to overlap (a later read of one is refused: at worst the
# generic engines run, as before)
MASK_ELEMENTS = 1 << 22


def overlapping(target: Strided, others: list[Strided]) -> list[Strided]:
    """The tensors among ``others`` (of ``target``'s storage) that have an element in common
    with ``target``: their spans of storage offsets meet and, unless one of the two fills its
    span (contiguous), their strided index sets meet, read from a mask of ``target``'s
    elements over the span (the columns of ``gates.unsafe_chunk(3, 1)`` interleave but never
    meet). Tensors of another element size (``view(dtype)``) are taken to overlap."""
    found, masked = [], []
    for t in others:
        if t.itemsize != target.itemsize:
            found.append(t)
        elif t.numel == 0 or target.numel == 0 or not _spans_meet(t, target):
            continue
        elif t.contiguous or target.contiguous:
            found.append(t)
        else:
            masked.append(t)
    if not masked:
        return found
    spans = [t.span for t in (target, *masked)]
    low, high = min(lo for lo, _ in spans), max(hi for _, hi in spans)
    if high - low >= MASK_ELEMENTS:
        return found + masked
    mask = torch.zeros(high - low + 1, dtype=torch.bool)
    start, stop = spans[0]
    offsets = torch.arange(start - low, stop - low + 1)  # an index: target may repeat elements
    mask[offsets.as_strided(target.shape, target.stride, target.offset - start)] = True
    return found + [
        t for t in masked if bool(mask.as_strided(t.shape, t.stride, t.offset - low).any())
    ]


def rewritten_by(
    rewrites: dict[int, list[tuple[int, Strided, str]]], refs: dict[int, Ref], a: torch.Tensor
) -> str | None:
    """The op of a write in ``rewrites`` (by storage: the node recording it, the elements it
    wrote, the op; ``_Recorder.note_write``) that changed some of ``a``'s elements after
    ``a`` was made (by the node of its ``Ref`` in ``refs``), or ``None``: a replay would give
    ``a`` its values from before the write."""
    writes = rewrites.get(_storage(a))
    if not writes:
        return None
    ref = refs.get(id(a))
    made = -1 if ref is None else ref.node
    here = strided(a)
    for node, written, op in writes:
        if node > made and overlapping(written, [here]):
            return op
    return None


class Storages:
    """Which nodes have an output living in a storage, read from ``outputs`` (each node's
    outputs from position ``skip`` on, a list that grows as ``f`` runs) when asked: each
    node's storages are found once, so a write costs no walk over every node (a deep net
    with an in-place activation per layer)."""

    def __init__(self, outputs: list[Any], skip: int = 0) -> None:
        self.outputs, self.skip, self.done = outputs, skip, skip
        self.nodes: dict[int, list[int]] = {}

    def holding(self, storage: int) -> list[int]:
        """The nodes with an output in ``storage``, in order."""
        for i in range(self.done, len(self.outputs)):
            found = {_storage(t) for t in leaves(self.outputs[i]) if isinstance(t, torch.Tensor)}
            for s in found:
                self.nodes.setdefault(s, []).append(i - self.skip)
        self.done = len(self.outputs)
        return self.nodes.get(storage, [])


def _spans_meet(a: Strided, b: Strided) -> bool:
    (a_low, a_high), (b_low, b_high) = a.span, b.span
    return a_low <= b_high and b_low <= a_high


def lifted(func: Any, args: Any) -> bool:
    """Whether ``func(*args)`` is the ``lift_fresh`` of memory PyTorch allocated just before:
    ``torch.tensor(data)``'s copy of Python data, new memory of ``f``'s as a factory's. (It
    aliases its argument; ``torch.from_numpy(a)``/``as_tensor(a)`` lift an array's memory,
    which is not resizable: maybe a global, state outside ``f``.)"""
    if func is not aten.lift_fresh.default:
        return False
    try:
        return bool(args[0].untyped_storage().resizable())
    except (RuntimeError, NotImplementedError):  # (a transform's wrapper: no storage)
        return False


def _storage(t: torch.Tensor) -> int:
    """Where ``t``'s elements live (views share it); a tensor without storage is its own. A
    meta or ``FakeTensorMode`` tensor, or an empty one, has no memory (its ``data_ptr`` is 0,
    deprecated for a fake one): its storage object stands for it, which its views share (the
    Python tensor did before: a view of an empty tensor ``f`` made, written in place, was a
    write to another storage, outside ``f``, whose version counter ``_exact.state.Changes``
    set back between evaluations; the first's graph then raised "modified by an inplace
    operation"). (A plain tensor's type is tested first: the ``FakeTensor`` test cost ~5 us
    a watched call, 39 of these, perfcheck23.)"""
    try:
        if type(t) is not torch.Tensor and isinstance(t, FakeTensor):
            return t.untyped_storage()._cdata
        return storage_address(t) or t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...
        return id(t)


def _kept(func: Any, leaves: list[Any], writes: bool) -> list[Any] | None:
    """The outputs of a random or mutating op, which a replay must not run again: a second
    dropout mask, or a buffer incremented once more (or an ``out=`` op that autograd refuses)."""
    return leaves if writes or _facts(func).random else None


class _Facts(NamedTuple):
    """What recording needs from an op's schema and tags, read once per op (reading them
    took a fifth of a small network's recording): whether it is random and whether it is in
    place on its first argument, with the out-of-place op of the same overload (``None`` if
    there is none); the arguments it writes: ``written_arguments``."""

    random: bool
    in_place: bool
    functional: Any


_FACTS: dict[Any, _Facts] = {}


def _facts(func: Any) -> _Facts:
    facts = _FACTS.get(func)
    if facts is None:
        schema = func._schema
        name = schema.name.split("::")[-1]
        first = schema.arguments[0].alias_info if schema.arguments else None
        in_place = (
            name.endswith("_") and not name.startswith("_") and first is not None and first.is_write
        )
        packet = getattr(torch.ops.aten, name[:-1], None) if in_place else None
        facts = _FACTS[func] = _Facts(
            torch.Tag.nondeterministic_seeded in func.tags,
            in_place,
            _out_of_place(func, packet) if packet is not None else None,
        )
    return facts


def _out_of_place(func: Any, packet: Any) -> Any:
    """The overload of ``packet`` (the out-of-place op of the in-place ``func``) that takes
    ``func``'s arguments: the one of the same name, unless that takes others (``pow_.Scalar``
    is ``Tensor ** number``, as ``pow.Tensor_Scalar``; ``pow.Scalar`` is ``number ** Tensor``,
    and recording it so had the replay take the jet for the base), then the one whose
    arguments have ``func``'s types; ``None`` if there is none."""

    def signature(op: Any) -> list[tuple[str, bool, str | None]]:
        arguments = op._schema.arguments
        return [(str(a.type), a.kwarg_only, a.name if a.kwarg_only else None) for a in arguments]

    wanted = signature(func)
    named = getattr(packet, func._overloadname, None)
    others = [getattr(packet, name) for name in packet.overloads()]
    return next((op for op in (named, *others) if op is not None and signature(op) == wanted), None)


# training-mode batch norm updates its running statistics (arguments 3 and 4) in place,
# though its schema does not say so
_BATCH_NORMS = {
    torch.ops.aten.native_batch_norm.default,
    torch.ops.aten._native_batch_norm_legit.default,
}


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors an ATen call writes to (its schema marks them; batch norm's statistics)."""
    out = []
    if func in _BATCH_NORMS and len(args) > 5 and args[5]:
        out += [t for t in args[3:5] if isinstance(t, torch.Tensor)]
    return out + written_arguments(func, args, kwargs)


def _random_states(x: torch.Tensor) -> list[tuple[Callable[[Any], None], Any]]:
    """Ways to put back torch's random number generators ``f`` may draw from. (Not Python's
    and NumPy's global ones, ``GLOBALS``: reading NumPy's state costs 60-65 us, 4-9% of every
    recording of a small Laplacian, perfcheck19; a refused call that records ``f`` to name
    the cause leaves them one evaluation's draws further on.)"""
    states: list[tuple[Callable[[Any], None], Any]] = [
        (torch.random.set_rng_state, torch.random.get_rng_state())
    ]
    if x.is_cuda:
        device = x.device
        states.append(
            (lambda s: torch.cuda.set_rng_state(s, device), torch.cuda.get_rng_state(device))
        )
    return states


def subclass(kind: type) -> str:
    """What ``UnsupportedOp`` says of a ``torch.Tensor`` subclass met while recording (a
    ``DTensor`` is made by tensor parallelism's modules whatever ``x`` is: no plain ``x``)."""
    if kind.__qualname__ == "FakeTensor":
        return (
            "FakeTensorMode's tensors (shape-only tracing: recording cannot follow a fake "
            "tensor; it runs on meta tensors, model.to('meta') and x.to('meta'), or use "
            "method='auto')"
        )
    way = "" if kind.__qualname__ == "DTensor" else "; a plain tensor: x.as_subclass(torch.Tensor)"
    return (
        f"the torch.Tensor subclass {kind.__qualname__} (recording cannot follow the tensors "
        f"its __torch_function__ makes{way})"
    )


def plain(x: torch.Tensor) -> bool:
    """Whether ``x`` is a plain tensor (or a parameter), which ``f`` can be recorded at."""
    return type(x) is torch.Tensor or type(x) is torch.nn.Parameter


def argument(x: torch.Tensor) -> torch.Tensor:
    """What ``f`` is called on when it is recorded or checked: a new alias of ``x`` (a view,
    differentiable to ``x``), so that a tensor ``f`` reads from outside, the caller's ``x``
    object included (``lambda z: bc(x) * net(z)``), is a constant of ``f``, as the other
    engines see it, and never taken for the argument by its ``id``. Made with grad on: a
    view made under the caller's ``no_grad`` would require grad without a ``grad_fn``, and
    ``f``'s own ``autograd.grad(E(z).sum(), z)`` (a score) found ``z`` unused."""
    with torch.enable_grad():
        return x.view_as(x)


def outputs(made: list[Any], overwritten: set[int]) -> list[list[Any]]:
    """Every node's outputs (``made``, as each call returned them) for ``Graph.values``, those
    of the ``overwritten`` nodes as ``None`` each."""
    values = [leaves(out) for out in made]
    for i in overwritten:
        values[i] = [None] * len(values[i])
    return values


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """The modes ``f`` runs under while it is recorded (or checked, ``torchdiv._taylor.cache``):
    grad mode on (its own ``no_grad`` blocks show) and forward-mode AD on (a custom
    ``autograd.Function``'s ``forward`` shows), attention as primitives, ``SafeDerivatives(1)``."""
    with torch.enable_grad(), _set_fwd_grad_enabled(True), replacing():
        yield


@contextlib.contextmanager
def replacing() -> Iterator[None]:
    """``recording()``'s modes that choose which ops ``f`` runs: attention as primitives,
    ``SafeDerivatives(1)``."""
    with math_attention(), SafeDerivatives(1, "method='auto'", recording=True):
        yield


def capture(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    rules: Container[Any],
    keep_values: bool = False,
    batch_dims: int | None = None,
) -> Graph:
    """Record the ATen calls of ``f(x)`` (evaluated once, with grad enabled around ``f`` so
    that its own ``no_grad`` blocks show).

    ``rules`` holds the ops that have a propagation rule; dependent calls outside it are
    decomposed where PyTorch can, else listed in ``Graph.unsupported`` (so are a backward
    pass or a custom ``autograd.Function`` inside ``f``, a write to ``x``, writes that a
    replay cannot reproduce (see ``_Recorder.before_writes``), and a ``torch.func``
    transform around the call, under which ``f`` is not even called). ``keep_values`` keeps
    every call's outputs in ``Graph.values`` (differentiable, as ``f`` computed them), unless
    ``f`` ran an in-place op. A caller that gives up on the graph and evaluates ``f`` again
    calls ``Graph.undo()`` first. With ``batch_dims``, an ``f`` that mixes samples raises
    ``BatchInteractionError`` (``torchdiv._core.mixing``), with nothing ``f`` changed left changed.
    """
    if peek_interpreter_stack() is not None:
        # under vmap/grad/jvp the calls carry unwrapped tensors: nothing can be recorded
        return Graph(unsupported=["a torch.func transform around the call"])
    if not plain(x):  # nothing evaluated: each result of f would be a new, unlinked object
        return Graph(unsupported=[subclass(type(x))])
    z = argument(x)
    recorder = recorder_at(z, rules, batch_dims)
    outer_grad = torch.is_grad_enabled()
    try:
        with recording(), recorder, watching(recorder):
            y = f(z)
    except Exception:  # f's own error (or a refusal): what f changed so far is put back, as
        recorder.graph.undo()  # after a mixing refusal; a caller that goes on evaluates f again
        raise
    return finished(recorder, y, outer_grad, keep_values)


def recorder_at(z: torch.Tensor, rules: Container[Any], batch_dims: int | None) -> _Recorder:
    """A recorder of ``f(z)`` (``z``: ``argument(x)``), watching it for sample mixing with
    ``batch_dims``, with what ``Graph.undo`` puts back as it is now."""
    recorder = _Recorder(z, rules, None if batch_dims is None else tracker(z, batch_dims))
    recorder.graph.rng = _random_states(z)
    recorder.graph.settings = Settings()
    return recorder


def watching(recorder: _Recorder) -> contextlib.ExitStack:
    """The torch-function modes a recording runs under besides ``recording()``'s: in-place
    ``detach_`` and ``requires_grad`` reads (``_InPlaceDetach``), values read outside the
    dispatcher for the mixing watch (``reading``)."""
    stack = contextlib.ExitStack()
    stack.enter_context(_InPlaceDetach(recorder))
    stack.enter_context(reading(recorder.axes))
    return stack


def finished(recorder: _Recorder, y: Any, outer_grad: bool, keep_values: bool) -> Graph:
    """The ``Graph`` of ``recorder`` once ``f`` returned ``y`` (``outer_grad``: grad mode
    around the call): refusals of underivable ops and sample mixing (with what ``f`` changed
    put back), the output and, if ``keep_values``, every call's outputs."""
    if recorder.underivable is not None:
        recorder.graph.undo()  # (as for sample mixing, below)
        refuse_underivable(recorder.underivable, True)
    if recorder.axes is not None:
        try:
            recorder.axes.finish(y)
        except BatchInteractionError:
            recorder.graph.undo()  # a batch norm's statistics and step counter
            raise
        recorder.graph.verdict = recorder.axes.verdict()
        recorder.graph.indexed = recorder.axes.indexed
        recorder.axes = None  # let go of the tensors it followed
    recorder.untracked(leaves(y))
    recorder.graph.output = map_leaves(recorder.read if recorder.filled else recorder.ref, y)
    recorder.graph.output_shape = tuple(y.shape)
    recorder.graph.requires_grad = outer_grad and y.requires_grad
    if keep_values and not recorder.mutated:
        recorder.graph.values = outputs(recorder.alive[1:], recorder.overwritten)
        recorder.graph.overwritten = frozenset(recorder.overwritten)
    return recorder.graph


# a reentrant ``torch.utils.checkpoint`` as the recorders' refusals name it (``custom_function``)
REENTRANT_CHECKPOINT = "torch.utils.checkpoint(use_reentrant=True)"
CUSTOM_FUNCTION = "a custom autograd.Function"


def custom_function() -> str:
    """The custom ``autograd.Function`` whose ``forward`` runs now, as a refusal names it: a
    reentrant ``torch.utils.checkpoint`` (its ``CheckpointFunction`` on the stack) by that
    name, whose way out is another than a generic Function's (``way_out``)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is CheckpointFunction.forward.__code__:
            return f"{REENTRANT_CHECKPOINT}, {CUSTOM_FUNCTION}"
        frame = frame.f_back
    return CUSTOM_FUNCTION


def way_out(what: str, default: str) -> str:
    """The way out of a recording engine's refusal of ``what``: ``default`` (another
    method), but for a reentrant checkpoint, whose backward runs only under ``.backward()``
    and which no method differentiates, the non-reentrant one, which the recorders and
    ``"auto"`` do; and none for a custom op without a derivative (``UNDERIVED``), which no
    method differentiates: its registration."""
    if UNDERIVED in what:
        return (
            "no method differentiates such an op (plain autograd's backward pass neither): "
            "register_autograd for it, or write it in differentiable torch ops"
        )
    if REENTRANT_CHECKPOINT not in what:
        return default
    return (
        "pass use_reentrant=False to torch.utils.checkpoint, which this method and 'auto' "
        "differentiate (no method differentiates the reentrant one)"
    )
