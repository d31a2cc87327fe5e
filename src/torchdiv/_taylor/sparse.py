"""Per-particle sparse jets: each element's derivatives along its own particles' directions only.

For an input event of shape ``(N, d)`` (``N`` particles in ``d`` dimensions, the positions of a
wavefunction's electrons), the ``K = N d`` unit directions are ``u_(p, c)`` (particle ``p``,
coordinate ``c``, flattened as ``p d + c``). A network applied to each particle alone (an
orbital MLP, row by row) makes elements that depend on one particle each; a pair distance
depends on two. Their dense ``jac`` is zero along all other directions. A ``Sparse`` jet with
``T`` *terms* stores, for every element ``s`` of a value of shape ``S``,

    owner[t][s]         the t-th particle that s depends on, distinct over t   (T,) + S
    jac[t d + c][s]   = D v[s] [u_(owner[t][s], c)]                            (T d,) + S
    lap                 as in ``Jet``

(both broadcasting to ``S``), so that the dense ``jac[p d + c] = sum_t [owner[t] = p] jac[t d
+ c]`` (``densify``); folx does the same for one particle per element.

Because the owners of an element are distinct, ``sum_k`` over the ``K`` dense directions of a
product of two such jets (the collapsed second-order term, ``jac_a . jac_b``) is the sum over
the ``T d`` stored ones, *if both store the same owners in the same order*. Every rule written
for dense jets is then exact with ``T d`` directions. ``apply`` runs the dense rules that way
where it can prove this from the owners: elementwise ops (operands put on the union of their
owners, if those stay distinct), moves of elements (the owners move with them: the op applied
to them), reductions and matrix products over dimensions along which every owner is constant.
``slogdet`` of a matrix whose rows have one owner each has a rule of its own. Anything else (a
sum over particles, owners that would coincide, a dense operand) gets dense jets (``densify``),
which is always right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from torchdiv._core.linalg import inverse
from torchdiv._taylor import elementwise, linear
from torchdiv._taylor.jet import Context, Jet, aligned_jac
from torchdiv._taylor.tree import leaves, map_leaves

aten = torch.ops.aten
Tensor = torch.Tensor
Rule = Callable[[Context, Any, Any], Any]  # (ctx, args, kwargs) -> the op's output jets
# more owners per element than this: dense jets (each term costs as much as d directions)
MAX_TERMS = 4


@dataclass
class Sparse:
    """A jet whose ``jac`` is stored along the ``d`` directions of each of an element's ``T``
    owners: ``jac`` of ``(T d,) + S``, ``owner`` of ``(T,) + S`` (``S`` broadcasting to
    ``value.shape``, with as many dimensions), ``particles``: ``N``."""

    value: Tensor
    jac: Tensor
    lap: Tensor | None
    owner: Tensor
    particles: int
    dense: Jet | None = field(default=None, repr=False)  # ``densify``'s, made once

    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    @property
    def terms(self) -> int:
        return len(self.owner)

    @property
    def num_directions(self) -> int:
        return self.particles * len(self.jac) // self.terms


def per_particle(x: Tensor, batch_dims: int) -> Sparse | None:
    """The unit directions of ``x`` as a ``Sparse`` jet, if its event is ``(N, d)`` with
    ``N >= 2`` (else ``None``)."""
    event = x.shape[batch_dims:]
    if len(event) != 2 or event[0] < 2:
        return None
    n, d = event
    ones = [1] * batch_dims
    jac = torch.eye(d, dtype=x.dtype, device=x.device).reshape(d, *ones, 1, d)
    owner = torch.arange(n, device=x.device).reshape(1, *ones, n, 1)
    return Sparse(x, jac, None, owner, n)


def densify(a: Any) -> Any:
    """``a`` as a dense ``Jet`` if it is ``Sparse``, else ``a``."""
    if not isinstance(a, Sparse):
        return a
    if a.dense is None:
        n, t = a.particles, a.terms
        particle = torch.arange(n, device=a.owner.device).reshape(n, *[1] * a.owner.dim())
        mask = (a.owner == particle).to(a.jac.dtype)[:, :, None]  # (N, T, 1) + S
        jac = mask * a.jac.unflatten(0, (t, -1))  # (N, T, d) + S
        jac = jac[:, 0] if t == 1 else jac.sum(1)
        a.dense = Jet(a.value, jac.flatten(0, 1), a.lap)
    return a.dense


def apply(func: Any, ctx: Context, args: Any, kwargs: Any, rule: Rule) -> Any:
    """``func``'s outputs for arguments of which some are ``Sparse``: sparse where the owners
    prove it exact, else ``rule`` run on dense jets."""
    found = leaves((args, kwargs))
    sparse = [a for a in found if isinstance(a, Sparse)]
    out = None
    if all(s.particles == sparse[0].particles for s in sparse) and not any(
        isinstance(a, Jet) for a in found
    ):
        out = _sparse(func, ctx, args, kwargs, rule)
    if out is not None:
        return out
    return rule(ctx, map_leaves(densify, args), map_leaves(densify, kwargs))


def _sparse(func: Any, ctx: Context, args: Any, kwargs: Any, rule: Rule) -> Any:
    if func in _ELEMENTWISE:
        return _elementwise(ctx, args, kwargs, rule)
    if func in _MOVES:
        return _moved(func, ctx, args, kwargs, rule)
    if func in _REDUCTIONS:
        a = args[0]
        if not isinstance(a, Sparse) or _any_sparse((args[1:], kwargs)):
            return None
        nd = a.value.dim()
        dims = sorted({d % nd for d in _REDUCTIONS[func](nd, *args[1:], **kwargs)})
        return _over(a, dims, ctx, args, kwargs, rule)
    if func in _PRODUCTS:
        a, b = args[-2:]
        if isinstance(a, Sparse) == isinstance(b, Sparse) or _any_sparse((args[:-2], kwargs)):
            return None
        jet, dim = (a, -1) if isinstance(a, Sparse) else (b, -2)
        return _over(jet, [dim % jet.value.dim()], ctx, args, kwargs, rule)
    if func is aten._linalg_slogdet.default:
        return _slogdet(ctx, *args, **kwargs)
    return None


def _any_sparse(tree: Any) -> bool:
    return any(isinstance(a, Sparse) for a in leaves(tree))


def _run(ctx: Context, args: Any, kwargs: Any, rule: Rule, owner: Callable[[int, int], Any]) -> Any:
    """``rule`` run on the ``T d`` stored directions (every ``Sparse`` argument with the same
    owners); output leaf ``i`` with ``nd`` dimensions gets the owners ``owner(i, nd)``."""
    sparse = next(a for a in leaves((args, kwargs)) if isinstance(a, Sparse))
    inner = replace(ctx, num_directions=len(sparse.jac))

    def stored(a: Any) -> Any:
        return Jet(a.value, a.jac, a.lap) if isinstance(a, Sparse) else a

    out = rule(inner, map_leaves(stored, args), map_leaves(stored, kwargs))
    index = iter(range(len(leaves(out))))

    def wrap(a: Any) -> Any:
        i = next(index)
        jac = aligned_jac(a, a.value.dim()) if isinstance(a, Jet) else None
        if jac is None:
            return a
        nd = a.value.dim()
        owners = _aligned(owner(i, nd), nd).to(a.value.device)  # (_to_copy may move a value)
        return Sparse(a.value, jac, a.lap, owners, sparse.particles)

    return map_leaves(wrap, out)


def _aligned(owner: Tensor, nd: int) -> Tensor:
    """``owner`` (``(T,) + shape``) with size-1 dimensions after ``T`` up to ``nd``, and size 1
    along the dimensions it was expanded along (stride 0: the same owners, so ``densify``
    keeps a ``jac`` broadcast across samples broadcast)."""
    missing = nd + 1 - owner.dim()
    # (a tuple sum, not ``(slice(None), *nones)``: mypy on Python 3.10 refuses a star inside
    # a subscript, parenthesized too, as 3.11 syntax: pyvers31)
    owner = owner[(slice(None),) + (None,) * missing] if missing > 0 else owner
    for d, (size, stride) in enumerate(zip(owner.shape, owner.stride(), strict=True)):
        if stride == 0 and size > 1:
            owner = owner.narrow(d, 0, 1)
    return owner


def _elementwise(ctx: Context, args: Any, kwargs: Any, rule: Rule) -> Any:
    """An elementwise op: its ``Sparse`` operands put on the union of their owners (``_union``)."""
    operands = [a for a in leaves((args, kwargs)) if isinstance(a, Sparse)]
    if all(a.owner is operands[0].owner for a in operands):
        return _run(ctx, args, kwargs, rule, lambda i, nd: operands[0].owner)
    shape = torch.broadcast_shapes(*(a.shape for a in operands))
    owners = _union([_aligned(a.owner, len(shape)).expand(-1, *shape) for a in operands])
    if owners is None:
        return None
    union, places = owners
    if any(p != list(range(len(union))) for p in places):
        moved = iter([_spread(a, p, len(union)) for a, p in zip(operands, places, strict=True)])
        args, kwargs = map_leaves(
            lambda a: next(moved) if isinstance(a, Sparse) else a, (args, kwargs)
        )
    owner = torch.stack(union)
    return _run(ctx, args, kwargs, rule, lambda i, nd: owner)


def _union(owners: list[Tensor]) -> tuple[list[Tensor], list[list[int]]] | None:
    """The terms of all ``owners`` (each ``(T_i,) + S``), equal ones merged, and where each
    operand's terms went; ``None`` if two terms differ somewhere but agree somewhere else (an
    element would count a particle twice) or there are more than ``MAX_TERMS``."""
    union: list[Tensor] = list(owners[0])
    places = [list(range(len(union)))]
    for owner in owners[1:]:
        place = []
        for term in owner:
            same = next((i for i, u in enumerate(union) if u is term or torch.equal(u, term)), None)
            if same is None:
                if any(bool((u == term).any()) for u in union) or len(union) == MAX_TERMS:
                    return None
                union.append(term)
                same = len(union) - 1
            place.append(same)
        places.append(place)
    return union, places


def _spread(a: Sparse, place: list[int], terms: int) -> Sparse:
    """``a`` with its terms at positions ``place`` of ``terms`` (zero derivatives elsewhere)."""
    jac = a.jac.unflatten(0, (a.terms, -1))
    pieces = [torch.zeros_like(jac[0])] * terms
    for t, p in enumerate(place):
        pieces[p] = jac[t]
    return Sparse(a.value, torch.cat(pieces), a.lap, a.owner, a.particles)


def _moved(func: Any, ctx: Context, args: Any, kwargs: Any, rule: Rule) -> Any:
    """Ops whose every output element is one input element (views, slices, gathers, copies):
    the owners move with the elements (the op applied to each term of them)."""
    first = args[0]
    operands = list(first) if isinstance(first, list | tuple) else [first]
    if not all(isinstance(a, Sparse) for a in operands) or _any_sparse((args[1:], kwargs)):
        return None
    terms = operands[0].terms
    if any(a.terms != terms for a in operands):
        return None
    if func in _COPIES:
        return _run(ctx, args, kwargs, rule, lambda i, nd: operands[0].owner)
    op = aten.reshape.default if func in _VIEWS else func
    per_term = []
    for t in range(terms):
        full = [a.owner[t].expand(a.shape) for a in operands]
        per_term.append(
            leaves(op(full if first is not operands[0] else full[0], *args[1:], **kwargs))
        )
    owners = [torch.stack(outs) for outs in zip(*per_term, strict=True)]
    return _run(ctx, args, kwargs, rule, lambda i, nd: owners[i])


def _over(a: Sparse, dims: list[int], ctx: Context, args: Any, kwargs: Any, rule: Rule) -> Any:
    """An op that mixes the elements of ``a`` along ``dims`` (a reduction, a normalisation, a
    matrix product): sparse if every owner is constant along them; the outputs' owners keep
    those dimensions at size 1, or drop them for outputs with fewer dimensions."""
    owner = a.owner
    for d in dims:
        if owner.shape[d + 1] != 1:
            first = owner.narrow(d + 1, 0, 1)
            if not bool((owner == first).all()):
                return None
            owner = first
    squeezed = owner.squeeze([d + 1 for d in dims]) if dims else owner
    nd = a.value.dim()
    return _run(ctx, args, kwargs, rule, lambda i, out_nd: owner if out_nd == nd else squeezed)


def _slogdet(ctx: Context, a: Any) -> tuple[Tensor, Jet, Tensor, Tensor] | None:
    """``log|det A|`` of a matrix whose rows have one owner each (``rows``): with
    ``G_c = Ȧ_c A^-1`` (``Ȧ_c`` the stored derivatives, ``(d,) + A.shape``),

        jac_(p, c) = sum_(i: rows_i = p) G_c[i, i]
        lap        = tr(A^-1 L) - sum_c sum_(i, j: rows_i = rows_j) G_c[i, j] G_c[j, i]

    (``tr(A^-1 Ȧ_k)`` and ``tr((A^-1 Ȧ_k)^2)`` of the dense rule, with ``Ȧ_k`` zero outside
    the rows of one particle): ``d`` matrix products instead of ``N d``."""
    if not isinstance(a, Sparse) or a.terms != 1:
        return None
    rows = a.owner[0]
    if rows.shape[-1] != 1:
        first = rows.narrow(-1, 0, 1)
        if not bool((rows == first).all()):
            return None
        rows = first
    rows = rows.expand(*a.shape[:-1], 1)[..., 0]  # (..., n)
    sign, value, lu, pivots = aten._linalg_slogdet(a.value)
    inv = inverse(a.value)
    g = a.jac.expand(a.jac.shape[0], *a.value.shape) @ inv  # (d, ..., n, n); stored broadcast
    jac = lap = None
    if ctx.jac:
        particle = torch.arange(a.particles, device=rows.device)
        onehot = (rows[..., None] == particle).to(g.dtype)  # (..., n, N)
        per = (g.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * onehot).sum(-2)  # (d, ..., N)
        jac = per.movedim(-1, 0).flatten(0, 1)
    if ctx.second_order:
        same = rows[..., :, None] == rows[..., None, :]
        lap = (g * g.mT * same).sum((0, -2, -1)).neg()
        if a.lap is not None:
            lap = lap + (a.lap * inv.mT).sum((-2, -1))
        lap = lap.expand(value.shape)
    return sign, Jet(value, jac, lap), lu, pivots


def _dims(position: int) -> Callable[..., list[int]]:
    """The reduced dimensions of an op whose ``dim`` argument is argument ``position`` after
    the input; ``None`` or an empty list mean all of them."""

    def dims(nd: int, *args: Any, **kwargs: Any) -> list[int]:
        dim = args[position] if len(args) > position else kwargs.get("dim")
        if dim is None or (isinstance(dim, list | tuple) and len(dim) == 0):
            return list(range(nd))
        return [dim] if isinstance(dim, int) else list(dim)

    return dims


def _everything(nd: int, *args: Any, **kwargs: Any) -> list[int]:
    return list(range(nd))


def _normalized(nd: int, shape: list[int], *args: Any, **kwargs: Any) -> list[int]:
    return list(range(nd - len(shape), nd))


_ELEMENTWISE = {
    *elementwise.RULES,
    aten.add.Tensor,
    aten.add.Scalar,
    aten.sub.Tensor,
    aten.sub.Scalar,
    aten.rsub.Scalar,
    aten.mul.Tensor,
    aten.mul.Scalar,
    aten.div.Scalar,
    aten.neg.default,
    aten.where.self,
    aten.maximum.default,
    aten.minimum.default,
    aten.clamp.Tensor,
}
_COPIES = {aten.clone.default, aten.alias.default, aten._to_copy.default, aten.to.dtype}
_VIEWS = {aten.view.default, aten._unsafe_view.default}
_MOVES = {
    *linear.MOVES,
    *_COPIES,
    aten.movedim.int,
    aten.t.default,
    aten.diagonal.default,
    aten.index.Tensor,
    aten.gather.default,
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.unbind.int,
}
_REDUCTIONS: dict[Any, Callable[..., list[int]]] = {
    aten.sum.dim_IntList: _dims(0),
    aten.sum.default: _everything,
    aten.mean.dim: _dims(0),
    aten.mean.default: _everything,
    aten.amax.default: _dims(0),
    aten.logsumexp.default: _dims(0),
    aten.linalg_vector_norm.default: _dims(1),
    aten._softmax.default: _dims(0),
    aten._log_softmax.default: _dims(0),
    aten.native_layer_norm.default: _normalized,
}
_PRODUCTS = {aten.mm.default, aten.bmm.default, aten.addmm.default}
