"""Linear ops applied to a whole ``jac`` at once: the op's dimension arguments shifted past the
leading direction dimension ``K``, instead of ``torch.vmap`` over the directions.

``jet.linear`` applies an op that is linear in its input (a view, a slice, a sum) to the value,
to ``lap`` and to every direction of ``jac``. ``vmap`` does the last for any op, but costs about
100 us of Python per call, more than the op itself at the sizes of a PINN (a batch of 256, a
few inputs): it was a third of the Taylor engine's time on a Chebyshev KAN. For the ops below
the batched call is written out; ``lift`` returns ``None`` for anything else, and the caller
vmaps.

Each entry is ``(broadcast, lift)``: ``lift(j, nd, out, *args, **kwargs)`` gets ``j`` (``(K,) +``
a shape that broadcasts to the input's ``nd`` dimensions if ``broadcast``, else expanded to the
input's shape), the op's output value ``out`` and the op's other arguments, and returns the
op's ``jac`` (a tuple of them for ``split`` and ``unbind``). Ops that only
rearrange dimensions or act elementwise keep a ``jac`` broadcast across samples broadcast (a
first layer's ``(K, 1, n)``); ops that may merge or drop dimensions get the expanded ``jac``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

aten = torch.ops.aten
Tensor = torch.Tensor
Lift = Callable[..., Any]  # a tensor, a tuple of them (split, unbind), or None


def _shift(dim: int, nd: int) -> int:
    """The dimension ``dim`` of an ``nd``-dimensional tensor, counted in ``(K,) + shape``."""
    return dim % nd + 1


def _shifted(dims: int | Sequence[int], nd: int) -> list[int]:
    return [_shift(d, nd) for d in ([dims] if isinstance(dims, int) else dims)]


def _reshaped(j: Tensor, nd: int, out: Tensor, *_: Any, **__: Any) -> Tensor:
    """Views that keep the order of the elements (view, reshape, squeeze, flatten)."""
    return j.reshape(len(j), *out.shape)


def _unsqueeze(j: Tensor, nd: int, out: Tensor, dim: int) -> Tensor:
    return j.unsqueeze(dim % (nd + 1) + 1)


def _permute(j: Tensor, nd: int, out: Tensor, dims: Sequence[int]) -> Tensor:
    return j.permute(0, *_shifted(dims, nd))


def _transpose(j: Tensor, nd: int, out: Tensor, dim0: int, dim1: int) -> Tensor:
    return j.transpose(_shift(dim0, nd), _shift(dim1, nd))


def _movedim(j: Tensor, nd: int, out: Tensor, source: int, destination: int) -> Tensor:
    return j.movedim(_shift(source, nd), _shift(destination, nd))


def _t(j: Tensor, nd: int, out: Tensor) -> Tensor:
    return j.transpose(1, 2) if nd == 2 else j


def _expand(
    j: Tensor, nd: int, out: Tensor, sizes: Sequence[int], implicit: bool = False
) -> Tensor | None:
    return j.expand(len(j), *out.shape) if len(sizes) == nd else None


def _same_dtype(j: Tensor, nd: int, out: Tensor, *_: Any, **__: Any) -> Tensor:
    """``clone``, ``alias``, ``_to_copy``, ``to``: linear, only the dtype and device matter."""
    return j.to(dtype=out.dtype, device=out.device)


def _reduced(dims: int | Sequence[int] | None, nd: int) -> list[int]:
    """The shifted dimensions a reduction runs over: every one if ``dims`` is ``None`` or
    empty (as ``aten.sum.dim_IntList``)."""
    every = dims is None or (not isinstance(dims, int) and len(dims) == 0)
    return _shifted(range(nd) if every or dims is None else dims, nd)


def _sum(
    j: Tensor, nd: int, out: Tensor, dims: Any = None, keepdim: bool = False, *, dtype: Any = None
) -> Tensor:
    return j.sum(_reduced(dims, nd), keepdim, dtype=dtype)


def _mean(
    j: Tensor, nd: int, out: Tensor, dims: Any = None, keepdim: bool = False, *, dtype: Any = None
) -> Tensor:
    return j.mean(_reduced(dims, nd), keepdim, dtype=dtype)


def _whole(reduce: Lift) -> Lift:
    """``sum.default``/``mean.default``: over every dimension, only ``dtype`` as an option."""
    return lambda j, nd, out, *, dtype=None: reduce(j, nd, out, None, dtype=dtype)


def _dim_op(method: str) -> Lift:
    """An op whose first argument after the tensor is one dimension, the rest passed on."""
    return lambda j, nd, out, dim, *args, **kwargs: getattr(j, method)(
        _shift(dim, nd), *args, **kwargs
    )


def _slice(
    j: Tensor, nd: int, out: Tensor, dim: int = 0, start: Any = None, end: Any = None, step: int = 1
) -> Tensor:
    return aten.slice.Tensor(j, _shift(dim, nd), start, end, step)


def _flip(j: Tensor, nd: int, out: Tensor, dims: Sequence[int]) -> Tensor:
    return j.flip(_shifted(dims, nd))


def _diagonal(
    j: Tensor, nd: int, out: Tensor, offset: int = 0, dim1: int = 0, dim2: int = 1
) -> Tensor:
    return j.diagonal(offset, _shift(dim1, nd), _shift(dim2, nd))


def _gather(
    j: Tensor, nd: int, out: Tensor, dim: int, index: Tensor, *, sparse_grad: bool = False
) -> Tensor:
    return j.gather(_shift(dim, nd), index.expand(len(j), *index.shape))


def _split(j: Tensor, nd: int, out: Any, sizes: Any, dim: int = 0) -> tuple[Tensor, ...]:
    """``split`` and ``split_with_sizes`` (several outputs, ``out`` is their list)."""
    return j.split(sizes, _shift(dim, nd))


def _squeezed(j: Tensor, nd: int, out: Tensor, dim: Any = None) -> Tensor:
    """``torch.squeeze`` as the composite rules call it (a dimension, several or all)."""
    return _reshaped(j, nd, out)


LIFTS: dict[Any, tuple[bool, Lift]] = {
    **{op: (False, _reshaped) for op in (aten.view.default, aten._unsafe_view.default)},
    **{op: (False, _reshaped) for op in (aten.reshape.default, torch.reshape)},
    **{op: (False, _reshaped) for op in (aten.squeeze.dim, aten.squeeze.dims)},
    aten.squeeze.default: (False, _reshaped),
    torch.squeeze: (False, _squeezed),
    aten.unsqueeze.default: (True, _unsqueeze),
    aten.permute.default: (True, _permute),
    aten.transpose.int: (True, _transpose),
    aten.movedim.int: (True, _movedim),
    aten.t.default: (True, _t),
    aten.expand.default: (True, _expand),
    **{
        op: (True, _same_dtype)
        for op in (aten.clone.default, aten.alias.default, aten._to_copy.default, aten.to.dtype)
    },
    aten.neg.default: (True, lambda j, nd, out: -j),
    **{op: (False, _sum) for op in (aten.sum.dim_IntList, torch.sum)},
    **{op: (False, _mean) for op in (aten.mean.dim, torch.mean)},
    aten.sum.default: (False, _whole(_sum)),
    aten.mean.default: (False, _whole(_mean)),
    aten.slice.Tensor: (False, _slice),
    aten.select.int: (False, _dim_op("select")),
    aten.narrow.default: (False, _dim_op("narrow")),
    aten.index_select.default: (False, _dim_op("index_select")),
    aten.cumsum.default: (False, _dim_op("cumsum")),
    aten.unfold.default: (False, _dim_op("unfold")),
    aten.flip.default: (False, _flip),
    aten.diagonal.default: (False, _diagonal),
    aten.gather.default: (False, _gather),
    **{op: (False, _split) for op in (aten.split.Tensor, aten.split_with_sizes.default)},
    aten.unbind.int: (False, lambda j, nd, out, dim=0: j.unbind(_shift(dim, nd))),
}


def lifted(op: Any, nd: int) -> tuple[bool, Lift] | None:
    """``(broadcast, lift)`` for ``op`` on an ``nd``-dimensional input, or ``None``: not in
    ``LIFTS``, or a 0-dimensional input (no dimension to shift). ``lift`` itself may return
    ``None`` for a form it does not cover (an ``expand`` adding dimensions)."""
    return LIFTS.get(op) if nd else None
