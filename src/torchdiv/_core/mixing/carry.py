"""Batch dimensions carried through elementwise ops, views and joins (``after`` rules).

Each rule is a ``Carry``: ``rule(tr, args, out)`` -> the batch dimensions (``Axes``) of each
result, ``None`` where one is not followed. Elementwise ops broadcast (``_pointwise``:
``_aligned`` to the result's shape); reshapes keep the batch factor, the samples being the
outermost factor of a dimension (``(B, T, D) -> (B*T, D)`` merges it with the dimensions
after it), or spread the batch digit across dimensions (``x.reshape(D, B)``,
``BatchAxes.spread``; a reshape back follows it again); permutes and transposes move it;
``select`` and slices pick samples (``Pick``: ``x[0]``; rows in order: ``x[1:]``, ``split``,
``narrow``); ``cat``/``stack`` join pieces, the batch again if in order (``torch.stack([g(xi)
for xi in x])``); convolutions keep it along ``N`` (or among the channels of grouped weights
held per sample); matrix products (``_mm``) and reductions (``_reduced``) keep the batch
dimensions they did not contract or reduce.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from torchdiv._core.checks import _shape
from torchdiv._core.mixing.axes import Axis, Pick
from torchdiv._core.mixing.places import (
    _aligned,
    _indices,
    _reduced_dims,
    _rows,
    constant_blocks,
)
from torchdiv._core.mixing.reads import _floating
from torchdiv._core.mixing.writes import _along_line

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Axes, Carry
    from torchdiv._core.mixing.tracker import BatchAxes


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
    # (an axis past ``t``'s dimensions: one a reduction over it left on its result, which is
    # mixed already; ``x.T[..., None, :] * w`` summed over the batch, then ``.T``: KeyError
    # until mixsweep34, blamed on f)
    moved = (axis._replace(position=where[axis.position]) for axis in axes if axis.position < n)
    return [tuple(sorted(moved))]


def _select(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``select(t, dim, i)``: one sample of a batch dimension is no batch any more; it is
    a picked sample if that was ``t``'s only batch dimension (else the tracking of that
    dimension ends). The others move up after ``dim``."""
    t, axes = args[0], tr.axes(args[0])
    if not axes:
        return None
    dim = args[1] % t.dim()
    kept = tuple(_moved(axis, -(axis.position > dim)) for axis in axes if axis.position != dim)
    cut = [axis for axis in axes if axis.position == dim]
    if _one_of(cut, kept):
        at = args[2] % t.shape[dim]
        _picked(tr, t, cut[0] if cut else axes[0], dim, range(at, at + 1), out, bool(kept))
    return [kept]


def _one_of(cut: Sequence[Axis], kept: Sequence[Axis]) -> bool:
    """Whether a piece along the batch dimensions ``cut`` may hold one sample of them: they
    are the only ones, or one beside batch dimensions of other sources of ``x`` (not its own
    samples along another dimension: ``w[0]`` of ``w = softmax(h @ h.T)`` cuts a row of
    pairs of samples)."""
    return not kept or (len(cut) == 1 and all(a.source != cut[0].source for a in kept))


def _picked(
    tr: BatchAxes,
    t: torch.Tensor,
    axis: Axis,
    dim: int,
    span: range,
    o: Any,
    partial: bool = False,
) -> None:
    """Note ``o``, indices ``span`` of ``t`` along ``dim``, as one picked sample if they fall
    in one sample of ``axis`` (``t``'s only batch dimension; ``partial``: one of several, the
    others kept in ``o``: ``x[:, :1]`` of a ``(T, X, d)`` grid with ``batch_dims=2``)."""
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
        pick = Pick(axis.size, sample, what, axis.source)
        if partial:
            tr.pick_partial(o, pick)
        else:
            tr.pick(o, pick)


def _repeated(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
    """``repeat(repeats)`` (``torch.tile``): ``t`` tiled ``repeats[k]`` times along each
    dimension, new ones in front; a batch dimension tiled whole (a whole number of its
    periods) holds its samples in the same order again: ``x.repeat(1, 2)``, whose result was
    not followed, so a mean over samples after it passed unseen. A fresh tensor's tiles stay
    fresh (PyG's ``to_dense_batch`` fills its buffer by ``as_tensor(fill).repeat(size)``)."""
    t, axes = args[0], tr.axes(args[0])
    if tr.fresh.get(id(t)) is t:
        _fresh(tr, args, out)
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
            if i < len(pieces) and _one_of(cut, kept):
                _picked(tr, t, cut[0] if cut else axes[0], dim, pieces[i], o, bool(kept))
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
        pick, axes = _sample_of(tr, t), tr.axes(t) or ()
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
    sizes = {(p.size, p.source) for t in tensors if (p := _sample_of(tr, t)) is not None}
    line = torch.cat(pieces)
    if axis is None and len(sizes) == 1 and bool((line >= 0).all()):  # samples picked alone
        size, source = sizes.pop()  # (in another order: ``cat([g(x[1:2]), g(x[0:1])])``)
        axis = Axis(dim, size, 1, (), source)
    if axis is None or not sizes <= {(axis.size, axis.source)}:
        return []
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
    else:
        found.update(_reordered(tr, tensors, dim))
    return [tuple(sorted(found))]


def _reordered(tr: BatchAxes, tensors: Sequence[torch.Tensor], dim: int) -> list[Axis]:
    """The batch dimension along the new ``dim`` of ``stack(tensors, dim)``, each a sample of
    one batch dimension picked out alone, not in order (``stack([g(x[1]), g(x[0])])``): its
    rows, moved samples that must be put back."""
    picks = [_sample_of(tr, t) for t in tensors]
    found = [p for p in picks if p is not None and p.sample is not None]
    if len(found) != len(picks) or len({(p.size, p.source) for p in found}) != 1:
        return []
    size, source = found[0].size, found[0].source
    line = torch.tensor([p.sample for p in found])
    return [_rows(tr, dim, Axis(dim, size, 1, (), source), line, str(tr.func))]


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


def _sample_of(tr: BatchAxes, t: torch.Tensor) -> Pick | None:
    """The sample ``t`` was picked out of, along ``x``'s only batch dimension or along one of
    several (``BatchAxes.partial``: ``g(x[:, i])``, restacked over ``i``, holds that batch
    dimension again, which a mean over it afterwards mixes)."""
    return tr.picks(t) or tr.partial_pick(t)


def _restacked(tr: BatchAxes, tensors: Sequence[torch.Tensor]) -> Pick | None:
    """The first pick, if ``tensors`` are the samples of a batch dimension, each picked out
    alone, in order."""
    picks = [_sample_of(tr, t) for t in tensors]
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
    the left operand's row dimensions and the right one's column dimension carry over; a
    constant block-diagonal ``a`` over ``b``'s rows of samples (``constant_blocks``) carries
    ``b``'s rows over too."""

    def rule(tr: BatchAxes, args: Sequence[Any], out: Any) -> list[Axes | None] | None:
        a, b = (args[1], args[2]) if biased else (args[0], args[1])
        found: list[Axis] = []
        if biased and (axes := tr.axes(args[0])):
            found += _aligned(args[0], axes, out)
        if axes := tr.axes(a):
            found += [axis for axis in axes if axis.position < a.dim() - 1]
        if axes := tr.axes(b):
            found += [axis for axis in axes if axis.position in (b.dim() - 1, *range(b.dim() - 2))]
            if constant_blocks(tr, a, b):  # (rows of one sample: the same places as b's)
                found += list(axes)
        return [tuple(sorted(set(found))) if len(found) > 1 else tuple(found)]

    return rule


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
