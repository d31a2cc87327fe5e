"""Second-order forward jets and the arithmetic every propagation rule is built from.

A ``Jet`` carries, for one intermediate tensor ``v(x)`` of shape ``S``, its value, its
derivatives along ``K`` input directions ``u_1 .. u_K`` and the *collapsed* second-order term

    jac[k] = D v [u_k]                       shape (K,) + S
    lap    = sum_k D^2 v [u_k, u_k]          shape S

(Taylor mode with the K second-order coefficients summed as they are produced: "forward
Laplacian", Li et al. 2023; "collapsed Taylor mode", Dangel et al. 2024). With the unit
vectors of the input event as directions, ``lap`` of the output is its Laplacian and ``jac``
its Jacobian. ``lap`` is linear in the directions' second-order contributions, so directions
can be processed in chunks and the chunks' ``lap`` summed.

``jac`` may be *broadcast*: its shape after ``K`` need only broadcast to ``S`` (the basis of
``x`` is the same in every sample, so it is stored once, ``(K, 1, ..., 1) + event``, and stays
that way through ops that treat samples alike, such as a first ``Linear`` layer). ``None``
stands for an exact zero. With ``second_order=False`` the ``lap`` terms are skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, overload

import torch

from torchdiv._taylor.lifted import lifted

Op = Callable[..., torch.Tensor]


class UnsupportedOp(NotImplementedError):
    """An op that the forward-propagation engine cannot run on this input."""


@dataclass
class Jet:
    """One intermediate ``v(x)`` of shape ``S`` pushed along ``K`` directions ``u_k``:
    ``value`` is ``v``, ``jac[k] = D v [u_k]`` (shape ``(K,) + S``, or broadcastable to it;
    ``None``: zero) and ``lap = sum_k D^2 v [u_k, u_k]`` (shape ``S`` or broadcastable;
    ``None``: zero).

        >>> x = torch.tensor([[1.0, 2.0]])  # one sample, directions e_1, e_2 stored once
        >>> a = Jet(x, torch.eye(2).reshape(2, 1, 2), None)
        >>> b = product(Context(2, second_order=True), torch.mul, a, a)  # v = x * x
        >>> b.jac.shape, b.lap  # d(x_i^2)/dx_k = 2 x_i [i = k]; sum_k d^2/dx_k^2 = 2 [i = k]
        (torch.Size([2, 1, 2]), tensor([[2., 2.]]))
    """

    value: torch.Tensor
    jac: torch.Tensor | None
    lap: torch.Tensor | None

    @property
    def shape(self) -> torch.Size:
        """``value``'s shape ``S``."""
        return self.value.shape


@dataclass(frozen=True)
class Context:
    """What a rule may ask: the number of directions, whether ``lap`` is wanted, whether the
    result's ``jac`` is (a rule may skip it when ``jac=False``: no later op reads it), and
    whether the first argument's ``jac`` may be overwritten (``overwrite``: nothing reads it
    after the rule, no graph records it; ``propagate`` tells, for ``OVERWRITES``' ops)."""

    num_directions: int
    second_order: bool
    jac: bool = True
    overwrite: bool = False


def inner(ctx: Context) -> Context:
    """The context for a composite rule's intermediate jets: their ``jac`` is always needed."""
    return replace(ctx, jac=True)


def full_jac(ctx: Context, a: Jet) -> torch.Tensor:
    """``a.jac`` expanded to ``(K,) + a.shape`` (a zero tensor for ``None``)."""
    shape = (ctx.num_directions, *a.shape)
    jac = aligned_jac(a, a.value.dim())
    return a.value.new_zeros(()).expand(shape) if jac is None else jac.expand(shape)


def full_lap(a: Jet) -> torch.Tensor:
    """``a.lap`` expanded to ``a.shape`` (a zero tensor for ``None``)."""
    return a.value.new_zeros(()).expand(a.shape) if a.lap is None else a.lap.expand(a.shape)


def _add(p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor | None:
    if p is None:
        return q
    return p if q is None else p + q


def add(a: Jet | torch.Tensor, b: Jet | torch.Tensor | float, alpha: float = 1.0) -> Jet:
    """``a + alpha * b`` (either may be a constant tensor or number)."""
    value = torch.add(value_of(a), value_of(b), alpha=alpha)
    ja, jb, lb = aligned_jac(a, value.dim()), aligned_jac(b, value.dim()), lap_of(b)
    if alpha != 1:
        jb, lb = (None if jb is None else jb * alpha), (None if lb is None else lb * alpha)
    return Jet(value, _add(ja, jb), _add(lap_of(a), lb))


def scale(a: Jet, c: torch.Tensor | float, value: torch.Tensor | None = None) -> Jet:
    """``a * c`` for a constant ``c`` (a number or a tensor broadcasting against ``a``)."""
    value = a.value * c if value is None else value
    jac = aligned_jac(a, value.dim())
    return Jet(
        value,
        None if jac is None else jac * c,
        None if a.lap is None else a.lap * c,
    )


def sum_squares(ctx: Context, a: Jet) -> torch.Tensor | None:
    """``sum_k jac[k] ** 2`` (``None`` if ``jac`` is zero or no second order is wanted)."""
    if a.jac is None or not ctx.second_order:
        return None
    return square_sum(a.jac)


# elements of one direction, and of ``jac``, from which ``square_sum`` accumulates direction by
# direction: below either, ``square().sum(0)``'s two kernels are faster (perfcheck25: 12 x 256
# x 32 16 us against 39, 128 x 256 x 32 400 us against 490, a LayerNorm MLP's Laplacian +12 %)
ACCUMULATED_NUMEL = 1 << 14
ACCUMULATED_TOTAL = 1 << 19


def square_sum(jac: torch.Tensor) -> torch.Tensor:
    """``sum_k jac[k] ** 2`` along dimension 0. Where no graph records it (``jac`` needs no
    gradient or grad mode is off), a direction holds ``ACCUMULATED_NUMEL`` elements or more
    and ``jac`` ``ACCUMULATED_TOTAL``: summed into one ``jac[0]``-sized accumulator by
    ``addcmul_``, without ``jac ** 2``:
    at 100 directions, batch 2048, width 64 that temporary was 50 MiB, above glibc's largest
    ``mmap`` threshold, so mapped, page-faulted and zeroed at every call (issue 18: 2.5 ms
    for the loop against 22 ms, one thread). Below, the two kernels of ``square().sum(0)``
    (at 32 x 64 per direction 40 us against the loop's 300), and in 16-bit floats, whose
    in-place sums round at each step (bf16, 1000 directions: 18 % off; ``sum`` reduces in
    float32)."""
    if (
        len(jac) < 2
        or jac[0].numel() < ACCUMULATED_NUMEL
        or jac.numel() < ACCUMULATED_TOTAL
        or torch.finfo(jac.dtype).bits < 32
        or (jac.requires_grad and torch.is_grad_enabled())
    ):
        return jac.square().sum(0)
    total = jac[0].square()
    for k in range(1, len(jac)):
        total.addcmul_(jac[k], jac[k])
    return total


def chain(ctx: Context, a: Jet, y: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor | None) -> Jet:
    """``phi(a)`` for an elementwise ``phi`` with ``y = phi(a.value)``, ``d1 = phi'``,
    ``d2 = phi''`` (``None`` if zero): ``jac' = d1 jac``, ``lap' = d1 lap + d2 sum_k jac_k^2``."""
    squares = None if d2 is None else sum_squares(ctx, a)  # (before jac may be overwritten)
    jac = None if a.jac is None or not ctx.jac else scaled_jac(ctx, d1, a.jac)
    lap = None if a.lap is None else d1 * a.lap
    if d2 is not None and squares is not None:
        lap = _add(lap, d2 * squares)
    return Jet(y, jac, lap)


def scaled_jac(ctx: Context, d: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    """``d * jac`` (``d`` broadcasting over ``jac``'s directions), written into ``jac`` where
    ``ctx.overwrite`` allows and the product has ``jac``'s shape and dtype: one ``jac``-sized
    block fewer (issue 18: a 50 MiB one, mapped and faulted afresh at every call)."""
    if (
        ctx.overwrite
        and isinstance(d, torch.Tensor)
        and torch.broadcast_shapes(d.shape, jac.shape) == jac.shape
        and torch.result_type(d, jac) == jac.dtype
        and jac.is_contiguous()
    ):
        return jac.mul_(d)
    return d * jac


def chain2(
    ctx: Context,
    a: Jet | torch.Tensor,
    b: Jet | torch.Tensor,
    y: torch.Tensor,
    first: tuple[torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> Jet:
    """``phi(a, b)`` for an elementwise ``phi`` of two arguments (either may be a constant),
    with ``y = phi(a, b)``, ``first = (phi_a, phi_b)``, ``second = (phi_aa, phi_ab, phi_bb)``:

        jac = phi_a ja + phi_b jb
        lap = phi_a la + phi_b lb + sum_k (phi_aa ja_k^2 + 2 phi_ab ja_k jb_k + phi_bb jb_k^2)
    """
    (da, db), (daa, dab, dbb) = first, second
    ja, jb = aligned_jac(a, y.dim()), aligned_jac(b, y.dim())
    jac = None
    if ctx.jac:
        jac = _add(None if ja is None else da * ja, None if jb is None else db * jb)
    if not ctx.second_order:
        return Jet(y, jac, None)
    la, lb = lap_of(a), lap_of(b)
    lap = _add(None if la is None else da * la, None if lb is None else db * lb)
    if ja is not None:
        lap = _add(lap, daa * square_sum(ja))
    if jb is not None:
        lap = _add(lap, dbb * square_sum(jb))
    if ja is not None and jb is not None:
        lap = _add(lap, 2 * dab * (ja * jb).sum(0))
    return Jet(y, jac, lap)


def product(
    ctx: Context,
    op: Op,
    a: Jet | torch.Tensor,
    b: Jet | torch.Tensor,
    value: torch.Tensor | None = None,
    **kw: Any,
) -> Jet:
    """``op(a, b)`` for an ``op`` linear in each argument (``mul``, ``matmul``, ...):

        jac = op(jac_a, b) + op(a, jac_b)
        lap = op(lap_a, b) + op(a, lap_b) + 2 sum_k op(jac_a[k], jac_b[k])

    ``op`` must broadcast over a leading ``K`` dimension of either argument. ``value``:
    ``op(a.value, b.value)`` if already known (as ``f`` computed it at capture).
    """
    value = op(value_of(a), value_of(b), **kw) if value is None else value
    ja, jb = aligned_jac(a, value.dim()), aligned_jac(b, value.dim())
    jac = None
    if ctx.jac:
        jac = _add(
            None if ja is None else op(ja, value_of(b), **kw),
            None if jb is None else op(value_of(a), jb, **kw),
        )
    if not ctx.second_order:
        return Jet(value, jac, None)
    # (full shapes: a lap may be broadcast, e.g. a constant minus a keepdim sum, and
    # ``matmul`` does not broadcast its last axes)
    la, lb = (None if lap_of(t) is None else full_lap(t) for t in (a, b))  # type: ignore[arg-type]
    lap = _add(
        None if la is None else op(la, value_of(b), **kw),
        None if lb is None else op(value_of(a), lb, **kw),
    )
    if ja is not None and jb is not None:
        lap = _add(lap, 2 * op(ja, jb, **kw).sum(0))
    return Jet(value, jac, lap)


def linear(ctx: Context, op: Op, a: Jet, *args: Any, **kwargs: Any) -> Jet:
    """``op(a, *args)`` for an ``op`` linear in ``a`` with no constant term (views, sums,
    slices, ...): applied to the value and ``lap``, and to ``jac``'s directions (``lifted_jac``)."""
    value = op(a.value, *args, **kwargs)
    jac = lifted_jac(ctx, op, a, value, args, kwargs) if a.jac is not None and ctx.jac else None
    lap = None if a.lap is None else op(full_lap(a), *args, **kwargs)
    return Jet(value, jac, lap)


def lifted_jac(ctx: Context, op: Op, a: Jet, out: Any, args: Any, kwargs: Any) -> Any:
    """``op`` applied to every direction of ``a.jac`` (not ``None``), given its output ``out``
    on ``a.value``: written out for the ops in ``lifted.LIFTS``, else ``torch.vmap``."""
    entry = lifted(op, a.value.dim())
    if entry is not None:
        broadcast, lift = entry
        jac = aligned_jac(a, a.value.dim()) if broadcast else full_jac(ctx, a)
        out = lift(jac, a.value.dim(), out, *args, **kwargs)
        if out is not None:
            return out
    return torch.vmap(lambda j: op(j, *args, **kwargs))(full_jac(ctx, a))


@overload
def value_of(a: Jet | torch.Tensor) -> torch.Tensor: ...
@overload
def value_of(a: float) -> float: ...
def value_of(a: Jet | torch.Tensor | float) -> torch.Tensor | float:
    """A jet's value; a constant (tensor or number) as it is."""
    return a.value if isinstance(a, Jet) else a


def aligned_jac(a: Jet | torch.Tensor | float, ndim: int) -> torch.Tensor | None:
    """``a``'s ``jac`` with size-1 dimensions after ``K`` so that it has ``1 + ndim`` of them
    (broadcasting a tensor against a larger one would otherwise align ``K`` with a sample
    dimension)."""
    if not isinstance(a, Jet) or a.jac is None:
        return None
    missing = ndim + 1 - a.jac.dim()
    # (a tuple sum, not a star inside the subscript: mypy on Python 3.10 refuses that, pyvers31)
    return a.jac[(slice(None),) + (None,) * missing] if missing > 0 else a.jac


def lap_of(a: Jet | torch.Tensor | float) -> torch.Tensor | None:
    """A jet's ``lap``; ``None`` (zero) for a constant."""
    return a.lap if isinstance(a, Jet) else None
