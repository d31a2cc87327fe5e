"""Rules for ops that are linear or bilinear in the tensors that depend on ``x``.

Views, reductions, slicing and pooling are linear: ``jac`` and ``lap`` go through the same op.
Sums and products follow ``jet.add`` and ``jet.product``. Matrix products and convolutions
keep a ``jac`` that is broadcast across samples broadcast (``(K, 1, ...)``): a first layer
then costs ``K`` rows instead of ``K * N``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._decomp import core_aten_decompositions

from torchdiv._taylor.elementwise import CLAMP_EDGES_SPLIT
from torchdiv._taylor.jet import (
    Context,
    Jet,
    UnsupportedOp,
    add,
    full_jac,
    full_lap,
    lifted_jac,
    linear,
    product,
    scale,
    value_of,
)

aten = torch.ops.aten
Tensor = torch.Tensor
Operand = Jet | Tensor


def _linear(op: Callable[..., Tensor]) -> Callable[..., Jet]:
    def rule(ctx: Context, a: Jet, *args: Any, **kwargs: Any) -> Jet:
        return linear(ctx, op, a, *args, **kwargs)

    return rule


def _split(op: Callable[..., Any]) -> Callable[..., list[Jet]]:
    """Multi-output linear ops (``split``, ``unbind``): one jet per piece."""

    def rule(ctx: Context, a: Jet, *args: Any, **kwargs: Any) -> list[Jet]:
        values = op(a.value, *args, **kwargs)
        jacs: Sequence[Tensor | None] = [None] * len(values)
        if a.jac is not None:
            jacs = lifted_jac(ctx, op, a, values, args, kwargs)
        laps = [None] * len(values) if a.lap is None else op(full_lap(a), *args, **kwargs)
        return [Jet(v, j, lap) for v, j, lap in zip(values, jacs, laps, strict=True)]

    return rule


def _reshape(ctx: Context, a: Jet, shape: list[int]) -> Jet:
    return linear(ctx, torch.reshape, a, shape)


def _add(ctx: Context, a: Operand, b: Operand, alpha: float = 1) -> Jet:
    return add(a, b, alpha)


def _sub(ctx: Context, a: Operand, b: Operand, alpha: float = 1) -> Jet:
    return add(a, b, -alpha)


def _rsub(ctx: Context, a: Jet, b: Tensor | float, alpha: float = 1) -> Jet:
    return add(scale(a, -alpha), b)


def _mul(ctx: Context, a: Operand, b: Operand, value: Tensor | None = None) -> Jet:
    if isinstance(a, Jet) and isinstance(b, Jet):
        return product(ctx, torch.mul, a, b, value)
    jet, c = (a, b) if isinstance(a, Jet) else (b, a)
    assert isinstance(jet, Jet) and not isinstance(c, Jet)  # rules run on ops with a jet
    return scale(jet, c, value=torch.mul(value_of(a), value_of(b)) if value is None else value)


def _scalar_scale(ctx: Context, a: Jet, c: float) -> Jet:
    return scale(a, c)


def _scalar_div(ctx: Context, a: Jet, c: float) -> Jet:
    return scale(a, 1 / c, value=a.value / c)


def _matmul_operand(ctx: Context, a: Operand, keep_first: bool) -> Operand:
    """``a`` with ``jac`` expanded everywhere except (if ``keep_first``) its first dimension."""
    if not isinstance(a, Jet) or a.jac is None:
        return a
    first = a.jac.shape[1] if keep_first else a.shape[0]
    return Jet(a.value, a.jac.expand(ctx.num_directions, first, *a.shape[1:]), a.lap)


def _mm(ctx: Context, a: Operand, b: Operand, value: Tensor | None = None) -> Jet:
    a, b = _matmul_operand(ctx, a, True), _matmul_operand(ctx, b, False)
    return product(ctx, torch.matmul, a, b, value)


def _bmm(ctx: Context, a: Operand, b: Operand, value: Tensor | None = None) -> Jet:
    a, b = _matmul_operand(ctx, a, True), _matmul_operand(ctx, b, True)
    return product(ctx, torch.matmul, a, b, value)


def _addmm(
    ctx: Context, bias: Operand, a: Operand, b: Operand, *, beta: float = 1, alpha: float = 1
) -> Jet:
    """``beta bias + alpha a b``. A bias that does not depend on x: the value by ``addmm``
    itself, rounded once as ``f``'s was (the product rounded to the dtype, then the bias
    added and rounded again is another value in half precision: where ``x W`` and ``b``
    cancel, ``x W``'s rounding is large against the sum; a Slater determinant's orbitals by
    ``nn.Linear`` under ``autocast(bfloat16)``, replayed so, moved its ``log|det|`` by 0.25
    and its Hutchinson Laplacian 14-58 %, 8-85x the loop's error: precision34)."""
    if not isinstance(bias, Jet) and beta != 0:
        value = torch.addmm(bias, value_of(a), value_of(b), beta=beta, alpha=alpha)
        return _addmm_given(ctx, value, bias, a, b, beta=beta, alpha=alpha)
    out = _mm(ctx, a, b)
    if alpha != 1:
        out = scale(out, alpha)
    return add(out, bias, beta) if beta != 0 else out


def _addmm_given(
    ctx: Context,
    value: Tensor,
    bias: Operand,
    a: Operand,
    b: Operand,
    *,
    beta: float = 1,
    alpha: float = 1,
) -> Jet:
    """``_addmm`` given its value ``beta bias + alpha a b``: the product's ``jac`` and ``lap``
    (the value standing in for the product's); a bias that depends on x goes by ``_addmm``."""
    if isinstance(bias, Jet) and beta != 0:
        return _addmm(ctx, bias, a, b, beta=beta, alpha=alpha)
    out = _mm(ctx, a, b, value)
    return scale(out, alpha, value) if alpha != 1 else out


def _convolution(
    ctx: Context, a: Operand, weight: Operand, bias: Operand | None, *conv: Any
) -> Jet:
    if isinstance(weight, Jet) or isinstance(bias, Jet) or not isinstance(a, Jet):
        raise UnsupportedOp("aten.convolution whose weight or bias depends on x")
    value = aten.convolution(a.value, weight, bias, *conv)
    jac = None
    if a.jac is not None and ctx.jac:
        k, n = ctx.num_directions, a.jac.shape[1]
        j = a.jac.expand(k, n, *a.shape[1:]).reshape(k * n, *a.shape[1:])
        out = aten.convolution(j, weight, None, *conv)
        jac = out.reshape(k, n, *out.shape[1:])
    lap = None if a.lap is None else aten.convolution(full_lap(a), weight, None, *conv)
    return Jet(value, jac, lap)


def _pad(ctx: Context, a: Jet, pad: list[int], value: float = 0.0) -> Jet:
    """Constant padding: the padded border is constant, so its derivatives are zero."""
    out = linear(ctx, aten.constant_pad_nd, a, pad, 0.0)
    return Jet(aten.constant_pad_nd(a.value, pad, value), out.jac, out.lap)


def _cat(ctx: Context, tensors: list[Operand], dim: int = 0) -> Jet:
    """``torch.cat`` of jets. ``cat`` skips the legacy empty 1-D operands of shape ``(0,)``
    (key/value caches start as ``torch.tensor([])``): so do the derivatives."""
    value = torch.cat([value_of(t) for t in tensors], dim)
    jets = [
        t if isinstance(t, Jet) else Jet(t, None, None)
        for t in tensors
        if value.dim() == 1 or value_of(t).shape != (0,)
    ]
    d = dim % value.dim()
    jac = torch.cat([full_jac(ctx, j) for j in jets], d + 1)
    lap = torch.cat([full_lap(j) for j in jets], d) if ctx.second_order else None
    return Jet(value, jac, lap)


def _where(ctx: Context, cond: Tensor, a: Operand, b: Operand) -> Jet:
    ja, jb = (t if isinstance(t, Jet) else Jet(t, None, None) for t in (a, b))
    value = torch.where(cond, ja.value, jb.value)
    jac = torch.where(
        cond, full_jac(ctx, Jet(value, ja.jac, None)), full_jac(ctx, Jet(value, jb.jac, None))
    )
    lap = torch.where(cond, full_lap(Jet(value, None, ja.lap)), full_lap(Jet(value, None, jb.lap)))
    return Jet(value, jac, lap if ctx.second_order else None)


def _select(ctx: Context, value: Tensor, pick: Callable[[Tensor], Tensor], a: Jet) -> Jet:
    """An op that copies one input element per output element (max, max pooling): ``jac``
    and ``lap`` are copied from the same places (``pick`` works with a leading ``K`` too)."""
    jac = None if a.jac is None or not ctx.jac else pick(full_jac(ctx, a))
    return Jet(value, jac, None if a.lap is None else pick(full_lap(a)))


def take_along(ctx: Context, a: Jet, value: Tensor, index: Tensor, dim: int) -> Jet:
    """The jet of ``value = a.value.gather(dim, index)`` (max, sort, top-k: piecewise a
    selection, so linear almost everywhere): ``jac`` and ``lap`` gathered at ``index``, which
    has as many dimensions as ``a``."""

    def pick(t: Tensor) -> Tensor:
        lead = t.dim() - a.value.dim()
        return t.gather(dim % a.value.dim() + lead, index.expand(*t.shape[:lead], *index.shape))

    return _select(ctx, value, pick, a)


def selected(
    ctx: Context, a: Jet, value: Tensor, index: Tensor, dim: int, keepdim: bool
) -> tuple[Jet, Tensor]:
    """A reduction that selects one element along ``dim`` (computed with ``keepdim=True``)."""
    out = take_along(ctx, a, value, index, dim)
    return (out, index) if keepdim else (linear(ctx, torch.squeeze, out, dim), index.squeeze(dim))


def _max_dim(ctx: Context, a: Jet, dim: int, keepdim: bool = False) -> tuple[Jet, Tensor]:
    value, index = torch.max(a.value, dim, keepdim=True)
    return selected(ctx, a, value, index, dim, keepdim)


def _amax(
    ctx: Context, a: Jet, dims: tuple[int, ...] | list[int] = (), keepdim: bool = False
) -> Jet:
    return tied(ctx, a, torch.amax(a.value, dims, keepdim=True), dims, keepdim)


def tied(ctx: Context, a: Jet, value: Tensor, dims: Sequence[int], keepdim: bool) -> Jet:
    """``amax``/``amin`` over ``dims`` (``value``, computed with ``keepdim=True``; none: every
    dimension, as ``torch.amax(x)`` calls it): the derivatives are the mean over the places
    that reach it, as autograd spreads them evenly over ties (a single ``argmax`` read 1
    where autograd reads 1/2 at a tie of two)."""
    dims = list(dims) or list(range(a.value.dim()))
    at = (a.value == value).to(a.value.dtype)
    weights = at / at.sum(dims, keepdim=True)
    # negative dims, so that the leading direction dimension of ``jac`` is left alone
    back = [d % a.value.dim() - a.value.dim() for d in dims]
    out = linear(ctx, lambda t: (t * weights).sum(back, keepdim=keepdim), a)
    return Jet(value if keepdim else value.squeeze(dims), out.jac, out.lap)


def _extremum(ctx: Context, a: Operand, b: Operand, larger: bool) -> Jet:
    """``maximum``/``minimum``: the derivatives of the operand that is taken, and at a tie
    the mean of both, as autograd has it: the value too, ``(a + b) / 2`` there (equal to
    either), so that its own derivatives in what ``a`` and ``b`` close over (parameters, the
    next order's sweep) are also split in halves, as autograd's backward of ``maximum`` (the
    value ``b`` took all of them: parameter gradients of a gradient or Laplacian of
    ``f(x) * maximum(h, 0)`` at ``h == 0``, zero biases at the origin, were 0, not 1/2)."""
    va, vb = value_of(a), value_of(b)
    # the ``nan`` operand where either is one (``maximum`` propagates it; ``va > vb`` alone
    # took ``b``'s value: ``maximum(nan, 1)`` read 1)
    picked = _where(ctx, (va > vb if larger else va < vb) | va.isnan(), a, b)
    return _where(ctx, va == vb, _halved(ctx, a, b), picked)


def _clamp_tensor(
    ctx: Context, a: Operand, low: Operand | None = None, high: Operand | None = None
) -> Jet:
    """``clamp`` between tensors (``torch.clamp(x, -s, s)``: dynamic thresholding, with ``s``
    a per-sample quantile of ``|x|``): piecewise a selection of ``a``, ``low`` or ``high``,
    at the edges as autograd has it: ``a``'s derivatives on ``[low, high]``, ``low``'s below
    it, ``high``'s above it and wherever ``high < low`` (then the value is ``high``). Below
    ``low == high`` the value is ``low``, with ``low``'s derivatives, as PyTorch's forward
    mode has them (``clamp(x, b, b) = b``; its backward passes nothing to either bound).
    Where a bound or ``a`` is ``nan``, so is the value, with no derivatives (autograd's).
    From torch 2.14 on (``CLAMP_EDGES_SPLIT``), ``a`` at one edge of ``low < high`` has the
    mean of its and that bound's derivatives."""
    out: Operand = a
    va = value_of(a)
    lo = None if low is None else value_of(low)
    hi = None if high is None else value_of(high)
    for bound, edge in ((low, lo), (high, hi)) if CLAMP_EDGES_SPLIT else ():
        if bound is not None and edge is not None:
            apart = True if lo is None or hi is None else lo < hi
            out = _where(ctx, (va == edge) & apart, _halved(ctx, a, bound), out)
    if low is not None and lo is not None:  # (both: mypy narrows each name alone)
        below = va < lo if hi is None else (va < lo) & (lo <= hi)
        out = _where(ctx, below, low, out)
    if high is not None and hi is not None:
        above = va > hi if lo is None else (va > hi) | (hi < lo)
        out = _where(ctx, above, high, out)
    value = torch.clamp(va, lo, hi)  # (every comparison with a ``nan`` bound is false)
    return _where(ctx, value.isnan(), value, out)


def _halved(ctx: Context, a: Operand, b: Operand) -> Jet:
    """``(a + b) / 2`` as a jet (the derivatives at a tie of ``maximum``)."""
    ja, jb = (t if isinstance(t, Jet) else Jet(t, None, None) for t in (a, b))
    # a/2 + b/2 in the promoted dtype, not (a + b) / 2, which overflows at a tie of values
    # over half the largest finite (float16's 32752); broadcast, autograd's halves in what
    # both close over. (An odd multiple of the smallest subnormal loses its last bit.)
    dtype = torch.result_type(ja.value, jb.value)
    value = ja.value.to(dtype) / 2 + jb.value.to(dtype) / 2
    jac = (full_jac(ctx, Jet(value, ja.jac, None)) + full_jac(ctx, Jet(value, jb.jac, None))) / 2
    lap = (full_lap(Jet(value, None, ja.lap)) + full_lap(Jet(value, None, jb.lap))) / 2
    return Jet(value, jac, lap if ctx.second_order else None)


def _accumulated(op: Callable[..., Tensor], source: int) -> Callable[..., Jet]:
    """``op(self, ..., source, ...)`` that adds ``source``'s elements into places of ``self``
    (``index_add``, ``scatter_add``, ``index_put(accumulate=True)``: message passing, a mixture
    of experts' dispatch), linear in the two together: ``jac`` (by ``torch.vmap`` over the
    directions) and ``lap`` go through the same op, the other arguments (indices, ``dim``,
    ``alpha``) as they are. ``source`` is its position among the arguments; either tensor may
    be a constant (zero derivatives). ``index_put`` without ``accumulate`` (``h[idx] = v``,
    ``index_copy_``) writes ``source`` over those places instead, also linear in the two where
    its indices name each place once (``_distinct``, checked on the indices of every call);
    where they name one twice, PyTorch keeps one of the writes, which the jets could not
    follow: the rule refuses it, unless the written values are constants (``index_fill_``,
    ``h[idx] = 0``): whichever write is kept, the place's derivatives are zero, and the value
    is PyTorch's own. ``scatter`` (``src`` written over ``self`` at ``index`` along ``dim``)
    likewise, where ``index`` names each place once (``_once``)."""

    def rule(ctx: Context, *args: Any, **kwargs: Any) -> Jet:
        written = op is aten.index_put.default and not (args[3:4] or [kwargs.get("accumulate")])[0]
        constant = not isinstance(args[source], Jet) or (
            args[source].jac is None and args[source].lap is None
        )
        if written and not constant and not _distinct(value_of(args[0]).shape, args[1]):
            raise UnsupportedOp("index_put without accumulate writing a place twice")
        if op is aten.scatter.src and not constant and not _once(args[2], args[1]):
            raise UnsupportedOp("scatter writing a place twice")
        jets = [a if isinstance(a, Jet) else Jet(a, None, None) for a in (args[0], args[source])]

        def applied(into: Tensor, added: Tensor) -> Tensor:
            return op(into, *args[1:source], added, *args[source + 1 :], **kwargs)

        value = applied(jets[0].value, jets[1].value)
        jac = None
        if ctx.jac:
            jac = torch.vmap(applied)(full_jac(ctx, jets[0]), full_jac(ctx, jets[1]))
        lap = applied(full_lap(jets[0]), full_lap(jets[1])) if ctx.second_order else None
        return Jet(value, jac, lap)

    return rule


def _once(index: Tensor, dim: int) -> bool:
    """Whether ``scatter``'s ``index`` names each place once: element ``i`` of ``index`` writes
    the place of ``i``'s coordinates with ``index[i]`` along ``dim``, so two places meet only
    where ``index`` repeats a value along ``dim``."""
    if index.dim() == 0 or index.shape[dim] < 2:
        return True
    ordered = index.sort(dim).values
    size = ordered.shape[dim]
    return bool((ordered.narrow(dim, 1, size - 1) != ordered.narrow(dim, 0, size - 1)).all())


def _distinct(shape: Sequence[int], indices: Sequence[Tensor | None]) -> bool:
    """Whether ``index_put``'s ``indices`` into a tensor of ``shape`` name each place once:
    a boolean mask over ``k`` dimensions stands for its ``nonzero()``'s ``k`` columns, each
    index is taken modulo its dimension's size (``-1`` is the last), all are broadcast
    together (as PyTorch does), and the places they name (a ``None``: every element of its
    dimension, the same for all) differ where their flat offsets over the indexed dimensions
    differ. ``h[[0, 2], 1] = v``: distinct; ``h[[0, 0]] = v``: not."""
    columns: list[Tensor] = []
    sizes: list[int] = []
    dim = 0
    for index in indices:
        if index is None:
            dim += 1
        elif index.dtype in (torch.bool, torch.uint8):
            columns += index.nonzero().unbind(1)
            sizes += shape[dim : dim + index.dim()]
            dim += index.dim()
        else:
            columns.append(index)
            sizes.append(shape[dim])
            dim += 1
    if not columns:
        return True
    flat = torch.zeros((), dtype=torch.long, device=columns[0].device)
    for column, size in zip(torch.broadcast_tensors(*columns), sizes, strict=True):
        flat = flat * size + column.long() % size
    flat = flat.reshape(-1)
    return bool(flat.unique().numel() == flat.numel())


def _max_pool(op: Callable[..., tuple[Tensor, Tensor]], n: int) -> Callable[..., Any]:
    """Max pooling over the last ``n`` dimensions picks one input per output (``index``: flat
    over those ``n``, as PyTorch returns it): ``jac`` and ``lap`` are gathered there."""

    def rule(ctx: Context, a: Jet, *args: Any) -> tuple[Jet, Tensor]:
        value, index = op(a.value, *args)

        def pick(t: Tensor) -> Tensor:  # t: (..., C, *spatial) -> (..., C, *pooled) at argmax
            flat_index = index.flatten(-n).expand(*t.shape[: -n - 1], *index.shape[-n - 1 : -n], -1)
            return t.flatten(-n).gather(-1, flat_index).view(*t.shape[:-n], *value.shape[-n:])

        return _select(ctx, value, pick, a), index

    return rule


# ops whose output elements are elements of their inputs, moved, repeated or copied (what
# the sparse jets and the structured engine's chains follow; each adds its own)
MOVES = frozenset(
    {
        aten._unsafe_view.default,
        aten.alias.default,
        aten.cat.default,
        aten.clone.default,
        aten.expand.default,
        aten.flip.default,
        aten.index_select.default,
        aten.narrow.default,
        aten.permute.default,
        aten.repeat.default,
        aten.reshape.default,
        aten.roll.default,
        aten.select.int,
        aten.slice.Tensor,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.transpose.int,
        aten.unsqueeze.default,
        aten.view.default,
    }
)


LINEAR_OPS = [
    aten.expand.default,
    aten.permute.default,
    aten.movedim.int,
    aten.transpose.int,
    aten.t.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.clone.default,
    aten.contiguous.default,  # (in an inner sweep's recording: masked_fill of a transposed view)
    aten.alias.default,
    aten._to_copy.default,
    aten.flip.default,
    aten.roll.default,
    aten.repeat.default,
    aten.unfold.default,
    aten.index_select.default,
    aten.sum.dim_IntList,
    aten.sum.default,
    aten.mean.dim,
    aten.mean.default,
    aten.avg_pool2d.default,
    aten.avg_pool3d.default,
    aten._adaptive_avg_pool2d.default,
    aten._adaptive_avg_pool3d.default,
    aten.diagonal.default,
    aten.upsample_nearest2d.default,
    aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec,
    aten.upsample_bilinear2d.default,
    aten.upsample_trilinear3d.default,
    aten.upsample_trilinear3d.vec,
    aten.neg.default,
    aten.cumsum.default,
    aten.index.Tensor,
    aten.gather.default,
    aten.narrow.default,
    aten.reshape.default,
    aten.to.dtype,
]

# rules given the op's output as ``f`` computed it (``propagate``'s ``known``): ``given(ctx,
# y, *args, **kwargs)``, the matrix products whose value costs a kernel as large as a direction's
GIVEN: dict[Any, Callable[..., Jet]] = {
    aten.mul.Tensor: lambda ctx, y, a, b: _mul(ctx, a, b, y),
    aten.mm.default: lambda ctx, y, a, b: _mm(ctx, a, b, y),
    aten.bmm.default: lambda ctx, y, a, b: _bmm(ctx, a, b, y),
    aten.addmm.default: _addmm_given,
}

# 3D nearest interpolation as PyTorch's decomposition writes it (gathers): its forward kernel
# and the decomposition agree, but the kernel's backward does not where a non-integer factor
# keeps an axis's size (3 rows at 1.3: rows 0, 0, 1 forward, row q's gradient to row q), and
# the parameter gradients of a jet go through it. A rule of its own (not the recorder's
# decomposition) keeps the op whole for the structured engine's windows.
_NEAREST_3D = {
    op: core_aten_decompositions()[op]
    for op in (aten.upsample_nearest3d.default, aten.upsample_nearest3d.vec)
}


def _copy_strided(ctx: Context, a: Jet, stride: list[int]) -> Jet:
    """``prims.copy_strided(a, stride)``: ``a``'s values laid out with those strides (the end of
    PyTorch's ``index_fill`` decomposition on a tensor that is not contiguous, keeping its
    layout): the same values, so the same derivatives (a copy, as ``clone``)."""
    copied = linear(ctx, aten.clone.default, a)
    return Jet(torch.ops.prims.copy_strided.default(a.value, stride), copied.jac, copied.lap)


RULES: dict[Any, Callable[..., Any]] = {
    **{op: _linear(op) for op in LINEAR_OPS},
    **{op: _linear(decomposed) for op, decomposed in _NEAREST_3D.items()},
    aten.view.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.split.Tensor: _split(aten.split.Tensor),
    aten.split_with_sizes.default: _split(aten.split_with_sizes.default),
    aten.unbind.int: _split(aten.unbind.int),
    aten.tensor_split.sections: _split(aten.tensor_split.sections),  # (``glu`` decomposed)
    aten.tensor_split.indices: _split(aten.tensor_split.indices),
    aten.add.Tensor: _add,
    aten.add.Scalar: _add,
    aten.sub.Tensor: _sub,
    aten.sub.Scalar: _sub,
    aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _mul,
    aten.mul.Scalar: _scalar_scale,
    aten.div.Scalar: _scalar_div,
    aten.mm.default: _mm,
    aten.bmm.default: _bmm,
    aten.addmm.default: _addmm,
    aten.convolution.default: _convolution,
    aten.cat.default: _cat,
    aten.constant_pad_nd.default: _pad,
    aten.where.self: _where,
    aten.max_pool2d_with_indices.default: _max_pool(aten.max_pool2d_with_indices, 2),
    aten.max_pool3d_with_indices.default: _max_pool(aten.max_pool3d_with_indices, 3),
    aten.max.dim: _max_dim,
    aten.amax.default: _amax,
    aten.max.default: _amax,  # (every dimension: its derivative spreads over ties, as amax's)
    aten.index_add.default: _accumulated(aten.index_add.default, 3),
    aten.scatter_add.default: _accumulated(aten.scatter_add.default, 3),
    aten.index_put.default: _accumulated(aten.index_put.default, 2),
    aten.scatter.src: _accumulated(aten.scatter.src, 3),
    aten.maximum.default: lambda ctx, a, b: _extremum(ctx, a, b, True),
    aten.minimum.default: lambda ctx, a, b: _extremum(ctx, a, b, False),
    aten.clamp.Tensor: _clamp_tensor,
    torch.ops.prims.copy_strided.default: _copy_strided,
}
