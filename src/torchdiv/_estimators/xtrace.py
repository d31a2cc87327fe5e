"""XTrace: the exchangeable Hutch++ trace estimator, per sample.

Epperly, Tropp and Webber (2024), "XTrace: Making the most of every sample in stochastic trace
estimation", SIAM J. Matrix Anal. Appl. ``m = 2k`` products: ``Y = A W`` for ``k`` random
vectors ``w_i``, ``Q R = Y``, and ``A Q``. Every ``w_i`` in turn is left out of the sketch:
``Q_i`` spans the other ``k - 1`` columns of ``Y`` and ``w_i`` is an independent Hutchinson
probe of the rest,

    t_i = tr(Q_i^T A Q_i) + w_i^T P_i A P_i w_i,      P_i = I - Q_i Q_i^T,
    tr(A) ~ (1/k) sum_i t_i.

Each ``t_i`` is unbiased (as a Hutch++ estimate with a ``k - 1`` sketch), so their mean is.
No extra products are needed: ``Q_i Q_i^T = Q (I - N_i) Q^T`` with ``N_i`` the projector onto
what the other columns of ``R`` miss of ``R^k`` (``_left_out_complements``; for a full-rank
``R``, ``s_i s_i^T`` with ``s_i`` the normalised row ``i`` of ``R^{-1}``), so every ``t_i`` is a
few ``k x k`` operations on ``Q^T A Q``, ``Q^T W`` and ``Q^T A W``. ``Q_i`` spans exactly the
``A w_j``, ``j != i``, whatever their rank, so it never depends on ``w_i``: Rademacher probes
of a small event repeat up to sign (``w_j = -w_i``, probability ``2^(1-n)`` a pair), and a
left-out sketch that kept ``A w_i`` through ``A w_j`` is still independent of ``w_i``.
Exact when ``rank(A) < k`` and every ``k - 1`` of the ``A w_i`` span ``range(A)`` (almost
surely for Gaussian probes; repeated Rademacher probes can leave a smaller sketch).

Terms and standard error: the terms are the ``k`` left-out estimates ``t_i``, and the standard
error is the paper's estimate, their spread, ``std(t_1..t_k) / sqrt(k)``. The ``t_i`` are not
independent (they share the sketch), so this is a heuristic, checked against the observed
spread in ``tests/estimators/test_estimators.py``; it runs low on decaying spectra (25-50%
below the observed spread), so the tolerance mode does not rely on it alone (see
``torchdiv._estimators.trace``).

Gradients: ``Q`` (and ``R``) are held constant. Each ``t_i`` has conditional mean ``tr(A)``
given ``Q_i``, which depends only on the other probes, so the gradient stays unbiased; the
QR's own backward would give NaN for rank-deficient sketches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from torchdiv._estimators.sketch import combine, gram, qr


def terms(matmat: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
    """``(k, N, n)`` random vectors, ``k <= n`` -> the left-out estimates ``t_i``, ``(k, N)``."""
    y = matmat(vectors)
    q, r = qr(y.detach())  # the basis is held constant for gradients, as in Hutch++
    aq = matmat(q)
    null, s, keep = _left_out_complements(r)
    h = gram(q, aq)  # Q^T A Q
    w = gram(q, vectors)  # column i: Q^T w_i
    # tr(Q_i^T A Q_i) = tr(Q^T A Q (I - N_i)),  N_i = U_0 U_0^T + beta_i s_i s_i^T
    low_rank = (
        h.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
        - (null * (h @ null)).sum((1, 2))[:, None]
        - keep * torch.einsum("sji,sjl,sli->si", s, h, s)
    )
    # p_i = (I - N_i) Q^T w_i, so that Q_i Q_i^T w_i = Q p_i
    p = w - null @ (null.mT @ w) - s * (keep * (s * w).sum(1))[:, None, :]
    z = y - combine(aq, p)  # z_i = A P_i w_i = A w_i - A Q p_i
    u = gram(q, z)  # column i: Q^T z_i
    # w_i^T P_i z_i = w_i^T z_i - p_i^T Q^T z_i
    residual = (vectors * z).sum(-1).T - (p * u).sum(1)
    return (low_rank + residual).T  # (k, N); their spread is nan for k = 1


def _left_out_complements(
    r: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each left-out sketch misses of ``range(R)``: ``N_i = U_0 U_0^T + beta_i s_i s_i^T``,
    the orthogonal projector onto the complement of the span of every column of ``R`` but the
    ``i``-th (``Q_i Q_i^T = Q (I - N_i) Q^T``).

    With ``R = U S V^T`` and ``U_0`` the left singular vectors of the numerically zero singular
    values (``R``'s left null space), ``u^T R`` vanishes off column ``i`` iff ``u = U_0 a + c s_i``
    with ``s_i`` the normalised row ``i`` of the pseudo-inverse ``R^+``, and ``c = 0`` where
    column ``i`` lies in the span of the others (``e_i`` meets ``R``'s null space,
    ``V_0[i] != 0``): then ``beta_i = 0``. A full-rank ``R`` has no ``U_0`` and every
    ``beta_i = 1``: ``N_i = s_i s_i^T``, ``s_i`` the normalised row ``i`` of ``R^{-1}``.

    Whether the columns of ``R_{-i}`` are dependent is a property of the other probes alone,
    so the left-out basis stays independent of ``w_i`` and ``t_i`` unbiased: Rademacher probes
    of a small event repeat up to sign (``w_j = -w_i``), and a sketch that kept ``A w_i``
    (through ``A w_j``) while dropping a direction as if it were full rank was biased. A
    zero operator (``R = 0``) has ``N_i = I``: no sketch.

    Returns:
        ``U_0`` as ``(N, k, k)`` with the other columns zeroed, ``s`` as ``(N, k, k)`` (column
        ``i`` is ``s_i``, zero where ``R`` has no such direction) and ``beta``, ``(N, k)``.
    """
    k = r.shape[-1]
    # a sample whose products are not finite (a nan or inf in its x or f(x)) has no SVD, and
    # LAPACK's error stopped the whole batch: its R is taken as 0 (no sketch), and its terms
    # stay non-finite through its Q and products, as a loop over the samples would leave them
    r = torch.where(torch.isfinite(r).flatten(-2).all(-1)[:, None, None], r, 0)
    u, sigma, vh = torch.linalg.svd(r)
    eps = torch.finfo(r.dtype).eps
    # round-off makes a repeated sketch column's singular value a few ulps of the largest
    # (eps^0.8: 25 ulps in float32, where eps^(2/3), 200, took a tanh net's genuine
    # directions 3e-6 of the largest for zeros and its estimates 1e-2 off)
    zero = sigma <= eps**0.8 * sigma[..., :1]  # (N, k); all of a zero R
    null = u * zero[:, None, :]
    inverse = torch.where(zero, 0, 1 / torch.where(zero, 1, sigma))
    rows = u @ (inverse[:, :, None] * vh)  # column i: R^{+T} e_i, i.e. row i of R^+
    norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    s = rows / torch.where(norms > 0, norms, 1)
    # column i in the span of the others: e_i has a part in R's (right) null space, above the
    # round-off of that space: its perturbation (the largest zero singular value, at least
    # eps times the largest) over the gap to the smallest other one. Not an absolute floor:
    # ``A w_i`` through ``A w_j`` 1e-5 times as long (R = [[a, b], [0, 0]]) meets it by b/a.
    part = torch.linalg.vector_norm(vh.mT * zero[:, None, :], dim=-1)  # (N, k)
    kept = torch.where(zero, math.inf, sigma).amin(-1)  # inf where R has only zeros
    perturbation = torch.maximum(torch.where(zero, sigma, 0).amax(-1), eps * sigma[..., 0])
    # (at most 0.1: a gap within 1000 k round-offs, common in float32, made every column
    # independent, and each left-out sketch of a rank-deficient R dropped a direction it spans)
    involved = part > (10 * k * perturbation / kept).clamp(max=0.1)[:, None]
    keep = ((~involved) & (norms[:, 0] > 0)).to(r.dtype)
    return null, s, keep
