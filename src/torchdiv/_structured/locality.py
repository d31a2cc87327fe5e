"""How far from its own position each output element of ``f`` reads ``x``: the reach in pixels.

Every tensor computed from ``x`` gets a *layout*: for each spatial axis of ``x``, the tensor
dimension that runs along it and, for every position ``q`` on that dimension, the interval
``[first(q), last(q)]`` of ``x``'s pixels that position reads along that axis; all other
dimensions (channels, the batch, the sub-pixels of a space-to-depth squeeze) count as mixed in
every way. ``x`` itself has ``first(q) = last(q) = q``. An op maps a layout through the
*window* ``[a(q), b(q)]`` of input positions that its output position ``q`` reads:

    first'(q) = min_{a(q) <= i <= b(q)} first(i),     last'(q) = max_{a(q) <= i <= b(q)} last(i),

the interval hull of what the window reads: exact for exact windows, an upper bound for
widened ones (linear interpolation's windows take both neighbours and a pixel more where float
rounding could move a floor). Windows come from convolutions (strides, dilations, transposed),
average, adaptive average and max pooling, nearest and (bi-, tri-)linear upsampling (2D and 3D
alike; 1D and nearest-exact arrive decomposed), padding (constant; reflect and replicate
arrive decomposed as ``index`` with a constant index) and slices; a reshape maps positions
through the flattened index (a squeeze's ``(H, W) -> (H/2, 2, W/2, 2)`` makes ``H/2`` a
spatial dimension whose position reads two pixels, the ``2`` a channel; merging back reads
the position's pixels whatever its sub-pixel). Elementwise ops and concatenation over
channels take the union; channel slices, selects and reductions keep the spatial
dimensions. Anything else computed from ``x`` (normalisation or attention over positions, a
reshape that merges two spatial axes, a matrix product over a spatial axis) ends the analysis.
Nodes whose results never reach ``f``'s output are skipped (``ones_like(x[:, :1]) * t`` reads
``x`` for its shape only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch

from torchdiv._taylor import Graph
from torchdiv._taylor.capture import Node, Ref
from torchdiv._taylor.tree import leaves, map_leaves

aten = torch.ops.aten


@dataclass(frozen=True)
class Axis:
    """One spatial axis of ``x`` in a tensor: position ``q`` of dimension ``dim`` reads the
    pixels ``first[q] .. last[q]`` of ``x`` along that axis (none if ``first[q] > last[q]``)."""

    dim: int
    first: tuple[int, ...]
    last: tuple[int, ...]


Layout = tuple[Axis, ...]
Window = Callable[[int], tuple[int, int]]  # output position -> first, last input position

_SAME = {  # one output of the input's shape, read position by position
    aten.clone.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.to.dtype,
    aten.native_batch_norm.default,  # evaluation mode only (checked)
    aten._native_batch_norm_legit_no_training.default,
}
_VIEWS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int}


def reach(
    graph: Graph, values: list[list[Any]], x: torch.Tensor, batch_dims: int, held: bool = False
) -> tuple[int, ...] | None:
    """Per spatial axis of ``x`` (event dimensions after the first), the largest distance in
    pixels between an output element and an element of ``x`` it reads, or ``None`` if ``f``'s
    output is not local in ``x`` (or not laid out like ``x``). ``held``: as if each group
    norm's statistics were given (``torchdiv._structured.statistics``): its output read
    position by position."""
    layouts = _Layouts(graph, values, x, batch_dims, held).run()
    out = graph.output
    if layouts is None or not isinstance(out, Ref) or out not in layouts:
        return None
    reaches = []
    for a, axis in enumerate(layouts[out]):
        if axis.dim != batch_dims + 1 + a or len(axis.first) != x.shape[axis.dim]:
            return None
        pairs = zip(axis.first, axis.last, strict=True)
        reaches.append(max([max(q - i, j - q) for q, (i, j) in enumerate(pairs) if i <= j] + [0]))
    return tuple(reaches)


class _Layouts:
    def __init__(
        self,
        graph: Graph,
        values: list[list[Any]],
        x: torch.Tensor,
        batch_dims: int,
        held: bool = False,
    ):
        self.graph, self.values, self.x, self.held = graph, values, x, held
        axes = (
            Axis(d, tuple(range(x.shape[d])), tuple(range(x.shape[d])))
            for d in range(batch_dims + 1, x.dim())
        )
        self.layouts: dict[Ref, Layout] = {Ref(-1): tuple(axes)}

    def run(self) -> dict[Ref, Layout] | None:
        live = _live(self.graph)
        for index, node in enumerate(self.graph.nodes):
            if not node.depends or index not in live:
                continue
            outs = self._visit(node, index)
            if outs is None:
                return None
            self.layouts.update({Ref(index, leaf): layout for leaf, layout in outs.items()})
        return self.layouts

    def value(self, a: Any) -> Any:
        if not isinstance(a, Ref):
            return a
        return self.x if a.node < 0 else self.values[a.node][a.leaf]

    def _visit(self, node: Node, index: int) -> dict[int, Layout] | None:
        inputs = [
            a
            for a in leaves((node.args, node.kwargs))
            if isinstance(a, Ref) and (a.node < 0 or self.graph.nodes[a.node].depends)
        ]
        if any(a not in self.layouts for a in inputs) or not inputs:
            return None
        outs = self.values[index]
        func = node.func
        if func in _SPLITS:
            return self._split(node, inputs, outs)
        out = outs[0]
        if not isinstance(out, torch.Tensor):
            return None
        layout = self._layout(node, inputs, out)
        return None if layout is None else {0: layout}

    def _layout(self, node: Node, inputs: list[Ref], out: torch.Tensor) -> Layout | None:
        func, args = node.func, list(map_leaves(self.value, node.args))
        first = inputs[0]
        source = self.layouts[first]
        held = self.held and func == aten.native_group_norm.default  # (its output; not its
        if torch.Tag.pointwise in func.tags or func in _SAME or held:  # statistics: unlaid)
            if func == aten.native_batch_norm.default and args[5]:
                return None  # training mode: statistics over positions
            return self._union(inputs, out)
        if func == aten.cat.default:
            dim = (args[1] if len(args) > 1 else 0) % out.dim()
            layout = self._union(inputs, out)
            return None if layout is None or any(a.dim == dim for a in layout) else layout
        if len(inputs) != 1 or node.args[0] != first:
            return None  # below: ops linear in their first argument only
        shape = args[0].shape
        if func in _VIEWS:  # (an empty tensor has no element counts to group dimensions by)
            return _reshaped(source, tuple(shape), tuple(out.shape)) if out.numel() else None
        if func == aten.permute.default:
            order = [d % out.dim() for d in args[1]]
            return tuple(replace(a, dim=order.index(a.dim)) for a in source)
        if func == aten.transpose.int:
            i, j = (d % out.dim() for d in args[1:3])
            swap = {i: j, j: i}
            return tuple(replace(a, dim=swap.get(a.dim, a.dim)) for a in source)
        if func == aten.select.int:
            dim = args[1] % len(shape)
            return _dropped(source, [dim])
        if func in _REDUCTIONS:
            given = args[1] if len(args) > 1 and args[1] is not None else []
            dims = [d % len(shape) for d in given] or list(range(len(shape)))
            keep = len(args) > 2 and args[2]
            return (
                None
                if any(a.dim in dims for a in source)
                else _dropped(source, [] if keep else dims)
            )
        if func == aten.expand.default:
            extra = out.dim() - len(shape)
            moved = tuple(replace(a, dim=a.dim + extra) for a in source)
            return moved if all(shape[a.dim] == out.shape[a.dim + extra] for a in source) else None
        windows = self._windows(func, args, shape, out)
        if windows is None:
            return None
        return _through(source, windows, shape, out.shape)

    def _union(self, inputs: list[Ref], out: torch.Tensor) -> Layout | None:
        """The layout of an elementwise result: every input's spatial dimensions must line up
        with the output's (broadcast only over other dimensions); the reaches add up as a
        union."""
        found: Layout | None = None
        for a in inputs:
            value = self.value(a)
            extra = out.dim() - value.dim()
            layout = tuple(replace(ax, dim=ax.dim + extra) for ax in self.layouts[a])
            if any(value.shape[ax.dim - extra] != out.shape[ax.dim] for ax in layout):
                return None
            if found is None:
                found = layout
            elif any(p.dim != q.dim for p, q in zip(found, layout, strict=True)):
                return None
            else:
                found = tuple(
                    replace(
                        p,
                        first=tuple(map(min, p.first, q.first)),
                        last=tuple(map(max, p.last, q.last)),
                    )
                    for p, q in zip(found, layout, strict=True)
                )
        return found

    def _split(self, node: Node, inputs: list[Ref], outs: list[Any]) -> dict[int, Layout] | None:
        if len(inputs) != 1 or node.args[0] != inputs[0]:
            return None
        source = self.layouts[inputs[0]]
        rank = self.value(inputs[0]).dim()
        dim = (
            (node.args[2] if len(node.args) > 2 else 0)
            if node.func != aten.unbind.int
            else (node.args[1] if len(node.args) > 1 else 0)
        )
        dim %= rank
        layout = _dropped(source, [dim]) if node.func == aten.unbind.int else source
        if layout is None or any(a.dim == dim for a in source):
            return None
        return dict.fromkeys(range(len(outs)), layout)

    def _windows(
        self, func: Any, args: list[Any], shape: Sequence[int], out: torch.Tensor
    ) -> dict[int, Window | None] | None:
        """The window of every dimension an op reads in windows (``None``: mixed whole)."""
        rank = len(shape)
        if func == aten.convolution.default:
            _, weight, _, stride, padding, dilation, transposed, _, _ = args
            spatial = range(2, rank)
            kernels = weight.shape[2:]
            make = _transposed if transposed else _strided
            return {
                d: make(shape[d], k, s, p, dl)
                for d, k, s, p, dl in zip(spatial, kernels, stride, padding, dilation, strict=True)
            } | {1: None}
        if func in _POOLS:
            n = _POOLS[func]
            kernel = _tuple(args[1], n)
            stride = _tuple(args[2], n) if len(args) > 2 and args[2] else kernel
            padding = _tuple(args[3], n) if len(args) > 3 else (0,) * n
            dilation = _tuple(args[4], n) if func in _MAX_POOLS and len(args) > 4 else (1,) * n
            return {
                rank - n + i: _strided(
                    shape[rank - n + i], kernel[i], stride[i], padding[i], dilation[i]
                )
                for i in range(n)
            }
        if func in _ADAPTIVE_POOLS:
            n = _ADAPTIVE_POOLS[func]
            return {
                rank - n + i: _adaptive(shape[rank - n + i], out.shape[rank - n + i])
                for i in range(n)
            }
        if func in _UPSAMPLING:
            n, linear = _UPSAMPLING[func]
            corners = bool(args[2]) if linear else False
            return {
                rank - n + i: _upsampled(
                    shape[rank - n + i],
                    out.shape[rank - n + i],
                    _scale_factor(func, args, i),
                    linear,
                    corners,
                )
                for i in range(n)
            }
        if func == aten.constant_pad_nd.default:
            pads = args[1]
            return {
                rank - 1 - i: _shifted(shape[rank - 1 - i], pads[2 * i])
                for i in range(len(pads) // 2)
            }
        if func in (aten.slice.Tensor, aten.narrow.default):
            dim = args[1] % rank
            if func == aten.narrow.default:
                start, step = args[2], 1
            else:
                start = args[2] if len(args) > 2 and args[2] is not None else 0
                step = args[4] if len(args) > 4 else 1
            start = max(start + shape[dim], 0) if start < 0 else min(start, shape[dim])
            return {dim: _sliced(shape[dim], start, step)}
        if func == aten.index_select.default:
            dim = args[1] % rank
            return {dim: _indexed(args[2], shape[dim])}
        if func == aten.index.Tensor:
            picks = [(d, i) for d, i in enumerate(args[1]) if i is not None]
            if len(picks) != 1 or picks[0][1].dim() != 1 or picks[0][1].dtype == torch.bool:
                return None  # a mask, or advanced indexing that moves or merges dimensions
            dim, index = picks[0]
            return {dim: _indexed(index, shape[dim])}
        return None


# pooling ops by their number of spatial (last) dimensions; ``kernel_size, stride, padding``
# (and ``dilation`` for max pooling) after the input. avg_pool1d arrives as avg_pool2d;
# ceil_mode, count_include_pad and divisor_override change weights or add outputs whose
# windows the same formula gives
_MAX_POOLS = {aten.max_pool2d_with_indices.default: 2, aten.max_pool3d_with_indices.default: 3}
_POOLS = {aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3, **_MAX_POOLS}
_ADAPTIVE_POOLS = {aten._adaptive_avg_pool2d.default: 2, aten._adaptive_avg_pool3d.default: 3}
# interpolation ops: (spatial dimensions, linear (else nearest)). 1D interpolation and
# nearest-exact have no rule: they arrive decomposed, as index
_UPSAMPLING = {
    aten.upsample_nearest2d.default: (2, False),
    aten.upsample_nearest2d.vec: (2, False),
    aten.upsample_nearest3d.default: (3, False),
    aten.upsample_nearest3d.vec: (3, False),
    aten.upsample_bilinear2d.default: (2, True),
    aten.upsample_bilinear2d.vec: (2, True),
    aten.upsample_trilinear3d.default: (3, True),
    aten.upsample_trilinear3d.vec: (3, True),
}
_VECTOR_UPSAMPLING = {op for op in _UPSAMPLING if op._overloadname == "vec"}


def _live(graph: Graph) -> set[int]:
    """The nodes whose results reach ``f``'s output."""
    wanted = {r.node for r in leaves(graph.output) if isinstance(r, Ref)}
    live = set()
    for index in range(len(graph.nodes) - 1, -1, -1):
        if index in wanted:
            live.add(index)
            node = graph.nodes[index]
            wanted |= {r.node for r in leaves((node.args, node.kwargs)) if isinstance(r, Ref)}
    return live


def _dropped(layout: Layout, dims: Sequence[int]) -> Layout | None:
    """The layout once ``dims`` (none of them spatial) are removed."""
    if any(a.dim in dims for a in layout):
        return None
    return tuple(replace(a, dim=a.dim - sum(d < a.dim for d in dims)) for a in layout)


def _through(
    layout: Layout,
    windows: dict[int, Window | None],
    shape: Sequence[int],
    out_shape: Sequence[int],
) -> Layout | None:
    """Each spatial dimension through its window (dimensions without one must keep their
    size; ``None``: the op mixes that dimension whole, a convolution's channels)."""
    axes = []
    for a in layout:
        if a.dim not in windows:
            if shape[a.dim] != out_shape[a.dim]:
                return None
            axes.append(a)
            continue
        window = windows[a.dim]
        if window is None:
            return None
        first, last = [], []
        for q in range(out_shape[a.dim]):
            i, j = window(q)
            # a window past the edges reads nothing; never index from the back
            i, j = max(i, 0), min(j, len(a.first) - 1) + 1 if j >= max(i, 0) else 0
            first.append(min(a.first[i:j], default=_NOTHING[0]))
            last.append(max(a.last[i:j], default=_NOTHING[1]))
        axes.append(Axis(a.dim, tuple(first), tuple(last)))
    return tuple(axes)


_NOTHING = (1 << 62, -(1 << 62))  # the interval of a position that reads no pixel


def _clip(first: int, last: int, size: int) -> tuple[int, int]:
    return max(first, 0), min(last, size - 1)


def _strided(size: int, kernel: int, stride: int, padding: int, dilation: int) -> Window:
    """A convolution or pooling window: ``[q s - p, q s - p + d (k - 1)]``."""
    reach = dilation * (kernel - 1)
    return lambda q: _clip(q * stride - padding, q * stride - padding + reach, size)


def _transposed(size: int, kernel: int, stride: int, padding: int, dilation: int) -> Window:
    """A transposed convolution: output ``q`` gets input ``i`` where ``q = i s - p + j d``."""

    def window(q: int) -> tuple[int, int]:
        first = -((dilation * (kernel - 1) - q - padding) // stride)  # ceil
        return _clip(first, (q + padding) // stride, size)

    return window


def _adaptive(size: int, out: int) -> Window:
    return lambda q: _clip(q * size // out, -(-(q + 1) * size // out) - 1, size)


def _scale_factor(func: Any, args: list[Any], i: int) -> float | None:
    """The scale factor an upsampling call was given along its ``i``-th dimension, if any."""
    if func in _VECTOR_UPSAMPLING:
        factors = args[-1]
        return None if factors is None else factors[i]
    rest = args[3 if _UPSAMPLING[func][1] else 2 :]  # after align_corners, if linear
    return rest[i] if len(rest) > i and rest[i] is not None else None


def _upsampled(size: int, out: int, factor: float | None, linear: bool, corners: bool) -> Window:
    """Nearest or linear interpolation along one axis (bilinear and trilinear are linear along
    each): every source-index formula PyTorch may use (from the sizes, from the scale factor),
    widened by one input pixel where float rounding could move a floor."""
    ratios = [size / out] + ([1 / factor] if factor else [])
    if corners:
        ratios = [(size - 1) / (out - 1) if out > 1 else 0.0]

    def window(q: int) -> tuple[int, int]:
        firsts, lasts = [], []
        for r in ratios:
            src = q * r if corners or not linear else max((q + 0.5) * r - 0.5, 0.0)
            slack = 0 if _dyadic(r) else 1e-6  # products of dyadic ratios round nowhere
            firsts.append(math.floor(src - slack))
            lasts.append(math.floor(src + slack) + linear)
        return _clip(min(firsts), max(lasts), size)

    return window


def _dyadic(r: float) -> bool:
    """Whether ``r`` is a power of two (``1/2``, ``1``, ``2``): exact in floating point."""
    f = Fraction(r)
    return (
        f > 0 and f.numerator & (f.numerator - 1) == 0 and f.denominator & (f.denominator - 1) == 0
    )


def _shifted(size: int, left: int) -> Window:
    """Constant padding (negative: cropping): output ``q`` is input ``q - left``."""
    return lambda q: (q - left, q - left) if 0 <= q - left < size else (1, 0)


def _sliced(size: int, start: int, step: int) -> Window:
    return lambda q: (start + q * step, start + q * step)


def _indexed(index: torch.Tensor, size: int) -> Window:
    """A constant index along a dimension (reflect or replicate padding, gathers)."""
    picks = (index.cpu() % size).tolist()
    return lambda q: (picks[q], picks[q])


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    """A pooling argument for ``n`` dimensions: one number (or a list of one) for all."""
    v = list(v) if isinstance(v, Sequence) else [v]
    return tuple(v * n if len(v) == 1 else v[:n])


def _reshaped(layout: Layout, old: tuple[int, ...], new: tuple[int, ...]) -> Layout | None:
    """A view: the dimensions are cut into groups whose element counts match; in a group
    with a spatial dimension, that dimension must be the outermost one of size above one,
    and the group's outermost new dimension of size above one carries it on (position ``q``
    covers the flattened indices ``[q N, (q + 1) N)``, ``N`` the new inner size)."""
    axes = []
    for (o0, o1), (n0, n1) in _groups(old, new):
        inside = [a for a in layout if o0 <= a.dim < o1]
        if not inside:
            continue
        if len(inside) > 1:
            return None  # two spatial axes merged (attention over pixels)
        (a,) = inside
        if any(old[d] != 1 for d in range(o0, a.dim)):
            return None  # channels outside the spatial dimension: positions interleave
        inner_old = math.prod(old[a.dim + 1 : o1])
        carriers = [d for d in range(n0, n1) if new[d] != 1]
        if not carriers:
            return None
        dim = carriers[0]
        inner_new = math.prod(new[dim + 1 : n1])

        def window(q: int, n: int = inner_new, m: int = inner_old) -> tuple[int, int]:
            return q * n // m, ((q + 1) * n - 1) // m  # the flattened indices [q n, (q + 1) n)

        moved = _through((replace(a, dim=0),), {0: window}, (old[a.dim],), (new[dim],))
        assert moved is not None  # a window on every spatial dimension: always a layout
        axes.append(replace(moved[0], dim=dim))
    return tuple(axes) if len(axes) == len(layout) else None


def _groups(
    old: tuple[int, ...], new: tuple[int, ...]
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Ranges ``[o0, o1), [n0, n1)`` of dimensions with equal element counts, as small as
    possible (size-one dimensions join the group before them)."""
    out = []
    i = j = 0
    while i < len(old) or j < len(new):
        i0, j0 = i, j
        a = old[i] if i < len(old) else 1
        b = new[j] if j < len(new) else 1
        i, j = min(i + 1, len(old)), min(j + 1, len(new))
        while a != b:
            if a < b:
                a *= old[i]
                i += 1
            else:
                b *= new[j]
                j += 1
        while i < len(old) and old[i] == 1:
            i += 1
        while j < len(new) and new[j] == 1:
            j += 1
        out.append(((i0, i), (j0, j)))
    return out
