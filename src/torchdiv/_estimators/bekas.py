"""Stochastic diagonal estimator of Bekas, Kokiopoulou and Saad, per sample.

Bekas, Kokiopoulou and Saad (2007), "An estimator for the diagonal of a matrix". With probes
``v_1..v_m``, ``E[v v^T] = I``,

    diag(A) ~ (1/m) sum_j v_j * (A v_j)          (elementwise products),

unbiased: ``E[v_i (A v)_i] = sum_l A_il E[v_i v_l] = A_ii``. Rademacher probes are the usual
choice: the error of entry ``i`` is then ``sum_{l != i} A_il v_i v_l``, free of ``A_ii``.
"""

from __future__ import annotations

import torch

from torchdiv._estimators.sketch import Operator


def estimate(matmat: Operator, probes: torch.Tensor) -> torch.Tensor:
    """``m`` products: ``(m, N, n)`` probes -> per-sample diagonal estimate, ``(N, n)``, the
    chunks' sums of ``v * A v`` added as they come (``reduce``, ``add``)."""
    return matmat(probes, reduce=lambda v, av: (v * av).sum(0), add=True) / len(probes)
