"""Batch dimensions carried through writes into views and storage (``after`` rules).

Values written in place through a view of another tensor (``buf[:, :D] = g(x)``,
``buf.narrow(...).copy_(...)``; ``select_scatter``, ``slice_scatter`` out of place) are
followed into that tensor (``_overwrite``): ``_box`` finds where the view lies in the tensor
whose memory it shares (its first element, and for each of its dimensions the dimension of the
root it runs along with its step), ``_lines`` the samples along each of the root's batch
dimensions (-1 where none was written); along each dimension the samples written replace those
there, so a fresh buffer holds the batch where they were written, and samples written into
other samples' places (``y[1:] = g(x)[:-1]``) are moved rows. ``_writing`` wraps the rule of
an op that writes into its first argument; ``_padded_constant`` follows ``F.pad``,
``_copied``/``_scattered_into`` copies, ``_strided`` an ``as_strided`` whose strides keep
each sample's elements along one dimension (``torch.stft``'s frames; frames along the batch
mix), read through the samples each storage element holds (``_storage_samples``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_leaves

from torchdiv._core.checks import _shape, storage_address
from torchdiv._core.mixing.axes import Axis, Pick
from torchdiv._core.mixing.errors import _PUT_WHAT
from torchdiv._core.mixing.places import _aligned, _grid, _indices, _line, _rows
from torchdiv._core.mixing.reads import _floating

if TYPE_CHECKING:
    from torchdiv._core.mixing.axes import Axes, Carry, Lines
    from torchdiv._core.mixing.tracker import BatchAxes


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
    if pick is not None and pick.sample is not None and pick.source not in {a.source for a in axes}:
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
        pick = tr.carried if not axes else tr.carried_partial  # (``y[:, i] = g(x[:, j])``)
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


# the arguments each op met writes into, by place and name, as its schema marks them
# (``written_arguments``)
_WRITES: dict[Any, tuple[tuple[int, str], ...]] = {}


def written_arguments(func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors the ATen call ``func(*args, **kwargs)`` writes into, as its schema marks
    them: its first argument's (``copy_``, ``add_``), an ``out=``'s, those of a
    ``_foreach_*_``'s list (an EMA's ``_foreach_lerp_``) (the watch's ``BatchAxes.wrote``,
    the Taylor recorder's writes)."""
    places = _WRITES.get(func)
    if places is None:
        places = _WRITES[func] = tuple(
            (i, a.name)
            for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write
        )
    if not places:
        return []
    found = [args[i] if i < len(args) else kwargs.get(name) for i, name in places]
    return [t for t in tree_leaves(found) if isinstance(t, torch.Tensor)]


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
        axes, pick = tr.axes(src) or (), tr.picks(src) or tr.partial_pick(src)
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
    storage = storage_address(t)
    for other, axes in list(tr.known.values()):
        if other is t or storage_address(other) != storage:
            continue
        same = next((a for a in axes if a.source == axis.source), None)
        if same is None:
            continue
        held = _storage_samples(other, same).as_strided(size, stride, offset)
        if not bool((held < 0).any()):
            return held
    return None
