"""Determinants, solves and Householder products whose derivatives of every order are
right, for nested autodiff.

PyTorch's first derivatives of ``slogdet``, ``det`` and ``solve`` are right, but the
derivatives of its derivative formulas are not (measured in float64 against finite
differences, see ``torchdiv._core.modes``). Here each op is an ``autograd.Function`` whose
``backward`` and ``jvp`` are written with differentiable ops that are right at every order:
the function itself, ``inv`` and products. With ``M = A^-1``:

    d log|det A| [Ȧ] = tr(M Ȧ),     grad_A log|det A| = M^T,
    d (A^-1 b) [Ȧ, ḃ] = A^-1 (ḃ - Ȧ X),   grad_b = A^-T g,  grad_A = -grad_b X^T.

``torchdiv._core.modes.SafeDerivatives`` runs ``f`` with these in place of PyTorch's ops. ``det``
is ``sign * exp(log|det|)`` (a singular ``A`` gives ``nan`` derivatives, as the Taylor rule's
``A^-1`` would).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import Function

Tensor = torch.Tensor


class _LogAbsDet(Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor) -> Tensor:  # type: ignore[override]
        with torch._C.DisableTorchFunction():  # no mode may replace the op again
            return torch.linalg.slogdet(a).logabsdet

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return grad[..., None, None] * torch.linalg.inv(a).mT

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return (torch.linalg.inv(a) * tangent.mT).sum((-2, -1))


class _Solve(Function):
    """``A^-1 B`` for ``B`` of shape ``(..., n, k)``, batch dimensions equal."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        with torch._C.DisableTorchFunction():
            return torch.linalg.solve(a, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0], output)
        ctx.save_for_forward(inputs[0], output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        a, x = ctx.saved_tensors
        grad_b = _Solve.apply(a.mT, grad)
        return -grad_b @ x.mT, grad_b

    @staticmethod
    def jvp(ctx: Any, da: Tensor | None, db: Tensor | None) -> Tensor:  # type: ignore[override]
        a, x = ctx.saved_tensors
        rhs = torch.zeros_like(x) if db is None else db
        return _Solve.apply(a, rhs if da is None else rhs - da @ x)


def _sign(a: Tensor) -> Tensor:
    with torch.no_grad(), torch._C.DisableTorchFunction():
        return torch.linalg.slogdet(a).sign


def slogdet(a: Tensor) -> Any:
    """``torch.linalg.slogdet``: ``(sign, log|det A|)``."""
    # torch.return_types.linalg_slogdet exists at run time; torch's stubs omit it
    return torch.return_types.linalg_slogdet((_sign(a), _LogAbsDet.apply(a)))  # type: ignore[attr-defined]


def logdet(a: Tensor) -> Tensor:
    """``torch.logdet``: ``log det A``, ``nan`` where ``det A < 0``."""
    return torch.where(_sign(a) < 0, torch.nan, _LogAbsDet.apply(a))


def det(a: Tensor) -> Tensor:
    """``torch.linalg.det``."""
    return _sign(a) * torch.exp(_LogAbsDet.apply(a))


def solve(a: Tensor, b: Tensor, *, left: bool = True) -> Tensor:
    """``torch.linalg.solve`` (``b`` a batch of vectors or of matrices, batches broadcast)."""
    if not left:  # X A = B  <=>  A^T X^T = B^T
        return solve(a.mT, b.mT).mT
    vector = b.dim() == 1 or (b.dim() == a.dim() - 1 and b.shape == a.shape[:-1])
    columns = b.unsqueeze(-1) if vector else b
    batch = torch.broadcast_shapes(a.shape[:-2], columns.shape[:-2])
    out = _Solve.apply(a.expand(*batch, *a.shape[-2:]), columns.expand(*batch, *columns.shape[-2:]))
    return out.squeeze(-1) if vector else out


def solve_ex(a: Tensor, b: Tensor, *, left: bool = True, check_errors: bool = False) -> Any:
    """``torch.linalg.solve_ex``: ``(solution, info)``."""
    with torch.no_grad(), torch._C.DisableTorchFunction():
        info = torch.linalg.solve_ex(a, b, left=left, check_errors=check_errors).info
    # torch.return_types.linalg_solve_ex exists at run time; torch's stubs omit it
    return torch.return_types.linalg_solve_ex((solve(a, b, left=left), info))  # type: ignore[attr-defined]


def cholesky_inverse(factor: Tensor, upper: bool = False) -> Tensor:
    """``torch.cholesky_inverse``: ``(C C^T)^-1`` for a lower ``C`` (``(U^T U)^-1`` if upper),
    reading only that triangle of ``factor``, as PyTorch does."""
    if upper:
        return torch.linalg.inv(factor.triu().mT @ factor.triu())
    return torch.linalg.inv(factor.tril() @ factor.tril().mT)


def householder_product(a: Tensor, tau: Tensor, *, out: Any = None) -> Tensor:
    """``torch.linalg.householder_product`` (``orgqr``): the first ``n`` columns of
    ``Q = H_1 ⋯ H_k``, ``H_i = I - τ_i v_i v_iᴴ``, ``v_i`` column ``i`` of ``a`` below the
    diagonal with a 1 on it, as products: ``q ← H_i q`` from ``i = k`` down, ``q = I[:, :n]``
    at first. PyTorch's derivatives of its forward-mode formula are wrong (off by 14-640% at
    the second order)."""
    if out is not None:
        raise TypeError("householder_product: out= is not supported inside torchdiv's engines")
    m, n = a.shape[-2:]
    rows = torch.arange(m, device=a.device)
    q = torch.eye(m, n, dtype=a.dtype, device=a.device).expand(*a.shape[:-2], m, n)
    for i in reversed(range(tau.shape[-1])):
        v = torch.where(rows > i, a[..., :, i], (rows == i).to(a.dtype))
        q = q - tau[..., i, None, None] * v[..., :, None] * (v.conj()[..., None, :] @ q)
    return q
