"""Hutch++ trace estimator, per sample.

Meyer, Musco, Musco and Woodruff (2021), "Hutch++: Optimal stochastic trace estimation".
``m = 3c`` products: a sketch ``S`` of ``c`` random vectors, ``Q = orth(A S)`` (``c``
products), the trace on ``range(Q)`` exactly (``c`` products), and Hutchinson on the rest with
``c`` fresh probes ``G`` (``c`` products):

    tr(A) ~ tr(Q^T A Q) + (1/c) sum_j g_j^T P A P g_j,     P = I - Q Q^T.

``tr(A) = tr(Q^T A Q) + tr(P A P)`` for every ``Q``, and ``G`` is independent of ``Q``, so the
estimate is unbiased; its error is Hutchinson's on ``P A P``, which is small when ``A``'s
spectrum decays (exact when ``rank(A) <= c``, almost surely for Gaussian probes).

Terms and standard error: the estimate is the mean of the ``c`` terms
``tr(Q^T A Q) + g_j^T P A P g_j``. Given the sketch, the first part is fixed and the second
is i.i.d. over ``j``, so the terms' sample variance over ``c`` estimates the conditional
variance without bias. The conditional mean is ``tr(A)`` for every sketch, so the total
variance is the expectation of the conditional one, and the same sample variance estimates it
without bias: the standard error is the terms' standard deviation over ``sqrt(c)``.

Gradients: the basis ``Q`` is held constant (detached). For every fixed ``Q`` the estimate's
conditional mean is ``tr(A)`` whatever the parameters, so its gradient is an unbiased estimate
of ``grad tr(A)``; differentiating through the QR instead would add nothing in expectation and
gives NaN when a sample's sketch is rank deficient (a 2-D field with Rademacher probes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchdiv._estimators.sketch import combine, gram, qr


def terms(matmat: Callable[[torch.Tensor], torch.Tensor], vectors: torch.Tensor) -> torch.Tensor:
    """``(2c, N, n)`` vectors (sketch, then probes) -> every sample's ``c`` terms, ``(c, N)``."""
    c = vectors.shape[0] // 2
    sketch, probes = vectors[:c], vectors[c:]
    q, _ = qr(matmat(sketch).detach())  # see "Gradients" above
    low_rank = (q * matmat(q)).sum((0, 2))  # tr(Q^T A Q) of every sample
    deflated = probes - combine(q, gram(q, probes))  # P g_j
    return low_rank + (deflated * matmat(deflated)).sum(-1)
