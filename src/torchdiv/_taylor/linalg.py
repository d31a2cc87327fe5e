"""Rules for linear algebra: determinants, inverses, solves, Cholesky and symmetric eigenvalues.

For a matrix ``A(x)`` with directional derivatives ``Ȧ_k`` (``jac``) and collapsed second term
``L = sum_k Ä_k`` (``lap``), write ``M_k = A^-1 Ȧ_k``:

- ``log|det A|``: ``jac_k = tr M_k``, ``lap = tr(A^-1 L) - sum_k tr(M_k M_k)``.
- ``det A``, ``adj = det A^-1``: ``jac_k = tr(adj Ȧ_k)``, ``lap = tr(adj L) +
  sum_k tr(A^-1 C_k Ȧ_k)``, ``C_k = tr(adj Ȧ_k) I - Ȧ_k adj``, in float64 (its terms cancel
  near a singular ``A``).
- ``A^-1 = B``: ``jac_k = -B Ȧ_k B``, ``lap = B (2 sum_k Ȧ_k B Ȧ_k - L) B``.
- ``X = A^-1 b`` (either may depend on x): ``Ẋ_k = A^-1 (ḃ_k - Ȧ_k X)``,
  ``lap = A^-1 (L_b - L_A X - 2 sum_k Ȧ_k Ẋ_k)``.
- ``A = C C^T`` (Cholesky, ``C`` lower): ``Ċ_k = C Φ(C^-1 Ȧ_k C^-T)`` with ``Φ`` the lower
  triangle with halved diagonal, and ``lap = C Φ(C^-1 (L - 2 sum_k Ċ_k Ċ_k^T) C^-T)`` (the
  same map applied to the second derivative of ``C C^T = A``).
- eigenvalues ``λ_i`` of a symmetric ``A = V diag(λ) V^T``, with ``P_k = V^T Ȧ_k V``:
  ``jac_{k,i} = (P_k)_ii``, ``lap_i = (V^T L V)_ii + 2 sum_k sum_{j != i} (P_k)_ij^2 /
  (λ_i - λ_j)`` (first- and second-order perturbation theory; it assumes *distinct*
  eigenvalues, as PyTorch's own derivatives of ``eigh`` do). Eigenvectors have no rule.

Determinants need an invertible ``A``, Cholesky a positive definite one. ``cholesky`` and
``eigh`` read one triangle of ``A`` (``upper``/``UPLO``), so the jets are symmetrised from the
same triangle. The rules use only ``inv``, ``solve``, ``solve_triangular``, ``eigh``, matrix
products and the ops' own values: their first derivatives are right in PyTorch, so the result
is differentiable with respect to the parameters by ordinary autograd. (The higher-order
derivative formulas PyTorch has for these ops are not all right: see ``torchdiv._core.modes``.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from torchdiv._core.linalg import inverse
from torchdiv._taylor.jet import (
    Context,
    Jet,
    UnsupportedOp,
    aligned_jac,
    full_jac,
    full_lap,
    value_of,
)

aten = torch.ops.aten
Tensor = torch.Tensor


class Missing(Jet):
    """An output whose derivatives no rule computes (the eigenvectors of ``eigh``): its value
    may be read (``detach`` does), its ``jac`` or ``lap`` raise ``UnsupportedOp`` naming it."""

    def __init__(self, value: Tensor, what: str) -> None:  # jac, lap unset: lookups fail
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "what", what)

    def __getattr__(self, name: str) -> Any:
        if name in ("jac", "lap"):
            raise UnsupportedOp(self.what)
        raise AttributeError(name)


def _columns(op: Callable[[Tensor], Tensor], r: Tensor) -> Tensor:
    """``op`` (a map acting on each column, such as ``A^-1 @``) applied to ``r`` of shape
    ``(K, ..., n, m)`` in one call, the ``K`` directions folded into the columns."""
    k, m = r.shape[0], r.shape[-1]
    folded = op(r.movedim(0, -2).flatten(-2))
    return folded.unflatten(-1, (k, m)).movedim(-2, 0)


def _trace(p: Tensor, q: Tensor) -> Tensor:
    """``tr(p q)`` over the last two dimensions."""
    return (p * q.mT).sum((-2, -1))


def _jets(ctx: Context, a: Jet) -> tuple[Tensor, Tensor | None]:
    """``(Ȧ, L)``: ``jac`` expanded to ``(K,) + A.shape``, and ``lap`` (``None`` when no
    second order is wanted)."""
    return full_jac(ctx, a), full_lap(a) if ctx.second_order else None


def _log_abs_det(ctx: Context, a: Jet) -> tuple[Tensor, Tensor | None]:
    """``log|det A|``'s ``(jac, lap)``; ``tr(A^-1 Ȧ_k)`` as an elementwise product with
    ``A^-T`` (``inv`` costs one ``n^3`` per sample, a solve per direction ``K`` of them)."""
    inv_t = inverse(a.value).mT
    jac = aligned_jac(a, a.value.dim())
    d1 = a.value.new_zeros(()) if jac is None else (jac * inv_t).sum((-2, -1))
    d2 = None
    if ctx.second_order:
        d2 = (full_lap(a) * inv_t).sum((-2, -1))
        if jac is not None:
            square = jac.expand(*jac.shape[:-2], *a.value.shape[-2:])  # stored broadcast
            m = inv_t.mT @ square  # M_k = A^-1 Ȧ_k
            d2 = d2 - _trace(m, m).sum(0)
    return d1.expand(ctx.num_directions, *a.shape[:-2]), d2


def _slogdet(ctx: Context, a: Jet) -> tuple[Tensor | Jet, Jet, Tensor, Tensor]:
    """``(sign, log|det A|)``. A complex ``A``: ``log det A = log|det A| + i θ`` (its terms
    from ``_log_abs_det``, complex), so ``log|det A|`` takes their real parts and ``sign =
    e^{iθ}`` has ``jac_k = i sign θ_k`` and ``lap = sign (i Σθ'' - Σ_k θ_k^2)`` (the sign was
    taken for a constant, as a real ``A``'s: Laplacians through it 20 % off, rev-complex25)."""
    sign, value, lu, pivots = aten._linalg_slogdet(a.value)
    d1, d2 = _log_abs_det(ctx, a)
    if not a.value.is_complex():
        return sign, Jet(value, d1 if ctx.jac else None, d2), lu, pivots
    turn = d1.imag
    phase = None if d2 is None else sign * (1j * d2.imag - turn.square().sum(0))
    spin = Jet(sign, 1j * sign * turn if ctx.jac else None, phase)
    modulus = Jet(value, d1.real if ctx.jac else None, None if d2 is None else d2.real)
    return spin, modulus, lu, pivots


def _wide(t: Tensor) -> Tensor:
    """``t`` in float64 (complex128) where it is of a lower precision (not on ``mps``, which has
    no float64)."""
    if t.device.type == "mps" or t.dtype in (torch.float64, torch.complex128):
        return t
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _det(ctx: Context, a: Jet) -> tuple[Jet, Tensor, Tensor]:
    """``det A`` through the adjugate ``adj = det A^-1``: ``jac_k = tr(adj Ȧ_k)`` and ``lap =
    tr(adj L) + sum_k tr(A^-1 C_k Ȧ_k)``, ``C_k = tr(adj Ȧ_k) I - Ȧ_k adj`` (``d adj[Ȧ] =
    A^-1 C``), the last term as ``tr(C_k Q_k) = jac_k tr Q_k - det tr(Q_k^2)``, ``Q_k = Ȧ_k
    A^-1`` (one product per direction). Near a singular ``A`` these terms are
    ``sigma_{n-1} / sigma_min`` larger than the sum in every grouping tried: a float32 Slater
    determinant's Laplacian with two electrons 1e-3 apart was up to 2000x the float32
    grad-of-grad loop's error from 8 electrons (1300x through ``log|det|`` with 4). So the rule
    runs in float64 (complex128): its inputs' own round-off then dominates, 0.5-1.9x the loop's
    error for 2-16 electrons, values and parameter gradients (rev-merges24a)."""
    det, lu, pivots = aten._linalg_det(a.value)
    value = _wide(a.value)
    inv = inverse(value)
    wide_det = det if value is a.value else aten._linalg_det(value)[0]  # (float64 in: f's own)
    adj = wide_det[..., None, None] * inv
    jac = aligned_jac(a, a.value.dim())
    jac = None if jac is None else _wide(jac)
    d1 = value.new_zeros(()) if jac is None else (jac * adj.mT).sum((-2, -1))
    lap = None
    if ctx.second_order:
        lap = (_wide(full_lap(a)) * adj.mT).sum((-2, -1))
        if jac is not None:
            square = jac.expand(*jac.shape[:-2], *a.value.shape[-2:])  # stored broadcast
            q = square @ inv
            trace = q.diagonal(dim1=-2, dim2=-1).sum(-1)
            lap = lap + (d1 * trace - wide_det * _trace(q, q)).sum(0)
        lap = lap.to(det.dtype)
    jac_det = d1.to(det.dtype).expand(ctx.num_directions, *a.shape[:-2]) if ctx.jac else None
    return Jet(det, jac_det, lap), lu, pivots


def _inv(ctx: Context, a: Jet, check_errors: bool = False) -> tuple[Jet, Tensor]:
    b, info = aten.linalg_inv_ex(a.value, check_errors=check_errors)
    jac, lap = _jets(ctx, a)
    jac_b = -(b @ jac @ b)
    lap_b = None
    if lap is not None:
        lap_b = b @ (2 * (jac @ b @ jac).sum(0) - lap) @ b
    return Jet(b, jac_b if ctx.jac else None, lap_b), info


def _solve(
    ctx: Context, a: Jet | Tensor, b: Jet | Tensor, *, left: bool = True, check_errors: bool = False
) -> tuple[Jet, Tensor, Tensor, Tensor]:
    if not left:
        raise UnsupportedOp("aten._linalg_solve_ex with left=False (only left=True has a rule)")
    av, bv = value_of(a), value_of(b)
    x, lu, pivots, info = aten._linalg_solve_ex(av, bv, left=True, check_errors=check_errors)
    vector = bv.dim() == 1 or (bv.dim() == av.dim() - 1 and bv.shape == av.shape[:-1])
    xc = x.unsqueeze(-1) if vector else x  # columns
    solve = functools.partial(torch.linalg.solve, av)
    rhs = torch.zeros_like(xc).expand(ctx.num_directions, *xc.shape)  # ḃ_k - Ȧ_k X
    rhs2 = torch.zeros_like(xc)  # L_b - L_A X, then - 2 sum_k Ȧ_k Ẋ_k
    if isinstance(b, Jet):
        rhs = rhs + (full_jac(ctx, b).unsqueeze(-1) if vector else full_jac(ctx, b))
        rhs2 = rhs2 + (full_lap(b).unsqueeze(-1) if vector else full_lap(b))
    ja = full_jac(ctx, a) if isinstance(a, Jet) else None
    if ja is not None:
        rhs = rhs - ja @ xc
    jac = _columns(solve, rhs)
    lap = None
    if ctx.second_order:
        if isinstance(a, Jet) and ja is not None:  # (isinstance: for the type checkers)
            rhs2 = rhs2 - full_lap(a) @ xc - 2 * (ja @ jac).sum(0)
        lap = solve(rhs2)
        lap = lap.squeeze(-1) if vector else lap
    jac = jac.squeeze(-1) if vector else jac
    jet = Jet(x, jac if ctx.jac else None, lap)
    return jet, lu, pivots, info


def _symmetric(t: Tensor, upper: bool) -> Tensor:
    """The symmetric matrix that ``cholesky``/``eigh`` see in ``t``: one triangle, mirrored."""
    if upper:
        return t.triu() + t.triu(1).mT
    return t.tril() + t.tril(-1).mT


def _phi(t: Tensor) -> Tensor:
    """The lower triangle of ``t`` with its diagonal halved."""
    return t.tril(-1) + 0.5 * t.diagonal(dim1=-2, dim2=-1).diag_embed()


def _cholesky(
    ctx: Context, a: Jet, *, upper: bool = False, check_errors: bool = False
) -> tuple[Jet, Tensor]:
    c, info = aten.linalg_cholesky_ex(a.value, upper=upper, check_errors=check_errors)
    c = c.mT if upper else c  # lower: A = C C^T
    jac, lap = _jets(ctx, a)

    def tangent(s: Tensor) -> Tensor:  # C Φ(C^-1 S C^-T) for symmetric S, (K, ..., n, n)
        half = _columns(lambda r: torch.linalg.solve_triangular(c, r, upper=False), s)
        inner = _columns(lambda r: torch.linalg.solve_triangular(c, r, upper=False), half.mT)
        return c @ _phi(inner)

    d1 = tangent(_symmetric(jac, upper))
    d2 = None
    if lap is not None:
        d2 = tangent((_symmetric(lap, upper) - 2 * (d1 @ d1.mT).sum(0))[None])[0]
    if upper:
        c, d1, d2 = c.mT, d1.mT, None if d2 is None else d2.mT
    return Jet(c, d1 if ctx.jac else None, d2), info


def _eigh(ctx: Context, a: Jet, uplo: str = "L", compute_v: bool = True) -> tuple[Jet, Missing]:
    eigenvalues, v = torch.linalg.eigh(a.value, UPLO=uplo)
    jac, lap = _jets(ctx, a)
    upper = uplo.upper() == "U"
    p = v.mT @ _symmetric(jac, upper) @ v  # P_k = V^T Ȧ_k V
    d1 = p.diagonal(dim1=-2, dim2=-1)
    d2 = None
    if lap is not None:
        gaps = eigenvalues[..., :, None] - eigenvalues[..., None, :]  # λ_i - λ_j
        # 1 / (λ_i - λ_j), 0 for i = j and for repeated eigenvalues: within a cluster the
        # terms cancel in pairs (P_k is symmetric), so sums over a cluster stay exact
        apart = gaps != 0
        weights = torch.where(apart, 1 / torch.where(apart, gaps, 1), 0)
        curvature = (v.mT @ _symmetric(lap, upper) @ v).diagonal(dim1=-2, dim2=-1)
        d2 = curvature + 2 * (p.square().sum(0) * weights).sum(-1)
    missing = Missing(v, "the eigenvectors of aten._linalg_eigh (only eigenvalues have a rule)")
    return Jet(eigenvalues, d1 if ctx.jac else None, d2), missing


RULES: dict[Any, Callable[..., Any]] = {
    aten._linalg_slogdet.default: _slogdet,
    aten._linalg_det.default: _det,
    aten.linalg_inv_ex.default: _inv,
    aten._linalg_solve_ex.default: _solve,
    aten.linalg_cholesky_ex.default: _cholesky,
    aten._linalg_eigh.default: _eigh,
}
