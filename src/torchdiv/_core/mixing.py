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

Samples an indexing op moves along the batch are followed as rows (``Axis.rows``: the sample
at each index): ``x[mask]`` (a mask computed from ``x``), ``x[perm]``, ``x[idx.nonzero()]``,
``index_select``, ``gather``/``take_along_dim``, ``masked_select``, ``flip``, ``roll``. Rows
that reach ``f``'s output out of place (``net(x[perm])``), are combined elementwise with other
rows (``x[perm] * x``) or reduced (``x[mask].sum(0)``) mix samples; values written back by
``index_put`` (``y[m] = g(x[m])``), ``index_copy``, ``index_add`` or ``scatter`` must land in
places of their own samples (into ``x``'s batch shape: ``torch.zeros_like(x)`` too), so a
selection written back in place, or a permutation undone, is per sample. Samples added into a
fresh tensor whose first dimension has ``k`` places per sample are checked as a flattened batch
(``x.reshape(B * k, ...)``'s layout: a message-passing net's ``(B * N, F)`` nodes, a mixture of
experts' ``(B * T, D)`` tokens): if every value lands in its own sample's places the result is
followed as one.

A slice of part of the batch (``x[1:]``, ``x[::2]``, ``split``, ``narrow``) holds its samples
in order, as rows (``x[1:] - x[:-1]`` combines two samples in each place); pieces joined back
along the batch (``cat([g(x[:1]), h(x[1:])])``, also with constants: ``cat([x, zeros(k, D)])``,
``F.pad`` along the batch) hold theirs one after the other, the batch again if in order. Two
different samples picked out and combined (``x[0] * x[1]``, a recurrence run over the samples:
``nn.GRU`` with ``batch_first=False`` fed ``(B, T, D)``) mix them; so do samples along the time
steps or features of a fused RNN kernel (cuDNN's, on a GPU).

Values written in place through a view of another tensor (``buf[:, :D] = g(x)``,
``buf.narrow(...).copy_(...)``; ``select_scatter``, ``slice_scatter`` out of place) are followed
into that tensor (``_overwrite``): along each of its dimensions, the samples written replace
those there, so a fresh buffer holds the batch where they were written, and samples written into
other samples' places (``y[1:] = g(x)[:-1]``) are moved rows. A reshape that splits the batch
digit across dimensions (``x.reshape(D, B)``) leaves the samples spread (``BatchAxes.spread``):
elementwise ops keep them apart and a reshape back follows them again; any other op reading them
mixes samples (a batch split in order, ``x.reshape(F, P, D)`` read by ``einsum``, too: the
message then names ``batch_dims=2`` with ``x`` in that shape, which is followed). A custom
``autograd.Function``'s ``forward`` runs without grad, like a ``no_grad`` block, but with
forward AD off too: it is followed, its results differentiable if ``apply`` makes them so
(``BatchAxes._settle``).

Each batch dimension of a tensor is recorded as ``(position, size)`` and the batch dimension of
``x`` it came from (with ``batch_dims=2`` and a square batch, ``x.transpose(0, 1)`` at the
output mixes samples): the samples are the outermost factor of that dimension (reshapes may
merge it with the dimensions after it, as ``matmul`` does with ``(B, T, D) -> (B*T, D)``).
Elementwise ops, broadcasts, reshapes that keep the batch factor, transposes, slices and
concatenations carry it, in complex tensors too (FFTs along event dimensions, ``view_as_real``;
``_spectral`` refuses an FFT over a batch dimension), and ``as_strided`` where its strides keep
each sample's elements along one dimension (``torch.stft``'s frames of each sample; frames along
the batch mix, ``_strided``). An op no table knows is judged from its
schema (``_unknown``): it combines samples if its ``dim`` argument names a batch dimension
(``sort``, ``topk``, ``median``/``mode``/``cummax`` along it, ``nansum``, ``unfold``), it pools
or resamples along one among its spatial dimensions (``grid_sample`` there at any grid), it
is a ``linalg`` function of matrices whose rows or columns are samples (``det``, ``svd``,
``matrix_exp``), its keys are samples (attention), or it reads different samples in one place
(``linalg_cross(x, x.flip(0))``); a result with no dimension that could hold the samples
(a scalar ``dist``, ``median()``, a mean loss) depends on all of them; a result shaped as a
tracked argument holds its samples in place, and one of an op that rearranges only some
dimensions (a pad, a pool, ``interpolate``, ``im2col``/``col2im``, ``pixel_shuffle``,
``diag_embed``, ``diagonal``, ``glu``) holds them along the others. Anything else
ends the tracking of its result, silently: the analysis does not raise on what it does not
understand (an op that combines samples without any of those signs, ...), so it misses some
mixing (``check_batch_independence`` tests any ``f``) but does not flag an independent ``f``
built from ops that keep samples apart; an indexing op whose indices have two or more dimensions
along the batch (not one broadcast along the others, as ``x[arange(B)[:, None], idx]``) is one
exception, refused if its result reaches the output; moved samples that a reshape spreads across
places (``x.reshape(-1)[perm].reshape(B, D)``), samples spread by a reshape read by an op other
than an elementwise one or a reshape, a roll of the flattened tensor by part of a sample, samples
added (or moved samples written) into a tensor neither of ``x``'s batch shape nor a flattened
batch in their own places (per-cluster sums ``zeros(K, D).index_add(0, cid, x)``), and values
written through views that put two samples in one place are the others.

The recorders (``torchdiv._taylor.capture``) record an op without a propagation rule as the
ops it decomposes into, but watch it as itself, as the other engines' watches see it: its
parts may combine samples with zero weights (an interpolation onto its own size).

``allow_batch_interaction()`` turns the detection off for code that means to mix samples.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from torchdiv._core.checks import _shape
from torchdiv._core.modes import (
    UNDERIVABLE_OPS,
    DispatchMode,
    refuse_gradient_hook,
    refuse_underivable,
)
from torchdiv._core.walk import BATCH_NORM_NODES, nodes

aten = torch.ops.aten


class Axis(NamedTuple):
    """A batch dimension of a tensor: along dimension ``position``, index ``j`` holds sample
    ``(j // inner) % size`` of a batch dimension of ``size`` samples; for samples an indexing
    op moved (``x[perm]``, ``x[mask]``, ``index_select``, ``gather``), sample
    ``rows[(j // inner) % len(rows)]`` (``rows`` empty: in order, the first form). The samples
    are those of ``x``'s batch dimension ``source``: with ``batch_dims=2`` and a square batch,
    ``x.transpose(0, 1)`` holds each dimension's samples along the other one."""

    position: int
    size: int
    inner: int
    rows: tuple[int, ...] = ()
    source: int = 0

    @property
    def period(self) -> int:
        """How many ``inner``-long runs along ``position`` before the samples repeat."""
        return len(self.rows) or self.size

    def samples(self, at: torch.Tensor) -> torch.Tensor:
        """The sample held at each index ``at`` (an integer tensor) along ``position``."""
        runs = torch.div(at, self.inner, rounding_mode="floor") % self.period
        return _rows_tensor(self.rows).to(at.device)[runs] if self.rows else runs


@functools.lru_cache(maxsize=64)
def _rows_tensor(rows: tuple[int, ...]) -> torch.Tensor:
    """``rows`` as a tensor, made once: every indexing op that reads moved rows asks again."""
    return torch.tensor(rows)


Axes = tuple[Axis, ...]
# marked attention weights: (the tensor, the samples along its rows, along its keys, its
# version when marked: ``BatchAxes.blocks``)
Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]
# x's batch dimension -> (a dimension of a tensor, the sample at each index along it, -1 where
# none was written)
Lines = dict[int, tuple[int, torch.Tensor]]

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
        # an empty batch has no samples to mix (and a reshape of its zero elements places
        # none: merging batch dimensions (2, 0) into one of 0 read as spreading samples)
        empty = x.shape[:batch_dims].numel() == 0
        axes = tuple(
            Axis(d, x.shape[d], 1, (), d) for d in range(batch_dims) if x.shape[d] > 1 and not empty
        )
        # id -> (tensor, axes); the tensor is held so that its id stays unique while watched
        self.known: dict[int, tuple[torch.Tensor, Axes]] = {id(x): (x, axes)} if axes else {}
        self.start = axes  # x's: those of a tensor of x's batch shape that nothing tracked
        # id -> tensor: made by a factory (``zeros``, ``new_full``, ``zeros_like``), no values
        self.fresh: dict[int, torch.Tensor] = {}
        # the rows of samples moved by an indexing op (``Axis.rows``), with the op's name
        self.moves: dict[tuple[int, ...], str] = {}
        # id -> (tensor, message): results that depend on samples combined by some op
        self.mixed: dict[int, tuple[torch.Tensor, str]] = {}
        # the same by the autograd node that made them and which of its outputs they are
        # (``_saved_mixed``), as of ``mixed_writes``: the writes into ``mixed`` (a count of
        # its entries could come back to the same after a removal and an addition); the graph
        # task ``f`` is called from, to tell a backward pass inside ``f``
        self.mixed_nodes: dict[tuple[Any, int], str] = {}
        self.mixed_writes = 0
        self.nodes_of = 0
        self.task = torch._C._current_graph_task_id()
        # id -> (tensor, pick): results computed from samples picked out of the batch alone
        self.picked: dict[int, tuple[torch.Tensor, Pick]] = {}
        self.pending: str | None = None  # the message for the results of the current op
        # the current op's refusal if the places it puts into, laid out as a guess
        # (``_flattened``), do not hold the samples put there
        self.guess: str | None = None
        self.carried: Pick | None = None  # the pick the results of the current op inherit
        self.func: Any = None  # the current op
        self.kwargs: dict[str, Any] = {}  # its keyword arguments (``_unknown`` reads them)
        # id -> (tensor, its axes then, source -> (dimension, sample at each index, -1 where
        # none)): tensors whose samples values written through views put in (``_overwrite``)
        self.lines: dict[int, tuple[torch.Tensor, Axes, Lines]] = {}
        # id -> tensor: results computed inside a custom ``autograd.Function``'s ``forward``,
        # not yet known to be differentiable (``_settle``)
        self.inside: dict[int, torch.Tensor] = {}
        self.quiet = False  # whether the last op ran under no_grad
        # id -> (tensor, axes in flat form): batch dimensions a reshape split across dimensions
        # (``_view``)
        self.spread: dict[int, tuple[torch.Tensor, Axes]] = {}
        self.quiet_forward = False  # whether the op before the current forward did
        # whether an op turned values into something that decides what ``f`` does
        # (``decides``): until then, the watch holds for any floating values
        self.values_decide = False
        # whether a rule read the values of indices along a batch dimension (``x[perm]``, a
        # mask over the batch, ``gather`` along it): the verdict then holds for those values
        # only, so a recording is not kept to check later calls by structure
        # (``torchdiv._taylor.cache.template``: an index changed in place went unwatched)
        self.indexed = False
        # whether ``f`` computed with a tensor subclass (``Reads``): its results are then
        # aliases no ATen call made, followed at every op (``follow``)
        self.subclassed = False
        # id -> (tensor, the samples along its rows, along its keys: its last two dimensions,
        # its version then): attention weights that are exactly 0 wherever the row's sample
        # and the key's differ (``_softmaxed``), and the softmax of the current op to check
        # so, with its message
        self.blocks: dict[int, Block] = {}
        self.block_check: tuple[int, int, str] | None = None

    def axes(self, t: Any) -> Axes | None:
        entry = self.known.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def before(
        self, func: Any, args: Sequence[Any], kwargs: dict[str, Any] | None = None
    ) -> Carry | None:
        """The rule that ``after`` applies to ``func``'s results (``None``: nothing to note,
        e.g. under ``no_grad``, whose results are constants); notes whether ``func`` combines
        samples in a way derivatives see, or reads a result that did."""
        self.pending, self.carried, self.func, self.guess = None, None, func, None
        self.block_check = None
        self.kwargs = kwargs or {}
        if self.subclassed:  # (under ``torch.func``, the subclass's results come unwrapped)
            for a in tree_leaves(args):
                self.follow(a)
        if not self.known:
            return None
        within = not torch.is_grad_enabled()
        if within and (torch._C._is_fwd_grad_enabled() or torch.is_inference_mode_enabled()):
            self.quiet = True
            return None  # a no_grad block: constants
        # else, without grad, a custom autograd.Function's forward (which turns forward AD off
        # too): followed, its results differentiable if ``apply`` makes them so (``_settle``)
        if self.inside and not within:
            self._settle()
        elif within and not self.inside:
            self.quiet_forward = self.quiet
        self.quiet = False
        if func in _IN_PLACE_VIEWS:  # the shape changes under the tensor's id: read it now
            axes = self.axes(args[0])
            if axes is None:
                return None
            moved: list[Axes | None] = [_in_place_view(func, args[0], axes, args)]
            return lambda tr, a, o: moved
        rules = _rules.get(func)  # one lookup per op: hashing an OpOverload costs 0.4 us
        if rules is None:
            mixing = _MIXING.get(func)
            carry = _CARRY.get(func) or _kind(func, mixing is None)
            if _writes_first(func):
                written = _writing(carry)
                if carry is _pointwise:
                    _ELEMENTWISE.add(written)
                carry = written
            rules = _rules[func] = (mixing, carry)
        mixing, carry = rules
        if self.mixed and func not in VALUE_FREE:
            self.pending = self._mixed_in(args)
        if self.pending is None and self.picked and func not in VALUE_FREE and func not in _PUTS:
            self._picked_in(func, args)
        if self.pending is None and self.moves and carry in _ELEMENTWISE:
            self._rows_in(func, args)
        if self.pending is None and self.spread and carry is not _view and func not in VALUE_FREE:
            self._spread_in(func, args, carry)
        if self.pending is None and mixing is not None:
            what = mixing(self, args)
            if what is not None:
                self.pending = self.message(func, what)
        return functools.partial(_within, carry) if within else carry

    def after(self, carry: Carry | None, args: Sequence[Any], out: Any) -> None:
        """Note the batch dimensions of the results ``out`` by the rule ``before`` gave (none:
        not followed further), and whether they depend on combined samples."""
        self.values_decide = self.values_decide or decides(self.func, (args, self.kwargs), out)
        if carry is None:
            return
        result = carry(self, args, out)
        if self.blocks and self.func in _SAME_PLACES:
            _keep_block(self, args[0], out)
        outs = (out,) if isinstance(out, torch.Tensor) else out
        for i, t in enumerate(outs if isinstance(outs, list | tuple) else ()):
            if isinstance(t, torch.Tensor):
                axes = result[i] if result and i < len(result) else None
                self._note(t, axes)
                if self.pending is not None:
                    self.mixed[id(t)] = (t, self.pending)
                    self.mixed_writes += 1
                elif self.carried is not None and not axes:
                    self.pick(t, self.carried)

    def finish(self, y: Any) -> None:
        """Raise ``BatchInteractionError`` if ``f``'s result ``y`` (a tensor or a tree of
        them) depends on samples that an op combined, or holds ``x``'s samples along one of
        its event dimensions (every output sample then depends on every input sample)."""
        if self.inside:
            self._settle()
        leaves = tree_leaves(y)
        for t in leaves:
            self.follow(t)
        if self.mixed:
            message = self._mixed_in(leaves)
            if message is not None:
                raise BatchInteractionError(message)
        for t in leaves:
            what = self._out_of_place(t) or self._misplaced(t) or self._spread_out(t)
            if what is not None:
                raise BatchInteractionError(explain(what, self.x, self.batch_dims))

    def _out_of_place(self, t: Any) -> str | None:
        """What puts ``x``'s samples along another dimension of ``f``'s output ``t``: an event
        dimension, or another batch dimension (with ``batch_dims=2`` and a square batch)."""
        for axis in self.axes(t) or ():
            if axis.position >= self.batch_dims:
                return (
                    f"x's samples run along dimension {axis.position} of f's output of shape "
                    f"{_shape(t)}, an event dimension (a broadcast of the batch against a tensor "
                    "with a batch dimension of its own, such as z @ A with A of shape (B, n, n)?)"
                )
        for axis in self.axes(t) or ():
            if axis.source != axis.position:
                return (
                    f"the samples of x's batch dimension {axis.source} run along batch "
                    f"dimension {axis.position} of f's output of shape {_shape(t)} "
                    "(batch dimensions transposed or permuted)"
                )
        return None

    def _spread_out(self, t: Any) -> str | None:
        """What spreads ``x``'s samples across dimensions of ``f``'s output ``t``: a reshape
        of the batch laid out in another order (``x.T.reshape(B, D)``)."""
        if self.spreads(t) is None:
            return None
        return (
            f"x's samples spread across the dimensions of f's output of shape {_shape(t)} by a "
            "reshape of the batch laid out in another order (x.T.reshape(B, D) for x?)"
        )

    def _misplaced(self, t: Any) -> str | None:
        """What puts other samples' values in the places of ``f``'s output ``t``: samples an
        indexing op moved and nothing put back, or one sample picked for all of them."""
        for axis in self.axes(t) or ():
            if axis.rows:
                at = next((i for i, r in enumerate(axis.rows) if r != i % axis.size), None)
                if at is None:  # the first samples, in order (x[:k])
                    continue
                return (
                    f"{self.moves.get(axis.rows, 'an indexing op')} moved samples along the "
                    f"batch: place {at} along dimension {axis.position} of f's output of shape "
                    f"{_shape(t)} holds sample {axis.rows[at]}, and they were not put back "
                    "(select and write back the same places: y[m] = g(x[m]), or invert the "
                    "permutation)"
                )
        pick = self.picks(t)
        if pick is not None and pick.sample is not None and t.dim() > 0:
            return f"every sample of f's output of shape {_shape(t)} is computed from {pick.what}"
        return None

    def _rows_in(self, func: Any, args: Sequence[Any]) -> None:
        """An elementwise op combining operands whose samples an indexing op moved: each
        place must hold the same samples in every operand (``x[perm] * x`` does not)."""
        tensors = [a for a in args if isinstance(a, torch.Tensor) and self.axes(a)]
        if len(tensors) < 2:
            return
        first = (tensors[0].shape, self.axes(tensors[0]))
        if all((a.shape, self.axes(a)) == first for a in tensors):
            return  # the same samples in the same places (``h + tanh(h)``): the usual case
        shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
        shape = torch.broadcast_shapes(*shapes)  # type: ignore[no-untyped-call]
        seen: dict[int, set[tuple[int, ...]]] = {}
        rowed: set[int] = set()
        for a in tensors:
            held: dict[int, set[tuple[int, ...]]] = {}
            for axis in _aligned(a, self.axes(a) or (), shape):
                held.setdefault(axis.position, set()).add(_held(axis, shape[axis.position]))
                if axis.rows:
                    rowed.add(axis.position)
            for q, samples in held.items():
                if seen.setdefault(q, samples) != samples and q in rowed:
                    what = self.moves.get(next(iter(samples - seen[q]), ()), "an indexing op")
                    self.pending = self.message(
                        func,
                        f"samples moved by {what}, combined elementwise with others in other "
                        f"places (along dimension {q} of the result of shape {tuple(shape)})",
                    )
                    return

    def spreads(self, t: Any) -> Axes | None:
        entry = self.spread.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def _spread_in(self, func: Any, args: Sequence[Any], carry: Carry) -> None:
        """An op reading samples a reshape spread across dimensions (``x.reshape(D, B)``):
        only an elementwise one of same-shaped operands holding them alike keeps each sample's
        values apart (a reshape back follows them again, ``_view``); any other (a transpose, a
        reduction) mixes them."""
        tensors = [t for t in _listed(args) if isinstance(t, torch.Tensor)]
        spread = [(t, s) for t in tensors if (s := self.spreads(t))]
        if not spread:
            return
        if func in _REDUCTIONS:
            t, dims = args[0], _reduced_dims(func, args)
            spans = [_span(t, axis) for axis in self.spreads(t) or ()]
            if spans and all(span is not None and not set(dims) & set(span) for span in spans):
                return  # over dimensions that hold none of them (``_spread_reduced``)
        shapes = [t.shape for t in tensors]
        shape = torch.broadcast_shapes(*shapes) if carry in _ELEMENTWISE else None  # type: ignore[no-untyped-call]
        if (
            shape is not None
            and all(t.shape == shape for t, _ in spread)
            and len({s for _, s in spread}) == 1
            and not any(self.axes(t) for t in tensors)
        ):
            return  # constants may broadcast against them
        how = (
            f"{_SPLIT_WHAT}, as x.reshape(F, P, D)"
            if all(_split_in_order(t, s) for t, s in spread)
            else "by a reshape to another order, as x.reshape(D, B) for x.T, or an interleaving "
            "stack"
        )
        what = (
            f"x's samples spread across the dimensions of a tensor of shape {_shape(spread[0][0])} "
            f"({how}), read by an op other than an elementwise one or a reshape back"
        )
        self.pending = self.message(func, what)

    def _mixed_in(self, args: Sequence[Any]) -> str | None:
        backward = torch._C._current_graph_task_id() != self.task  # a backward pass inside f
        for a in args:
            for t in a if isinstance(a, list | tuple) else (a,):
                if not isinstance(t, torch.Tensor):
                    continue
                entry = self.mixed.get(id(t))
                if entry is not None and entry[0] is t:
                    return entry[1]
                if backward and t.grad_fn is not None:
                    message = self._saved_mixed(t)
                    if message is not None:
                        return message
        return None

    def _saved_mixed(self, t: torch.Tensor) -> str | None:
        """The message of the mixed result that ``t`` is read back as in a backward pass
        inside ``f`` (``grad(energy(x).logsumexp(0), x)``): autograd unpacks a saved result
        as a new object with the node that made it and its output number, which an alias
        made by an op (``detach``) or ``Tensor.data`` (constants) has not got."""
        if self.nodes_of != self.mixed_writes:  # (nodes are set after ``after`` saw them)
            self.mixed_nodes = {
                (m.grad_fn, m.output_nr): message
                for m, message in self.mixed.values()
                if m.grad_fn is not None
            }
            self.nodes_of = self.mixed_writes
        return self.mixed_nodes.get((t.grad_fn, t.output_nr))

    def pick(self, t: torch.Tensor, pick: Pick) -> None:
        """Note that ``t`` holds samples picked out of the batch (its samples' derivatives
        flow; an integer or boolean tensor carries none)."""
        if _floating(t):
            self.picked[id(t)] = (t, pick)

    def picks(self, t: Any) -> Pick | None:
        entry = self.picked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def _picked_in(self, func: Any, args: Sequence[Any]) -> None:
        """An op reading picked samples: combined with a batch, or two different picked
        samples combined, it mixes samples (the pending message); else its results inherit
        the pick (``carried``). Joining pieces (``cat``, ``stack``) carries a
        pick only if every piece is one, and not when they are distinct samples (a batch in
        some order: ``_restacked`` makes one in order the batch again); joined along a batch
        dimension, a pick only stands beside the samples (padding a batch with its last
        sample), it is not combined with them."""
        joins = func in _JOINS
        pieces = list(args[0]) if joins else args
        tensors = _listed(pieces)
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
        if not joins and len({(p.source, p.sample) for p in picks}) > 1:
            # a recurrence run over the samples (``nn.GRU`` fed (B, T, D) with batch_first
            # False: each step reads the state of the sample before)
            self.pending = self.message(func, f"{picks[0].what}, combined with {picks[-1].what}")
            return
        sample = picks[0].sample if len(distinct) == 1 else None
        self.carried = picks[0]._replace(sample=sample)

    def _settle(self) -> None:
        """After a custom ``autograd.Function``'s ``forward``: its results that ``apply`` left
        without grad (called under ``no_grad``, or not returned) are constants. Where ``x``
        does not require grad (the recorders), none does: those of a forward called right
        after an op under ``no_grad`` are taken for constants, the others followed."""
        constant = self.quiet_forward or self.x.requires_grad
        for t in self.inside.values():
            if constant and not t.requires_grad:
                for table in (self.known, self.mixed, self.picked):
                    table.pop(id(t), None)
                self.mixed_writes += 1
        self.inside.clear()

    def follow(self, t: Any) -> None:
        """Note ``t``, an alias that no ATen call made, as the result it aliases: a tensor
        subclass's ``__torch_function__`` wraps each result of an op by ``as_subclass`` (as
        ``f`` may itself: ``y.as_subclass(Sub)``), a view of that result with an ``id`` of
        its own (under ``torch.func``, unwrapped to a plain view). Unfollowed, a subclass
        ``f`` held took every result past the watch: ``z.roll(1, 0) ** 2 + 0 * t_sub``
        returned silently."""
        base = t._base if isinstance(t, torch.Tensor) else None
        # (each table's entries hold their tensor first: copied, ``t`` takes its place)
        tables = cast(
            "tuple[dict[int, tuple[Any, ...]], ...]",
            (self.known, self.mixed, self.picked, self.spread, self.lines),
        )
        if base is None or any(id(t) in table for table in tables):
            return
        found = False
        for table in tables:
            entry = next((e for e in table.values() if _alias(e[0], t, base)), None)
            if entry is not None:
                table[id(t)] = (t, *entry[1:])
                found = True
        self.mixed_writes += found

    def _note(self, t: torch.Tensor, axes: Axes | None) -> None:
        if axes and _floating(t):  # complex too: an FNO's spectra (``rfft``, ``view_as_real``)
            self.known[id(t)] = (t, axes)
        elif id(t) in self.known:
            del self.known[id(t)]  # an in-place op the analysis cannot follow

    def message(self, func: Any, what: str) -> str:
        module = _module_in_stack()
        where = f"in {module}, " if module else ""
        return explain(f"{what} ({where}ATen op {func})", self.x, self.batch_dims)


def _alias(a: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``a`` and the view ``t`` of ``base`` are the same elements (``BatchAxes.follow``)."""
    return (
        (a is base or a._base is base)
        and a.shape == t.shape
        and a.stride() == t.stride()
        and a.storage_offset() == t.storage_offset()  # (not ``data_ptr``: ``Reads`` notes it)
    )


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
        if _SPLIT_WHAT in what:  # x.reshape(F, P, D) inside f, read by einsum or bmm
            fix += (
                " Where f splits the batch in order (x.reshape(F, P, D), points grouped per "
                "function) and keeps each sample apart, pass x in that shape with batch_dims "
                "set to the number of leading dimensions the batch was split into (batch_dims=2 "
                "for (F, P, D)): the watch follows batch dimensions through einsum, bmm and "
                "transposes, but not a batch split inside f."
            )
        if what.startswith(_PUT_WHAT):  # message passing along dimension 0
            fix += (
                " A batch of graphs with its nodes along dimension 0 (PyTorch Geometric's "
                "batch vector) makes each node a sample: give f a padded batch (B, N, ...) "
                "with node masks, or sum torchdiv.jacobian_diagonal(f, x, batch_dims=0) over "
                "each graph's nodes."
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
        # an op PyTorch cannot differentiate, on the way from x (the engines of plain
        # autograd evaluate f outside SafeDerivatives and would find no trace of it)
        underivable = UNDERIVABLE_OPS.get(func)
        if underivable is not None:
            grad = torch.is_grad_enabled()
            refuse_underivable(underivable, grad and any(_requires_grad(a) for a in args))
        carry = self.tracker.before(func, args, kwargs)
        out = func(*args, **kwargs)
        self.tracker.after(carry, args, out)
        return out

    def __exit__(self, *exc: Any) -> None:
        self.tracker = None  # let go of the tensors it tracked
        super().__exit__(*exc)  # type: ignore[no-untyped-call]  # torch leaves it unannotated


def _requires_grad(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.requires_grad


def check_empty_event(f: Callable[[torch.Tensor], Any], x: torch.Tensor, batch_dims: int) -> None:
    """For an engine that does not watch ``f``: when ``x`` has no event dimensions (every
    element a sample), evaluate ``f`` once more, watched by ``Watching`` (with grad enabled,
    so that ``no_grad`` blocks in ``f`` show as constants). Only an elementwise ``f`` is then
    batch independent, and the problem is small."""
    if checks_empty_event(x, batch_dims):
        watch_once(f, x, batch_dims)


def checks_empty_event(x: torch.Tensor, batch_dims: int) -> bool:
    """Whether ``check_empty_event`` evaluates ``f`` (a caller that evaluates it again then
    makes the two evaluations compute one function: ``torchdiv._exact.state.once``)."""
    return x.dim() == batch_dims and x.numel() > 1 and not allowed()


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
    with Watching(x, batch_dims) as mode, reading(mode.tracker):  # (``BatchAxes.follow``)
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
    """Samples picked out of a batch dimension of ``size`` samples (``x``'s batch dimension
    ``source``): ``sample`` (``None``: several, or not known which), and ``what`` picked it,
    for the message."""

    size: int
    sample: int | None
    what: str
    source: int = 0


# ---- where batch dimensions go (``after``) ----

Carry = Callable[[BatchAxes, Sequence[Any], Any], "list[Axes | None] | None"]


def _untracked(_: BatchAxes, __: Sequence[Any], ___: Any) -> None:
    return None


def _within(carry: Carry, tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``carry`` inside a custom ``autograd.Function``'s ``forward``: its results are noted as
    made there (``BatchAxes._settle``)."""
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor):
            tr.inside[id(t)] = t
    return carry(tr, args, out)


def _fresh(tr: BatchAxes, _: Sequence[Any], out: Any) -> None:
    """A factory's result (``zeros``, ``new_full``, ``zeros_like``): no values of ``x``, so a
    put into it may take it for a flattened batch (``_put_axes``)."""
    if isinstance(out, torch.Tensor):
        tr.fresh[id(out)] = out


def _detached(tr: BatchAxes, args: Sequence[Any], out: Any) -> None:
    """``detach`` (a constant, not followed; autograd detaches a fresh tensor before a put
    into it): a fresh tensor's stays fresh."""
    if tr.fresh.get(id(args[0])) is args[0]:
        _fresh(tr, args, out)


def _duplicated(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``clone`` and ``_to_copy`` (``.to(device)``, ``.double()``, ``type_as``): elementwise,
    and a fresh tensor's copy stays fresh (``torch.zeros(n, d).type_as(h).index_add_(0, dst,
    m)``, a message sum into a flattened batch, was refused)."""
    if tr.fresh.get(id(args[0])) is args[0]:
        _fresh(tr, args, out)
    return _pointwise(tr, args, out)


def _aligned(t: torch.Tensor, axes: Axes, out: torch.Tensor | Sequence[int]) -> Axes:
    """``t``'s batch dimensions in ``out`` (or a tensor of that shape), with shapes aligned at
    the right (broadcasting)."""
    shape = out.shape if isinstance(out, torch.Tensor) else out
    shift = len(shape) - t.dim()
    return tuple(
        axis._replace(position=axis.position + shift)
        for axis in axes
        if 0 <= axis.position + shift < len(shape)
        and shape[axis.position + shift] == t.shape[axis.position]
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
            spread = next((s for a in args if (s := tr.spreads(a))), None) if tr.spread else None
            if spread is not None:
                tr.spread[id(o)] = (o, spread)  # ``_spread_in`` let it through
        result.append(found)
    return result


def _flat(t: torch.Tensor, axis: Axis) -> int:
    """The place value of ``axis``'s digit in ``t``'s flat index."""
    return axis.inner * math.prod(t.shape[axis.position + 1 :])


def _placed(axis: Axis, after: int, out: torch.Tensor) -> Axis | None:
    """``axis`` in ``out``, a reshape (same elements in the same order). A batch dimension is a
    digit of the flat index with place value ``after`` (elements per sample index) and
    ``size`` values; it survives in the dimension of ``out`` whose place values hold the
    whole digit (merged with others, as ``(B, T, D) -> (B*T, D)`` merges ``B`` and ``T``),
    if any."""
    rest = out.numel()
    for p, n in enumerate(out.shape if rest else ()):
        rest //= max(n, 1)  # place value of dimension p's index
        if after % rest == 0 and (rest * n) % (after * axis.period) == 0:
            return axis._replace(position=p, inner=after // rest)
    return None


def _view(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """A reshape: the batch dimensions held whole by a dimension of ``out`` (``_placed``);
    those split across dimensions of it (``x.reshape(D, B)``, whose rows hold pieces of
    several samples) are followed as spread (``BatchAxes.spread``, in flat form: position
    -1, ``inner`` their place value), until a reshape puts them back; moved samples split
    so (``x.reshape(-1)[perm].reshape(B, D)``) mix."""
    t, axes, spread = args[0], tr.axes(args[0]), tr.spreads(args[0])
    if not (axes or spread) or not isinstance(out, torch.Tensor) or out.numel() != t.numel():
        return None
    if out.numel() == 0:  # no element: no sample's values, wherever its axes went
        return None
    found: list[Axis] = []
    flat = [(axis, _flat(t, axis)) for axis in axes or ()]
    flat += [(axis, axis.inner) for axis in spread or ()]
    split: list[Axis] = []
    for axis, after in flat:
        placed = _placed(axis, after, out)
        if placed is not None:
            found.append(placed)
        elif axis.rows:  # moved samples no longer followed could reach the output unseen
            moved = tr.moves.get(axis.rows, "an indexing op")
            what = f"samples moved by {moved}, reshaped to {_shape(out)} across their places"
            tr.pending = tr.message(tr.func, what)
            return None
        else:
            split.append(axis._replace(position=-1, inner=after))
    if split:
        tr.spread[id(out)] = (out, tuple(split))
    return [tuple(sorted(found))]


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
    return [tuple(sorted(axis._replace(position=where[axis.position]) for axis in axes))]


def _select(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``select(t, dim, i)``: one sample of a batch dimension is no batch any more; it is
    a picked sample if that was ``t``'s only batch dimension (else the tracking of that
    dimension ends). The others move up after ``dim``."""
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    dim = args[1] % t.dim()
    kept = tuple(_moved(axis, -(axis.position > dim)) for axis in axes if axis.position != dim)
    if not kept:
        at = args[2] % t.shape[dim]
        _picked(tr, t, axes[0], dim, range(at, at + 1), out)
    return [kept]


def _picked(
    tr: BatchAxes,
    t: torch.Tensor,
    axis: Axis,
    dim: int,
    span: range,
    o: Any,
) -> None:
    """Note ``o``, indices ``span`` of ``t`` along ``dim``, as one picked sample if they fall
    in one sample of ``axis`` (``t``'s only batch dimension)."""
    if axis.position != dim or not isinstance(o, torch.Tensor) or not span:
        return
    if axis.rows:
        held = axis.samples(_indices(span)).unique()
        one, sample = len(held) == 1, int(held[0])
    else:  # indices in increasing order
        one, sample = span[0] // axis.inner == span[-1] // axis.inner, span[0] // axis.inner
        sample %= axis.size
    if one:
        what = f"sample {sample} picked out of the batch (dimension {dim} of {_shape(t)})"
        tr.pick(o, Pick(axis.size, sample, what, axis.source))


def _repeated(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``repeat(repeats)`` (``torch.tile``): ``t`` tiled ``repeats[k]`` times along each
    dimension, new ones in front; a batch dimension tiled whole (a whole number of its
    periods) holds its samples in the same order again: ``x.repeat(1, 2)``, whose result was
    not followed, so a mean over samples after it passed unseen."""
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    repeats, shift = list(args[1]), len(args[1]) - t.dim()
    kept = tuple(
        _moved(axis, shift)
        for axis in axes
        if repeats[axis.position + shift] == 1
        or t.shape[axis.position] % (axis.period * axis.inner) == 0
    )
    return [kept or None]


def _moved(axis: Axis, shift: int) -> Axis:
    """``axis`` at ``shift`` dimensions further (negative: nearer the front)."""
    return axis._replace(position=axis.position + shift)


Spans = Callable[[Sequence[Any], int, Sequence[Any]], "list[range]"]  # args, dim, outs


def _indices(span: range) -> torch.Tensor:
    return torch.arange(span.start, span.stop, span.step)


def _cut(position: int, spans: Spans) -> Carry:
    """``slice``, ``narrow``, ``split``, ``unbind`` along ``dim`` (argument ``position``: 2
    for ``split``, after the sizes), whose pieces hold indices ``spans(args, dim, outs)``
    along ``dim``. A whole batch dimension stays; a piece of a cut one spanning two
    or more samples holds those (``x[1:]``: rows ``1, ..., B - 1``, so that ``x[1:] - x[:-1]``
    is seen to combine different samples); a piece inside one sample of ``t``'s only batch
    dimension is that sample, picked (inside one of several: not followed). The other batch
    dimensions stay (``unbind`` removes ``dim``)."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        t, axes = args[0], tr.axes(args[0])
        if not axes:
            return None
        dim = (args[position] if len(args) > position else 0) % t.dim()
        outs = out if isinstance(out, list | tuple) else (out,)
        pieces = spans(args, dim, outs)
        if pieces == [range(t.shape[dim])] and outs[0].dim() == t.dim():
            return [axes]
        kept = [axis for axis in axes if axis.position != dim]
        cut = [axis for axis in axes if axis.position == dim]
        result: list[Axes | None] = []
        for i, o in enumerate(outs):
            shift = int(o.dim() < t.dim())
            found = [_moved(a, -(a.position > dim) * shift) for a in kept]
            if i < len(pieces) and not kept:
                _picked(tr, t, axes[0], dim, pieces[i], o)
            if i < len(pieces) and not shift:
                found += _spanned(tr, cut, pieces[i])
            result.append(tuple(sorted(found)))
        return result

    return rule


def _spanned(tr: BatchAxes, cut: Sequence[Axis], span: range) -> list[Axis]:
    """The batch dimensions ``cut`` as held by their indices ``span``, those where they span
    two or more samples (as rows, unless the whole batch in order)."""
    found = []
    for axis in cut:
        samples = axis.samples(_indices(span))
        if samples.numel() and bool((samples != samples[0]).any()):
            found.append(_rows(tr, axis.position, axis, samples, str(tr.func)))
    return found


def _in_order(args: Sequence[Any], dim: int, outs: Sequence[Any]) -> list[range]:
    """``split`` and ``unbind``: the pieces one after the other (``unbind``'s one long)."""
    spans, start = [], 0
    for o in outs:
        extent = o.shape[dim] if o.dim() == args[0].dim() else 1
        spans.append(range(start, start + extent))
        start += extent
    return spans


def _sliced(args: Sequence[Any], dim: int, outs: Sequence[Any]) -> list[range]:
    """``slice(t, dim, start, end, step)``: its range."""
    n = args[0].shape[dim]
    start, end, step = (*args[2:5], None, None, None)[:3]
    first, stop = (
        min(max(v + n if v < 0 else v, 0), n) for v in (start or 0, n if end is None else end)
    )
    return [range(first, stop, step or 1)]


def _narrowed(args: Sequence[Any], dim: int, outs: Sequence[Any]) -> list[range]:
    """``narrow(t, dim, start, length)``."""
    first = args[2] % args[0].shape[dim]
    return [range(first, first + args[3])]


def _cat(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """Pieces joined along ``dim`` keep their other batch dimensions; every sample picked
    out, in order, each as long along ``dim``, is the batch again; whole batches one after
    the other (``cat([g(z), h(z)])``, a ``stack`` of them recorded as ``cat`` and ``view``)
    repeat their batch dimension along ``dim``."""
    tensors = [t for t in args[0] if isinstance(t, torch.Tensor)]
    dim = (args[1] if len(args) > 1 else 0) % out.dim()
    found: set[Axis] = set()
    for t in tensors:
        axes = tr.axes(t)
        if axes and t.dim() == out.dim():
            found.update(axis for axis in axes if axis.position != dim)
    extents = {t.shape[dim] for t in tensors if t.dim() == out.dim()}
    pick = _restacked(tr, tensors)
    if pick is not None and len(extents) == 1:
        found.add(Axis(dim, pick.size, extents.pop(), (), pick.source))
    else:
        found.update(_rejoined(tr, [t for t in tensors if t.dim() == out.dim()], dim))
    return [tuple(sorted(found))]


def _rejoined(tr: BatchAxes, tensors: Sequence[torch.Tensor], dim: int) -> list[Axis]:
    """The batch dimension along ``dim`` of pieces joined along it, when each is a sample
    picked out, holds one batch dimension there or nothing followed (a constant: padding),
    and one of them several samples (``cat([g(x[:1]), h(x[1:])])``, ``cat([x, zeros(k, D)])``):
    their samples one after the other, the batch again if in order (``_along_line`` places
    the constants' indices)."""
    pieces, axis = [], None
    for t in tensors:
        pick, axes = tr.picks(t), tr.axes(t) or ()
        held = [a for a in axes if a.position == dim]
        if len(held) == 1 and pick is None:
            axis = held[0]
            pieces.append(axis.samples(torch.arange(t.shape[dim])))
        elif pick is not None and pick.sample is not None and not held:
            pieces.append(torch.full((t.shape[dim],), pick.sample))
        elif pick is None and not axes and tr.spreads(t) is None:
            pieces.append(torch.full((t.shape[dim],), -1))
        else:
            return []
    sizes = {(p.size, p.source) for t in tensors if (p := tr.picks(t)) is not None}
    if axis is None or not sizes <= {(axis.size, axis.source)}:
        return []
    line = torch.cat(pieces)
    if bool((line < 0).any()):
        found = _along_line(tr, dim, line, axis.size, axis.source, (), f"padding ({tr.func})")
        return [] if found is None else [found]
    return [_rows(tr, dim, axis, line, str(tr.func))]


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
    found: set[Axis] = set()
    interleaved = _interleaved(tr, tensors, dim, out)
    if not interleaved:
        for t in tensors:
            found.update(_moved(a, a.position >= dim) for a in tr.axes(t) or ())
    pick = _restacked(tr, tensors)
    if pick is not None:
        found.add(Axis(dim, pick.size, 1, (), pick.source))
    return [tuple(sorted(found))]


def _listed(args: Sequence[Any]) -> list[Any]:
    """``args`` with list and tuple arguments (``cat``'s tensors) spread into it."""
    return [t for a in args for t in (a if isinstance(a, list | tuple) else (a,))]


def _interleaved(tr: BatchAxes, tensors: Sequence[torch.Tensor], dim: int, out: Any) -> bool:
    """Whether ``stack(tensors, dim)`` interleaves the batch: each tensor holds samples along
    ``dim - 1`` alone, and index ``(i, k)`` of dimensions ``(dim - 1, dim)`` holds sample
    ``i K + k`` (``stack([x[::2], x[1::2]], 1)``), the batch in order once the two are merged:
    noted as spread (``BatchAxes.spread``) for a reshape to follow."""
    held: list[Axis] = []
    for t in tensors:
        axes = tr.axes(t)
        if not axes or len(axes) != 1 or axes[0].position != dim - 1 or dim == 0:
            return False
        held.append(axes[0])
    first = held[0]  # (stack of no tensors raised before)
    if any((h.size, h.source, h.inner) != (first.size, first.source, 1) for h in held):
        return False
    n = tensors[0].shape[dim - 1]
    samples = torch.stack([h.samples(torch.arange(n)) for h in held], 1).flatten()
    if len(samples) != first.size or not bool((samples == torch.arange(first.size)).all()):
        return False
    after = math.prod(out.shape[dim + 1 :])
    tr.spread[id(out)] = (out, (Axis(-1, first.size, after, (), first.source),))
    return True


def _restacked(tr: BatchAxes, tensors: Sequence[torch.Tensor]) -> Pick | None:
    """The first pick, if ``tensors`` are the samples of a batch dimension, each picked out
    alone, in order."""
    picks = [tr.picks(t) for t in tensors]
    first = picks[0] if picks else None
    if first is None or len(picks) != first.size:
        return None
    in_order = [(p.size, p.source, p.sample) if p else None for p in picks] == [
        (first.size, first.source, i) for i in range(len(picks))
    ]
    return first if in_order else None


def _broadcast(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``broadcast_tensors(tensors)``: each result keeps its tensor's batch dimensions."""
    return [_aligned(t, tr.axes(t) or (), o) or None for t, o in zip(args[0], out, strict=True)]


def _first_like_input(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """Normalisations, convolutions, matrix products that passed ``before``: the first output
    keeps the batch dimensions it had in the input (``_MIXING`` refused the others)."""
    first = out[0] if isinstance(out, list | tuple) else out
    axes = tr.axes(args[0])
    return [_aligned(args[0], axes, first)] if axes and args[0].dim() == first.dim() else None


def _convolved(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """A convolution that ``_convolution`` let pass: the batch dimensions keep their places;
    samples along the channels (a folded batch, whole groups per sample) hold the output
    channels of their groups, ``inner`` scaled by output over input channels per group."""
    t, axes = args[0], tr.axes(args[0])
    groups = args[8] if len(args) > 8 else 1
    width_in, width_out = t.shape[1] // groups, out.shape[1] // groups
    if not axes and isinstance(out, torch.Tensor):  # (samples only in the weights or bias)
        return [_channels_from_weights(tr, args, width_in, width_out)]
    if not axes or t.dim() != out.dim():
        return None
    channels = tuple(
        axis._replace(inner=axis.inner // width_in * width_out)
        for axis in axes
        if axis.position == 1 and axis.inner % width_in == 0  # (else refused: mixed)
    )
    return [tuple(sorted({*_aligned(t, axes, out), *channels}))]


def _channels_from_weights(
    tr: BatchAxes, args: Sequence[Any], width_in: int, width_out: int
) -> Axes | None:
    """The output channels' samples of a convolution of a constant input whose weights or
    bias hold samples along their first dimension (a hypernetwork's per-sample kernels,
    ``_conv_parameters`` checked them): the output channels (the input channels of a
    transposed convolution's weights: ``inner`` scaled as in ``_convolved``)."""
    weight, bias, transposed = args[1], args[2], bool(args[6])
    for axis in tr.axes(weight) or ():
        scale = (axis.inner // width_in * width_out) if transposed else axis.inner
        return (axis._replace(position=1, inner=scale),)
    for axis in tr.axes(bias) or ():
        return (axis._replace(position=1),)
    return None


def _complex_view(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``view_as_real`` (a new last dimension: real and imaginary parts) and
    ``view_as_complex`` (those pairs as one number; ``_paired`` refused pairs of samples):
    the dimensions before, and the batch dimensions among them, stay where they were."""
    t, axes = args[0], tr.axes(args[0])
    if not axes or not isinstance(out, torch.Tensor):
        return None
    return [tuple(axis for axis in axes if axis.position < min(t.dim(), out.dim()))]


def _mm(biased: bool) -> Carry:
    """``(n, k) @ (k, m)`` (after a bias for ``addmm``), batched over dimension 0 for ``bmm``:
    the left operand's row dimensions and the right one's column dimension carry over."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        a, b = (args[1], args[2]) if biased else (args[0], args[1])
        found: list[Axis] = []
        if biased and (axes := tr.axes(args[0])):
            found += _aligned(args[0], axes, out)
        if axes := tr.axes(a):
            found += [axis for axis in axes if axis.position < a.dim() - 1]
        if axes := tr.axes(b):
            found += [axis for axis in axes if axis.position in (b.dim() - 1, *range(b.dim() - 2))]
        return [tuple(sorted(set(found))) if len(found) > 1 else tuple(found)]

    return rule


_SPLIT_WHAT = "the batch split in order across the leading dimensions"


def _split_in_order(t: torch.Tensor, spread: Axes) -> bool:
    """Whether ``t`` holds the samples spread as ``x.reshape(F, P, D)`` puts them: each spread
    axis's samples are exactly its leading dimensions, in order (``_span``). Such an ``f``
    may keep every sample apart through an op the watch cannot follow spread samples through
    (``einsum``, ``bmm``, a transpose: a DeepONet's points grouped per function), and is then
    watched exactly when given ``x`` in that shape with as many batch dimensions."""
    spans = [_span(t, axis) for axis in spread]
    return all(span is not None and span.start == 0 and len(span) > 1 for span in spans)


def _span(t: torch.Tensor, axis: Axis) -> range | None:
    """The dimensions of ``t`` whose indices together are exactly the spread ``axis``'s samples
    (``x.reshape(B // 2, 2, D)``: dimensions 0 and 1), if its digit is aligned with them."""
    place = 1
    for q in reversed(range(t.dim())):
        if place == axis.inner and t.shape[q] > 1:
            held = 1
            for p in reversed(range(q + 1)):
                held *= t.shape[p]
                if held == axis.period:
                    return range(p, q + 1)
            return None
        place *= t.shape[q]
    return None


def _spread_reduced(
    tr: BatchAxes, t: torch.Tensor, spread: Axes, dims: Sequence[int], out: Any
) -> None:
    """A reduction over dimensions that hold none of the samples spread in ``t`` (``_span``):
    its results hold them spread alike, at the place value less the reduced dimensions
    after them."""
    found = []
    for axis in spread:
        span = _span(t, axis)
        if span is None or any(d in span for d in dims):
            return
        below = math.prod(t.shape[d] for d in dims if d > span[-1])
        found.append(axis._replace(inner=axis.inner // below))
    for o in out if isinstance(out, list | tuple) else (out,):
        if isinstance(o, torch.Tensor) and _floating(o):
            tr.spread[id(o)] = (o, tuple(found))


def _reduced(op: Any) -> Carry:
    """A reduction that ``before`` let through: the batch dimensions were not reduced; they
    move up past reduced dimensions unless ``keepdim``."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        t, axes = args[0], tr.axes(args[0])
        if tr.spread and (spread := tr.spreads(t)):
            _spread_reduced(tr, t, spread, _reduced_dims(op, args), out)
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
                result.append(tuple(_moved(a, -sum(d < a.position for d in dims)) for a in axes))
        return result

    return rule


# ---- samples moved by indexing (``Axis.rows``) ----


def _held(axis: Axis, n: int) -> tuple[int, ...]:
    """The samples ``axis`` holds at indices ``0..n-1`` along its dimension."""
    if axis.inner == 1 and n == len(axis.rows):
        return axis.rows  # each index one row: no tensor to make
    return tuple(axis.samples(torch.arange(n)).tolist())


def _rows(tr: BatchAxes, position: int, axis: Axis, samples: torch.Tensor, what: str) -> Axis:
    """The batch dimension at ``position`` holding ``samples`` of ``axis``'s batch, one per
    index (in order, or the batch in order repeated, as whole batches joined: a plain one;
    else its rows, noted as moved by ``what``). Runs of one sample as long as the first
    (``x.reshape(-1).flip(0)``: ``D`` elements per sample) are one row each, with that
    ``inner``, so that a reshape back follows them."""
    run = _run(samples)
    rows = tuple(samples[::run].tolist())
    if len(rows) % axis.size == 0 and rows == tuple(range(axis.size)) * (len(rows) // axis.size):
        return Axis(position, axis.size, run, (), axis.source)
    tr.moves.setdefault(rows, what)
    return Axis(position, axis.size, run, rows, axis.source)


def _run(samples: torch.Tensor) -> int:
    """The length of the first run of equal ``samples`` (1-d), if they are all runs that long
    (else 1)."""
    changes = (samples[1:] != samples[:-1]).nonzero()
    run = int(changes[0]) + 1 if len(changes) else len(samples)
    if run < 2 or len(samples) % run:
        return 1
    blocks = samples.reshape(-1, run)
    return run if bool((blocks == blocks[:, :1]).all()) else 1


def _expanded(t: torch.Tensor, indices: Sequence[Any]) -> list[torch.Tensor | None] | None:
    """The indices of ``t[indices]`` (``aten.index``, ``index_put``) one per dimension of
    ``t``, a boolean mask as the integer indices of its ``True`` places in the dimensions it
    covers, negative ones counted from the end; ``None`` for a 0-d mask."""
    index: list[torch.Tensor | None] = []
    for i in indices:
        if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
            if i.dim() == 0:
                return None
            index += list(i.nonzero().unbind(1))
        else:
            index.append(i)
    index += [None] * (t.dim() - len(index))
    return [None if i is None else i.long() % t.shape[d] for d, i in enumerate(index)]


def _indexed(
    tr: BatchAxes, t: torch.Tensor, axes: Axes, index: list[torch.Tensor | None], what: str
) -> tuple[list[int], Axes, Pick | None]:
    """The shape of ``t[index]`` (advanced indexing: the broadcast indices replace the
    dimensions they index, in place if those are adjacent, else in front), its batch
    dimensions (``t``'s ``axes``; one indexed gives the samples at the indices, as rows), and
    the sample it holds if ``t``'s only batch dimension, indexed, gives one sample
    throughout. An indexed batch dimension under indices of two or more dimensions is not
    followed: ``tr.pending`` says so."""
    given = [d for d, i in enumerate(index) if i is not None]
    if not given:
        return list(t.shape), axes, None
    indices = torch.broadcast_tensors(*(i for i in index if i is not None))  # type: ignore[no-untyped-call]
    inner = list(indices[0].shape)
    adjacent = given == list(range(given[0], given[-1] + 1))
    at = given[0] if adjacent else 0
    kept = [d for d in range(t.dim()) if d not in given]
    front = kept[:at] if adjacent else []
    shape = [t.shape[d] for d in front] + inner + [t.shape[d] for d in kept[len(front) :]]
    found: list[Axis] = []
    for axis in axes:
        if axis.position in kept:
            rank = kept.index(axis.position)
            found.append(axis._replace(position=rank + (len(inner) if rank >= len(front) else 0)))
            continue
        samples = axis.samples(indices[given.index(axis.position)])
        tr.indexed = True
        if len(axes) == 1 and samples.numel() and bool((samples == samples.flatten()[0]).all()):
            sample = int(samples.flatten()[0])
            pick = f"sample {sample} picked out of the batch by {what}"
            return shape, (), Pick(axis.size, sample, pick, axis.source)
        line = _line(samples) if samples.numel() else None
        if line is not None:
            found.append(_rows(tr, at + line[0], axis, line[1], what))
        elif samples.numel():
            tr.pending = tr.message(tr.func, "samples moved by indices of two or more dimensions")
    return shape, tuple(sorted(found)), None


def _line(samples: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """The dimension ``k`` along which alone ``samples`` (a non-empty index's samples) vary,
    with the samples along it: a 1-d index, or one broadcast along the others
    (``x[arange(B)[:, None], idx]``, each sample's entries at its own ``idx[b]``)."""
    for k in range(samples.dim()):
        line = samples.movedim(k, 0).reshape(samples.shape[k], -1)
        if bool((line == line[:, :1]).all()):
            return k, line[:, 0]
    return None


def _noted(tr: BatchAxes, axes: Axes, pick: Pick | None) -> list[Axes | None]:
    """The result's batch dimensions, or the sample it holds (``tr.carried``)."""
    if pick is not None:
        tr.carried = pick
    return [axes]


def _index(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``t[indices]`` (``aten.index``): a boolean mask or integer indices along the batch
    move samples (``x[mask]``, ``x[perm]``, ``x[idx.nonzero()]``)."""
    t, axes = args[0], tr.axes(args[0])
    index = _expanded(t, args[1]) if axes else None
    if not axes or index is None:
        return None
    _, found, pick = _indexed(tr, t, axes, index, f"an indexing op ({tr.func})")
    return _noted(tr, found, pick)


def _index_select(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``index_select(t, dim, index)``: ``t[..., index]`` along ``dim``."""
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    index: list[torch.Tensor | None] = [None] * t.dim()
    index[args[1] % t.dim()] = args[2].reshape(-1).long() % t.shape[args[1]]
    _, found, pick = _indexed(tr, t, axes, index, str(tr.func))
    return _noted(tr, found, pick)


def _grid(shape: Sequence[int], dim: int) -> torch.Tensor:
    """The index along ``dim`` of every element of a tensor of ``shape``."""
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return torch.arange(shape[dim]).reshape(view).expand(*shape)


def _gather(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``gather(t, dim, index)`` (``take_along_dim`` too): ``out[i][j] = t[index[i][j]][j]``
    for ``dim=0``. A batch dimension gathered along is moved, if each row of the result
    holds one sample (an index expanded along the other dimensions); else the rows mix
    samples. The others stay where the index spans them whole."""
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    dim, index = args[1] % max(t.dim(), 1), args[2]
    found: list[Axis] = []
    for axis in axes:
        q = axis.position
        if q != dim:
            if index.shape[q] == t.shape[q]:
                found.append(axis)
            continue
        tr.indexed = True
        held = axis.samples(index % t.shape[dim]).movedim(dim, 0).reshape(index.shape[dim], -1)
        if not bool((held == held[:, :1]).all()):
            tr.pending = tr.message(tr.func, "a gather whose rows read several samples")
            return None
        if len(axes) == 1 and held.numel() and bool((held == held[0, 0]).all()):
            sample = int(held[0, 0])
            pick = Pick(axis.size, sample, f"sample {sample} gathered", axis.source)
            return _noted(tr, (), pick)
        if held.numel():
            found.append(_rows(tr, dim, axis, held[:, 0], str(tr.func)))
    return [tuple(sorted(found))]


def _masked_select(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``masked_select(t, mask)``: the elements at the mask's ``True`` places, in order, in
    one dimension; each of ``t``'s batch dimensions gives the sample of each element."""
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    shape = torch.broadcast_shapes(t.shape, args[1].shape)  # type: ignore[no-untyped-call]
    places = args[1].expand(shape).nonzero()
    index: list[torch.Tensor | None] = list(places.unbind(1))
    _, found, pick = _indexed(tr, t.expand(shape), _aligned(t, axes, shape), index, str(tr.func))
    return _noted(tr, found, pick)


def _one_per_place(args: Sequence[Any]) -> bool:
    """Whether ``masked_scatter(t, mask, source)`` is ``t[mask] = source``: a 1-d ``source``
    with one value per ``True`` place of the mask (broadcast to ``t``)."""
    t: torch.Tensor = args[0]
    mask: torch.Tensor = args[1]
    source: torch.Tensor = args[2]
    return t.dim() > 0 and source.dim() == 1 and source.numel() == int(mask.expand(t.shape).sum())


def _masked_put(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``masked_scatter(t, mask, source)`` with one value per place: ``index_put`` at the
    mask's places (``x.masked_scatter(m, g(x[m]))`` puts each sample's values back)."""
    t = args[0]
    index = _expanded(t, [args[1].expand(t.shape)]) if _one_per_place(args) else None
    return None if index is None else [_put(tr, t, index, args[2]) or None]


def _reordered(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``flip(t, dims)`` and ``roll(t, shifts, dims)``: a batch dimension among ``dims`` holds
    its samples in another order."""
    t, axes = args[0], tr.axes(args[0])
    if not axes or not isinstance(out, torch.Tensor) or out.shape != t.shape:
        return None
    rolled = tr.func in _ROLLS
    dims = args[2 if rolled else 1] if len(args) > (2 if rolled else 1) else []
    dims = [dims] if isinstance(dims, int) else list(dims)
    shifts = args[1] if rolled else [0] * len(dims)
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    if rolled and not dims:
        return _rolled_flat(tr, t, axes, shifts[0])
    order: dict[int, torch.Tensor] = {}
    for d, shift in zip(dims, shifts, strict=True):
        d %= t.dim()
        at = torch.arange(t.shape[d])
        order[d] = (at - shift) % t.shape[d] if rolled else at.flip(0)
    found = [
        _rows(tr, a.position, a, a.samples(order[a.position]), str(tr.func))
        if a.position in order
        else a
        for a in axes
    ]
    return [tuple(sorted(found))]


def _rolled_flat(
    tr: BatchAxes, t: torch.Tensor, axes: Axes, shift: int
) -> list[Axes | None] | None:
    """``roll(t, shift)`` with no dims rolls the flattened tensor: element ``f`` holds
    ``t``'s ``(f - shift) % numel``. Each batch dimension is followed where its samples still
    vary along one dimension; samples spread over several (a shift by part of a row) mix."""
    n = t.numel()
    source = ((torch.arange(n) - shift) % max(n, 1)).reshape(t.shape)
    found = []
    for axis in axes:
        stride = math.prod(t.shape[axis.position + 1 :])
        at = torch.div(source, stride, rounding_mode="floor") % t.shape[axis.position]
        samples = axis.samples(at)
        line = _line(samples) if samples.numel() else None
        if line is None:
            what = "samples moved across dimensions by a roll of the flattened tensor"
            tr.pending = tr.message(tr.func, what)
            return None
        found.append(_rows(tr, line[0], axis, line[1], str(tr.func)))
    return [tuple(sorted(found))]


_PUT_WHAT = "values written into other samples' places"


def _written(tr: BatchAxes, axis: Axis) -> str:
    """The message for values of ``axis``'s samples written into other samples' places."""
    moved = tr.moves.get(axis.rows, "an indexing op") if axis.rows else None
    return _PUT_WHAT + (f" (samples moved there by {moved})" if moved else "")


def _put_axes(
    tr: BatchAxes, t: torch.Tensor, values: Any, accumulate: bool, along: int | None = None
) -> Axes:
    """The batch dimensions of ``t``, written (or, ``accumulate``, added) ``values``: its
    own, or, for a tensor nothing tracked of ``x``'s batch shape (``torch.zeros_like(x)``)
    written samples, ``x``'s. Samples added, or moved samples written, into an untracked
    tensor of another shape are refused (``tr.pending``) unless ``values`` lands along one
    dimension ``along`` only, as many dimensions as ``t``, whose batch dimensions lie
    elsewhere, each as long in ``t`` (``_kept_in_place``: the result holds them there), or
    ``t`` is fresh (``_fresh``) and its first dimension could be a flattened batch
    (``_flattened``): the caller's check that every value lands in a place of its own
    samples decides, with ``tr.guess`` as the message if not."""
    axes = tr.axes(t)
    if axes:
        return axes
    held = tr.axes(values)
    batch = tr.x.shape[: tr.batch_dims]
    if (held or tr.picks(values) is not None) and t.shape[: tr.batch_dims] == batch:
        return tr.start
    if held and _kept_in_place(t, values, held, along):
        return held
    if held and (accumulate or any(axis.rows for axis in held)):
        # per-cluster sums ``zeros(K, D).index_add(0, cid, x)``: places no longer followed
        what = (
            f"samples {'added' if accumulate else 'moved'} into a tensor of shape "
            f"{_shape(t)}, not x's batch shape, whose places are not followed"
        )
        flat = _flattened(tr, t) if tr.fresh.get(id(t)) is t else ()
        if flat:
            tr.guess = tr.message(tr.func, f"{what} (nor those of a flattened batch)")
            return flat
        tr.pending = tr.message(tr.func, what)
    return ()


def _kept_in_place(t: torch.Tensor, values: Any, held: Axes, along: int | None) -> bool:
    """Whether every value of ``values`` (batch dimensions ``held``) written along the one
    dimension ``along`` of ``t`` (``index_add``, ``scatter_add``, ``index_put`` with one
    index) stays at its own place along every other dimension: as many dimensions, none of
    ``held`` along ``along``, each as long in ``t``. A sum over a layout with the batch
    elsewhere (``zeros(D, B).index_add(0, i, h.T)``, the directions' ``(k, B, n)`` jets of a
    Laplacian inside a Laplacian) keeps its samples apart there."""
    if along is None or not isinstance(values, torch.Tensor) or not 0 < values.dim() == t.dim():
        return False
    along %= t.dim()
    return all(p != along and t.shape[p] == values.shape[p] for p in (a.position for a in held))


def _flattened(tr: BatchAxes, t: torch.Tensor) -> Axes:
    """``x``'s batch dimensions in ``t`` if its first dimension has ``k * n`` places (``n``:
    the batch's size, all its dimensions) laid out as ``x.reshape(n * k, ...)`` would hold
    them: samples outermost, ``k`` places each (a message-passing net's ``(B * N, F)`` nodes,
    a mixture of experts' ``(B * T, D)`` tokens); none otherwise."""
    batch = tr.x.shape[: tr.batch_dims]
    n = math.prod(batch)
    if t.dim() == 0 or t.shape[0] % n:
        return ()
    k = t.shape[0] // n
    return tuple(
        Axis(0, axis.size, k * math.prod(batch[axis.source + 1 :]), (), axis.source)
        for axis in tr.start
    )


def _put(
    tr: BatchAxes,
    t: torch.Tensor,
    index: list[Any],
    values: Any,
    accumulate: bool = False,
    along: int | None = None,
) -> Axes:
    """``t[index] = values`` (``index_put``, ``index_copy``, ``index_add``; ``along``: the one
    dimension ``index`` picks places along, if so): each value must land in a place of its
    own samples (``y[m] = g(x[m])``, ``y[perm] = x[perm]``); else ``tr.pending`` says which
    op moved samples. Returns ``t``'s batch dimensions."""
    axes = _put_axes(tr, t, values, accumulate, along)
    if not axes or not isinstance(values, torch.Tensor):
        return axes
    func = tr.func
    shape, places, pick = _indexed(tr, t, axes, index, str(func))
    carried, held = tr.picks(values), tr.axes(values)
    if carried is not None and carried.sample is not None:
        wrong = places or (pick is not None and pick.sample != carried.sample)
        if wrong:
            tr.pending = tr.message(func, f"{carried.what}, written into other samples' places")
        return axes
    if held and pick is not None:
        tr.pending = tr.guess or tr.message(func, f"{_PUT_WHAT} (the places all hold {pick.what})")
        return axes
    expected: dict[int, set[tuple[int, ...]]] = {}
    for axis in places:
        expected.setdefault(axis.position, set()).add(_held(axis, shape[axis.position]))
    for axis in _aligned(values, held or (), shape):
        if _held(axis, shape[axis.position]) not in expected.get(axis.position, set()):
            tr.pending = tr.guess or tr.message(func, _written(tr, axis))
            break
    return axes


def _index_put(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``index_put(t, indices, values)`` and its in-place forms (``y[m] = v``)."""
    index = _expanded(args[0], args[1])
    if index is None:
        return None
    accumulate = bool(args[3]) if len(args) > 3 else False
    picked = [d for d, i in enumerate(args[1]) if i is not None]
    one = picked if len(picked) == 1 and args[1][picked[0]].dim() == 1 else [None]
    return [_put(tr, args[0], index, args[2], accumulate, one[0]) or None]


def _index_copy(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``index_copy(t, dim, index, source)``, ``index_add``: ``t[..., index] = source``."""
    t = args[0]
    index: list[Any] = [None] * t.dim()
    dim = args[1] % max(t.dim(), 1)
    index[dim] = args[2].reshape(-1).long() % t.shape[dim]
    return [_put(tr, t, index, args[3], tr.func in _ACCUMULATING, dim) or None]


def _scatter(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``scatter(t, dim, index, src)`` (``scatter_add``, ``scatter_reduce``): ``src[i][j]``
    lands at ``[index[i][j]][j]`` for ``dim=0``; each must be a place of its own samples."""
    t, dim, index, src = args[0], args[1] % max(args[0].dim(), 1), args[2], args[3]
    axes = _put_axes(tr, t, src, tr.func in _ACCUMULATING, dim)
    held = tr.axes(src) if isinstance(src, torch.Tensor) else None
    if not axes or not held:
        return [axes or None]
    shape = list(index.shape)
    places = {
        (
            axis.size,
            tuple(
                axis.samples(index % t.shape[dim] if q == dim else _grid(shape, q))
                .flatten()
                .tolist()
            ),
        )
        for axis in axes
        for q in (axis.position,)
    }
    for axis in held:
        if index.shape[axis.position] == 0:
            continue
        samples = tuple(axis.samples(_grid(shape, axis.position)).flatten().tolist())
        if (axis.size, samples) not in places:
            tr.pending = tr.guess or tr.message(tr.func, _written(tr, axis))
            break
    return [axes]


# ---- values written through a view (``buffer[:, :k] = g(x)``) ----


def _box(
    root: torch.Tensor, view: torch.Tensor
) -> tuple[list[int], list[int | None], list[int]] | None:
    """Where ``view`` lies in ``root``, whose memory it shares (``root``: dense, not
    overlapping): the index in ``root`` of its first element, and for each of its dimensions
    the dimension of ``root`` it runs along (``None``: one long) with its step; ``None`` if
    two of its dimensions run along one of ``root``'s (a reshape that splits one) or one
    leaves it."""
    order = sorted((d for d in range(root.dim()) if root.shape[d] > 1), key=root.stride)[::-1]
    dense = 1
    for d in order[::-1]:
        if root.stride(d) != dense:
            return None
        dense *= root.shape[d]
    offset, first = int(view.storage_offset() - root.storage_offset()), [0] * root.dim()
    for d in order:
        first[d], offset = divmod(offset, root.stride(d))
    dims: list[int | None] = []
    steps: list[int] = []
    for n, stride in zip(view.shape, view.stride(), strict=True):
        q = next((d for d in order if 0 < root.stride(d) <= stride), None) if n > 1 else None
        step = stride // root.stride(q) if q is not None else 0
        if n > 1 and (
            q is None
            or stride % root.stride(q)
            or q in dims
            or first[q] + step * (n - 1) >= root.shape[q]
        ):
            return None
        dims.append(q)
        steps.append(step)
    return first, dims, steps


def _lines(tr: BatchAxes, t: torch.Tensor) -> Lines | None:
    """The samples along ``t``'s batch dimensions as lines, -1 where no value of ``x`` was
    written (kept from the last write through a view, if its batch dimensions did not change
    since); ``None`` if it holds one batch dimension of ``x`` twice."""
    entry = tr.lines.get(id(t))
    axes = tr.axes(t) or ()
    if entry is not None and entry[0] is t and entry[1] == axes:
        return dict(entry[2])
    lines: Lines = {}
    for axis in axes:
        if axis.source in lines:
            return None
        lines[axis.source] = (axis.position, axis.samples(torch.arange(t.shape[axis.position])))
    return lines


def _overwrite(
    tr: BatchAxes,
    old: torch.Tensor,
    root: torch.Tensor,
    view: torch.Tensor,
    axes: Axes,
    pick: Pick | None,
) -> tuple[Axes, str | None] | None:
    """The batch dimensions of ``root``, which held ``old``'s values, after values holding
    ``axes`` (aligned to ``view``; or one sample, ``pick``) were written into ``view``, a view
    of it: along each dimension of ``root``, the samples at the written indices replace those
    there if the write spans all the other dimensions, else must be the same (``buffer[:, :k] =
    g(x)`` makes a fresh buffer hold the batch along dimension 0; ``y[1:] = g(x)[:-1]``
    shifts it). ``None`` if not followed (no lines: a view across dimensions); with a message
    if the samples no longer lie along one dimension (two written in one place)."""
    box = _box(root, view)
    lines = None if box is None else _lines(tr, old)
    if box is None or lines is None:
        return None
    first, dims, steps = box
    spans = [range(i, i + 1) for i in first]
    for k, q in enumerate(dims):
        if q is not None:
            spans[q] = range(first[q], first[q] + steps[k] * (view.shape[k] - 1) + 1, steps[k])
    written: Lines = {}
    for axis in axes:
        q = dims[axis.position]
        if q is None or axis.source in written:
            return None
        written[axis.source] = (q, axis.samples(torch.arange(view.shape[axis.position])))
    batch = tr.x.shape[: tr.batch_dims]
    if pick is not None and pick.sample is not None and not axes:
        source = pick.source
        q = lines[source][0] if source in lines else source
        if source not in lines and root.shape[: tr.batch_dims] != batch:
            return None  # one sample written into a tensor not followed: not followed
        written[source] = (q, torch.full((len(spans[q]),), pick.sample))
    sizes = {axis.source: axis.size for axis in tr.start}
    result: list[Axis] = [a for a in tr.axes(old) or () if a.source not in written]
    for source, (q, samples) in written.items():
        at = _indices(spans[q])
        q_old, line = lines.get(source, (q, torch.full((root.shape[q],), -1)))
        whole = all(len(spans[d]) == root.shape[d] for d in range(root.dim()) if d != q)
        kept = line[at]
        if q_old != q and whole and len(at) == root.shape[q]:
            line = torch.full((root.shape[q],), -1)  # all of it written
        elif q_old != q or (not whole and bool(((kept >= 0) & (kept != samples)).any())):
            return (), f"{_PUT_WHAT} (written through a view into a tensor of shape {_shape(root)})"
        line = line.clone()
        line[at] = samples
        lines[source] = (q, line)
        placed = _along_line(
            tr, q, line, sizes[source], source, steps, f"a write through a view ({tr.func})"
        )
        if placed is not None:
            result.append(placed)
    found = tuple(sorted(result))
    tr.lines[id(root)] = (root, found, lines)
    return found, None


def _along_line(
    tr: BatchAxes,
    q: int,
    line: torch.Tensor,
    size: int,
    source: int,
    steps: Sequence[int],
    what: str,
) -> Axis | None:
    """The batch dimension along ``q`` holding ``line``'s samples, where indices without one
    (-1) take whatever keeps the batch in order (``buffer[::2] = g(x)``: two indices per
    sample), else the sample before them."""
    held = line >= 0
    if not bool(held.any()):
        return None
    n = len(line)
    at = torch.arange(n)
    for inner in sorted({1, *(s for s in steps if s > 1), max(n // size, 1)}):
        if bool(((at[held] // inner) % size == line[held]).all()):
            return Axis(q, size, inner, (), source)
    filled = line.clone()
    last = int(line[held][0])
    for i in range(n):  # the sample before, the first for the indices before any
        last = int(filled[i]) if filled[i] >= 0 else last
        filled[i] = last
    return _rows(tr, q, Axis(q, size, 1, (), source), filled, what)


def _writing(carry: Carry) -> Carry:
    """``carry`` of an op writing into its first argument, which, a view of another tensor
    (``buffer[:, :k].copy_(g(x))``), writes into that too: its batch dimensions follow
    (``_overwrite``), and it depends on combined samples if the values written do."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        result = carry(tr, args, out)
        view = args[0]
        root = view._base if isinstance(view, torch.Tensor) else None
        if root is None or not _floating(root):
            return result
        axes = (result[0] if result else None) or ()
        pick = tr.carried if not axes else None
        if tr.pending is not None:
            tr.mixed[id(root)] = (root, tr.pending)
        elif axes or pick is not None:
            found = _overwrite(tr, root, root, view, axes, pick)
            if found is not None and found[1] is not None:
                tr.mixed[id(root)] = (root, tr.message(tr.func, found[1]))
            elif found is not None:
                tr.picked.pop(id(root), None)
                tr._note(root, found[0])
        return result

    return rule


def _writes_first(func: Any) -> bool:
    """Whether ``func`` writes into its first argument (``copy_``, ``add_``, ``index_put_``)."""
    arguments = func._schema.arguments
    alias = arguments[0].alias_info if arguments else None
    return alias is not None and alias.is_write


def _sliced_at(t: torch.Tensor, args: Sequence[Any]) -> tuple[slice, ...]:
    """The index of ``slice_scatter(t, src, dim, start, end, step)``'s view of ``t``."""
    dim = (args[2] if len(args) > 2 else 0) % t.dim()
    start, end, step = (*args[3:6], None, None, None)[:3]
    return (slice(None),) * dim + (slice(start, end, step or 1),)


def _padded_constant(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``constant_pad_nd(t, pad)`` (``F.pad``), ``pad`` as ``(left, right)`` pairs from the
    last dimension (negative: cut): a batch dimension padded holds the constant's indices
    (``_along_line`` places them), the others stay."""
    t, axes, pad = args[0], tr.axes(args[0]), args[1]
    if not axes:
        return None
    found = []
    for axis in axes:
        i = t.dim() - 1 - axis.position
        left, right = (pad[2 * i], pad[2 * i + 1]) if 2 * i + 1 < len(pad) else (0, 0)
        if not (left or right):
            found.append(axis)
            continue
        samples = axis.samples(torch.arange(t.shape[axis.position]))
        samples = samples[max(-left, 0) : len(samples) - max(-right, 0)]
        line = torch.cat(
            [torch.full((max(left, 0),), -1), samples, torch.full((max(right, 0),), -1)]
        )
        placed = _along_line(tr, axis.position, line, axis.size, axis.source, (), str(tr.func))
        found += [placed] if placed is not None else []
    return [tuple(sorted(found))]


def _copied(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``copy_(t, src)``: ``t`` holds ``src``'s values (broadcast), its own are gone."""
    src = args[1]
    axes = tr.axes(src)
    return [_aligned(src, axes, args[0]) or None] if axes else None


def _scattered_into(make_view: Callable[[torch.Tensor, Sequence[Any]], torch.Tensor]) -> Carry:
    """``select_scatter(t, src, dim, index)``, ``slice_scatter``, ...: ``t`` with ``src``
    written into the view ``make_view(result, args)`` (``_overwrite``)."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        t, src = args[0], args[1]
        axes, pick = tr.axes(src) or (), tr.picks(src)
        if not axes and pick is None:
            return [tr.axes(t)]
        view = make_view(out, args)
        found = _overwrite(tr, t, out, view, _aligned(src, axes, view), pick)
        if found is None:
            return None
        if found[1] is not None:
            tr.pending = tr.message(tr.func, found[1])
        return [found[0] or None]

    return rule


def _storage_samples(t: torch.Tensor, axis: Axis) -> torch.Tensor:
    """The sample of ``axis`` held at each element of ``t``'s storage (``-1``: an element
    ``t`` does not view), a 1-d integer tensor (``_strided`` reads it through the strides of
    an ``as_strided`` call)."""
    size = t.untyped_storage().nbytes() // t.element_size()
    held = torch.full((size,), -1, dtype=torch.long)
    places = torch.arange(size).as_strided(t.shape, t.stride(), t.storage_offset())
    held[places] = axis.samples(_grid(t.shape, axis.position))  # (an overlap: the same sample)
    return held


def _strided(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``as_strided(t, size, stride, offset)``: any layout of ``t``'s storage (a transpose,
    ``torch.stft``'s overlapping frames of ``n_fft`` elements every ``hop_length``). Read
    through its strides, a batch dimension of ``t`` is one of the result where the samples
    vary along one dimension alone (frames of each sample's signal, ``stft`` of a ``(B, L)``
    batch, are per sample: the samples along the frames' dimension); one sample throughout is
    a picked sample; samples varying along two or more dimensions (``stft`` of ``x.T``: frames
    along the batch, each holding several samples) are laid across the places of each one, and
    what reads them combines samples (as ``x.reshape(-1).unfold(0, k, 1)`` would: refused
    where it reaches ``f``'s output). A result that also reads storage outside ``t`` is read
    through another followed tensor on that storage holding the same batch dimension and
    every place read (``x[1:].as_strided(x.shape, x.stride(), 0)`` reads ``x[0]``: ``x``'s),
    else not followed."""
    t, axes = args[0], tr.axes(args[0])
    if not axes or not isinstance(out, torch.Tensor) or not out.numel():
        return None
    offset = args[3] if len(args) > 3 and args[3] is not None else t.storage_offset()
    found: list[Axis] = []
    for axis in axes:
        held: torch.Tensor | None = _storage_samples(t, axis).as_strided(args[1], args[2], offset)
        if held is not None and bool((held < 0).any()):
            held = _through_storage(tr, t, axis, args[1], args[2], offset)
        if held is None:
            continue
        first = int(held.flatten()[0])
        if len(axes) == 1 and bool((held == first).all()):
            what = f"sample {first} picked out of the batch by {tr.func}"
            tr.carried = Pick(axis.size, first, what, axis.source)
            return [()]
        line = _line(held)
        if line is None:
            what = (
                f"as_strided laying x's samples across the dimensions of {_shape(out)} "
                f"(frames along the batch: torch.stft of x.T, a sliding window over samples)"
            )
            tr.pending = tr.message(tr.func, what)
            return None
        found.append(_rows(tr, line[0], axis, line[1], str(tr.func)))
    return [tuple(sorted(found))]


def _through_storage(
    tr: BatchAxes, t: torch.Tensor, axis: Axis, size: Any, stride: Any, offset: int
) -> torch.Tensor | None:
    """The samples an ``as_strided(size, stride, offset)`` view of ``t``'s storage reads, by
    another followed tensor on that storage that holds ``axis``'s batch dimension of ``x``
    and every place the view reads (``x[1:]``'s base ``x``); ``None`` where none does."""
    storage = t.untyped_storage().data_ptr()
    for other, axes in list(tr.known.values()):
        if other is t or other.untyped_storage().data_ptr() != storage:
            continue
        same = next((a for a in axes if a.source == axis.source), None)
        if same is None:
            continue
        held = _storage_samples(other, same).as_strided(size, stride, offset)
        if not bool((held < 0).any()):
            return held
    return None


_POINTWISE_EXTRA = {
    aten.alias.default,
    aten.native_dropout.default,
    aten.expand.default,
    aten.lift_fresh.default,
    aten.masked_fill.Scalar,
    aten.masked_fill.Tensor,
    aten.where.self,
    # elementwise, though not tagged so
    aten.log_sigmoid_forward.default,
    aten.log_sigmoid_backward.default,
    aten.hardswish.default,
    aten.hardswish_backward.default,
    aten._prelu_kernel.default,  # its weight broadcast (C, 1, ..., 1)
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
    aten.clone.default: _duplicated,
    aten._to_copy.default: _duplicated,
    **dict.fromkeys(_VIEWS, _view),
    aten.permute.default: _permute,
    aten.repeat.default: _repeated,
    aten.transpose.int: _permute,
    aten.t.default: _permute,
    aten.select.int: _select,
    aten.slice.Tensor: _cut(1, _sliced),
    aten.narrow.default: _cut(1, _narrowed),
    aten.split.Tensor: _cut(2, _in_order),
    aten.split_with_sizes.default: _cut(2, _in_order),
    aten.unsafe_split.Tensor: _cut(2, _in_order),
    aten.unsafe_split_with_sizes.default: _cut(2, _in_order),
    aten.unbind.int: _cut(1, _in_order),
    aten.cat.default: _cat,
    aten.stack.default: _stack,
    aten.copy_.default: _copied,
    aten.constant_pad_nd.default: _padded_constant,
    aten.copy.default: _copied,
    aten.select_scatter.default: _scattered_into(lambda t, a: t.select(a[2], a[3])),
    aten.slice_scatter.default: _scattered_into(lambda t, a: t[_sliced_at(t, a)]),
    aten.broadcast_tensors.default: _broadcast,
    # samples of different lengths packed one time step after the other: not followed
    aten._pack_padded_sequence.default: _untracked,
    aten.as_strided.default: _strided,  # any layout, even of the same shape (a transpose)
}
_IN_PLACE_VIEWS = {
    aten.unsqueeze_.default,
    aten.squeeze_.default,
    aten.squeeze_.dim,
    aten.squeeze_.dims,
    aten.transpose_.default,
    aten.swapdims_.default,
    aten.swapaxes_.default,
    aten.t_.default,
}


def _in_place_view(func: Any, t: torch.Tensor, axes: Axes, args: Sequence[Any]) -> Axes:
    """The batch dimensions of ``t`` after ``unsqueeze_``, ``squeeze_``, ``transpose_`` (and
    ``swapdims_``, ``t_``), read from its shape before the call: ``quantile`` makes all three
    inside ATen, and after the call ``t``'s old positions would name the wrong dimensions."""
    n = t.dim()
    if func == aten.unsqueeze_.default:
        at = args[1] % (n + 1)
        return tuple(_moved(a, int(a.position >= at)) for a in axes)
    if func in (aten.squeeze_.default, aten.squeeze_.dim, aten.squeeze_.dims):
        named = range(n) if func == aten.squeeze_.default else args[1]
        dims = [named] if isinstance(named, int) else list(named)
        gone = {d % n for d in dims if n and t.shape[d % n] == 1}
        return tuple(_moved(a, -sum(d < a.position for d in gone)) for a in axes)
    if n < 2:
        return axes
    d0, d1 = (0, 1) if func == aten.t_.default else (args[1] % n, args[2] % n)
    swap = {d0: d1, d1: d0}
    return tuple(sorted(a._replace(position=swap.get(a.position, a.position)) for a in axes))


_ROLLS = {aten.roll.default}
_MASKED_SCATTERS = {aten.masked_scatter.default, aten.masked_scatter_.default}
_CARRY.update(
    {
        aten.index.Tensor: _index,
        aten.index_select.default: _index_select,
        aten.gather.default: _gather,
        aten.masked_select.default: _masked_select,
        aten.flip.default: _reordered,
        **dict.fromkeys(_ROLLS, _reordered),
        **dict.fromkeys(_MASKED_SCATTERS, _masked_put),
        **dict.fromkeys(
            [aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default],
            _index_put,
        ),
        **dict.fromkeys(
            [
                aten.index_copy.default,
                aten.index_copy_.default,
                aten.index_add.default,
                aten.index_add_.default,
            ],
            _index_copy,
        ),
        **dict.fromkeys(
            [
                aten.scatter.src,
                aten.scatter_.src,
                aten.scatter_add.default,
                aten.scatter_add_.default,
                aten.scatter_reduce.two,
                aten.scatter_reduce_.two,
            ],
            _scatter,
        ),
    }
)
_ACCUMULATING = {
    aten.index_add.default,
    aten.index_add_.default,
    aten.scatter_add.default,
    aten.scatter_add_.default,
    aten.scatter_reduce.two,
    aten.scatter_reduce_.two,
}
_PUTS = {op for op, rule in _CARRY.items() if rule in (_index_put, _index_copy, _scatter)}
_PUTS |= {aten.select_scatter.default, aten.slice_scatter.default}
_CATS = {aten.cat.default}
_JOINS = {*_CATS, aten.stack.default}
_FRESH = {
    aten.zeros.default,
    aten.full.default,
    aten.empty.memory_format,
    aten.zeros_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_full.default,
    aten.new_empty.default,
}
_CARRY.update({**dict.fromkeys(_FRESH, _fresh), aten.detach.default: _detached})
_rules: dict[Any, tuple[Mixing | None, Carry]] = {}  # each op's two rules, as first met
# (and their in-place forms' (``_writing``), as met)
_ELEMENTWISE: set[Carry] = {_pointwise, _duplicated}
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


def decides(func: Any, args: Sequence[Any], out: Any) -> bool:
    """Whether the op ``func`` turned values into something that can decide what the code
    calls next or which samples an index moves: a Python number (``item``, a branch on a
    tensor), a shape set by values (``nonzero``, ``unique``), or integers or booleans computed
    from floating values (``x > 0``, ``argmax``, ``.long()``, a sort's indices), or an op that
    raises on a floating argument's values (``_CHECKS_VALUES``: ``try: bernoulli(p)``, its
    error caught, decides what ``f`` does next by ``p`` though no result shows it). A watch of
    ``f`` during which no op did holds for every floating value ``f`` reads, not only
    those it was watched with (``torchdiv._taylor.mixing.identity``): which ops ran, on
    which shapes, with which integer indices, followed from ``f``'s code and the rest.
    (A read that bypasses the dispatcher, ``tolist()``, ``numpy()`` or ``str()``, is noted
    by ``Reads``.)

    Example:
        >>> x = torch.ones(2)
        >>> decides(aten.gt.Scalar, (x, 0.5), x > 0.5), decides(aten.tanh.default, (x,), x)
        (True, False)
    """
    decided = _DECIDED.get(func)
    if decided is None:
        tagged = any(tag in func.tags for tag in _VALUES_DECIDE)
        decided = _DECIDED[func] = tagged or func in _CHECKS_VALUES
    if decided:
        return True
    outs = out if isinstance(out, list | tuple) else (out,)
    if all(t is None or (isinstance(t, torch.Tensor) and _floating(t)) for t in outs):
        return False
    return any(isinstance(a, torch.Tensor) and _floating(a) for a in tree_leaves(args))


def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class Reads(TorchFunctionMode):
    """Note in ``axes`` (``BatchAxes.values_decide``) a floating tensor's values read where
    the dispatcher does not see it, so ``decides`` cannot: ``tolist()``, ``numpy()``,
    ``np.asarray`` (``__array__``), ``__dlpack__``, ``str``/``repr``/``print``, an f-string or
    ``format`` (``__format__``, inside which this mode does not see ``__repr__``, and ``repr``
    turns the dispatch modes off), its storage or data pointer, ``apply_``/``map_`` (a Python
    callable given each value), a number read out (``item``, ``float``, ``int``, ``bool``: seen
    by the dispatcher too, unless ``f`` turned the dispatch modes off). ``if t.tolist() > 0.5:
    ...`` then keeps ``f`` watched at every new ``t``. The mode sees each ``torch`` call of
    ``f`` (~1 us each, during the watch only).

    Example:
        >>> axes = BatchAxes(torch.ones(2, 1), 1)
        >>> with Reads(axes):
        ...     _ = torch.tensor(0.5).tolist()
        >>> axes.values_decide
        True
    """

    def __init__(self, axes: BatchAxes) -> None:
        super().__init__()
        self.axes = axes

    def __torch_function__(
        self, func: Any, types: Any, args: Any = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        refuse_gradient_hook(func, args)  # (a watched plain evaluation: no other mode sees it)
        if func in _READS:
            held = args[0] if args else None
            if isinstance(held, torch.Tensor) and _floating(held):
                self.axes.values_decide = True
        self._follow(args)  # (a subclass's results: ``BatchAxes.follow``)
        out = func(*args, **(kwargs or {}))
        self._follow((out,))
        return out

    def _follow(self, values: Sequence[Any]) -> None:
        """``BatchAxes.follow`` each tensor of a subclass among ``values`` (or in a list or
        tuple among them)."""
        for v in values:
            for t in v if isinstance(v, list | tuple) else (v,):
                if type(t) not in _PLAIN_TYPES and isinstance(t, torch.Tensor):
                    self.axes.subclassed = True
                    self.axes.follow(t)


def reading(axes: BatchAxes | None) -> contextlib.AbstractContextManager[Any]:
    """``Reads(axes)`` around a watched evaluation; nothing where none watches (``axes``
    ``None``: a recording without ``batch_dims``, detection off), which would pay the mode
    at every ``torch`` call for no one."""
    return contextlib.nullcontext() if axes is None else Reads(axes)


# the tensor types whose objects the ATen calls ``BatchAxes`` watches made (``follow``)
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
# the tensor methods that read values where the dispatcher does not see it (``Reads``)
_READS = frozenset(
    {
        torch.Tensor.tolist,
        torch.Tensor.numpy,
        torch.Tensor.__array__,
        torch.Tensor.__dlpack__,
        torch.Tensor.__repr__,
        torch.Tensor.__format__,
        torch.Tensor.item,
        torch.Tensor.__float__,
        torch.Tensor.__int__,
        torch.Tensor.__index__,
        torch.Tensor.__bool__,
        torch.Tensor.__complex__,
        torch.Tensor.untyped_storage,
        torch.Tensor.storage,
        torch.Tensor.data_ptr,
        torch.Tensor.apply_,  # (a Python callable called with each value)
        torch.Tensor.map_,
        torch.Tensor.map2_,
    }
)

# the ops whose results are values read out or shaped by values (``decides``), by their tags
_VALUES_DECIDE = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
_DECIDED: dict[Any, bool] = {}  # each op's verdict by its tags, as first met
# the ops that raise on the values of a floating argument, where ``f`` may catch the error and
# do something else (nothing they return shows it): bernoulli's ``p`` or a binary cross
# entropy's input outside [0, 1], normal's negative ``std``, poisson's negative rate, histc's
# or histogram's infinite range, an assert on a value, LAPACK failing to converge (``svd``,
# ``eig``, ``eigh``, ``pinv``; the ``*_ex`` factorizations return their integer ``info``)
_CHECKS_VALUES = frozenset(
    getattr(getattr(aten, packet), overload)
    for packet, overloads in {
        "bernoulli": ("default", "out", "Tensor", "Tensor_out"),  # (not ``p``: a float)
        "bernoulli_": ("Tensor",),
        "normal": ("float_Tensor", "float_Tensor_out", "Tensor_Tensor", "Tensor_Tensor_out"),
        "poisson": ("default", "out"),
        "histc": ("default", "out"),
        "histogram": ("bins_tensor", "bins_tensor_out", "bin_ct", "bin_ct_out"),
        "binary_cross_entropy": ("default", "out"),
        "_assert_async": ("default", "msg"),
        "_functional_assert_async": ("msg",),
        "_linalg_svd": ("default", "U"),
        "linalg_eig": ("default", "out"),
        "linalg_eigvals": ("default", "out"),
        "_linalg_eigh": ("default", "eigenvalues"),
        "linalg_pinv": ("default", "atol_rtol_float", "atol_rtol_tensor", "rcond_tensor"),
    }.items()
    for overload in overloads
)


def _kind(func: Any, unknown: bool) -> Carry:
    """Elementwise ops (PyTorch's ``pointwise`` tag) broadcast; an op with no rule of its own
    (``unknown``: in neither table) is judged by ``_unknown``; the others end the tracking."""
    if torch.Tag.pointwise in func.tags:
        return _pointwise
    return _unknown(func) if unknown and func not in VALUE_FREE else _untracked


# ---- ops without a rule of their own ----

_DIM_ARGUMENTS = ("dim", "dims", "dimension")
_SPATIAL_ARGUMENTS = ("kernel_size", "output_size")
# the ops sampling their input at a grid's points (``_resampled``)
_GRID_SAMPLERS = frozenset(
    {"grid_sampler_2d", "grid_sampler_3d", "_grid_sampler_2d_cpu_fallback", "cudnn_grid_sampler"}
)
_RIGHT_HAND_SIDES = ("B", "b")  # of ``linalg_solve`` and kin: each column solved alone
# of ``linalg_householder_product``: a batch of vectors, not of matrices
_VECTOR_ARGUMENTS = ("tau",)
# solves outside ``torch.linalg``, whose first argument is the right-hand side, and another
# matrix function there
_SOLVES = ("cholesky_solve", "triangular_solve")
_MATRIX_FUNCTIONS = (*_SOLVES, "cholesky_inverse")
_PADS = re.compile(r"(reflection|replication)_pad\dd$")  # copies of the edges: the others mix
# sliding windows: the argument naming the dimension whose places they change
_WINDOWS = {"unfold": "dimension", "unfold_backward": "dim"}
# ops that leave their first argument's leading dimensions alone and rearrange the others:
# the names of the arguments whose smallest (wrapped around the result's or the argument's
# dimensions) counts those left alone, or a count less than the argument's dimensions
_LEADING_DIMS: dict[str, tuple[str, ...] | int] = {
    "pixel_shuffle": 3,  # (*, C r^2, H, W) -> (*, C, H r, W r)
    "pixel_unshuffle": 3,
    "diag_embed": ("dim1", "dim2"),  # (*, D) -> matrices along dim1, dim2 of the result
    "diagonal": ("dim1", "dim2"),  # dim1, dim2 taken out, the diagonal appended
    "affine_grid_generator": 2,  # (*, 2, 3) -> (*, H, W, 2)
}


def _unknown(func: Any) -> Carry:
    """The rule for an op no table knows, read from its schema: it combines samples (each
    floating result then depends on the combination) if, for an argument ``t`` holding samples,

    * its ``dim``/``dims``/``dimension`` argument names a batch dimension of its first
      argument (``sort``, ``topk``, ``kthvalue``, ``median``, ``mode``, ``cummax``,
      ``nansum``, ``unfold``, ``glu``, ``linalg_cross``);
    * it pools or resamples (a ``kernel_size``/``output_size`` argument) its first argument
      along a batch dimension among its last, spatial ones: a kernel wider than one or a new
      size there; or pads it there by reflection or replication (copies of other places);
    * it is a ``linalg`` matrix function (no ``dim`` argument; or ``cholesky_solve``,
      ``triangular_solve``, ``cholesky_inverse``) of matrices whose rows or columns are
      samples (the last two dimensions; of a solve's right-hand side ``B``, the rows alone:
      each column is solved alone);
    * its ``key`` or ``value`` (attention kernels) has samples along its sequence dimension;
    * two tracked arguments, or one in two ways, hold different samples at one place
      (``linalg_cross(x, x.flip(0))``), samples an indexing op moved among them;
    * it overlap-adds frames that are samples (``unfold_backward``, ``torch.istft``'s);
    * it shuffles channels that are samples (``channel_shuffle``: ``_shuffled``).

    Else only its floating results with no room for a batch dimension of ``t`` (no dimension
    a multiple of its samples: a scalar ``dist``, ``median()``, a mean loss)
    depend on combined samples. Ops that keep the samples in place (fused attention, pooling
    over the event, embeddings, interpolation) pass; a result shaped as a tracked
    argument is followed as holding its samples in place (not of an op that writes in place),
    and a pad's, ``unfold``'s, ``unfold_backward``'s, one of as many dimensions by an op
    along another dimension (``glu``), a pool's, a resampling's (``interpolate``, ``im2col``,
    ``col2im``), ``pixel_shuffle``'s or ``diag_embed``'s as holding those along the dimensions
    it leaves alone (``_left_alone``), ``grid_sample``'s as holding its grid's at the places read
    (``_sampled_at``); the others not."""
    op = _Signature.of(func)

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        tracked = [
            (arg, t, axes)
            for arg, a in [*zip(op.names, args, strict=False), *tr.kwargs.items()]
            for t in (a if isinstance(a, list | tuple) else (a,))
            if (axes := tr.axes(t))
        ]
        if not tracked:
            return None
        outs = [
            o
            for o in tree_leaves(out)
            if isinstance(o, torch.Tensor)
            and o.numel()
            and (o.dtype.is_floating_point or o.is_complex())
        ]
        what = _combined(op, tr, args, tracked, out) if outs else None
        for o in outs:
            lost = what or _no_room(op.name, tracked, o)
            if lost is not None:
                tr.mixed[id(o)] = (o, tr.message(tr.func, lost))
        if op.mutable or what is not None:
            return None
        # a result shaped as a tracked argument holds its samples in place; a pad's or a
        # sliding window's, those along the dimensions it leaves alone
        results = out if isinstance(out, list | tuple) else (out,)
        # (grid_sample's by its arguments' roles alone: its result shaped as its input holds
        # the grid's samples too)
        return [
            (
                _sampled_at(op, tr, args, o)
                if op.name in _GRID_SAMPLERS
                else next((axes for _, t, axes in tracked if t.shape == o.shape), None)
                or _left_alone(op, tr, args, o)
            )
            if isinstance(o, torch.Tensor)
            else None
            for o in results
        ]

    return rule


class _Signature(NamedTuple):
    """What ``_unknown`` reads of an op's schema, once."""

    name: str  # ``sort``
    names: list[str]  # of its arguments
    defaults: list[Any]  # what the dispatcher leaves out of ``args``
    dim: str | None  # its ``dim``-like argument, if its first one is a tensor ``self``
    spatial: str | None  # its ``kernel_size`` or ``output_size`` argument, likewise
    spatial_dims: int | None  # from its name: ``avg_pool2d``, 2
    linalg: bool  # a ``linalg`` function of matrices (no ``dim``)
    mutable: bool

    @classmethod
    def of(cls, func: Any) -> _Signature:
        schema = func._schema
        names = [a.name for a in schema.arguments]
        name = schema.name.split("::")[-1]
        first = bool(names) and names[0] in ("self", "input")
        first = first and str(schema.arguments[0].type) == "Tensor"
        dim = next((n for n in _DIM_ARGUMENTS if n in names), None) if first else None
        digits = re.findall(r"(\d)d", name)
        return cls(
            name,
            names,
            [a.default_value for a in schema.arguments],
            dim,
            next((n for n in _SPATIAL_ARGUMENTS if n in names), None) if first else None,
            int(digits[-1]) if digits else None,
            (name.startswith(("linalg_", "_linalg_")) and dim is None) or name in _MATRIX_FUNCTIONS,
            schema.is_mutable,
        )

    def argument(self, args: Sequence[Any], kwargs: dict[str, Any], arg: str) -> Any:
        at = self.names.index(arg)
        return args[at] if at < len(args) else kwargs.get(arg, self.defaults[at])


Tracked = tuple[str, torch.Tensor, Axes]  # an op's argument (schema name), holding samples


def _combined(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], tracked: list[Tracked], out: Any
) -> str | None:
    """What combines samples in the call of ``op`` (``_unknown``'s rules), if anything."""
    t = args[0] if args else None
    if isinstance(t, torch.Tensor) and tr.axes(t) and t.dim():
        what = (
            _along(op, tr, args, t)
            or _resampled(op, tr, args, t, out)
            or _padded(op, tr, args, t)
            or _overlapped(op, tr, args, t)
            or _shuffled(op, tr, args, t)
        )
        if what is not None:
            return what
    core = (lambda arg, a: 1 if _vector(op, tr, args, arg, a) else 2) if op.linalg else None
    return (
        _matrices(op, tr, args, tracked)
        or _attended(op, tracked)
        or _conflicting(op.name, tracked, core)
    )


def _along(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``op``'s ``dim`` names a batch dimension of its first argument ``t``."""
    dims = None if op.dim is None else op.argument(args, tr.kwargs, op.dim)
    q = None if dims is None or dims == [] else _batch_at(tr, t, _dims(t, dims))
    return None if q is None else f"{op.name} along samples (dimension {q} of {_shape(t)})"


def _resampled(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor, out: Any
) -> str | None:
    """``op`` pools or resamples ``t`` along a batch dimension among its last, spatial ones:
    a kernel wider than one there, or a new size; or samples it at a grid's points
    (``grid_sample``), whose values pick the places read, so any place reads any sample."""
    gridded = op.name in _GRID_SAMPLERS
    if gridded:
        k = t.dim() - 2
    elif op.spatial is not None:
        k = op.spatial_dims or len(op.argument(args, tr.kwargs, op.spatial) or ())
    else:
        return None
    kernel = op.argument(args, tr.kwargs, "kernel_size") if "kernel_size" in op.names else None
    first = out if isinstance(out, torch.Tensor) else tree_leaves(out)[0]
    for i, d in enumerate(range(max(t.dim() - k, 0), t.dim())):
        wide = kernel is not None and len(kernel) > 0 and kernel[min(i, len(kernel) - 1)] > 1
        wide = wide or gridded
        if _batch_at(tr, t, [d]) is not None and (wide or first.shape[d] != t.shape[d]):
            return f"{op.name} across samples (dimension {d} of {_shape(t)}, a spatial one)"
    return None


def _changed_dims(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], o: torch.Tensor
) -> set[int] | None:
    """The dimensions of the first argument ``t`` whose places a pad (the last
    ``len(padding) // 2``), ``unfold`` or ``unfold_backward`` (``torch.stft``'s and
    ``torch.istft``'s frames; ``dim``) changes, or an op along one dimension ``dim`` (not a
    batch one: ``_along``) whose result ``o`` has as many dimensions (``glu``, halving it:
    its result was not followed, so a mean over samples after a GLU passed unseen), a pool
    or a resampling (a ``kernel_size``/``output_size`` argument: its spatial dimensions;
    with a ``weight``, the channels too), ``pixel_shuffle``, ``diag_embed`` or ``diagonal``
    (all but the leading dimensions, ``_LEADING_DIMS``: their results were not followed
    either), a ``linalg`` function (each matrix: ``det``, ``eigvalsh``) or an op along
    dimensions ``dims`` keeping their number (``rot90``); ``None`` for any other op."""
    t = args[0]
    if _PADS.match(op.name):
        n = len(op.argument(args, tr.kwargs, "padding")) // 2
        return set(range(t.dim() - n, t.dim()))
    if op.name in _LEADING_DIMS:
        dims = _LEADING_DIMS[op.name]
        if isinstance(dims, int):
            return set(range(max(t.dim() - dims, 0), t.dim()))
        n = o.dim() if op.name == "diag_embed" else t.dim()
        return set(range(min(op.argument(args, tr.kwargs, d) % n for d in dims), t.dim()))
    if op.linalg:  # a matrix function of each matrix: (*, m, n) -> (*, ...)
        return set(range(max(t.dim() - 2, 0), t.dim()))
    if op.spatial is not None:  # a pool or a resampling: (N, C, *spatial), the last k changed
        k = op.spatial_dims or len(op.argument(args, tr.kwargs, op.spatial) or ())
        # one with a weight (a convolution's kernel) mixes the channels too
        return set(range(1 if "weight" in op.names else max(t.dim() - k, 0), t.dim()))
    if op.name in _WINDOWS:
        return {op.argument(args, tr.kwargs, _WINDOWS[op.name]) % t.dim()}
    dim = None if op.dim is None else op.argument(args, tr.kwargs, op.dim)
    if isinstance(dim, int) and t.dim() and o.dim() == t.dim():
        return {dim % t.dim()}
    if isinstance(dim, list | tuple) and dim and t.dim() and o.dim() == t.dim():  # rot90
        return {d % t.dim() for d in dim}
    return None


def _left_alone(op: _Signature, tr: BatchAxes, args: Sequence[Any], o: torch.Tensor) -> Axes | None:
    """The batch dimensions of ``op``'s first argument ``t`` (a pad, ``unfold``,
    ``unfold_backward``, an op along one other dimension: ``_changed_dims``) along the
    dimensions it leaves alone, in the same places of its result ``o`` (a reflection-padded
    signal's channels, each sample's frames of ``torch.stft``, ``torch.istft``'s
    overlap-added frames of each sample, a GLU's halves)."""
    t = args[0] if args else None
    axes = tr.axes(t)
    if not axes or not isinstance(t, torch.Tensor):
        return None
    changed = _changed_dims(op, tr, args, o)
    if changed is None:
        return None
    kept = tuple(
        axis
        for axis in axes
        if axis.position not in changed
        and axis.position < o.dim()
        and o.shape[axis.position] == t.shape[axis.position]
    )
    return kept or None


def _leading(func: Any) -> Carry:
    """The rule of an op with a mixing check of its own (``diagonal``) that leaves its first
    argument's leading dimensions alone (``_LEADING_DIMS``): their batch dimensions are
    followed into its result (a diagonal of each sample's matrix, ``x[:, :, None] * x[:, None]``
    taken along ``dim1=1, dim2=2``, was not followed, so a mean over samples after it passed
    unseen)."""
    op = _Signature.of(func)
    return lambda tr, args, out: [_left_alone(op, tr, args, out)]


_CARRY[aten.diagonal.default] = _leading(aten.diagonal.default)


def _sampled_at(op: _Signature, tr: BatchAxes, args: Sequence[Any], o: torch.Tensor) -> Axes | None:
    """The batch dimensions of ``grid_sample``'s result ``o``, ``(N, C, *places)``: its input's
    along ``N`` and ``C`` (along a spatial one it combined them: ``_resampled``), its grid's
    ``(N, *places, 2 or 3)`` along ``N`` and the places, one dimension further on. A tri-plane
    or K-planes field reads learned planes at every sample's points, which lie along the grid's
    places (``grid.view(1, -1, 1, 2)``): its result was not followed, so a mean over the
    samples after it passed unseen."""
    if op.name not in _GRID_SAMPLERS or len(args) < 2:
        return None
    image, grid = args[0], args[1]
    kept = [
        axis
        for axis in tr.axes(image) or ()
        if axis.position < 2 and o.shape[axis.position] == image.shape[axis.position]
    ]
    for axis in tr.axes(grid) or ():
        at = axis.position + (axis.position > 0)
        if axis.position < grid.dim() - 1 and o.shape[at] == grid.shape[axis.position]:
            kept.append(axis._replace(position=at))
    return tuple(sorted(set(kept))) or None


def _shuffled(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``channel_shuffle`` of ``(N, C, *spatial)`` with samples along the channels, in two or
    more groups of two or more: it moves samples to other samples' places, keeping the shape
    (followed in place, it passed a per-sample ``f`` of ``x[None, :, :, None]`` silently
    wrong)."""
    if op.name not in ("channel_shuffle", "native_channel_shuffle") or t.dim() < 2:
        return None
    groups = op.argument(args, tr.kwargs, "groups")
    q = _batch_at(tr, t, [1]) if 1 < groups < t.shape[1] else None
    return None if q is None else f"{op.name} moving samples (dimension {q} of {_shape(t)})"


def _overlapped(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``unfold_backward`` (the overlap-add of ``torch.istft``) of frames that are samples,
    overlapping (``size > step``): each place sums neighbouring samples."""
    if op.name != "unfold_backward":
        return None
    dim, size, step = (op.argument(args, tr.kwargs, a) for a in ("dim", "size", "step"))
    q = _batch_at(tr, t, [dim % t.dim()]) if size > step else None
    return (
        None
        if q is None
        else f"an overlap-add of frames that are samples (dimension {q} of {_shape(t)})"
    )


def _padded(op: _Signature, tr: BatchAxes, args: Sequence[Any], t: torch.Tensor) -> str | None:
    """``op``, a reflection or replication pad, pads ``t`` along a batch dimension: the new
    places hold copies of other places' samples, then followed as if they held their own."""
    if not _PADS.match(op.name):
        return None
    padding = op.argument(args, tr.kwargs, "padding")
    for i in range(len(padding) // 2):
        d = t.dim() - 1 - i
        if (padding[2 * i] or padding[2 * i + 1]) and _batch_at(tr, t, [d]) is not None:
            return f"{op.name} across samples (dimension {d} of {_shape(t)}, padded)"
    return None


def _matrices(
    op: _Signature, tr: BatchAxes, args: Sequence[Any], tracked: list[Tracked]
) -> str | None:
    """``op``, a ``linalg`` function, reads matrices whose rows or columns are samples (of a
    solve's right-hand side ``B``, whose columns are solved alone, the rows)."""
    if not op.linalg or not args:
        return None
    for arg, a, axes in tracked:
        matrix = [a.dim() - 2, a.dim() - 1]
        if _vector(op, tr, args, arg, a):
            matrix = [a.dim() - 1]
        elif arg in _RIGHT_HAND_SIDES or (op.name in _SOLVES and arg == "self"):
            # the rows of a right-hand side (left=False: its columns)
            matrix = [a.dim() - (2 if tr.kwargs.get("left", True) else 1)]
        q = next((q for q, *_ in axes if q in matrix), None)
        if q is not None:
            return (
                f"{op.name} of matrices whose rows or columns are samples (dimension {q} of "
                f"{_shape(a)})"
            )
    return None


def _vector(op: _Signature, tr: BatchAxes, args: Sequence[Any], arg: str, a: torch.Tensor) -> bool:
    """Whether the argument ``arg`` (``a``) of the ``linalg`` function ``op`` is a (batch of)
    vector(s), its dimensions before the last its batch: ``householder_product``'s ``tau``, a
    solve's right-hand side of one dimension fewer than its matrix (PyTorch's rule)."""
    if arg in _VECTOR_ARGUMENTS:
        return True
    solve = op.name in _SOLVES  # (B, A): cholesky_solve, triangular_solve
    if not (arg in _RIGHT_HAND_SIDES or (solve and arg == "self")):
        return False
    lhs = args[int(solve)] if len(args) > int(solve) else None  # A
    return a.dim() == 1 or (isinstance(lhs, torch.Tensor) and a.shape == lhs.shape[:-1])


def _attended(op: _Signature, tracked: list[Tracked]) -> str | None:
    """``op``, an attention kernel, attends each query to keys (values) that are samples."""
    for arg, a, axes in tracked:
        if arg in ("key", "value") and any(q == a.dim() - 2 for q, *_ in axes):
            return f"{op.name}, attention across samples (dimension {a.dim() - 2} of {arg})"
    return None


def _conflicting(
    name: str, tracked: list[Tracked], core: Callable[[str, torch.Tensor], int] | None = None
) -> str | None:
    """Whether the arguments hold different samples at one place (dimensions aligned at the
    right; for a ``linalg`` function, the batch dimensions before each argument's ``core``
    last ones, 2 of a matrix, 1 of a vector: ``solve(A.flip(0), b)``'s ``A`` ``(B, n, n)``
    and ``b`` ``(B, n)`` were compared one dimension apart, and passed), one of them samples
    an indexing op moved: ``x`` and ``x.flip(0)``."""
    if not any(axis.rows for *_, axes in tracked for axis in axes):
        return None
    seen: dict[tuple[int, int], tuple[int, ...]] = {}
    for arg, t, axes in tracked:
        end = t.dim() - (0 if core is None else core(arg, t))
        for axis in axes:
            held = _held(axis, t.shape[axis.position])
            key = (axis.position - end, axis.size)
            other = seen.setdefault(key, held)
            n = min(len(held), len(other))
            if held[:n] != other[:n]:
                return (
                    f"{name} combining different samples in one place (dimension "
                    f"{axis.position} of a tensor of shape {_shape(t)})"
                )
    return None


def _no_room(name: str, tracked: list[Tracked], out: torch.Tensor) -> str | None:
    """Whether the result ``out`` has no dimension for the samples of an argument: none whose
    size is a multiple of their number (a scalar, ``median()``, singular values)."""
    for _, t, axes in tracked:
        for axis in axes:
            if not any(n % axis.period == 0 for n in out.shape if n):
                return (
                    f"{name} of a tensor holding samples along dimension {axis.position} (shape "
                    f"{_shape(t)}), whose result of shape {_shape(out)} has no room for them"
                )
    return None


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
    whole tensor, so a source that carries samples lands in other samples' places, unless it
    holds one value per place (``x[m]``: ``_masked_put`` checks where each lands)."""
    if not tr.axes(args[2]) or _one_per_place(args):
        return None
    return "a masked_scatter, which reads its source across samples"


def _attention(op: Any, name: str) -> Mixing:
    """A softmax over samples: refused, unless its rows hold samples of the same batch
    dimension too (attention over every sample's tokens packed into one sequence), where
    ``_softmaxed`` reads its result: weights that are exactly 0 across samples (a
    block-diagonal mask, ``batch[:, None] == batch[None, :]``, PyG-style) keep them apart."""
    reduction = _reduction(op, name)

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        message = reduction(tr, args)
        if message is None:
            return None
        t, key = args[0], _batch_at(tr, args[0], _reduced_dims(op, args))
        axes = tr.axes(t) or ()
        keys = [a for a in axes if a.position == key]
        rows = [a for a in axes if a.position != key]
        if len(keys) != 1 or len(rows) != 1 or rows[0].source != keys[0].source:
            return message
        tr.block_check = (rows[0].position, cast(int, key), message)
        return None

    return rule


def _softmaxed(op: Any) -> Carry:
    """``_reduced``, and for a softmax ``_attention`` let through: its result is marked
    (``BatchAxes.blocks``) if exactly 0 at every (row, key) of different samples, else it
    combines samples (``pending``). The verdict holds for these values only (``indexed``,
    ``values_decide``: a call with another mask is watched again)."""
    reduced = _reduced(op)

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        result = reduced(tr, args, out)
        if tr.block_check is not None:
            row, key, message = tr.block_check
            tr.indexed = tr.values_decide = True
            if not _zero_across(tr, args[0], out, row, key):
                tr.pending = message
        return result

    return rule


def _samples_along(tr: BatchAxes, t: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The sample at each index of ``t``'s dimension ``dim`` (``None``: none there)."""
    for axis in tr.axes(t) or ():
        if axis.position == dim:
            return axis.samples(torch.arange(t.shape[dim]))
    return None


def _zero_across(tr: BatchAxes, t: torch.Tensor, out: Any, row: int, key: int) -> bool:
    """Whether ``out`` (shaped as ``t``) is exactly 0 wherever the sample along ``row``
    differs from the sample along ``key`` (then marked, as weights over its last two
    dimensions, rows by keys)."""
    rows, keys = _samples_along(tr, t, row), _samples_along(tr, t, key)
    if not isinstance(out, torch.Tensor) or out.shape != t.shape or rows is None or keys is None:
        return False
    zero = _zeros_across(out.movedim((row, key), (-2, -1)), rows, keys)
    if zero and (row, key) == (t.dim() - 2, t.dim() - 1):
        tr.blocks[id(out)] = (out, rows, keys, _version(out))
    return zero


def _zeros_across(weights: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether ``weights`` (rows by keys: their last two dimensions, holding samples
    ``rows`` and ``keys``) are exactly 0 wherever the row's sample and the key's differ
    (``False`` where their values cannot be read here)."""
    across = (rows[:, None] != keys[None, :]).to(weights.device)
    try:
        return bool((weights.detach()[..., across] == 0).all())
    except RuntimeError:
        return False


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter (shared by its views; ``None``: none to read, an inference
    tensor's or a wrapper's)."""
    try:
        return int(t._version)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None


def _marked(tr: BatchAxes, t: Any) -> Block | None:
    """``t``'s mark (``BatchAxes.blocks``) if no write changed it since (its version then:
    ``w.clone().add_(c)``, an item or a view written, would put values across samples into
    weights marked exactly 0 there)."""
    entry = tr.blocks.get(id(t)) if isinstance(t, torch.Tensor) else None
    if entry is None or entry[0] is not t or entry[3] is None or entry[3] != _version(t):
        return None
    return entry


def _keep_block(tr: BatchAxes, t: Any, out: Any) -> None:
    """A copy, a broadcast or a view of marked weights that keeps their last two dimensions
    (``expand``, ``view`` merging the heads into the batch of a ``bmm``, ``clone``,
    ``_to_copy``) holds each matrix of them in the same places: marked alike."""
    entry = _marked(tr, t)
    if entry is None or not isinstance(out, torch.Tensor):
        return
    if out.dim() >= 2 and out.shape[-2:] == t.shape[-2:]:
        tr.blocks[id(out)] = (out, entry[1], entry[2], _version(out))


def _within_blocks(tr: BatchAxes, a: Any, b: Any) -> bool:
    """Whether ``a @ b`` sums marked weights ``a`` (rows by keys: its last two dimensions,
    holding the samples the mark was checked with, and no other, still 0 across samples:
    ``w.data`` replaced or ``w.untyped_storage()`` written changes no version) against ``b``
    whose summed dimension holds the keys' samples, in order, and no other: each row then
    sums values of its own sample only (the weights of others are 0, and so are their
    derivatives)."""
    entry = _marked(tr, a)
    if entry is None or a.dim() < 2:
        return False
    _, rows, keys, _ = entry
    summed = max(b.dim() - 2, 0)
    if len(tr.axes(a) or ()) != 2 or len(tr.axes(b) or ()) != 1:
        return False
    along = [_samples_along(tr, a, a.dim() - 2), _samples_along(tr, a, a.dim() - 1)]
    held = _samples_along(tr, b, summed)
    return all(
        s is not None and torch.equal(s, want)
        for s, want in zip((*along, held), (rows, keys, keys), strict=True)
    ) and _zeros_across(a, rows, keys)  # (read again: `w.data =`, a storage write: no version)


def _contraction(biased: bool) -> Mixing:
    """Matrix products sum over the left operand's last dimension and the right one's second
    to last (a vector's only dimension)."""

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        a, b = (args[1], args[2]) if biased else (args[0], args[1])
        if tr.blocks and _within_blocks(tr, a, b):
            return None
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


def _recurrence(batch_first_arg: int | None) -> Mixing:
    """A fused RNN kernel (cuDNN's, MIOpen's, oneDNN's LSTM layer that ``nn.LSTM`` runs in
    float32 on the CPU; elsewhere on the CPU the dispatcher sees the steps, whose picked
    samples ``_picked_in`` follows) of an input ``(T, B, D)``, or ``(B, T, D)`` if its
    ``batch_first`` argument is set (``batch_first_arg``; ``None``: always ``(T, B, D)``, as
    oneDNN's layer is given it, its ``batch_first`` passed on after the transpose): samples
    along the time steps are read one after the other, along the features summed; only its
    batch dimension may hold them."""

    def rule(tr: BatchAxes, args: Sequence[Any]) -> str | None:
        t = args[0]
        batch = 0 if batch_first_arg is not None and args[batch_first_arg] else 1
        q = _batch_at(tr, t, [d for d in range(t.dim()) if d != batch])
        if q is None:
            return None
        return (
            f"a recurrent net run over samples (dimension {q} of its input of shape "
            f"{_shape(t)}, whose batch dimension is {batch}: batch_first set wrongly?)"
        )

    return rule


def _layer_norm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    t, shape = args[0], args[1]
    q = _batch_at(tr, t, range(t.dim() - len(shape), t.dim()))
    return None if q is None else f"a layer norm over samples (dimension {q} of shape {_shape(t)})"


def _within_runs(tr: BatchAxes, t: Any, width: int) -> bool:
    """Whether every batch dimension of ``t`` along its channels (dimension 1) holds each
    sample in runs that consecutive blocks of ``width`` channels never straddle: a batch
    folded into the channels, ``x.reshape(1, B * C, H, W)``, split into groups of
    ``width`` channels that each lie inside one sample (``inner`` a multiple of ``width``)."""
    return all(axis.inner % width == 0 for axis in tr.axes(t) or () if axis.position == 1)


def _group_norm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``native_group_norm(t, weight, bias, N, C, HxW, group, eps)`` normalises each of
    ``group`` blocks of ``C // group`` channels over them and the positions: samples along
    the positions are combined, along the channels only where a block holds several (a batch
    folded into the channels with one group per sample or more is per sample)."""
    t = args[0]
    q = _batch_at(tr, t, range(2, t.dim()))
    if q is None and not _within_runs(tr, t, max(args[4] // max(args[6], 1), 1)):
        q = 1
    if q is None and not _per_channel(tr, t, args[1:3]):
        return (
            f"a group norm whose weight or bias hold samples other than its channels' ({_shape(t)})"
        )
    return None if q is None else f"a group norm over samples (dimension {q} of shape {_shape(t)})"


def _per_channel(tr: BatchAxes, t: Any, params: Sequence[Any]) -> bool:
    """Whether a normalisation's per-channel ``params`` (weight, bias) computed from ``x``
    (AdaGN's scale and shift as the affine of a group norm over a batch folded into the
    channels) hold, at each channel, the sample of ``t``'s channel: their one batch
    dimension along their only dimension, ``t``'s only one along its channels."""
    held = [tr.axes(u) or () for u in params if isinstance(u, torch.Tensor)]
    if not any(held):
        return True
    t_axes = tr.axes(t) or ()
    if len(t_axes) != 1 or t_axes[0].position != 1:
        return False
    source, channels = t_axes[0].source, torch.arange(t.shape[1])
    want = t_axes[0].samples(channels)
    return all(
        len(axes) == 1
        and axes[0].position == 0
        and axes[0].source == source
        and torch.equal(axes[0].samples(channels).cpu(), want.cpu())
        for axes in held
        if axes
    )


def _diagonal(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``t.diagonal(offset, dim1, dim2)`` pairs sample ``i`` with index ``i`` of the other
    dimension when either dimension holds samples."""
    t = args[0]
    pair = _dims(t, [args[2] if len(args) > 2 else 0, args[3] if len(args) > 3 else 1])
    q = _batch_at(tr, t, pair)
    return None if q is None else f"a diagonal across samples (dimension {q} of {_shape(t)})"


def _pairwise(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``pdist(t)``: the distances between every two rows of ``t``, over its columns: any
    batch dimension of ``t`` is combined (its ``n (n - 1) / 2`` distances are a multiple of
    an odd ``n``: the result's size says nothing)."""
    q = _batch_at(tr, args[0], range(args[0].dim()))
    return None if q is None else f"pairwise distances across samples (dimension {q} of pdist)"


def _renorm(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``renorm(t, p, dim, maxnorm)`` scales each slice along ``dim`` by its norm over all the
    other dimensions."""
    t = args[0]
    q = _batch_at(tr, t, [d for d in range(t.dim()) if d != args[2] % max(t.dim(), 1)])
    return None if q is None else f"a renorm, a norm over samples (dimension {q} of {_shape(t)})"


def _convolution(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """A convolution sums over each group's input channels and the kernel's positions:
    samples along the channels are combined unless each group's channels lie inside one
    sample (a batch folded into the channels with ``groups`` a multiple of it: StyleGAN2's
    modulated convolution)."""
    t, weight = args[0], args[1]
    groups = args[8] if len(args) > 8 else 1
    mixed = [] if _within_runs(tr, t, t.shape[1] // groups) else [1]
    mixed += [d for d in range(2, t.dim()) if weight.shape[d] > 1]
    q = _batch_at(tr, t, mixed)
    if q is None and not _conv_parameters(tr, args, groups):
        return (
            "a convolution whose weights or bias hold samples other than its input channels' "
            f"(weights of shape {_shape(weight)}, groups={groups})"
        )
    return (
        None if q is None else f"a convolution across samples (dimension {q} of shape {_shape(t)})"
    )


def _conv_parameters(tr: BatchAxes, args: Sequence[Any], groups: int) -> bool:
    """Whether a convolution's weights and bias computed from ``x`` (a hypernetwork's
    per-sample kernels, ``(B * C_out, C_in // groups, k, k)`` over a batch folded into the
    channels) keep samples apart: their samples along their first dimension only, one batch
    dimension each, of the input's source, and every output channel reading one sample: its
    group's input channels (``_within_runs``), its weights (the input channels' rows of a
    transposed convolution's) and its bias of the same sample; the input's samples only
    along its channels (a weight of another sample than a row's input mixes them)."""
    t, weight, bias, transposed = args[0], args[1], args[2], bool(args[6])
    held = [(u, tr.axes(u) or ()) for u in (weight, bias) if isinstance(u, torch.Tensor)]
    if not any(axes for _, axes in held):
        return True
    t_axes = tr.axes(t) or ()
    every = [a for _, axes in held for a in axes] + list(t_axes)
    if any(len(axes) > 1 for _, axes in held) or len(t_axes) > 1:
        return False
    if len({a.source for a in every}) != 1 or any(a.position != 0 for _, ax in held for a in ax):
        return False
    if t_axes and t_axes[0].position != 1:
        return False
    c_in = t.shape[1]
    c_out = (weight.shape[1] * groups) if transposed else weight.shape[0]
    width_in, width_out = c_in // groups, c_out // groups

    def by_group(samples: torch.Tensor) -> torch.Tensor | None:  # input channels -> groups
        rows = samples.reshape(groups, width_in)
        if not bool((rows == rows[:, :1]).all()):
            return None
        return rows[:, 0].repeat_interleave(width_out)

    lines: list[torch.Tensor | None] = []
    if t_axes:
        lines.append(by_group(t_axes[0].samples(torch.arange(c_in))))
    for u, axes in held:
        if axes:
            line = axes[0].samples(torch.arange(u.shape[0]))
            lines.append(by_group(line) if transposed and u is weight else line)
    first = lines[0]
    return first is not None and all(
        line is not None and torch.equal(line.cpu(), first.cpu()) for line in lines
    )


def _spectral(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """An FFT (``_fft_r2c``, ``_fft_c2r``, ``_fft_c2c``: every ``torch.fft`` transform,
    ``fftn`` without ``dim`` too) over a batch dimension: each frequency sums the samples."""
    t, dims = args[0], args[1]
    q = _batch_at(tr, t, _dims(t, dims)) if dims else None
    name = tr.func._schema.name.split("::")[-1]
    return None if q is None else f"{name} along samples (dimension {q} of {_shape(t)})"


def _paired(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    """``view_as_complex`` of a last dimension (real, imaginary) that holds two samples."""
    t = args[0]
    q = _batch_at(tr, t, [t.dim() - 1])
    return None if q is None else f"view_as_complex pairing samples (dimension {q} of {_shape(t)})"


_SPECTRAL = {aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default}
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
_SOFTMAXES = {aten._softmax.default, aten._safe_softmax.default}  # (``_attention``)
# ops whose result holds the same values in the same places as their input, if shaped alike
_SAME_PLACES = {
    aten.expand.default,
    aten.view.default,
    aten._unsafe_view.default,
    aten.alias.default,
    aten.clone.default,
    aten._to_copy.default,
}
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
    **{op: _attention(op, "softmax") for op in _SOFTMAXES},
    **{op: _whole(name) for op, name in _WHOLE.items()},
    **{op: _batch_norm(i) for op, i in _BATCH_NORMS.items()},
    aten.native_layer_norm.default: _layer_norm,
    aten.native_group_norm.default: _group_norm,
    aten.convolution.default: _convolution,
    aten.diagonal.default: _diagonal,
    **dict.fromkeys(_MASKED_SCATTERS, _masked_scatter),
    aten.trace.default: _diagonal,  # the sum of the diagonal (0, 1): one kernel on CPU
    aten._pdist_forward.default: _pairwise,
    aten.renorm.default: _renorm,
    aten.renorm_.default: _renorm,
    aten._cudnn_rnn.default: _recurrence(10),
    aten.miopen_rnn.default: _recurrence(8),
    **dict.fromkeys(_SPECTRAL, _spectral),
    aten.view_as_complex.default: _paired,
    aten.mkldnn_rnn_layer.default: _recurrence(None),
}
_CARRY.update(
    {
        **{op: _mm(op in _BIASED) for op in _MATRIX_PRODUCTS},
        **{op: _reduced(op) for op in _REDUCTIONS},
        **{op: _softmaxed(op) for op in _SOFTMAXES},
        **dict.fromkeys(_BATCH_NORMS, _first_like_input),
        aten._native_batch_norm_legit_no_training.default: _first_like_input,
        aten.native_layer_norm.default: _first_like_input,
        aten.native_group_norm.default: _first_like_input,
        aten.convolution.default: _convolved,
        # transforms along event dimensions (``_spectral`` refused the batch): the batch
        # dimensions keep their places and sizes
        **dict.fromkeys(_SPECTRAL, _first_like_input),
        aten.view_as_real.default: _complex_view,
        aten.view_as_complex.default: _complex_view,
        aten._cudnn_rnn.default: _first_like_input,
        aten.miopen_rnn.default: _first_like_input,
        aten.mkldnn_rnn_layer.default: _first_like_input,
        # samples set to a value along the batch: each one alone
        **dict.fromkeys(
            [
                aten.index_fill.int_Scalar,
                aten.index_fill.int_Tensor,
                aten.index_fill_.int_Scalar,
                aten.index_fill_.int_Tensor,
            ],
            _first_like_input,
        ),
        # each slice along ``dim`` scaled alone (along the batch: each sample; over it,
        # ``_renorm`` refused it)
        aten.renorm.default: _first_like_input,
        aten.renorm_.default: _first_like_input,
        aten.narrow_copy.default: _cut(1, _narrowed),
    }
)
