"""The stochastic trace estimators, in one registry with one signature.

Every estimator takes ``matmat`` (``(k, N, n)`` vectors -> ``A`` times each, per sample) and
its random vectors ``(r, N, n)``, and returns per-sample terms ``(m, N)``: the estimate is
their mean, its standard error their standard error of the mean. It never touches autograd,
so it works on any batched square operator: a Jacobian (``A V`` by JVPs, or ``A^T V`` by
VJPs: same trace), a Hessian, a dense matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from torchdiv._estimators import hutchinson as _hutchinson
from torchdiv._estimators import hutchpp as _hutchpp
from torchdiv._estimators import xtrace as _xtrace
from torchdiv._estimators.sketch import Operator

Matmat = Callable[[torch.Tensor], torch.Tensor]


class Estimator(NamedTuple):
    """An estimator and how it spends products.

    ``terms(matmat, vectors)`` maps ``(r, N, n)`` random vectors to ``(m, N)`` per-sample terms:
    the estimate is their mean and its standard error ``sketch.standard_error`` of them
    (both computed in ``torchdiv._estimators.trace``), so a sum of estimates with the same vectors
    (an integral along an ODE solve) keeps one error formula.

    ``num_probes`` (products per sample) must be a multiple of ``products``; every such group
    uses ``vectors`` random vectors. ``block`` is the default block of the tolerance mode, and
    ``min_blocks`` how many independent blocks it draws at least (more than one where the
    per-block standard error is a heuristic that can run low).
    """

    terms: Callable[[Operator, torch.Tensor], torch.Tensor]
    products: int
    vectors: int
    block: int
    split: str
    min_blocks: int = 1


ESTIMATORS: dict[str, Estimator] = {
    "hutchinson": Estimator(_hutchinson.terms, 1, 1, 16, "one per probe"),
    "hutch++": Estimator(
        _hutchpp.terms,
        3,
        2,
        24,
        "a third each for the sketch, its basis and the residual",
        min_blocks=3,
    ),
    "xtrace": Estimator(
        _xtrace.terms, 2, 1, 16, "half for the sketch, half for its basis", min_blocks=3
    ),
}
STOCHASTIC_METHODS = tuple(ESTIMATORS)


def num_terms(method: str, num_probes: int) -> int:
    """How many terms ``method`` averages for ``num_probes`` products per sample: Hutchinson
    ``num_probes``, Hutch++ ``num_probes / 3`` (its residual probes), XTrace ``num_probes / 2``
    (its left-out estimates)."""
    return num_probes // ESTIMATORS[method].products


def num_vectors(method: str, num_probes: int) -> int:
    """How many random vectors ``method`` draws for ``num_probes`` products per sample."""
    spec = ESTIMATORS[method]
    return num_probes // spec.products * spec.vectors
