"""XTrace: the exchangeable Hutch++ trace estimator, per sample.

Epperly, Tropp and Webber (2024), "XTrace: Making the most of every sample in stochastic trace
estimation", SIAM J. Matrix Anal. Appl. ``m = 2k`` products: ``Y = A W`` for ``k`` random
vectors ``w_i``, ``Q R = Y``, and ``A Q``. Every ``w_i`` in turn is left out of the sketch:
``Q_i`` spans the other ``k - 1`` columns of ``Y`` and ``w_i`` is an independent Hutchinson
probe of the rest,

    t_i = tr(Q_i^T A Q_i) + w_i^T P_i A P_i w_i,      P_i = I - Q_i Q_i^T,
    tr(A) ~ (1/k) sum_i t_i.

Each ``t_i`` is unbiased (as a Hutch++ estimate with a ``k - 1`` sketch), so their mean is.
No extra products are needed: ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T`` with ``s_i`` the
normalised ``i``-th column of ``R^{-T}`` (the direction orthogonal to every other column of
``R``), so every ``t_i`` is a few ``k x k`` operations on ``Q^T A Q``, ``Q^T W`` and ``Q^T A W``.
Exact when ``rank(A) < k`` and every ``k - 1`` of the ``A w_i`` span ``range(A)`` (almost
surely for Gaussian probes; Rademacher probes of a tiny event can repeat).

Terms and standard error: the terms are the ``k`` left-out estimates ``t_i``, and the standard
error is the paper's estimate, their spread,
``std(t_1..t_k) / sqrt(k)``. The ``t_i`` are not independent (they share the sketch), so this
is a heuristic, checked against the observed spread in ``tests/test_estimators.py``; it runs
low on decaying spectra (25-50% below the observed spread), so the tolerance mode does not rely
on it alone (see ``torchdiv._estimators.trace``).

Gradients: ``Q`` (and ``R``) are held constant. Each ``t_i`` has conditional mean ``tr(A)``
given ``Q_i``, which depends only on the other probes, so the gradient stays unbiased; the
QR's own backward would give NaN for rank-deficient sketches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchdiv._estimators.sketch import combine, gram, qr


def terms(matmat: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
    """``(k, N, n)`` random vectors, ``k <= n`` -> the left-out estimates ``t_i``, ``(k, N)``."""
    y = matmat(vectors)
    q, r = qr(y.detach())  # the basis is held constant for gradients, as in Hutch++
    aq = matmat(q)
    s = _left_out_directions(r)  # (N, k, k): column i is s_i
    h = gram(q, aq)  # Q^T A Q
    w = gram(q, vectors)  # column i: Q^T w_i
    # tr(Q_i^T A Q_i) = tr(Q^T A Q (I - s_i s_i^T))
    low_rank = h.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) - torch.einsum(
        "sji,sjl,sli->si", s, h, s
    )
    c = (s * w).sum(1)  # (N, k): s_i . Q^T w_i
    # z_i = A P_i w_i = A w_i - A Q (I - s_i s_i^T) Q^T w_i
    z = y - combine(aq, w - s * c[:, None, :])
    u = gram(q, z)  # column i: Q^T z_i
    # w_i^T P_i z_i = w_i^T z_i - (Q^T w_i)^T (I - s_i s_i^T) Q^T z_i
    residual = (vectors * z).sum(-1).T - (w * u).sum(1) + c * (s * u).sum(1)
    return (low_rank + residual).T  # (k, N); their spread is nan for k = 1


def _left_out_directions(r: torch.Tensor) -> torch.Tensor:
    """Unit vectors ``s_i`` orthogonal to every column of ``R`` but the ``i``-th, ``(N, k, k)``.

    ``s_i`` is row ``i`` of ``R^{-1}``, normalised. A rank-deficient sketch (``rank(A) < k``)
    has pivots of ``R`` at round-off level; they are raised to ``k`` ulps of the largest one,
    which keeps ``R^{-1}`` finite and points ``s_i`` along ``R``'s numerical null space, as the
    limit of the exact formula does.
    """
    k = r.shape[-1]
    scale = r.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    r = r / torch.where(scale > 0, scale, 1)[:, None, None]
    pivots = r.diagonal(dim1=-2, dim2=-1)
    floor = torch.full_like(pivots, k * torch.finfo(r.dtype).eps)  # not the default dtype
    raised = torch.where(pivots.abs() < floor, torch.where(pivots < 0, -floor, floor), pivots)
    r = r + torch.diag_embed(raised - pivots)
    eye = torch.eye(k, dtype=r.dtype, device=r.device).expand_as(r)
    inverse: torch.Tensor = torch.linalg.solve_triangular(r, eye, upper=True)
    rows = inverse / inverse.abs().amax(-1, keepdim=True)
    norms: torch.Tensor = torch.linalg.vector_norm(rows, dim=-1, keepdim=True)
    return (rows / norms).transpose(-2, -1)
