"""rev-late28: ``maximum``/``minimum`` in the Taylor engine at a tie of large values (the
tie's value ``(a + b) / 2`` overflowed: ``inf`` where the true value is finite) and with a
``nan`` operand (the value was the other operand: ``maximum(nan, 1)`` read 1, not ``nan``).
References: the function's own value and float64 ``torch.autograd.grad``."""

from __future__ import annotations

import pytest
import torch

import torchdiv


@pytest.mark.parametrize(
    ("dtype", "big"),
    [(torch.float16, 40000.0), (torch.float32, 2e38), (torch.float64, 1e308)],
)
@pytest.mark.parametrize("op", [torch.maximum, torch.minimum])
def test_tie_of_large_values_is_finite(dtype: torch.dtype, big: float, op) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (op(x * x + big, x * 0 + big) / big).sum(-1)

    x = torch.zeros(2, 3, dtype=dtype)
    out = torchdiv.value_grad_laplacian(f, x, method="taylor")
    # exact: the value is 3 (three ties at ``big``), no rounding at any dtype
    assert torch.equal(out.value, f(x)), out.value
    assert torch.isfinite(out.laplacian).all()


@pytest.mark.parametrize("op", [torch.maximum, torch.minimum])
@pytest.mark.parametrize("nan_first", [True, False])
def test_nan_operand_gives_nan(op, nan_first: bool) -> None:
    one = torch.ones(1, 1, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        h = x[:, :1] * x[:, 1:]
        return (op(h, one) if nan_first else op(one, h)).sum(-1)

    x = torch.tensor([[float("nan"), 1.0], [0.5, 3.0]], dtype=torch.float64)
    out = torchdiv.value_grad_laplacian(f, x, method="taylor")
    # (a nan sample's derivatives are unspecified: autograd's mix 1 and nan there)
    torch.testing.assert_close(out.value, f(x), rtol=0, atol=0, equal_nan=True)
    xr = x[1:].clone().requires_grad_()
    (g,) = torch.autograd.grad(f(xr).sum(), xr)
    torch.testing.assert_close(out.gradient[1:], g, rtol=0, atol=0)  # exact: products of 1, 3, 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tanh_gelu_far_out(dtype: torch.dtype) -> None:
    """The tanh GELU's rule at |x| = 1e3, 1e4: its first derivative is 1 (x > 0) or 0, its
    second 0 (``du`` overflowed float16 from |x| = 782: ``0 * inf``, nan)."""
    import torch.nn.functional as F

    def f(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh").sum(-1)

    x = torch.tensor([[1e3], [-1e3], [1e4], [-1e4]], dtype=dtype)
    out = torchdiv.value_grad_laplacian(f, x, method="taylor")
    # exact: sech^2 u underflows to 0 in every dtype here, leaving 1 or 0
    assert torch.equal(out.gradient, torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=dtype))
    assert torch.equal(out.laplacian, torch.zeros(4, dtype=dtype))
