"""Girard-Hutchinson trace estimator, per sample.

Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for Laplacian
smoothing splines"; Girard (1989). With probes ``v_1..v_m`` drawn so that ``E[v v^T] = I``,

    tr(A) ~ (1/m) sum_j v_j^T A v_j,

unbiased, with variance ``Var(v^T A v) / m``; ``A`` enters by its symmetric part
``S = (A + A^T) / 2``: ``Var(v^T A v) = 2 ||S||_F^2 - 2 sum_i S_ii^2`` for Rademacher probes,
``2 ||S||_F^2`` for Gaussian ones (``2 ||A||_F^2`` only for a symmetric ``A``). The terms are
the ``m`` i.i.d. quadratic forms ``v_j^T A v_j``; standard error: their sample standard
deviation over ``sqrt(m)`` (undefined for ``m = 1``).
"""

from __future__ import annotations

import torch

from torchdiv._estimators.sketch import Operator


def terms(matmat: Operator, probes: torch.Tensor) -> torch.Tensor:
    """``m`` products: ``(m, N, n)`` probes -> every sample's terms ``v_j^T A v_j``, ``(m, N)``,
    formed chunk by chunk (``reduce``)."""
    return matmat(probes, reduce=lambda v, av: (v * av).sum(-1))
