"""The Laplacian family in half precision: chunk sums kept in float32, the result in x's dtype.

A bfloat16 running sum (8 significant bits) stops growing once it is 256 times a part
(float16: 2048 times). Here the terms are ``c_i`` with ``c = (2^8, 1, ..., 1)`` (float16:
``2^11``), eight inputs: every term, every partial sum and the total ``c_0 + 7`` are exact in
float32, so a sum kept in float32 and cast once gives exactly ``c_0 + 7`` rounded to the half
dtype (264 in bfloat16, 2056 in float16), while a sum kept in the half dtype sticks at ``c_0``.
The reference is that closed form; the comparison is exact because nothing but the final cast
rounds (a quadratic's second derivatives are its constant coefficients, computed without
rounding: ``x`` enters only through ``x * 1`` products that the derivatives do not see).
"""

from __future__ import annotations

import pytest
import torch

import torchdiv

N = 8
BIG = {torch.bfloat16: 256.0, torch.float16: 2048.0}


def _coefficients(dtype: torch.dtype) -> torch.Tensor:
    c = torch.ones(N, dtype=dtype)
    c[0] = BIG[dtype]
    return c


def _quadratic(c: torch.Tensor):
    """``u = ½ Σ c_i x_i²``: ``Δu = Σ c_i``."""
    return lambda x: 0.5 * (c * x * x).sum(-1)


def _quartic(c: torch.Tensor):
    """``u = Σ c_i x_i⁴ / 24``: ``Δ²u = Σ c_i``."""
    return lambda x: (c * x**4).sum(-1) / 24


CALLS = {
    **{
        m: lambda u, x, m=m: torchdiv.laplacian(u, x, method=m, chunk_size=1)
        for m in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad")
    },
    "grad-of-grad unchunked": lambda u, x: torchdiv.laplacian(u, x, method="grad-of-grad"),
    "coordinates": lambda u, x: torchdiv.laplacian(u, x, chunk_size=1, coordinates=range(N)),
    **{
        f"value_grad_laplacian {m}": lambda u, x, m=m: (
            torchdiv.value_grad_laplacian(u, x, method=m, chunk_size=1).laplacian
        )
        for m in ("auto", "taylor", "forward-over-reverse")
    },
    "weighted_laplacian": lambda u, x: torchdiv.weighted_laplacian(
        u, x, diffusion=torch.eye(N, dtype=x.dtype), chunk_size=1
    ),
    "weighted_laplacian, A requires grad": lambda u, x: torchdiv.weighted_laplacian(
        u, x, diffusion=torch.eye(N, dtype=x.dtype).requires_grad_(), chunk_size=1
    ),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("call", CALLS)
def test_half_precision_laplacians_sum_in_float32(call, dtype):
    c = _coefficients(dtype).requires_grad_()
    x = torch.randn(3, N).to(dtype)
    out = CALLS[call](_quadratic(c), x)
    assert out.dtype == dtype
    assert torch.equal(out, torch.full((3,), BIG[dtype] + N - 1).to(dtype))
    (grad,) = torch.autograd.grad(out.sum(), c)  # the cast back is differentiable
    assert torch.equal(grad, torch.full((N,), 3.0, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["auto", "forward-over-reverse"])
def test_half_precision_biharmonic_sums_in_float32(method, dtype):
    x = torch.randn(3, N).to(dtype)
    out = torchdiv.biharmonic(_quartic(_coefficients(dtype)), x, method=method, chunk_size=1)
    assert out.dtype == dtype
    assert torch.equal(out, torch.full((3,), BIG[dtype] + N - 1).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_hutchinson_sums_in_float32(dtype):
    """Given probes ``2 e_j`` for ``j < 4``: the estimate is exactly ``c_0 + c_1 + c_2 + c_3``,
    from per-probe parts ``4 c_j`` (a half-precision sum sticks at ``4 c_0``)."""
    x = torch.randn(3, N).to(dtype)
    probes = (2 * torch.eye(N, dtype=dtype)[:4, None, :]).expand(4, 3, N)
    out = torchdiv.laplacian(
        _quadratic(_coefficients(dtype)), x, method="hutchinson", probes=probes, chunk_size=1
    )
    assert torch.equal(out, torch.full((3,), BIG[dtype] + 3).to(dtype))
