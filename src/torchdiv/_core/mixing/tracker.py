"""``BatchAxes``: the state of one watch of ``f``, called around every ATen call.

``carry = before(func, args, kwargs)`` notes whether ``func`` combines samples in a way
derivatives see (its ``Mixing`` rule), or reads a result that did, picked samples combined with
others (``_picked_in``), moved rows combined elementwise with others (``_rows_in``) or samples
a reshape spread (``_spread_in``); ``after(carry, args, out)`` notes the batch dimensions of
the results (its ``Carry`` rule) and which depend on combined samples; ``finish(y)`` raises
``BatchInteractionError`` if ``f``'s result depends on such a combination or holds ``x``'s
samples out of place. Raising at the end, not at the op, lets a combination that only seeds a
backward pass inside ``f`` pass: ``grad(energy(x).sum(), x)`` is per sample, though the sum is
not.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils._pytree import tree_leaves

from torchdiv._core.checks import _shape, storage_address
from torchdiv._core.mixing.axes import Axis
from torchdiv._core.mixing.carry import (
    _joined_along_batch,
    _listed,
    _pointwise,
    _span,
    _split_in_order,
    _view,
    _within,
)
from torchdiv._core.mixing.combining import _REDUCTIONS, _SAME_PLACES, _keep_block
from torchdiv._core.mixing.errors import (
    _COLLECTIVE_WHAT,
    _SPLIT_WHAT,
    BatchInteractionError,
    _module_in_stack,
    explain,
)
from torchdiv._core.mixing.indexing import _cut_off, _unsorted
from torchdiv._core.mixing.places import _aligned, _held, _reduced_dims
from torchdiv._core.mixing.reads import (
    _CHECKS_VALUES,
    PYTHON,
    RAISES_ON_FIRST,
    VALUE_FREE,
    Kept,
    Verdict,
    _floating,
    decides,
)
from torchdiv._core.mixing.tables import (
    _CARRY,
    _CATS,
    _ELEMENTWISE,
    _IN_PLACE_VIEWS,
    _JOINS,
    _MIXING,
    _PUTS,
    _in_place_view,
    _kind,
    _rules,
)
from torchdiv._core.mixing.unknown import inside_kernel
from torchdiv._core.mixing.writes import _writes_first, _writing, written_arguments

aten = torch.ops.aten

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Axes, Block, Carry, Lines, Mixing, Pick


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
        # the same for a sample picked along one of several batch dimensions, the others kept
        # (``x[:, :1]`` with ``batch_dims=2``): combined with a tensor that holds that batch
        # dimension's samples, it mixes them
        self.partial: dict[int, tuple[torch.Tensor, Pick]] = {}
        self.pending: str | None = None  # the message for the results of the current op
        # the current op's refusal if the places it puts into, laid out as a guess
        # (``_flattened``), do not hold the samples put there
        self.guess: str | None = None
        # the other layouts such a fresh tensor may have (``_flattened``), tried in turn
        self.layouts: tuple[Axes, ...] = ()
        self.carried: Pick | None = None  # the pick the results of the current op inherit
        self.carried_partial: Pick | None = None  # and the partial one (``partial``)
        self.func: Any = None  # the current op
        self.kwargs: dict[str, Any] = {}  # its keyword arguments (``_unknown`` reads them)
        # id -> (tensor, its axes then, source -> (dimension, sample at each index, -1 where
        # none)): tensors whose samples values written through views put in (``_overwrite``)
        self.lines: dict[int, tuple[torch.Tensor, Axes, Lines]] = {}
        # id -> tensor: results computed inside a custom ``autograd.Function``'s ``forward``,
        # not yet known to be differentiable (``_settle``)
        self.inside: dict[int, torch.Tensor] = {}
        # whether such a forward ran on values from x: its backward, Python code the watch
        # does not see, may carry cotangents across samples (``watch._custom_backward``)
        self.custom_forward = False
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
        # whether the verdict holds for these values of ``x`` only (``verdict``): values
        # reached Python, or indices were read along the batch after values decided
        self.these_values = False
        # the parameters whose values alone reached Python, through an op that raises on them
        # (``_held_read``), each as it was then
        self.held_reads: list[Kept] = []
        # id -> (tensor, it and the tensor it is a view of as they were then): the integer
        # tensors a rule read indices along the batch from, before values decided anything
        # (``read_indices``)
        self.index_roots: dict[int, tuple[torch.Tensor, Kept, Kept | None]] = {}
        # the storages (by address) ``f`` wrote during the watch (``wrote``): a held weight or
        # index tensor written before it was read holds, at the next call's start, what
        # this call's writes left, not what that call's writes will (``_held_read``)
        self.written: set[int] = set()
        # id -> (tensor, the tensors ``f`` held before the call it was computed from): the
        # results of deterministic ops that read only such tensors, others of these and
        # Python numbers (``W @ W.T + eps * I``, a Glow layer's ``P @ L @ U``: ``_build``);
        # the storages written with such values, with their tensors (a view written), or
        # with others (``dirty``: a value from ``x`` or one no op made); the ids of every
        # tensor an op made during the watch (never one held before the call, alive all
        # along; a tensor made without an op at a freed one's id is taken for made: the
        # pass is then not kept, never kept wrongly)
        self.built: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = {}
        self.built_into: dict[int, tuple[torch.Tensor, ...]] = {}
        self.dirty: set[int] = set()
        self.made: set[int] = set()
        # whether a held read went through a built tensor (``Verdict.numbers``)
        self.numbers = False
        self.args: Sequence[Any] = ()  # the current op's arguments (``read_indices``)
        # whether ``f`` computed with a tensor subclass (``Reads``): its results are then
        # aliases no ATen call made, followed at every op (``follow``)
        self.subclassed = False
        # id -> (tensor, the samples along its rows, along its keys: its last two dimensions,
        # its version then): attention weights that are exactly 0 wherever the row's sample
        # and the key's differ (``_softmaxed``), and the softmax of the current op to check
        # so, with its message
        self.blocks: dict[int, Block] = {}
        self.block_check: tuple[int, int, str] | None = None
        # id -> (values of a sort along samples, their version then, the dimension sorted,
        # its batch dimension, the sample at each place: ``_sorted``), mixed unless a gather
        # puts each sample back into rows of its own (``_unsorted``)
        self.sorted: dict[int, tuple[torch.Tensor, int, int, Axis, torch.Tensor]] = {}
        # id -> (tensor, the row): a fresh tensor's spare last row that values of several
        # samples were written into (``_spared``), mixed until a slice cuts it off; dropped
        # at any later write into its storage (``wrote``)
        self.spare: dict[int, tuple[torch.Tensor, int]] = {}

    def read_indices(self) -> None:
        """Note that a rule read the values of indices along a batch dimension (``indexed``),
        those of the current op's integer or boolean arguments: after values decided
        something (``values_decide``), they may come from them, and the verdict holds for
        these values only. Before, they hold the same values at any ``x`` where each is (a
        view of) a tensor ``f``'s structure key holds by identity and version (a closure's
        or module's edges, ``p[senders]`` of a message-passing net over a flattened batch:
        ``index_roots``, kept by ``torchdiv._taylor.mixing.passed`` only where the key holds
        them); one it reaches otherwise (a neighbour list on a plain object, ``self.edges``
        through a bound method, a dict's entry, PyG's ``Data``, rebuilt outside ``f`` over the
        flattened batch: within each sample at one call, across samples at the next), or
        one ``f`` computed, keeps the pass for these values only too."""
        self.indexed = True
        if self.values_decide:
            self.these_values = True
            return
        for a in tree_leaves(self.args):
            if isinstance(a, torch.Tensor) and not _floating(a) and self.axes(a) is None:
                if a.dim() == 0 or a.is_inference() or self._written(a):
                    # (held by identity alone, if at all; or written before this read, from
                    # state the key may not hold: the next call may write other edges)
                    self.these_values = True
                if id(a) not in self.index_roots:
                    base = None if a._base is None else Kept.of(a._base)
                    self.index_roots[id(a)] = (a, Kept.of(a), base)

    def wrote(self, t: Any) -> None:
        """Note that ``f`` wrote into ``t``'s storage (an in-place op, through a view or
        ``.data``; ``t.data = v``: ``Reads``), whatever its version says."""
        if isinstance(t, torch.Tensor):
            storage = _storage(t)
            self.written.add(storage)
            self.built.pop(id(t), None)  # (``_build`` notes it again where built so)
            if self.spare:  # (any values written into the rows kept: no longer only its own)
                self.spare = {k: e for k, e in self.spare.items() if _storage(e[0]) != storage}

    def _written(self, t: torch.Tensor | None) -> bool:
        """Whether ``f`` wrote into ``t``'s storage earlier in the watch (``wrote``)."""
        return t is not None and _storage(t) in self.written - {0}

    def read_out(self) -> None:
        """Note values handed to Python where the dispatcher does not see it (``Reads``):
        its code may do anything after, so the verdict holds for these values only."""
        self.values_decide = self.these_values = True

    def values_read(self) -> None:
        """Note a verdict decided by floating values themselves (attention weights exactly 0
        across samples, ``_softmaxed``): it holds for these values only."""
        self.values_decide = self.indexed = self.these_values = True

    def _held_read(self, args: Sequence[Any]) -> bool:
        """Whether the current op, one that raises on its arguments' values
        (``_CHECKS_VALUES``: a factorization that fails to converge), read only tensors
        ``f`` held before the call (parameters, buffers, or views of one, that no watched op
        gave batch axes and ``f`` did not write), or tensors built from such alone
        (``built``: ``inv(P @ L @ U)``), which it then notes as they are (``held_reads``,
        ``Kept``; a built one's by the held tensors it was built from, and ``numbers``). Such
        an op on weights alone, ``W / matrix_norm(W, 2)``, cannot route one sample's values
        into another's, and whether it raises (a ``try:`` whose ``except`` branch mixes
        samples) follows from the weights' values alone (and the numbers the ops building
        its argument took), which this call's ``x`` did not set: the pass holds for any
        ``x`` while each weight is the same at the same version and values
        (``Verdict.while_held``; training's step writes it: watched again; ``passed`` keeps
        it only where the key holds each of them). An argument computed from ``x`` (a
        per-sample Kabsch alignment's ``svd``, even under ``no_grad``) keeps the pass for
        these values only; a solve's right-hand side is no such argument
        (``RAISES_ON_FIRST``)."""
        if self.func not in _CHECKS_VALUES:
            return False
        held: dict[int, torch.Tensor] = {}
        for a in tree_leaves(args[:1] if self.func in RAISES_ON_FIRST else args):
            if not isinstance(a, torch.Tensor) or not _floating(a):
                continue
            roots = self._roots(a)
            if roots is None:
                return False
            held.update((id(t), t) for t in roots)
        if not held:
            return False
        for t in held.values():
            if self.axes(t) or self._written(t):  # (``f`` set it: from a list, ``x``)
                return False
        self.held_reads += [Kept.of(t) for t in held.values()]
        return True

    def _roots(self, a: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The tensors ``f`` held before the call that ``a`` is, is a view of or was built
        from (``built``, and the tensors built into its storage, which ``f`` wrote nothing
        else into: ``dirty``), or ``None`` if none such (``x``'s values, or a tensor some
        op made otherwise). A view held before the call (``self.Wv = self.W[:]``) comes
        with its base: ``passed`` then holds it where ``f`` reads it from too (rebound, the
        base still in its place: watched again)."""
        root = a if a._base is None else a._base
        if self._held_before(root):
            return (root,) if root is a or id(a) in self.made else (root, a)
        entry = self.built.get(id(a))
        if entry is None or entry[0] is not a:
            return None
        storage = _storage(a)
        if storage in self.dirty or not storage:
            return None
        self.numbers = True
        leaves = (*entry[1], *self.built_into.get(storage, ()))  # (each held before)
        return tuple(u for t in leaves for u in ((t,) if t._base is None else (t._base, t)))

    def _held_before(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a tensor ``f`` held before the call: no op made it during the
        watch, and it is not ``x`` nor holds its samples (``passed`` keeps the pass only
        where ``f``'s structure key holds it)."""
        return id(t) not in self.made and t is not self.x and not self.axes(t)

    def _build(self, args: Sequence[Any], written: list[torch.Tensor], out: Any) -> None:
        """Note which results of the current op are ``built``: those of a deterministic op
        (not drawn at random, not ``empty``'s memory) whose tensor arguments (``args``: its
        positional and keyword ones) are all held before the call or built; the storages it
        wrote (``written``) as ``built_into`` or ``dirty``; and every result as ``made``. An
        op on ``x`` or on values no op made (``torch.tensor(...)``'s, ``from_numpy``'s)
        builds nothing. (Run at every watched op: ~1 us.)"""
        leaves = self._leaves(args, written)
        if leaves is not None and _unbuilt(self.func):
            leaves = None
        for t in written:
            storage = _storage(t)
            if leaves is None:
                self.dirty.add(storage)
            else:
                self.built_into[storage] = (*self.built_into.get(storage, ()), *leaves.values())
        for t in out if type(out) is tuple or type(out) is list else (out,):
            if isinstance(t, torch.Tensor):
                if leaves is not None:
                    self.built[id(t)] = (t, tuple(leaves.values()))
                elif self.built:
                    self.built.pop(id(t), None)
                if not written or not any(t is w for w in written):
                    self.made.add(id(t))

    def _leaves(
        self, args: Sequence[Any], written: list[torch.Tensor]
    ) -> dict[int, torch.Tensor] | None:
        """The tensors held before the call (by id; or views of them) that the tensors among
        ``args`` (and in their lists) are or were built from, or ``None`` if one is none
        such (``_build``; one the op writes is not: ``f`` sets its values)."""
        leaves: dict[int, torch.Tensor] = {}
        built, known, made = self.built, self.known, self.made
        for arg in args:
            for a in arg if type(arg) is list or type(arg) is tuple else (arg,):
                if not isinstance(a, torch.Tensor):
                    continue
                i = id(a)
                if i in known or i in made or a is self.x:  # (a result; ``x`` or from it)
                    entry = built.get(i)
                    if entry is None or entry[0] is not a:
                        return None
                    leaves.update((id(t), t) for t in entry[1])
                elif written and any(a is w for w in written):
                    return None
                else:  # (its root read at a held read only: ``_base`` costs 6 us in ``Reads``)
                    leaves[i] = a
        return leaves

    def verdict(self) -> Verdict:
        """What this watch, passed, says of other calls at the structure (``Verdict``)."""
        if self.these_values:
            return Verdict(False, not self.values_decide)
        if self.held_reads or self.index_roots:
            roots = tuple((kept, base) for _, kept, base in self.index_roots.values())
            held = tuple(self.held_reads)
            return Verdict(False, not self.values_decide, held, roots, self.numbers)
        return Verdict(True, not self.values_decide)

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
        self.carried_partial = None
        self.layouts, self.args = (), args
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
            mixing = _MIXING.get(func) or _collective(func)
            carry = _CARRY.get(func) or _kind(func, mixing is None)
            mixing = mixing or inside_kernel(func)  # (a custom op: followed as unknown too)
            if _writes_first(func):
                written = _writing(carry)
                if carry is _pointwise:
                    _ELEMENTWISE.add(written)
                carry = written
            rules = _rules[func] = (mixing, carry)
        mixing, carry = rules
        if self.mixed and func not in VALUE_FREE:
            self.pending = self._mixed_in(args)
            if self.pending is not None and self.sorted and func is aten.gather.default:
                unsorted = _unsorted(self, args)
                if unsorted is not None:
                    self.pending = None
                    return lambda tr, a, o: [unsorted]
            if self.pending is not None and self.spare and _cut_off(self, func, args):
                self.pending = None
        if self.pending is None and self.picked and func not in VALUE_FREE and func not in _PUTS:
            self._picked_in(func, args)
        if self.pending is None and self.partial and func not in VALUE_FREE and func not in _PUTS:
            self._partial_in(func, args)
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
        written = written_arguments(self.func, args, self.kwargs)
        for t in written:
            self.wrote(t)
        if self.pending is not None and _collective(self.func) is not None:
            # (what it filled, unmarked in its schema, and what the custom Function's forward
            # made before it: a gather leaves other ranks' outputs unfilled, and a rank that
            # served what another refused would wait for it at the backward's collective)
            filled = (out, _filled(self.func, args), list(self.inside.values()))
            for t in tree_leaves(filled):
                if isinstance(t, torch.Tensor):
                    self.mixed[id(t)] = (t, self.pending)
                    self.mixed_writes += 1
        self._build((*args, *self.kwargs.values()) if self.kwargs else args, written, out)
        decided = decides(self.func, args, out, self.values_decide, self.kwargs)
        if decided:
            self.values_decide = True
            if decided == PYTHON and not self._held_read(args):
                self.these_values = True
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
                partial = self.carried_partial
                if partial is not None and all(a.source != partial.source for a in axes or ()):
                    self.pick_partial(t, partial)

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
        indexing op moved and nothing put back, or one sample picked for all of them (of
        ``x``'s only batch dimension, or of one of several: ``partial``)."""
        for axis in self.axes(t) or ():
            if axis.rows:
                # (place ``p`` holds sample ``rows[p // inner]``: rows ``(0, 1)`` at ``inner``
                # 2, ``stack([h, 2 * h], 1).reshape(2 * B, D)[:B]``, hold samples 0, 0, 1, 1,
                # taken for the first samples in order until rev-merges19e: served)
                held = [r for r in axis.rows for _ in range(axis.inner)]
                at = next((p for p, r in enumerate(held) if r != p % axis.size), None)
                if at is None:  # the first samples, in order (x[:k])
                    continue
                return (
                    f"{self.moves.get(axis.rows, 'an indexing op')} moved samples along the "
                    f"batch: place {at} along dimension {axis.position} of f's output of shape "
                    f"{_shape(t)} holds sample {held[at]}, and they were not put back "
                    "(select and write back the same places: y[m] = g(x[m]), or invert the "
                    "permutation)"
                )
        pick = self.picks(t)
        if pick is not None and pick.sample is not None and t.dim() > 0:
            return f"every sample of f's output of shape {_shape(t)} is computed from {pick.what}"
        partial = self.partial_pick(t)  # (``net(x[:, :1]).expand(T, X, 1)``: one for all)
        if partial is not None and partial.size > 1:
            return (
                f"every sample along dimension {partial.source} of f's output of shape "
                f"{_shape(t)} is computed from {partial.what}"
            )
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

    def pick_partial(self, t: torch.Tensor, pick: Pick) -> None:
        """Note that ``t`` holds one sample of ``x``'s batch dimension ``pick.source`` beside
        the samples of its other batch dimensions (``partial``)."""
        if _floating(t):
            self.partial[id(t)] = (t, pick)

    def partial_pick(self, t: Any) -> Pick | None:
        entry = self.partial.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is t else None

    def _partial_in(self, func: Any, args: Sequence[Any]) -> None:
        """An op reading a sample picked along one of several batch dimensions: combined
        with a tensor that holds that dimension's samples (``u0(x[:, :1]) + t * net(x)`` on
        a ``(T, X, d)`` grid), or with another such pick, it mixes samples; joined with others
        (a restack) it is left; else its results inherit the pick (``carried_partial``)."""
        joins = func in _JOINS
        tensors = _listed(list(args[0]) if joins else args)
        picks = [p for t in tensors if (p := self.partial_pick(t)) is not None]
        if not picks:
            return
        sources = {p.source for p in picks}
        if any(a.source in sources for t in tensors for a in self.axes(t) or ()):
            if not (func in _CATS and _joined_along_batch(self, args)):
                self.pending = self.message(func, f"{picks[0].what}, combined with the whole batch")
            return
        if joins and (len(picks) < len(tensors) or len({p.sample for p in picks}) > 1):
            return
        if len({(p.source, p.sample) for p in picks}) > 1:
            self.pending = self.message(func, f"{picks[0].what}, combined with {picks[-1].what}")
            return
        self.carried_partial = picks[0]

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
        self.custom_forward = True
        for t in self.inside.values():
            if constant and not t.requires_grad:
                for table in (self.known, self.mixed, self.picked, self.partial):
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
            (self.known, self.mixed, self.picked, self.partial, self.spread, self.lines),
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
        """The ``BatchInteractionError``'s message for ``what`` mixed by ``func``, naming the
        running module where it can be read: an error while reading the stack (a frame's
        ``self`` a proxy that raises) leaves it out, the detection standing (was taken by
        dispatch for an engine that cannot run: ``f`` ran per sample, unwatched, its
        cross-sample terms dropped: rev-lead31's design note, the lead)."""
        try:
            module = _module_in_stack()
        except Exception:
            module = None
        where = f"in {module}, " if module else ""
        kind = "ATen op" if getattr(func, "namespace", "aten") in ("aten", "prims") else "custom op"
        return explain(f"{what} ({where}{kind} {func})", self.x, self.batch_dims)


def _alias(a: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``a`` and the view ``t`` of ``base`` are the same elements (``BatchAxes.follow``)."""
    return (
        (a is base or a._base is base)
        and a.shape == t.shape
        and a.stride() == t.stride()
        and a.storage_offset() == t.storage_offset()  # (not ``data_ptr``: ``Reads`` notes it)
    )


def _storage(t: torch.Tensor) -> int:
    """The address of ``t``'s storage (``0``: none, a transform's wrapper or an empty one)."""
    try:
        return storage_address(t)
    except (RuntimeError, NotImplementedError):
        return 0


# whether each op met builds nothing from held tensors (``BatchAxes._build``): drawn at
# random (``randn``, ``dropout``: other values at every call) or ``empty``'s memory
_UNBUILT: dict[Any, bool] = {}


def _collective(func: Any) -> Mixing | None:
    """The rule of a collective over a process group's ranks (``None`` for other ops): on a
    tensor of ``x``'s samples it combines them with the other ranks' in results derivatives
    see (every rank's batch one batch). ``c10d``'s ops inside a custom ``autograd.Function``'s
    ``forward`` (``torch.distributed.nn.functional``'s ``all_gather``/``all_reduce``,
    ``SyncBatchNorm``'s statistics), elsewhere constants (no derivative: as ``detach``); the
    functional ones (``torch.distributed._functional_collectives``, differentiable) anywhere.
    ``torch.cat(all_gather(h)).mean(0)`` was served as sample-wise: the gathered tensors,
    filled by an op its schema does not mark as writing, or shaped unlike ``h``, were
    untracked ("auto"'s Laplacian 0; the functional gather's results read before their wait:
    values of 1e250). DTensor's collectives (tensor parallelism: other ranks' features of the
    same samples) run inside its dispatch, where the watch does not see them. ``send`` and
    the barriers combine nothing here (a ``send`` of ``h`` inside a Function's forward marked
    what it had made: ``after``)."""
    namespace = getattr(func, "namespace", None)
    if namespace in ("_c10d_functional", "_c10d_functional_autograd"):
        return _gathered
    local = namespace != "c10d" or func._opname in _COMBINES_NOTHING
    return None if local else _gathered_within


def _filled(func: Any, args: Sequence[Any]) -> Any:
    """The tensors a ``c10d`` op fills in place, its first argument (``reduce_``, ``gather_``
    and ``alltoall_base_``, behind ``torch.distributed.nn.functional``'s ``reduce``, ``gather``
    and ``all_to_all_single``, return only a ``Work``: their results were served as
    sample-wise, ``h - torch.cat(gather(h, 0)).mean(0)`` where ``h - h.mean(0)`` is refused)."""
    return args[0] if func.namespace == "c10d" and args else ()


_COMBINES_NOTHING = frozenset({"send", "barrier", "monitored_barrier_", "check_for_nan"})


def _gathered(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    tracked = [t for t in tree_leaves(args) if tr.axes(t) is not None]
    return f"{_COLLECTIVE_WHAT} (every rank's batch taken as one)" if tracked else None


def _gathered_within(tr: BatchAxes, args: Sequence[Any]) -> str | None:
    return None if torch.is_grad_enabled() else _gathered(tr, args)


_EMPTY = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"})


def _unbuilt(func: Any) -> bool:
    found = _UNBUILT.get(func)
    if found is None:
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        found = _UNBUILT[func] = seeded or func._schema.name.split("::")[-1] in _EMPTY
    return found
