"""The result of a stochastic estimate: per-sample values with their standard errors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Estimate:
    """Per-sample stochastic estimate of a trace (a divergence, a Laplacian, ...).

    Attributes:
        value: the estimates, shape ``x.shape[:batch_dims]``, dtype and device of ``x``;
            differentiable like the exact operators.
        stderr: estimated standard error of each value, same shape, not differentiable; how
            each method computes it is documented in ``torchdiv.estimate_trace``. ``nan``
            where a single term gives no spread to measure (Hutchinson with one probe,
            Hutch++ with 3 products, XTrace with 2).
        num_probes: operator products (Jacobian-vector products) spent per sample.

    Examples:
        >>> import torch, torchdiv
        >>> x = torch.randn(4, 3)  # Rademacher probes: exact for a diagonal Jacobian, 2 I
        >>> torchdiv.estimate_divergence(lambda z: 2 * z, x, num_probes=8)
        Estimate(value=tensor([6., 6., 6., 6.]), stderr=tensor([0., 0., 0., 0.]), num_probes=8)
    """

    value: torch.Tensor
    stderr: torch.Tensor
    num_probes: int
