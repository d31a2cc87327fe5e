"""Rules for products, log-sum-exp and order statistics along a dimension.

**Products** (``prod``, ``cumprod``) never divide by the input, so zeros are handled exactly.
Jets form a ring under ``jet.product`` (per direction, truncated Taylor polynomials
``v + t j + t^2 l / 2``; ``lap`` sums over directions, which the product keeps, since it is
linear in ``l``), and the product is associative, so ``prod`` is a tree of pairwise jet
products (``ceil(log2 n)`` rounds) and ``cumprod`` a Hillis-Steele scan: in round ``r`` every
element from ``2^r`` on is multiplied by the one ``2^r`` before it. The exclusive products
``prod_{j != i} a_j`` that the closed form ``jac = sum_i (prod_{j != i} a_j) jac_i`` needs
appear inside these products without being formed.

**Log-sum-exp** over ``dims``, with ``s = exp(a - y)`` (the softmax) and
``<p, q> = sum_dims p q``: ``jac = <s, jac_a>``, ``lap = <s, lap_a + sum_k c_k^2>`` with
``c_k = jac_k - <s, jac_k>`` (its Hessian is ``diag(s) - s s^T``).

**Order statistics** (``sort``, ``topk``, ``kthvalue``, ``min``, ``amin``) return input elements:
piecewise a selection, so ``jac`` and ``lap`` are gathered where the values came from (ties
pick the element PyTorch's index names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from torchdiv._taylor.jet import (
    Context,
    Jet,
    aligned_jac,
    full_jac,
    full_lap,
    inner,
    linear,
    product,
)
from torchdiv._taylor.linear import RULES as LINEAR
from torchdiv._taylor.linear import selected, take_along, tied

aten = torch.ops.aten
Tensor = torch.Tensor
_cat = LINEAR[aten.cat.default]


def _narrow(a: Jet, dim: int, start: int, length: int) -> Jet:
    """Elements ``start .. start + length - 1`` of ``a`` along ``dim`` (a view; ``jac`` may
    be broadcast, so it is expanded first)."""
    jac = aligned_jac(a, a.value.dim())
    if jac is not None:
        jac = jac.expand(len(jac), *a.shape).narrow(dim + 1, start, length)
    lap = None if a.lap is None else full_lap(a).narrow(dim, start, length)
    return Jet(a.value.narrow(dim, start, length), jac, lap)


def _tree_product(ctx: Context, a: Jet, dim: int) -> Jet:
    """The product of ``a`` along ``dim`` (kept, size 1; ``a`` nonempty there), by pairing
    the first and second halves until one element is left."""
    while a.shape[dim] > 1:
        n = a.shape[dim]
        half = n // 2
        pairs = product(ctx, torch.mul, _narrow(a, dim, 0, half), _narrow(a, dim, half, half))
        a = pairs if n % 2 == 0 else _cat(ctx, [pairs, _narrow(a, dim, n - 1, 1)], dim)
    return a


def _cast(ctx: Context, a: Jet, dtype: torch.dtype | None) -> Jet:
    return a if dtype is None else linear(ctx, lambda t: t.to(dtype), a)


def _prod_dim(
    ctx: Context, a: Jet, dim: int, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> Jet:
    a, dim = _cast(inner(ctx), a, dtype), dim % max(a.value.dim(), 1)
    if a.value.dim() == 0:
        return a
    if a.shape[dim] == 0:  # an empty product is 1, whatever x is
        return Jet(a.value.prod(dim, keepdim=keepdim), None, None)
    out = _tree_product(inner(ctx), a, dim)
    return out if keepdim else linear(ctx, torch.squeeze, out, dim)


def _prod(ctx: Context, a: Jet, *, dtype: torch.dtype | None = None) -> Jet:
    flat = linear(inner(ctx), torch.reshape, a, (-1,))
    return linear(ctx, torch.reshape, _prod_dim(ctx, flat, 0, True, dtype=dtype), ())


def _cumprod(ctx: Context, a: Jet, dim: int, *, dtype: torch.dtype | None = None) -> Jet:
    ctx = inner(ctx)
    a = _cast(ctx, a, dtype)
    if a.value.dim() == 0:
        return a
    dim, offset = dim % a.value.dim(), 1
    n = a.shape[dim]
    while offset < n:
        shifted = product(
            ctx, torch.mul, _narrow(a, dim, offset, n - offset), _narrow(a, dim, 0, n - offset)
        )
        a = _cat(ctx, [_narrow(a, dim, 0, offset), shifted], dim)
        offset *= 2
    return a


def _logsumexp(ctx: Context, a: Jet, dims: list[int], keepdim: bool = False) -> Jet:
    if a.value.dim() == 0:  # one element: itself (its dimension 0 is no dimension of jac)
        return a
    dims = [d % a.value.dim() for d in dims] or list(range(a.value.dim()))
    y = torch.logsumexp(a.value, dims, keepdim=True)
    s = torch.exp(a.value - y.masked_fill(y == -torch.inf, 0))  # all -inf: s = 0, no nan
    shifted = [d + 1 for d in dims]
    jac = full_jac(ctx, a)
    mean = (s * jac).sum(shifted, keepdim=True)
    lap = None
    if ctx.second_order:
        lap = (s * (full_lap(a) + (jac - mean).square().sum(0))).sum(dims, keepdim=True)
    out = Jet(y, mean if ctx.jac else None, lap)
    return out if keepdim else linear(ctx, torch.squeeze, out, dims)


def _sort(
    ctx: Context, a: Jet, dim: int = -1, descending: bool = False, *, stable: bool | None = False
) -> tuple[Jet, Tensor]:
    value, index = torch.sort(a.value, dim=dim, descending=descending, stable=bool(stable))
    return take_along(ctx, a, value, index, dim), index


def _sort_stable(
    ctx: Context, a: Jet, *, stable: bool | None, dim: int = -1, descending: bool = False
) -> tuple[Jet, Tensor]:
    return _sort(ctx, a, dim, descending, stable=stable)


def _topk(
    ctx: Context, a: Jet, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
) -> tuple[Jet, Tensor]:
    value, index = torch.topk(a.value, k, dim, largest, sorted)
    return take_along(ctx, a, value, index, dim), index


def _kthvalue(
    ctx: Context, a: Jet, k: int, dim: int = -1, keepdim: bool = False
) -> tuple[Jet, Tensor]:
    value, index = torch.kthvalue(a.value, k, dim, keepdim=True)
    return selected(ctx, a, value, index, dim, keepdim)


def _min_dim(ctx: Context, a: Jet, dim: int, keepdim: bool = False) -> tuple[Jet, Tensor]:
    value, index = torch.min(a.value, dim, keepdim=True)
    return selected(ctx, a, value, index, dim, keepdim)


def _amin(
    ctx: Context, a: Jet, dims: tuple[int, ...] | list[int] = (), keepdim: bool = False
) -> Jet:
    return tied(ctx, a, torch.amin(a.value, dims, keepdim=True), dims, keepdim)


def _median(ctx: Context, a: Jet) -> Jet:
    """``median()`` of every element: PyTorch spreads its derivative evenly over the elements
    equal to it, as ``amin``'s over ties (``evenly_distribute_backward``)."""
    return tied(ctx, a, torch.median(a.value).reshape((1,) * a.value.dim()), (), False)


RULES: dict[Any, Callable[..., Any]] = {
    aten.prod.default: _prod,
    aten.prod.dim_int: _prod_dim,
    aten.cumprod.default: _cumprod,
    aten.logsumexp.default: _logsumexp,
    aten.sort.default: _sort,
    aten.sort.stable: _sort_stable,
    aten.topk.default: _topk,
    aten.kthvalue.default: _kthvalue,
    aten.min.dim: _min_dim,
    aten.amin.default: _amin,
    aten.min.default: _amin,  # (every dimension)
    aten.median.default: _median,
}
# piecewise selections: their ``lap`` needs only the input's ``lap`` (``propagate``)
SELECTIONS = {
    aten.amin.default,
    aten.sort.default,
    aten.sort.stable,
    aten.topk.default,
    aten.kthvalue.default,
    aten.min.dim,
    aten.min.default,
    aten.median.default,
}
