"""rev-merges18a: the session's merges attacked (rev-cfg18's ``clamp`` between tensors in the
recording engines, rev-watch18's writes the mixing watch records).

References: closed forms and per-sample grad of grad (``laplacian_alone``), all float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    laplacian_alone,
    loop_diagonal,
    parameter_gradients,
)

import torchdiv

f64 = torch.float64


def test_clamp_between_equal_tensor_bounds_is_the_bound():
    """``clamp(x, b, b) = b``: below ``b`` too (a range that closed). The rule took ``x``'s
    value and derivatives there (``"structured"`` read divergences 20 off, ``"taylor"`` the
    Laplacian of ``x``'s branch). Reference: the closed form of ``f = b(z) S(z)``, ``b = z0 / 2
    + 1``, ``S = z0 + z1 + z2`` (no element at ``b`` exactly): ``df_i/dz_i = b + S / 2 [i = 0]``,
    ``lap f_i = 2 b' . S' = 1``. PyTorch's forward mode agrees; its backward passes nothing to
    either bound below them (``method="reverse"``, and ``torch.func.hessian``, read 0.5 less)."""
    x = torch.tensor([[0.5, 2.0, -1.0], [1.0, 0.2, 3.0], [-2.0, -0.5, 0.1]], dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        bound = z[:, :1] * 0.5 + 1  # each row has elements below and above it
        return torch.clamp(z * z - 1, bound, bound) * z.sum(1, keepdim=True)

    b, s = x[:, :1] * 0.5 + 1, x.sum(1, keepdim=True)
    diagonal = b + torch.tensor([[0.5, 0.0, 0.0]], dtype=f64) * s
    for method in ("structured", "forward"):
        assert_close(torchdiv.jacobian_diagonal(f, x, method=method), diagonal)
    assert_close(torchdiv.divergence(f, x, method="structured"), diagonal.sum(1))
    assert_close(torchdiv.laplacian(f, x, method="taylor"), torch.ones_like(x))


def test_clamp_with_a_nan_bound_is_nan():
    """A ``nan`` bound (a diverged sample's quantile) makes ``clamp`` ``nan`` there, as
    ``f(x)`` is: the rule took ``x``'s value (its comparisons with ``nan`` are false), and
    ``"structured"`` read a finite divergence for a sample whose ``f`` is ``nan``. Reference:
    autograd's rows, ``nan`` in the same samples (autograd passes nothing to any argument
    where the value is ``nan``; the finite samples exactly)."""
    x = torch.tensor([[0.5, 2.0, -1.0], [-1.0, 0.2, 0.3], [2.0, -0.5, 0.1]], dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        low = torch.where(z[:, :1] > 0, float("nan"), -0.5)  # samples 0 and 2: nan
        return torch.clamp(2 * z, low, z[:, 1:2] + 0.5) * z.sum(1, keepdim=True)

    want = loop_diagonal(f, x)
    assert want[[0, 2]].isnan().all() and not want[1].isnan().any()
    got = torchdiv.jacobian_diagonal(f, x, method="structured")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True)


class Clamped(torch.nn.Module):
    """A small MLP clamped between bounds that depend on parameters (``a``, ``c``) and on the
    sample: per sample ``(B, 1)``, per feature, a 0-dim tensor, ``clamp_min`` and in place."""

    def __init__(self, bounds: str) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(3, 8).to(f64), torch.nn.Linear(8, 3).to(f64)
        self.a = torch.nn.Parameter(torch.tensor(0.3, dtype=f64))
        self.c = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.05], dtype=f64))
        self.bounds = bounds

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.l2(torch.tanh(self.l1(z)))
        if self.bounds == "sample":
            t = torch.nn.functional.softplus(self.a) * (z * z).sum(1, keepdim=True)
            y = torch.clamp(h, self.c - t, self.c + t)
        elif self.bounds == "feature":
            y = torch.clamp(h, self.c - self.a, self.c + self.a * z[:, :1] ** 2)
        elif self.bounds == "scalar":
            y = torch.clamp(h, -self.a, self.a)
        elif self.bounds == "min":
            y = torch.clamp_min(h, self.c * z.sum(1, keepdim=True))
        else:
            y = (h * 1).clamp_(self.c - self.a * z[:, 1:2], self.c + self.a)
        return (torch.tanh(y) * y).sum(1)


@pytest.mark.parametrize("bounds", ["sample", "feature", "scalar", "min", "inplace"])
def test_laplacian_through_clamp_with_parameter_bounds(bounds):
    """Guard: the Laplacian's ``"taylor"`` through ``clamp`` with broadcast bounds that
    require grad, and the gradients of ``sum lap^2`` with respect to every parameter (the
    bounds' ``a`` and ``c`` included: third derivatives), against per-sample grad of grad."""
    torch.manual_seed(0)
    net, x = Clamped(bounds), torch.randn(5, 3, dtype=f64)
    want = laplacian_alone(net, x)
    got = torchdiv.laplacian(net, x, method="taylor")
    assert_close(got, want)
    for g, w in zip(
        parameter_gradients(net, got.square().sum()),
        parameter_gradients(net, want.square().sum()),
        strict=True,
    ):
        assert_close(g, w)
