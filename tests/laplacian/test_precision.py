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


def test_float16_hutchinson_mean_is_taken_before_the_cast():
    """3000 probes in chunks of 100 on ``|x|^2 / 2`` (``Δ = 64``): each chunk's sum (6400)
    fits float16, their total (192000) does not (max 65504); the mean is exactly 64 when the
    total is divided before it is cast (it was ``inf``)."""
    x = torch.randn(2, 64).half()
    probes = torch.randint(0, 2, (3000, 2, 64)).half() * 2 - 1
    q = lambda z: 0.5 * (z * z).sum(-1)  # noqa: E731
    out = torchdiv.laplacian(q, x, method="hutchinson", probes=probes, chunk_size=100)
    assert torch.equal(out, torch.full((2,), 64.0, dtype=torch.float16))


# ----------------------------------------------------------------------------- autocast

W = torch.tensor([[0.9, -0.4, 0.3], [0.2, 1.1, -0.5], [-0.6, 0.3, 0.8]], dtype=torch.float64)


def _tanh_sum(x: torch.Tensor) -> torch.Tensor:
    """``u = Σ_j tanh((W x)_j)``; its matrix product runs in bfloat16 under autocast."""
    return torch.tanh(torch.nn.functional.linear(x, W.to(x.dtype))).sum(-1)


def _tanh_derivatives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed forms in float64: ``∇u = Wᵀ (1 - t²)``, ``Δu = Σ_j t''(z_j) |W_j|²`` and
    ``Δ²u = Σ_j t''''(z_j) |W_j|⁴`` with ``t'' = -2t(1 - t²)``, ``t'''' = 8t(1 - t²)(2 - 3t²)``."""
    t = torch.tanh(x @ W.T)
    rows = W.square().sum(-1)
    second = -2 * t * (1 - t * t)
    fourth = 8 * t * (1 - t * t) * (2 - 3 * t * t)
    return (1 - t * t) @ W, (second * rows).sum(-1), (fourth * rows.square()).sum(-1)


AUTOCAST = {
    **{
        f"laplacian {m}": lambda x, m=m: {"laplacian": torchdiv.laplacian(_tanh_sum, x, method=m)}
        for m in ("auto", "taylor", "forward-over-reverse", "grad-of-grad")
    },
    **{
        f"value_grad_laplacian {m}": lambda x, m=m: torchdiv.value_grad_laplacian(
            _tanh_sum, x, method=m
        )._asdict()
        for m in ("auto", "taylor", "forward-over-reverse")
    },
    "weighted_laplacian": lambda x: {
        "laplacian": torchdiv.weighted_laplacian(_tanh_sum, x, diffusion=torch.eye(3))
    },
    "biharmonic": lambda x: {"biharmonic": torchdiv.biharmonic(_tanh_sum, x)},
}


@pytest.mark.parametrize("call", AUTOCAST)
def test_laplacians_under_autocast_have_the_dtype_of_x(call):
    """float32 ``x`` inside ``torch.autocast("cpu", dtype=torch.bfloat16)``: the Taylor
    engine's jets come out in bfloat16; the results are float32, as by every other method.
    Values: against float64 closed forms to bfloat16 accuracy (the product ``W x`` is rounded
    to 8 significant bits, eps = 2^-8 = 3.9e-3; up to fourth derivatives of tanh amplify it
    a few times: 5e-2, about 13 eps)."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AUTOCAST[call](x)
    gradient, laplacian, biharmonic = _tanh_derivatives(x.double())
    expected = {"gradient": gradient, "laplacian": laplacian, "biharmonic": biharmonic}
    for name, got in out.items():
        if name == "value":  # what f returns: bfloat16 under autocast, as f(x) itself
            continue
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), expected[name], rtol=5e-2, atol=5e-2)
