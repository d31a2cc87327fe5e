"""Batch dimensions carried through indexing and puts (``after`` rules).

Samples an indexing op moves along the batch are followed as rows (``Axis.rows``: the sample at
each index): ``x[mask]``, ``x[perm]``, ``x[idx.nonzero()]`` (``_index``, ``_indexed``:
advanced indexing, the broadcast indices replacing the dimensions they index), ``index_select``,
``gather``/``take_along_dim``, ``masked_select``, ``flip``, ``roll``. Values written back by
``index_put`` (``y[m] = g(x[m])``), ``index_copy``, ``index_add``, ``scatter`` or
``masked_scatter`` must land in places of their own samples (``_put_axes``); samples added into
a fresh tensor whose first dimension has ``k`` places per sample are checked as a flattened
batch (``x.reshape(B * k, ...)``'s layout, or the written values' own in-order one, as a
sequence-first ``(T * B, F)``; ``_flattened``: a message-passing net's ``(B * N, F)`` nodes),
else refused with ``_PUT_WHAT``. Indices with two or more dimensions
along the batch are refused if their result reaches the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from torchdiv._core.checks import _shape
from torchdiv._core.mixing.axes import Axis, Pick
from torchdiv._core.mixing.errors import _PUT_WHAT
from torchdiv._core.mixing.places import _aligned, _grid, _held, _line, _rows

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Axes, Carry
    from torchdiv._core.mixing.tracker import BatchAxes

aten = torch.ops.aten


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
    throughout; where that one is indexed beside the others of other sources, kept, the
    sample is a partial pick (``x[:, [i]]`` of a ``(T, X, d)`` grid with ``batch_dims=2``, as
    ``x[:, i:i + 1]``: ``carry._picked``), not a dimension of one row. An indexed batch
    dimension under indices of two or more dimensions is not followed: ``tr.pending`` says
    so."""
    given = [d for d, i in enumerate(index) if i is not None]
    if not given:
        return list(t.shape), axes, None
    indices = torch.broadcast_tensors(*(i for i in index if i is not None))  # type: ignore[no-untyped-call]
    partial: Pick | None = None
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
        tr.read_indices()
        others = [a for a in axes if a is not axis]
        alone = all(a.position in kept and a.source != axis.source for a in others)
        if alone and samples.numel() and bool((samples == samples.flatten()[0]).all()):
            sample = int(samples.flatten()[0])
            pick = f"sample {sample} picked out of the batch by {what}"
            partial = Pick(axis.size, sample, pick, axis.source)
            if not others:
                return shape, (), partial
            continue
        line = _line(samples) if samples.numel() else None
        if line is not None:
            found.append(_rows(tr, at + line[0], axis, line[1], what))
        elif samples.numel():
            tr.pending = tr.message(tr.func, "samples moved by indices of two or more dimensions")
    return shape, tuple(sorted(found)), partial


def _noted(tr: BatchAxes, axes: Axes, pick: Pick | None) -> list[Axes | None]:
    """The result's batch dimensions, and the sample it holds (``tr.carried``; beside
    ``axes``: a partial pick, ``tr.carried_partial``)."""
    if pick is not None and axes:
        tr.carried_partial = pick
    elif pick is not None:
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
        tr.read_indices()
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


def _sorted(rule: Carry) -> Carry:
    """``sort(t, dim)`` (``stable`` too) by ``rule`` (``_unknown``'s: along a batch dimension
    it mixes samples, its values marked so), noting for a sort along ``t``'s one batch
    dimension the sample at each place of its values (``BatchAxes.sorted``): a gather that
    puts every sample's values back into rows of their own (``_unsorted``) follows them again.
    Its order is decided by the values, so a pass holds for these values only."""

    def rule_sorted(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        result = rule(tr, args, out)
        t, axes = args[0], tr.axes(args[0])
        values, indices = out
        if (
            axes is None
            or len(axes) != 1
            or tr.pending is not None  # (``t`` mixed already: that stays, unsorted or not)
            or id(values) not in tr.mixed
            or not t.dim()
        ):
            return result
        dim = tr.kwargs.get("dim", args[1] if len(args) > 1 else -1) % t.dim()
        if axes[0].position == dim:
            tr.values_read()
            samples = axes[0].samples(indices)
            tr.sorted[id(values)] = (values, values._version, dim, axes[0], samples)
        return result

    return rule_sorted


def _unsorted(tr: BatchAxes, args: Sequence[Any]) -> Axes | None:
    """The batch dimension of ``gather(t, dim, index)`` (``take_along_dim``: of ``t``
    expanded to its own shape) where ``t`` holds the values of a sort along samples
    (``_sorted``), unchanged since, gathered along the sorted dimension so that each row of
    the result holds one sample (PyG's ``MedianAggregation``: sorted by value, then stably by
    segment); ``None`` else (the rows mix samples: a median over the batch)."""
    t, dim, index = args[0], args[1], args[2]
    entry = tr.sorted.get(id(t)) or tr.sorted.get(id(t._base))
    if entry is None or not (entry[0] is t or _same_view(entry[0], t)):
        return None
    values, version, along, axis, samples = entry
    if values._version != version or dim % max(t.dim(), 1) != along:
        return None
    held = samples.gather(along, index).movedim(along, 0).reshape(index.shape[along], -1)
    if not held.numel() or not bool((held == held[:, :1]).all()):
        return None
    return (_rows(tr, along, axis, held[:, 0], "a sort along samples and a gather"),)


def _same_view(base: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of ``base`` with its elements in its places (``expand`` to
    its own shape)."""
    return (
        t._base is base
        and t.shape == base.shape
        and t.stride() == base.stride()
        and t.storage_offset() == base.storage_offset()
    )


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
    samples decides, with ``tr.guess`` as the message if not. Samples written (not added,
    not moved) into such a fresh tensor are checked so too (a dense batch of graphs,
    ``out[idx] = h``); into any other tensor, its places are not followed."""
    axes = tr.axes(t)
    if axes:
        return axes
    held = tr.axes(values)
    batch = tr.x.shape[: tr.batch_dims]
    if (held or tr.picks(values) is not None) and t.shape[: tr.batch_dims] == batch:
        return tr.start
    if held and _kept_in_place(t, values, held, along):
        return held
    if not held:
        return ()
    # per-cluster sums ``zeros(K, D).index_add(0, cid, x)``: places no longer followed;
    # samples written (PyG's ``to_dense_batch``: ``out[idx] = h`` into ``(B * N_max, F)``)
    moved = accumulate or any(axis.rows for axis in held)
    what = (
        f"samples {'added' if accumulate else 'moved' if moved else 'written'} into a tensor "
        f"of shape {_shape(t)}, not x's batch shape, whose places are not followed"
    )
    flat = _flattened(tr, t, values, held) if tr.fresh.get(id(t)) is t else []
    if flat:
        tr.guess = tr.message(tr.func, f"{what} (nor those of a flattened batch)")
        tr.layouts = tuple(flat[1:])
        return flat[0]
    if moved:
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


def _flattened(tr: BatchAxes, t: torch.Tensor, values: Any, held: Axes) -> list[Axes]:
    """The layouts ``x``'s batch dimensions may have in ``t`` if its first dimension has
    ``k * n`` places (``n``: the batch's size, all its dimensions): first, where the
    ``values`` written into it have ``held`` all along their first dimension and no more
    rows, theirs (before any move: a sequence-first ``(T * B, F)`` layout, row ``t * B + b``
    sample ``b``'s, its tokens written in order or sorted by a router and put back,
    ``out[order] = h[order]``, all of them or those an expert's capacity kept: with fewer
    rows, Megatron-style expert-choice routing was refused before rev-watch18); then as
    ``x.reshape(n * k, ...)`` would: samples outermost, ``k`` places each (a message-passing
    net's ``(B * N, F)`` nodes, a mixture of experts' ``(B * T, D)`` tokens), also with one
    spare row after them (PyG's
    ``to_dense_batch`` writes ``B * N_max + 1`` rows, the last a trash slot it slices off),
    which the samples' period wraps onto: it is sample 0's place (``Axis.samples``), so values
    of other samples written there are refused; none otherwise. Only guesses: the caller
    keeps the first under which every value lands in a place of its own samples (``t`` is
    fresh, none of its places holds a sample yet, so any layout they all fit is one its
    samples have; later ops follow that one), and refuses the write if none."""
    batch = tr.x.shape[: tr.batch_dims]
    n = math.prod(batch)
    if t.dim() == 0 or t.shape[0] < n or t.shape[0] % n > 1:
        return []
    alike = isinstance(values, torch.Tensor) and values.dim() == t.dim() > 0
    along = len(held) == len(tr.start) and all(a.position == 0 for a in held)
    own = [tuple(a._replace(rows=()) for a in held)] if alike and along else []
    moved = any(a.rows for a in held)
    if own and values.shape[0] == t.shape[0] and not moved:
        return own  # (in order: the values' own rows)
    k = t.shape[0] // n
    runs = [
        tuple(
            Axis(0, axis.size, d * math.prod(batch[axis.source + 1 :]), (), axis.source)
            for axis in tr.start
        )
        for d in (1, k, *(d for d in range(2, k) if k % d == 0))
    ]
    # moved rows (``rows``, each at ``inner`` 1) were in samples-innermost order before the
    # move (``runs[0]``; with ``batch_dims=2`` their own ``inner``s, 1, were not: refused
    # until leftovers19), and ``d`` rows of each sample may repeat every ``n * d`` rows
    # (``out.reshape(2, B, T, F)[1]``: sample-major values in the second half, ``d = T``)
    own = ([runs[0]] if moved else own) if own and values.shape[0] <= t.shape[0] else []
    return [*own, *(r for r in runs[1:] if r not in own)]


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
    op moved samples. Returns ``t``'s batch dimensions: of a fresh flattened buffer, the
    first layout guessed (``_flattened``, ``tr.layouts``) under which they all do."""
    axes = _put_axes(tr, t, values, accumulate, along)
    if not axes or not isinstance(values, torch.Tensor):
        return axes
    before = tr.pending
    found = _misput(tr, t, axes, index, values)
    first = tr.pending  # (``_indexed``'s own refusal, under the first layout)
    for layout in tr.layouts if found is not None else ():
        tr.pending = before
        if _misput(tr, t, layout, index, values) is None and tr.pending is before:
            return layout
    # (a write reading nothing mixed: ``t`` marked so already would lose that mark)
    spared = _spared(tr, t, index, values) if found is not None and before is None else None
    if spared is not None:
        tr.pending = before
        return spared
    tr.pending = first if found is None else found
    return axes


def _spared(tr: BatchAxes, t: torch.Tensor, index: list[Any], values: Any) -> Axes | None:
    """The batch dimension of a fresh ``t`` of ``n * k + 1`` rows (``n`` samples) written
    ``t[i] = values`` (rows of one batch dimension) where each value lands in the ``k``
    places of its own sample (``x.reshape(n * k, ...)``'s layout) or in the spare last row:
    PyG's ``to_dense_batch`` with ``max_num_nodes`` smaller than a graph sends the nodes it
    cuts off, any sample's, there (its trash slot). That row then mixes samples
    (``BatchAxes.spare``): ``t`` is marked mixed, which a slice cutting the row off clears
    (``_cut_off``) unless ``f`` wrote into ``t`` again (``BatchAxes.wrote``); ``None`` where
    the write is not of that form or reads a mixed tensor."""
    n, held = len(tr.x) if tr.batch_dims == 1 else 0, tr.axes(values)
    i = index[0] if index else None
    if (
        tr.fresh.get(id(t)) is not t
        or not isinstance(values, torch.Tensor)
        or not isinstance(i, torch.Tensor)
        or n < 2
        or t.dim() == 0
        or t.shape[0] % n != 1
        or any(j is not None for j in index[1:])
        or held is None
        or len(held) != 1
        or held[0].position != 0
        or i.dim() != 1
        or values.dim() == 0
        or len(i) != values.shape[0]
    ):
        return None
    k, at = t.shape[0] // n, i.long() % t.shape[0]
    keep = at != n * k
    tr.read_indices()
    samples = held[0].samples(torch.arange(values.shape[0]))
    if not bool((torch.div(at, k, rounding_mode="floor") == samples)[keep].all()):
        return None
    what = (
        f"values of several samples written into the spare last row of a tensor of shape "
        f"{_shape(t)}, read (cut it off: t[:-1])"
    )
    tr.spare[id(t)] = (t, n * k)
    tr.mixed[id(t)] = (t, tr.message(tr.func, what))
    tr.mixed_writes += 1
    return (Axis(0, n, k, (), 0),)


def _cut_off(tr: BatchAxes, func: Any, args: Sequence[Any]) -> bool:
    """Whether ``func(*args)`` slices the spare row off a tensor ``_spared`` noted."""
    entry = tr.spare.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
    if func is not aten.slice.Tensor or entry is None or entry[0] is not args[0]:
        return False
    dim, end, step = (*args[1:2], 0)[0], (*args[3:4], None)[0], (*args[4:5], 1)[0]
    if end is not None and end < 0:
        end += args[0].shape[0]
    return dim % args[0].dim() == 0 and end is not None and 0 <= end <= entry[1] and step > 0


def _misput(
    tr: BatchAxes, t: torch.Tensor, axes: Axes, index: list[Any], values: torch.Tensor
) -> str | None:
    """The refusal of ``t[index] = values`` with ``t``'s batch dimensions ``axes`` (``_put``),
    or ``None`` where every value lands in a place of its own samples."""
    func = tr.func
    shape, places, pick = _indexed(tr, t, axes, index, str(func))
    carried, held = tr.picks(values), tr.axes(values)
    if carried is not None and carried.sample is not None:
        wrong = places or (pick is not None and pick.sample != carried.sample)
        return (
            tr.message(func, f"{carried.what}, written into other samples' places")
            if wrong
            else None
        )
    partial = tr.partial_pick(values)
    if pick is not None and places:  # one sample of one of several batch dimensions
        if any(a.source == pick.source for a in held or ()):
            return tr.guess or tr.message(func, f"{_PUT_WHAT} (the places all hold {pick.what})")
        pick = None if partial is None else pick
    if partial is not None:  # values of one sample there: into places of that sample only
        if pick is None or (pick.source, pick.sample) != (partial.source, partial.sample):
            return tr.message(func, f"{partial.what}, written into other samples' places")
    elif held and pick is not None:
        return tr.guess or tr.message(func, f"{_PUT_WHAT} (the places all hold {pick.what})")
    expected: dict[int, set[tuple[int, ...]]] = {}
    for axis in places:
        expected.setdefault(axis.position, set()).add(_held(axis, shape[axis.position]))
    for axis in _aligned(values, held or (), shape):
        if _held(axis, shape[axis.position]) not in expected.get(axis.position, set()):
            return tr.guess or tr.message(func, _written(tr, axis))
    return None


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
    _scattered_pick(tr, t, axes, dim, index, src)
    if not axes or not held:
        return [axes or None]
    shape = list(index.shape)
    if any(axis.position == dim for axis in axes):
        tr.read_indices()
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


def _scattered_pick(
    tr: BatchAxes, t: torch.Tensor, axes: Axes, dim: int, index: Any, src: Any
) -> None:
    """``scatter(t, dim, index, src)`` of one sample picked out of a batch dimension (``src``
    from ``x[[i]]``; beside the others, a partial pick: ``x[:, [i]]``, ``x[:, i:i + 1]``):
    every place it lands in along that dimension must be sample ``i``'s, else
    ``tr.pending``. ``axes``: the result's batch dimensions (``_put_axes``)."""
    pick = tr.picks(src) or tr.partial_pick(src)
    if pick is None or pick.sample is None or not isinstance(index, torch.Tensor):
        return
    for axis in (a for a in axes if a.source == pick.source and index.numel()):
        q = axis.position
        at = index % t.shape[dim] if q == dim else _grid(list(index.shape), q)
        if not bool(axis.samples(at).eq(pick.sample).all()):
            tr.pending = tr.message(tr.func, f"{pick.what}, written into other samples' places")


_ROLLS = {aten.roll.default}


_ACCUMULATING = {
    aten.index_add.default,
    aten.index_add_.default,
    aten.scatter_add.default,
    aten.scatter_add_.default,
    aten.scatter_reduce.two,
    aten.scatter_reduce_.two,
}
