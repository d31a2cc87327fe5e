"""Sample mixing seen in what ``f`` computes: which dimensions of each tensor index samples.

Every operator probes the batched ``f`` with vectors broadcast across the batch (NOTE
[Batching over basis vectors] in ``torchdiv._core.basis``), which is right only if sample ``b`` of
``f(x)`` depends on sample ``b`` of ``x`` alone. ``BatchAxes`` follows the batch dimensions of
``x`` through the ATen calls ``f`` makes, inside dispatch modes that watch ``f`` anyway (the
structured recorder, ``_plan.OpSizes``), and raises ``BatchInteractionError`` when the result
of ``f`` depends on an op that positively combined one across samples (a sum that only seeds
a backward pass inside ``f``, as in ``grad(energy(x).sum(), x)``, does not count):

* a matrix product contracting it (``Linear`` applied to an unbatched ``x``, whose samples
  are then the features; ``batch_dims`` set too high);
* a reduction over it (``sum``, ``mean``, ``softmax``, ``var``, ... over dimension 0);
* a normalisation over it (train-mode batch norm; layer or group norm over batch dimensions);
* a convolution across it (a batch dimension among the channels or spatial dimensions).

A single sample picked out of the batch (``x[0]``, ``x[:1]``, ``for xi in x``) is followed
too: combined with the whole batch (``x - x[0]``, ``x * x[-1:]``) it mixes samples (sample
``b`` of the result depends on the picked one); stacked back in order with the other samples
(``torch.stack([g(xi) for xi in x])``, ``torch.cat`` of ``x[i:i + 1]`` pieces) it is a batch
again.

Each batch dimension of a tensor is recorded as ``(position, size)``: the samples are the
outermost factor of that dimension (reshapes may merge it with the dimensions after it, as
``matmul`` does with ``(B, T, D) -> (B*T, D)``). Elementwise ops, broadcasts, reshapes that
keep the batch factor, transposes, slices and concatenations along other dimensions carry it;
any other op ends the tracking of its result, silently: the analysis never raises on what it
does not understand (indexing, fused attention kernels, ...), so it misses some mixing
(``check_batch_independence`` tests any ``f``) but never flags an independent ``f``.

``allow_batch_interaction()`` turns the detection off for code that means to mix samples.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_leaves

from torchdiv._core.checks import _shape
from torchdiv._core.modes import DispatchMode
from torchdiv._core.walk import BATCH_NORM_NODES, nodes

aten = torch.ops.aten
# each batch dimension of a tensor as (position, size, inner): along dimension ``position``,
# the sample index is ``(index // inner) % size``
Axes = tuple[tuple[int, int, int], ...]

_state = threading.local()


class BatchInteractionError(ValueError):
    """``f`` mixes samples, so per-sample derivatives of the batched ``f`` would be wrong."""


def unnamed(message: str) -> str:
    """A ``BatchInteractionError`` message without the names of the public calls it passed
    through (``"laplacian: f mixes samples: ..."`` from a call nested in ``biharmonic``)."""
    at = message.find("f mixes samples")
    return message[at:] if at > 0 else message


@contextlib.contextmanager
def allow_batch_interaction() -> Iterator[None]:
    """Turn off torchdiv's sample-mixing detection inside the ``with`` block (this thread).

    Every operator assumes that sample ``b`` of ``f(x)`` depends only on sample ``b`` of
    ``x``, and raises ``BatchInteractionError`` when it sees ``f`` combine samples (a
    train-mode batch norm, a matrix product or reduction over a batch dimension). Inside
    this block it computes what it computes without looking: the probes of the batched
    ``f`` then measure cross-sample terms too (e.g. column sums of the whole batch's
    Jacobian for an empty event), which is what you want only if you know why.

    Examples:
        >>> import torchdiv
        >>> bn = torch.nn.BatchNorm1d(3)  # train mode: normalises with batch statistics
        >>> torchdiv.divergence(bn, torch.randn(4, 3))
        Traceback (most recent call last):
        ...
        torchdiv.BatchInteractionError: divergence: f mixes samples: a batch norm...
        >>> with torchdiv.allow_batch_interaction():
        ...     div = torchdiv.divergence(bn, torch.randn(4, 3))
        >>> div.shape
        torch.Size([4])
    """
    before = allowed()
    _state.allowed = True
    try:
        yield
    finally:
        _state.allowed = before


def allowed() -> bool:
    """Whether ``allow_batch_interaction()`` is active in this thread, or Dynamo traces the
    call (``torch.compile``): detection watches the dispatcher, which a compiled graph has
    not got."""
    return getattr(_state, "allowed", False) or torch.compiler.is_compiling()


class BatchAxes:
    """The batch dimensions of every tensor computed from ``x`` by ops it understands, and
    which tensors depend on a combination of samples.

    ``carry = before(func, args)`` and ``after(carry, args, out)`` are called by a dispatch
    mode around each ATen call (``Watching`` is that mode on its own); ``finish(y)`` raises
    ``BatchInteractionError`` if ``f``'s result ``y`` depends on an op that combined samples.
    Raising at the end, not at the op, lets a combination that only seeds a backward pass
    inside ``f`` pass: ``grad(energy(x).sum(), x)`` is per sample, though the sum is not.
    """

    def __init__(self, x: torch.Tensor, batch_dims: int) -> None:
        self.x, self.batch_dims = x, batch_dims
        axes = tuple((d, x.shape[d], 1) for d in range(batch_dims) if x.shape[d] > 1)
        # id -> (tensor, axes); the tensor is held so that its id stays unique while watched
        self.known: dict[int, tuple[torch.Tensor, Axes]] = {id(x): (x, axes)} if axes else {}
        # id -> (tensor, message): results that depend on samples combined by some op
        self.mixed: dict[int, tuple[torch.Tensor, str]] = {}
        # id -> (tensor, pick): results computed from samples picked out of the batch alone
        self.picked: dict[int, tuple[torch.Tensor, Pick]] = {}
        self.pending: str | None = None  # the message for the results of the current op
        self.carried: Pick | None = None  # the pick the results of the current op inherit

    def axes(self, t: Any) -> Axes | None:
        entry = self.known.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def before(self, func: Any, args: Sequence[Any]) -> Carry | None:
        """The rule that ``after`` applies to ``func``'s results (``None``: nothing to note,
        e.g. under ``no_grad``, whose results are constants); notes whether ``func`` combines
        samples in a way derivatives see, or reads a result that did."""
        self.pending, self.carried = None, None
        if not self.known or not torch.is_grad_enabled():
            return None
        rules = _rules.get(func)  # one lookup per op: hashing an OpOverload costs 0.4 us
        if rules is None:
            rules = _rules[func] = (_MIXING.get(func), _CARRY.get(func) or _kind(func))
        mixing, carry = rules
        if self.mixed and func not in VALUE_FREE:
            self.pending = self._mixed_in(args)
        if self.pending is None and self.picked and func not in VALUE_FREE:
            self._picked_in(func, args)
        if self.pending is None and mixing is not None:
            what = mixing(self, args)
            if what is not None:
                self.pending = self.message(func, what)
        return carry

    def after(self, carry: Carry | None, args: Sequence[Any], out: Any) -> None:
        """Note the batch dimensions of the results ``out`` by the rule ``before`` gave (none:
        not followed further), and whether they depend on combined samples."""
        if carry is None:
            return
        result = carry(self, args, out)
        outs = (out,) if isinstance(out, torch.Tensor) else out
        for i, t in enumerate(outs if isinstance(outs, list | tuple) else ()):
            if isinstance(t, torch.Tensor):
                axes = result[i] if result and i < len(result) else None
                self._note(t, axes)
                if self.pending is not None:
                    self.mixed[id(t)] = (t, self.pending)
                elif self.carried is not None and not axes:
                    self.pick(t, self.carried)

    def finish(self, y: Any) -> None:
        """Raise ``BatchInteractionError`` if ``f``'s result ``y`` (a tensor or a tree of
        them) depends on samples that an op combined, or holds ``x``'s samples along one of
        its event dimensions (every output sample then depends on every input sample)."""
        leaves = tree_leaves(y)
        if self.mixed:
            message = self._mixed_in(leaves)
            if message is not None:
                raise BatchInteractionError(message)
        for t in leaves:
            moved = [q for q, *_ in self.axes(t) or () if q >= self.batch_dims]
            if moved:
                what = (
                    f"x's samples run along dimension {moved[0]} of f's output of shape "
                    f"{_shape(t)}, an event dimension (a broadcast of the batch against a tensor "
                    "with a batch dimension of its own, such as z @ A with A of shape (B, n, n)?)"
                )
                raise BatchInteractionError(explain(what, self.x, self.batch_dims))

    def _mixed_in(self, args: Sequence[Any]) -> str | None:
        for a in args:
            for t in a if isinstance(a, list | tuple) else (a,):
                entry = self.mixed.get(id(t)) if isinstance(t, torch.Tensor) else None
                if entry is not None and entry[0] is t:
                    return entry[1]
        return None

    def pick(self, t: torch.Tensor, pick: Pick) -> None:
        """Note that ``t`` holds samples picked out of the batch (its samples' derivatives
        flow; an integer or boolean tensor carries none)."""
        if t.is_floating_point():
            self.picked[id(t)] = (t, pick)

    def picks(self, t: Any) -> Pick | None:
        entry = self.picked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def _picked_in(self, func: Any, args: Sequence[Any]) -> None:
        """An op reading picked samples: combined with a batch it mixes samples (the
        pending message); else its results inherit the pick (``carried``; several different
        samples: which ones is no longer known). Joining pieces (``cat``, ``stack``) carries a
        pick only if every piece is one, and not when they are distinct samples (a batch in
        some order: ``_restacked`` makes one in order the batch again); joined along a batch
        dimension, a pick only stands beside the samples (padding a batch with its last
        sample), it is not combined with them."""
        joins = func in _JOINS
        pieces = list(args[0]) if joins else args
        tensors = [t for a in pieces for t in (a if isinstance(a, list | tuple) else (a,))]
        picks = [p for t in tensors if (p := self.picks(t)) is not None]
        if not picks:
            return
        if any(self.axes(t) for t in tensors):
            if not (func in _CATS and _joined_along_batch(self, args)):
                self.pending = self.message(func, f"{picks[0].what}, combined with the whole batch")
            return
        distinct = {p.sample for p in picks}
        if joins and (len(picks) < len(tensors) or len(distinct) == len(picks) > 1):
            return
        sample = picks[0].sample if len(distinct) == 1 else None
        self.carried = Pick(picks[0].size, sample, picks[0].what)

    def _note(self, t: torch.Tensor, axes: Axes | None) -> None:
        if axes and t.is_floating_point():
            self.known[id(t)] = (t, axes)
        elif id(t) in self.known:
            del self.known[id(t)]  # an in-place op the analysis cannot follow

    def message(self, func: Any, what: str) -> str:
        module = _module_in_stack()
        where = f"in {module}, " if module else ""
        return explain(f"{what} ({where}ATen op {func})", self.x, self.batch_dims)


def explain(what: str, x: torch.Tensor, batch_dims: int) -> str:
    """The message of a ``BatchInteractionError``: what mixes samples, and the way out."""
    b = batch_dims
    text = (
        f"f mixes samples: {what}. With batch_dims={b}, dimensions {list(range(b))} of x "
        f"(shape {tuple(x.shape)}) index samples, and every sample's derivatives are read from "
        "one probe of the whole batch, so they would silently include other samples' terms. "
    )
    if "train mode" in what:
        fix = (
            "Call model.eval() before differentiating (batch norm then uses its running "
            "statistics), or normalise per sample (LayerNorm, GroupNorm)."
        )
    elif x.dim() == b:
        fix = (
            f"x has no event dimensions: each of its {x.shape[:b].numel()} elements is read as "
            "one sample of one element. For one unbatched sample pass batch_dims=0 (or x[None] "
            "with batch_dims=1); if only the first k dimensions index samples, pass batch_dims=k."
        )
    else:
        fix = (
            "If that dimension belongs to each sample's event, lower batch_dims; if f really "
            "combines samples, per-sample derivatives do not exist."
        )
    return (
        text + fix + " To compute it anyway, wrap the call in torchdiv.allow_batch_interaction()."
    )


def _module_in_stack() -> str | None:
    """The innermost ``nn.Module`` whose ``forward`` is running, as ``"Linear"`` or
    ``"BatchNorm1d in train mode"``: who called the op that mixes samples."""
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_locals.get("self")
        if isinstance(module, torch.nn.Module) and frame.f_code.co_name == "forward":
            name = type(module).__name__
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
                name += " in train mode"
            return name
        frame = frame.f_back  # type: ignore[assignment]
    return None


class Watching(DispatchMode):
    """Watch ``f`` with ``BatchAxes`` alone: ``with Watching(x, batch_dims): f(x)`` (nothing
    when ``allow_batch_interaction()`` is active)."""

    def __init__(self, x: torch.Tensor, batch_dims: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        self.tracker = None if allowed() else BatchAxes(x, batch_dims)

    def dispatch(self, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if self.tracker is None:
            return func(*args, **kwargs)
        carry = self.tracker.before(func, args)
        out = func(*args, **kwargs)
        self.tracker.after(carry, args, out)
        return out

    def __exit__(self, *exc: Any) -> None:
        self.tracker = None  # let go of the tensors it tracked
        super().__exit__(*exc)  # type: ignore[no-untyped-call]  # torch leaves it unannotated


def check_empty_event(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> None:
    """For an engine that does not watch ``f``: when ``x`` has no event dimensions (every
    element a sample), evaluate ``f`` once more, watched by ``Watching`` (with grad enabled,
    so that ``no_grad`` blocks in ``f`` show as constants). Only an elementwise ``f`` is then
    batch independent, and the problem is small."""
    if x.dim() == batch_dims and x.numel() > 1:
        watch_once(f, x, batch_dims)


def watch_once(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> None:
    """Evaluate ``f`` once, watched by ``Watching`` (with grad enabled, so that ``no_grad``
    blocks in ``f`` show as constants): ``BatchInteractionError`` if it mixes samples."""
    if not allowed():
        with torch.enable_grad():
            watched(f, x, batch_dims)


def watched(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> Any:
    """``f(x)``, watched by ``Watching`` unless ``allow_batch_interaction()`` is active:
    ``BatchInteractionError`` if it mixes samples. For an engine that evaluates ``f`` anyway
    (with grad enabled, so that ``no_grad`` blocks in ``f`` show as constants), the check
    costs no extra evaluation, only the mode's few microseconds per op."""
    if allowed():
        return f(x)
    with Watching(x, batch_dims) as mode:
        y = f(x)
        if mode.tracker is not None:
            mode.tracker.finish(y)
    return y


def check_graph(
    fn: str | None,
    y: torch.Tensor,
    x: torch.Tensor,
    batch_dims: int,
    empty_event: bool,
    batch_norms: list[Any] | None = None,
) -> None:
    """For ``y`` computed from ``x`` by a graph nobody watched: raise ``BatchInteractionError``
    if the graph holds a train-mode batch norm over more than one row, and, with
    ``empty_event`` (every element of ``x`` a sample), if one VJP with a random sign per
    sample differs from the signed VJP of ones: for independent samples, exactly
    ``J^T (s * u) = s * J^T u`` (a sign flip rounds exactly). Walking the graph costs a few
    microseconds; the signed VJP, one more VJP, is done only for empty events. ``fn``: the
    public function to name (``None``: its ``reported`` wrapper names it); ``batch_norms``:
    the graph's batch-norm nodes, if a walk of the caller's found them already."""
    if allowed() or x.shape[:batch_dims].numel() < 2 or y.grad_fn is None:
        return
    found = nodes(y.grad_fn) if batch_norms is None else batch_norms
    for node in found:
        if (
            type(node).__name__ in BATCH_NORM_NODES
            # saved attributes of the C++ node, absent from torch's stubs
            and node._saved_training
            and node._saved_input.shape[0] > 1
            and _reaches(node, x)  # a batch norm of something computed from x
        ):
            what = "a batch norm in train mode, normalising with statistics of the whole batch"
            raise BatchInteractionError(_named(fn, explain(what, x, batch_dims)))
    if empty_event:
        _signed_vjp(fn, y, x, batch_dims)


def _reaches(start: torch.autograd.graph.Node, x: torch.Tensor) -> bool:
    """Whether the graph below ``start`` reaches ``x`` (its ``grad_fn``, or its
    ``AccumulateGrad`` node for a leaf): depth first, each node once."""
    return any(node is x.grad_fn or getattr(node, "variable", None) is x for node in nodes(start))


def _named(fn: str | None, message: str) -> str:
    return message if fn is None else f"{fn}: {message}"


def _signed_vjp(fn: str | None, y: torch.Tensor, x: torch.Tensor, batch_dims: int) -> None:
    batch = x.shape[:batch_dims]
    generator = torch.Generator().manual_seed(0)
    signs = (torch.randint(0, 2, batch, generator=generator) * 2 - 1).to(y)
    on_y = signs.reshape(*batch, *[1] * (y.dim() - batch_dims)).expand(y.shape)
    cotangents = torch.stack([torch.ones_like(y), on_y])
    (grads,) = torch.autograd.grad(
        y, x, cotangents, retain_graph=True, is_grads_batched=True, allow_unused=True
    )
    if grads is None:
        return
    leak = (grads[1] - grads[0] * signs.reshape(*batch, *[1] * (x.dim() - batch_dims))).abs()
    if float(leak.max()) > 1e-6 * float(grads.abs().max()):
        what = (
            "y's gradient with respect to each element of x depends on the cotangents of other "
            "elements (a matrix product, reduction or normalisation over the batch)"
        )
        raise BatchInteractionError(_named(fn, explain(what, x, batch_dims)))


def tracker(x: torch.Tensor, batch_dims: int) -> BatchAxes | None:
    """A ``BatchAxes`` for a dispatch mode that watches ``f`` anyway, unless detection is off."""
    return None if allowed() else BatchAxes(x, batch_dims)


class Pick(NamedTuple):
    """Samples picked out of a batch dimension of ``size`` samples: ``sample`` (``None``:
    several, or not known which), and ``what`` picked it, for the message."""

    size: int
    sample: int | None
    what: str


# ---- where batch dimensions go (``after``) ----

Carry = Callable[[BatchAxes, Sequence[Any], Any], "list[Axes | None] | None"]


def _untracked(_: BatchAxes, __: Sequence[Any], ___: Any) -> None:
    return None


def _aligned(t: torch.Tensor, axes: Axes, out: torch.Tensor) -> Axes:
    """``t``'s batch dimensions in ``out``, with shapes aligned at the right (broadcasting)."""
    shift = out.dim() - t.dim()
    return tuple(
        (q + shift, s, inner)
        for q, s, inner in axes
        if 0 <= q + shift < out.dim() and out.shape[q + shift] == t.shape[q]
    )


def _pointwise(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """Broadcasting: every tracked argument's batch dimensions, aligned at the right."""
    outs = out if isinstance(out, list | tuple) else (out,)
    result: list[Axes | None] = []
    for o in outs:
        found: Axes | None = None
        if isinstance(o, torch.Tensor):
            for a in args:
                axes = tr.axes(a)
                if axes:
                    mapped = axes if a.shape == o.shape else _aligned(a, axes, o)
                    found = mapped if found is None else tuple(sorted({*found, *mapped}))
        result.append(found)
    return result


def _reshaped(t: torch.Tensor, axes: Axes, out: torch.Tensor) -> Axes:
    """Batch dimensions through a reshape (same elements in the same order). A batch dimension
    is a digit of the flat index with place value ``after`` (elements per sample index) and
    ``size`` values; it survives in the dimension of ``out`` whose place values hold the
    whole digit (merged with others, as ``(B, T, D) -> (B*T, D)`` merges ``B`` and ``T``),
    else its tracking ends."""
    result: list[tuple[int, int, int]] = []
    if out.numel() == 0:
        return ()
    for q, size, inner in axes:
        after = inner * math.prod(t.shape[q + 1 :])
        rest = out.numel()
        for p, n in enumerate(out.shape):
            rest //= max(n, 1)  # place value of dimension p's index
            if after % rest == 0 and (rest * n) % (after * size) == 0:
                result.append((p, size, after // rest))
                break
    return tuple(result)


def _view(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    axes = tr.axes(args[0])
    if not axes or not isinstance(out, torch.Tensor) or out.numel() != args[0].numel():
        return None
    return [_reshaped(args[0], axes, out)]


def _permute(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    n = t.dim()
    if len(args) == 1:  # t()
        order = list(range(n))[::-1]
    elif len(args) == 2:  # permute(dims)
        order = [d % n for d in args[1]]
    else:  # transpose(d0, d1)
        order = list(range(n))
        d0, d1 = args[1] % n, args[2] % n
        order[d0], order[d1] = order[d1], order[d0]
    where = {src: dst for dst, src in enumerate(order)}
    return [tuple(sorted((where[q], s, inner) for q, s, inner in axes))]


def _select(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``select(t, dim, i)``: one sample of a batch dimension is no batch any more; it is
    a picked sample if that was ``t``'s only batch dimension (else the tracking of that
    dimension ends). The others move up after ``dim``."""
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    dim = args[1] % t.dim()
    kept = tuple((q - (q > dim), s, inner) for q, s, inner in axes if q != dim)
    if not kept:
        _picked(tr, t, axes[0], dim, (args[2] % t.shape[dim],) * 2, out)
    return [kept]


def _picked(
    tr: BatchAxes,
    t: torch.Tensor,
    axis: tuple[int, int, int],
    dim: int,
    span: tuple[int, int],
    o: Any,
) -> None:
    """Note ``o``, indices ``span[0]..span[1]`` (inclusive) of ``t`` along ``dim``, as one
    picked sample if they fall in one sample of ``axis`` (``t``'s only batch dimension)."""
    q, size, inner = axis
    first, last = span[0] // inner, span[1] // inner
    if q == dim and first == last and isinstance(o, torch.Tensor):
        what = f"sample {first % size} picked out of the batch (dimension {q} of {_shape(t)})"
        tr.pick(o, Pick(size, first % size, what))


Spans = Callable[[Sequence[Any], int, Sequence[Any]], "list[tuple[int, int]]"]  # args, dim, outs


def _cut(position: int, spans: Spans) -> Carry:
    """``slice``, ``narrow``, ``split``, ``unbind`` along ``dim`` (argument ``position``: 2
    for ``split``, after the sizes), whose pieces hold indices ``spans(args, dim, outs)`` (first
    and last along ``dim``). A whole batch dimension stays; a cut one ends its
    tracking, and a piece inside one sample of ``t``'s only batch dimension is that sample,
    picked. The other batch dimensions stay (``unbind`` removes ``dim``)."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        t, axes = args[0], tr.axes(args[0])
        if not axes:
            return None
        dim = (args[position] if len(args) > position else 0) % t.dim()
        outs = out if isinstance(out, list | tuple) else (out,)
        pieces = spans(args, dim, outs)
        if pieces == [(0, t.shape[dim] - 1)] and outs[0].dim() == t.dim():
            return [axes]
        kept = [axis for axis in axes if axis[0] != dim]
        if not kept:
            for span, o in zip(pieces, outs, strict=False):
                _picked(tr, t, axes[0], dim, span, o)
        shift = [int(o.dim() < t.dim()) for o in outs]
        return [tuple((q - (q > dim) * k, s, i) for q, s, i in kept) for k in shift]

    return rule


def _in_order(args: Sequence[Any], dim: int, outs: Sequence[Any]) -> list[tuple[int, int]]:
    """``split`` and ``unbind``: the pieces one after the other (``unbind``'s one long)."""
    spans, start = [], 0
    for o in outs:
        extent = o.shape[dim] if o.dim() == args[0].dim() else 1
        spans.append((start, start + extent - 1))
        start += extent
    return spans


def _sliced(args: Sequence[Any], dim: int, outs: Sequence[Any]) -> list[tuple[int, int]]:
    """``slice(t, dim, start, end, step)``: its range, if the step is 1."""
    n = args[0].shape[dim]
    start, end, step = (*args[2:5], None, None, None)[:3]
    first, stop = (
        min(max(v + n if v < 0 else v, 0), n) for v in (start or 0, n if end is None else end)
    )
    return [(first, stop - 1)] if (step or 1) == 1 and stop > first else []


def _narrowed(args: Sequence[Any], dim: int, outs: Sequence[Any]) -> list[tuple[int, int]]:
    """``narrow(t, dim, start, length)``."""
    first = args[2] % args[0].shape[dim]
    return [(first, first + args[3] - 1)] if args[3] > 0 else []


def _cat(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """Pieces joined along ``dim`` keep their other batch dimensions; every sample picked
    out, in order, each as long along ``dim``, is the batch again."""
    tensors = [t for t in args[0] if isinstance(t, torch.Tensor)]
    dim = (args[1] if len(args) > 1 else 0) % out.dim()
    found: set[tuple[int, int, int]] = set()
    for t in tensors:
        axes = tr.axes(t)
        if axes and t.dim() == out.dim():
            found.update(axis for axis in axes if axis[0] != dim)
    extents = {t.shape[dim] for t in tensors if t.dim() == out.dim()}
    size = _restacked(tr, tensors)
    if size is not None and len(extents) == 1:
        found.add((dim, size, extents.pop()))
    return [tuple(sorted(found))]


def _joined_along_batch(tr: BatchAxes, args: Sequence[Any]) -> bool:
    """Whether ``cat(tensors, dim)`` joins its pieces along a batch dimension of one."""
    tensors = [t for t in args[0] if isinstance(t, torch.Tensor) and t.dim()]
    dim = (args[1] if len(args) > 1 else 0) % max(tensors[0].dim() if tensors else 1, 1)
    return any(q == dim for t in tensors for q, *_ in tr.axes(t) or ())


def _stack(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """Tensors stacked along a new ``dim``: their batch dimensions, and every sample picked
    out, stacked in order, is the batch again (``torch.stack([g(xi) for xi in x])``)."""
    tensors = [t for t in args[0] if isinstance(t, torch.Tensor)]
    dim = (args[1] if len(args) > 1 else 0) % out.dim()
    found: set[tuple[int, int, int]] = set()
    for t in tensors:
        found.update((q + (q >= dim), s, i) for q, s, i in tr.axes(t) or ())
    size = _restacked(tr, tensors)
    if size is not None:
        found.add((dim, size, 1))
    return [tuple(sorted(found))]


def _restacked(tr: BatchAxes, tensors: Sequence[torch.Tensor]) -> int | None:
    """The batch size, if ``tensors`` are its samples, each picked out alone, in order."""
    picks = [tr.picks(t) for t in tensors]
    size = picks[0].size if picks and picks[0] is not None else None
    in_order = [(p.size, p.sample) if p else None for p in picks] == [
        (size, i) for i in range(len(picks))
    ]
    return size if in_order and len(picks) == size else None


def _first_like_input(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """Normalisations, convolutions, matrix products that passed ``before``: the first output
    keeps the batch dimensions it had in the input (``_MIXING`` refused the others)."""
    first = out[0] if isinstance(out, list | tuple) else out
    axes = tr.axes(args[0])
    return [_aligned(args[0], axes, first)] if axes and args[0].dim() == first.dim() else None


def _mm(biased: bool) -> Carry:
    """``(n, k) @ (k, m)`` (after a bias for ``addmm``), batched over dimension 0 for ``bmm``:
    the left operand's row dimensions and the right one's column dimension carry over."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        a, b = (args[1], args[2]) if biased else (args[0], args[1])
        found: list[tuple[int, int, int]] = []
        if biased and (axes := tr.axes(args[0])):
            found += _aligned(args[0], axes, out)
        if axes := tr.axes(a):
            found += [axis for axis in axes if axis[0] < a.dim() - 1]
        if axes := tr.axes(b):
            found += [axis for axis in axes if axis[0] == b.dim() - 1 or axis[0] < b.dim() - 2]
        return [tuple(sorted(set(found))) if len(found) > 1 else tuple(found)]

    return rule


def _reduced(op: Any) -> Carry:
    """A reduction that ``before`` let through: the batch dimensions were not reduced; they
    move up past reduced dimensions unless ``keepdim``."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        t, axes = args[0], tr.axes(args[0])
        if not axes:
            return None
        dims = _reduced_dims(op, args)
        outs = out if isinstance(out, list | tuple) else (out,)
        result: list[Axes | None] = []
        for o in outs:
            if not isinstance(o, torch.Tensor):
                result.append(None)
            elif o.dim() == t.dim():
                result.append(axes)
            else:
                result.append(tuple((q - sum(d < q for d in dims), s, i) for q, s, i in axes))
        return result

    return rule


_POINTWISE_EXTRA = {
    aten.clone.default,
    aten._to_copy.default,
    aten.alias.default,
    aten.native_dropout.default,
    aten.expand.default,
    aten.copy_.default,
    aten.lift_fresh.default,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.where.self,
    aten.constant_pad_nd.default,
}
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten._reshape_alias.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.flatten.using_ints,
}
_CARRY: dict[Any, Carry] = {
    **dict.fromkeys(_POINTWISE_EXTRA, _pointwise),
    **dict.fromkeys(_VIEWS, _view),
    aten.permute.default: _permute,
    aten.transpose.int: _permute,
    aten.t.default: _permute,
    aten.select.int: _select,
    aten.slice.Tensor: _cut(1, _sliced),
    aten.narrow.default: _cut(1, _narrowed),
    aten.split.Tensor: _cut(2, _in_order),
    aten.split_with_sizes.default: _cut(2, _in_order),
    aten.unbind.int: _cut(1, _in_order),
    aten.cat.default: _cat,
    aten.stack.default: _stack,
}
_CATS = {aten.cat.default}
_JOINS = {*_CATS, aten.stack.default}
_rules: dict[Any, tuple[Mixing | None, Carry]] = {}  # each op's two rules, as first met
# results that do not depend on their argument's values: a gradient seed ones_like(loss)
VALUE_FREE = {
    aten.detach.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.rand_like.default,
    aten.randn_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
}


def _kind(func: Any) -> Carry:
    """Elementwise ops (PyTorch's ``pointwise`` tag) broadcast; other ops end the tracking."""
    return _pointwise if torch.Tag.pointwise in func.tags else _untracked


# ---- what combines samples (``before``) ----

Mixing = Callable[[BatchAxes, Sequence[Any]], "str | None"]


def _dims(t: torch.Tensor, dims: Any) -> list[int]:
    if dims is None or dims == []:
        return list(range(t.dim()))
    if isinstance(dims, int):
        dims = [dims]
    return [d % max(t.dim(), 1) for d in dims]


def _reduced_dims(func: Any, args: Sequence[Any]) -> list[int]:
    """The dimensions a reduction reduces (all, if none are given)."""
    at = 2 if func in _NORMS else 1  # norm(t, ord, dim)
    return _dims(args[0], args[at] if len(args) > at else None)


def _batch_at(tr: BatchAxes, t: Any, dims: Sequence[int]) -> int | None:
    """A dimension among ``dims`` where ``t`` has samples, if any."""
    for q, *_ in tr.axes(t) or ():
        if q in dims:
            return q
    return None


def _reduction(op: Any, name: str) -> Mixing:
    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        q = _batch_at(tr, args[0], _reduced_dims(op, args))
        if q is None:
            return None
        return f"a {name} over samples (dimension {q} of a tensor of shape {_shape(args[0])})"

    return rule


def _whole(name: str) -> Mixing:
    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        return f"a {name} of all elements, across samples" if tr.axes(args[0]) else None

    return rule


def _masked_scatter(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``masked_scatter`` fills the mask's places with ``source`` read in flat order over the
    whole tensor, so a source that carries samples lands in other samples' places."""
    return "a masked_scatter, which reads its source across samples" if tr.axes(args[2]) else None


def _contraction(biased: bool) -> Mixing:
    """Matrix products sum over the left operand's last dimension and the right one's second
    to last (a vector's only dimension)."""

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        a, b = (args[1], args[2]) if biased else (args[0], args[1])
        for t, summed in ((a, a.dim() - 1), (b, max(b.dim() - 2, 0))):
            for q, *_ in tr.axes(t) or ():
                if q == summed:
                    return (
                        f"a matrix product summing over samples (dimension {q} of an operand "
                        f"of shape {_shape(t)})"
                    )
        return None

    return rule


def _batch_norm(training_arg: int) -> Mixing:
    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        if len(args) <= training_arg or not args[training_arg]:
            return None
        t = args[0]
        if _batch_at(tr, t, [d for d in range(t.dim()) if d != 1]) is None:
            return None
        return "a batch norm in train mode, normalising with statistics of the whole batch"

    return rule


def _layer_norm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    t, shape = args[0], args[1]
    q = _batch_at(tr, t, range(t.dim() - len(shape), t.dim()))
    return None if q is None else f"a layer norm over samples (dimension {q} of shape {_shape(t)})"


def _group_norm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    t = args[0]
    q = _batch_at(tr, t, range(1, t.dim()))
    return None if q is None else f"a group norm over samples (dimension {q} of shape {_shape(t)})"


def _diagonal(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``t.diagonal(offset, dim1, dim2)`` pairs sample ``i`` with index ``i`` of the other
    dimension when either dimension holds samples."""
    t = args[0]
    pair = _dims(t, [args[2] if len(args) > 2 else 0, args[3] if len(args) > 3 else 1])
    q = _batch_at(tr, t, pair)
    return None if q is None else f"a diagonal across samples (dimension {q} of {_shape(t)})"


def _convolution(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    t, weight = args[0], args[1]
    groups = args[8] if len(args) > 8 else 1
    mixed = [1] if groups == 1 else []
    mixed += [d for d in range(2, t.dim()) if weight.shape[d] > 1]
    q = _batch_at(tr, t, mixed)
    return (
        None if q is None else f"a convolution across samples (dimension {q} of shape {_shape(t)})"
    )


_MATRIX_PRODUCTS = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten.mv.default,
    aten.addmv.default,
    aten.dot.default,
    aten.vdot.default,
}
_BIASED = {aten.addmm.default, aten.baddbmm.default, aten.addmv.default}  # (bias, a, b)
_REDUCTIONS = {
    aten.sum.dim_IntList: "sum",
    aten.mean.dim: "mean",
    aten.amax.default: "max",
    aten.amin.default: "min",
    aten.max.dim: "max",
    aten.min.dim: "min",
    aten.prod.dim_int: "product",
    aten.var.correction: "variance",
    aten.std.correction: "standard deviation",
    aten.var_mean.correction: "variance",
    aten.std_mean.correction: "standard deviation",
    aten.logsumexp.default: "logsumexp",
    aten.linalg_vector_norm.default: "norm",
    aten.norm.ScalarOpt_dim: "norm",
    aten._softmax.default: "softmax",
    aten._log_softmax.default: "log-softmax",
    aten._safe_softmax.default: "softmax",
    aten.cumsum.default: "cumulative sum",
    aten.cumprod.default: "cumulative product",
    aten.logcumsumexp.default: "cumulative logsumexp",
}
_NORMS = {aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim}
_WHOLE = {
    aten.sum.default: "sum",
    aten.mean.default: "mean",
    aten.max.default: "max",
    aten.min.default: "min",
    aten.prod.default: "product",
}
_BATCH_NORMS = {
    aten.native_batch_norm.default: 5,
    aten._native_batch_norm_legit.default: 5,
    aten._native_batch_norm_legit.no_stats: 3,
    aten._native_batch_norm_legit_functional.default: 5,
    aten.cudnn_batch_norm.default: 5,
    aten.miopen_batch_norm.default: 5,
}
_MIXING: dict[Any, Mixing] = {
    **{op: _contraction(op in _BIASED) for op in _MATRIX_PRODUCTS},
    **{op: _reduction(op, name) for op, name in _REDUCTIONS.items()},
    **{op: _whole(name) for op, name in _WHOLE.items()},
    **{op: _batch_norm(i) for op, i in _BATCH_NORMS.items()},
    aten.native_layer_norm.default: _layer_norm,
    aten.native_group_norm.default: _group_norm,
    aten.convolution.default: _convolution,
    aten.diagonal.default: _diagonal,
    aten.masked_scatter.default: _masked_scatter,
    aten.trace.default: _diagonal,  # the sum of the diagonal (0, 1): one kernel on CPU
}
_CARRY.update(
    {
        **{op: _mm(op in _BIASED) for op in _MATRIX_PRODUCTS},
        **{op: _reduced(op) for op in _REDUCTIONS},
        **dict.fromkeys(_BATCH_NORMS, _first_like_input),
        aten._native_batch_norm_legit_no_training.default: _first_like_input,
        aten.native_layer_norm.default: _first_like_input,
        aten.native_group_norm.default: _first_like_input,
        aten.convolution.default: _first_like_input,
    }
)
