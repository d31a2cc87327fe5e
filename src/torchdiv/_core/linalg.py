"""Determinants, solves, Householder products and norms whose derivatives of every order
are right, for nested autodiff.

PyTorch's first derivatives of ``slogdet``, ``det`` and ``solve`` are right, but the
derivatives of its derivative formulas are not (measured in float64 against finite
differences, see ``torchdiv._core.modes``). Here each op is an ``autograd.Function`` whose
``backward`` and ``jvp`` are written with differentiable ops that are right at every order:
the function itself, ``inv`` and products. With ``M = A^-1``:

    d log|det A| [Ȧ] = tr(M Ȧ),     grad_A log|det A| = M^T,
    d (A^-1 b) [Ȧ, ḃ] = A^-1 (ḃ - Ȧ X),   grad_b = A^-H g,  grad_A = -grad_b X^H.

A complex ``A`` (a wavefunction's orbitals, ``exp(i k·r)``) has the holomorphic
``log det A = log|det A| + i θ`` with the same ``d log det A [Ȧ] = tr(M Ȧ)``; its gradient
in PyTorch's convention (the conjugate Wirtinger derivative) is ``g · M^H``. ``slogdet``
and ``det`` of a complex ``A`` are then ``(exp(i Im log det), Re log det)`` and
``exp(log det)``: the sign's phase carries derivatives (the real ``A``'s sign, ±1, has none).
Until a review found it, a complex ``A`` took the real formulas (``M^T``, a sign without
derivatives): Laplacians of a complex Slater determinant 240% off.

``torchdiv._core.modes.SafeDerivatives`` runs ``f`` with these in place of PyTorch's ops. ``det``
is ``sign * exp(log|det|)`` (a singular ``A`` gives ``nan`` derivatives, as the Taylor rule's
``A^-1`` would: ``inverse``, whose ``inf``/``nan`` stay in the samples whose ``A`` is singular).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.autograd import Function
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from torchdiv._core.nested import refuse_nested_forward

Tensor = torch.Tensor


def inverse(a: Tensor) -> Tensor:
    """``A^-1`` of each matrix of ``a`` without LAPACK's check: an exactly singular matrix (one
    sample's orbitals at a node of its determinant) gets ``inf``/``nan`` entries, where
    ``torch.linalg.inv`` raised for the whole batch."""
    return torch.linalg.inv_ex(a).inverse


class _LogDet(Function):
    """``log|det A|`` of a real ``A``; of a complex ``A`` the complex ``log det A =
    log|det A| + i θ`` (``θ`` the sign's angle), a holomorphic function. Both: ``jvp``
    ``tr(A^-1 Ȧ)``, ``backward`` ``g · A^-H`` (``A^-T`` for a real ``A``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: Tensor) -> Tensor:  # type: ignore[override]
        with torch._C.DisableTorchFunction():  # no mode may replace the op again
            sign, logabs = torch.linalg.slogdet(a)
            return torch.complex(logabs, torch.angle(sign)) if a.is_complex() else logabs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return grad[..., None, None] * inverse(a).mH

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:  # type: ignore[override]
        refuse_nested_forward("det/slogdet/logdet")
        (a,) = ctx.saved_tensors
        return (inverse(a) * tangent.mT).sum((-2, -1))


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
        grad_b = _Solve.apply(a.mH, grad)  # (mH: PyTorch's convention for complex A, b)
        return -grad_b @ x.mH, grad_b

    @staticmethod
    def jvp(ctx: Any, da: Tensor | None, db: Tensor | None) -> Tensor:  # type: ignore[override]
        refuse_nested_forward("solve")
        a, x = ctx.saved_tensors
        rhs = torch.zeros_like(x) if db is None else db
        return _Solve.apply(a, rhs if da is None else rhs - da @ x)


def _sign(a: Tensor) -> Tensor:
    """The sign of ``det A``, a constant without derivatives of either mode (forward mode's
    would be 0, and from torch 2.15 on its formula raises where ``A`` is singular), taken after
    ``_LogDet.apply(a)`` (``logdet``: an op with grad on between): the sample-mixing watch takes
    the results of a custom Function's ``forward`` run right after an op under ``no_grad`` for
    constants (``BatchAxes._settle``), and so missed ``det``/``slogdet`` of matrices across
    samples (det25)."""
    with torch.no_grad(), _set_fwd_grad_enabled(False), torch._C.DisableTorchFunction():
        return torch.linalg.slogdet(a).sign


def slogdet(a: Tensor) -> Any:
    """``torch.linalg.slogdet``: ``(sign, log|det A|)``; a complex ``A``'s sign
    ``exp(i θ)`` differentiable."""
    if a.is_complex():
        log_det = _LogDet.apply(a)
        sign, logabs = torch.exp(1j * log_det.imag), log_det.real
    else:
        logabs = _LogDet.apply(a)
        sign = _sign(a)
    # torch.return_types.linalg_slogdet exists at run time; torch's stubs omit it
    return torch.return_types.linalg_slogdet((sign, logabs))  # type: ignore[attr-defined]


def logdet(a: Tensor) -> Tensor:
    """``torch.logdet``: ``log det A``, ``nan`` where a real ``det A < 0`` (a complex ``A``:
    the complex logarithm, as PyTorch's)."""
    if a.is_complex():
        return _LogDet.apply(a)
    return torch.where(_sign(a) < 0, torch.nan, _LogDet.apply(a))


def det(a: Tensor) -> Tensor:
    """``torch.linalg.det``."""
    if a.is_complex():
        return torch.exp(_LogDet.apply(a))
    logabs = _LogDet.apply(a)
    return _sign(a) * torch.exp(logabs)


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
    """``torch.cholesky_inverse``: ``(C C^H)^-1`` for a lower ``C`` (``(U^H U)^-1`` if upper),
    reading only that triangle of ``factor``, as PyTorch does."""
    if upper:
        return torch.linalg.inv(factor.triu().mH @ factor.triu())
    return torch.linalg.inv(factor.tril() @ factor.tril().mH)


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


# Norms. PyTorch's backward formulas of ``linalg_vector_norm`` (p != 1, 0, inf), ``norm``,
# ``dist``, ``renorm`` and ``std`` mask their zeros in place (``masked_fill_``), which forward
# mode cannot differentiate: the gradient of a Laplacian by forward over reverse raises "modified
# by an inplace operation". Here ``||a||_p = (sum_i |a_i|^p)^(1/p)`` from elementwise powers and
# a sum, with PyTorch's convention where it is not differentiable: 0 at a zero entry (``|a|^p``)
# and at a zero vector (the root), at every order.


def _powers(a: Tensor, p: float) -> Tensor:
    """``|a|^p`` elementwise (``p > 0``, real result), every derivative 0 where ``a`` is 0
    (exact for an entry that is 0 for every ``x``, as a masked one)."""
    if not a.is_complex() and p in (1, 2):
        return a.abs() if p == 1 else a.square()
    base = torch.view_as_real(a).square().sum(-1) if a.is_complex() else a.abs()
    if a.is_complex() and p == 2:  # re^2 + im^2, smooth: masked, its 2nd derivative at 0 was 0
        return base
    p = p / 2 if a.is_complex() else p
    nonzero = base != 0  # nan stays nan
    safe = torch.where(nonzero, base, torch.ones_like(base))
    return torch.where(nonzero, safe**p, torch.zeros_like(base))


def root(s: Tensor, p: float) -> Tensor:
    """``s^(1/p)`` of a sum ``s >= 0``, every derivative 0 where ``s`` is 0."""
    nonzero = s != 0
    safe = torch.where(nonzero, s, torch.ones_like(s))
    out = safe.sqrt() if p == 2 else safe ** (1 / p)
    return torch.where(nonzero, out, torch.zeros_like(out))


def vector_norm(
    a: Tensor, ord: Any = 2, dim: Any = None, keepdim: bool = False, *, dtype: Any = None
) -> Tensor:
    """``torch.linalg.vector_norm``: ``(sum |a_i|^p)^(1/p)`` over ``dim`` (all if ``None``)
    for ``0 < p < inf``, ``max |a_i|`` (``min``) for ``p = inf`` (``-inf``): selections whose
    derivatives are PyTorch's (ties share them equally), with Taylor rules; PyTorch's op for
    ``p = 0``, negative ``p`` and empty ``a`` (counts and reciprocals, right). A float16 or
    bfloat16 ``a`` in float32, rounded once, as PyTorch's."""
    a = a if dtype is None else a.to(dtype)
    p = float(ord)
    if abs(p) == math.inf and a.numel() > 0:
        extreme = torch.amax if p > 0 else torch.amin
        return extreme(a.abs(), () if dim is None else dim, keepdim)
    if not 0 < p < math.inf:
        return torch.linalg.vector_norm(a, ord, dim, keepdim)
    if a.dtype in (torch.float16, torch.bfloat16):  # (|a|^2 overflowed float16 from |a| = 256)
        return vector_norm(a.float(), p, dim, keepdim).to(a.dtype)
    return root(_powers(a, p).sum(dim, keepdim), p)


def norm(
    a: Tensor,
    p: Any = "fro",
    dim: Any = None,
    keepdim: bool = False,
    out: None = None,
    dtype: Any = None,
) -> Tensor:
    """``torch.norm`` (and ``Tensor.norm``): a vector norm, or PyTorch's matrix norms by
    name (``"nuc"``; ``"fro"`` over more than two dimensions refused there). ``out`` is
    ``None`` here (``SafeDerivatives`` leaves a call with one to PyTorch)."""
    dims = [dim] if isinstance(dim, int) else dim
    if isinstance(p, str) and (p != "fro" or (dims is not None and len(dims) > 2)):
        return torch.norm(a, p, dim, keepdim, dtype=dtype)
    return vector_norm(a, 2 if p is None or isinstance(p, str) else p, dims, keepdim, dtype=dtype)


def tensor_norm(
    a: Tensor, p: Any = "fro", dim: Any = None, keepdim: bool = False, dtype: Any = None
) -> Tensor:
    """``Tensor.norm`` (``dtype`` its fifth positional argument)."""
    return norm(a, p, dim, keepdim, dtype=dtype)


def matrix_norm(
    a: Tensor, ord: Any = "fro", dim: Any = (-2, -1), keepdim: bool = False, *, dtype: Any = None
) -> Tensor:
    """``torch.linalg.matrix_norm``: Frobenius as the vector 2-norm over ``dim``; the others
    are PyTorch's (singular values, maxima of 1-norms: right)."""
    if ord != "fro" or a.dim() < 2 or len(dim) != 2:
        return torch.linalg.matrix_norm(a, ord, dim, keepdim, dtype=dtype)
    return vector_norm(a, 2, dim, keepdim, dtype=dtype)


def linalg_norm(
    a: Tensor, ord: Any = None, dim: Any = None, keepdim: bool = False, *, dtype: Any = None
) -> Tensor:
    """``torch.linalg.norm``: a matrix norm where ``ord`` is given and ``dim`` (or ``a``) has
    two dimensions, else a vector norm (2 by default); shapes PyTorch refuses go to it."""
    dims = (dim,) if isinstance(dim, int) else dim
    count = a.dim() if dims is None else len(dims)
    if (dims is not None or ord is not None) and count not in (1, 2):
        return torch.linalg.norm(a, ord, dim, keepdim, dtype=dtype)  # PyTorch's error
    if ord is not None and count == 2:
        return matrix_norm(a, ord, (0, 1) if dims is None else dims, keepdim, dtype=dtype)
    if isinstance(ord, str):  # a matrix norm of one dimension
        return torch.linalg.norm(a, ord, dim, keepdim, dtype=dtype)  # PyTorch's error
    return vector_norm(a, 2 if ord is None else ord, dims, keepdim, dtype=dtype)


def normalize(
    a: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out: None = None
) -> Tensor:
    """``F.normalize``: ``a / max(||a||_p, eps)`` along ``dim`` (``out``: as in ``norm``)."""
    return a / vector_norm(a, p, dim, True).clamp_min(eps)


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """``F.cosine_similarity``: ``sum (x1 / max(|x1|, eps)) (x2 / max(|x2|, eps))`` along
    ``dim``, inputs broadcast. (PyTorch clamps the norms outside autograd, so its first
    derivatives below ``eps`` are not those of its values; here they are.)"""
    x1, x2 = torch.broadcast_tensors(x1, x2)
    return (normalize(x1, 2, dim, eps) * normalize(x2, 2, dim, eps)).sum(dim)


def pairwise_distance(
    x1: Tensor, x2: Tensor, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False
) -> Tensor:
    """``F.pairwise_distance``: ``||x1 - x2 + eps||_p`` along the last dimension."""
    return vector_norm(x1 - x2 + eps, p, -1, keepdim)


def dist(a: Tensor, other: Tensor, p: float = 2) -> Tensor:
    """``torch.dist``: ``||a - other||_p`` over every element (broadcast)."""
    return vector_norm(a - other, p)


def renorm(a: Tensor, p: float, dim: int, maxnorm: float) -> Tensor:
    """``torch.renorm``: each slice along ``dim`` whose ``p``-norm exceeds ``maxnorm`` scaled
    by ``maxnorm / (norm + 1e-7)`` (PyTorch's constant)."""
    others = [d for d in range(a.dim()) if d != dim % max(a.dim(), 1)]
    size = vector_norm(a, p, others, True)
    return a * torch.where(size > maxnorm, maxnorm / (size + 1e-7), torch.ones_like(size))
