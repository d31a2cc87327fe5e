"""Per-sample linear algebra on stacks of probe vectors, batched over samples.

The estimators hold ``k`` vectors of every sample as one ``(k, N, n)`` tensor (vector, sample,
flattened event). Per-sample matrices built from them are ``(N, k, k)`` stacks, so every
factorisation runs once over all samples (``torch.linalg`` batches), never in a Python loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

# (a chunk of vectors, their products) -> what to keep of them
Reduce = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Operator(Protocol):
    """``(k, N, n)`` vectors -> their products ``A v``, ``(k, N, n)``; with ``reduce``, the
    concatenation of ``reduce(v, A v)`` over the chunks the products are taken in (``add``:
    their sum), so that an estimator that keeps only a reduction (``v^T A v``) never holds
    every product at once."""

    def __call__(
        self, v: torch.Tensor, /, reduce: Reduce | None = None, add: bool = False
    ) -> torch.Tensor: ...


def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(k, N, n)``, ``(l, N, n)`` -> ``(N, k, l)``: ``[s, i, j] = a_i . b_j`` in sample s."""
    return torch.einsum("isn,jsn->sij", a, b)


def combine(vectors: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``(k, N, n)`` vectors, ``(N, k, l)`` -> ``(l, N, n)``: ``sum_i c[s,i,j] v_i``."""
    return torch.einsum("isn,sij->jsn", vectors, coefficients)


def qr(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample thin QR of the ``n x k`` matrix whose columns are a sample's ``k`` vectors.

    Returns:
        ``Q`` as ``(c, N, n)`` orthonormal vectors (``c = min(k, n)``), and ``R`` as ``(N, c, k)``.
        Householder QR, so ``Q`` is orthonormal even when the vectors are linearly dependent.
    """
    q, r = torch.linalg.qr(vectors.permute(1, 2, 0))
    return q.permute(2, 0, 1), r


def standard_error(terms: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean of ``m`` i.i.d. terms per sample: ``(m, N)`` -> ``(N,)``.

    ``sqrt(s^2 / m)`` with the unbiased sample variance ``s^2``; ``nan`` for ``m = 1``.
    """
    m = terms.shape[0]
    if m < 2:
        return torch.full_like(terms[0], math.nan)
    if terms[0].numel() == 0:  # no samples: nothing to reduce (std would warn)
        return terms[0].clone()
    return terms.std(0) / math.sqrt(m)
