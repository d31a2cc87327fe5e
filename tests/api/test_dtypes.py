"""The result has x's dtype whatever the process's default dtype, against closed forms.

``torch.set_default_dtype(torch.float64)`` with float32 ``x``: a tensor the library made
without a dtype (``torch.where`` over two Python floats, ``torch.tensor(0.5)``) is float64 and
promotes what it meets. Every operator and method runs once under that default; the default
is put back after each case. References are closed forms in float64; float32 results agree
to a few ulps of float32 per term (``conftest.tolerances``).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import tolerances

import torchdiv

f64 = torch.float64
W = torch.tensor([[0.9, -0.4, 0.3], [0.2, 1.1, -0.5], [-0.6, 0.3, 0.8]], dtype=f64)
A = torch.tensor([2.0, -3.0, 0.0], dtype=f64)  # diag(A): rank 2, every probe sees tr = -1


def tanh_layer(x: torch.Tensor) -> torch.Tensor:
    """``tanh(W x)``: ``J = diag(1 - t²) W``."""
    return torch.tanh(x @ W.to(x.dtype).T)


def tanh_sum(x: torch.Tensor) -> torch.Tensor:
    """``u = Σ_j tanh((W x)_j)``: ``Δu = Σ_j -2 t_j (1 - t_j²) |W_j|²``."""
    return tanh_layer(x).sum(-1)


def diagonal_map(x: torch.Tensor) -> torch.Tensor:
    """``diag(A) x``: every Rademacher probe gives ``tr = -1`` exactly; rank 2: Hutch++ and
    XTrace sketches of Gaussian probes span its range, which makes them exact too."""
    return x * A.to(x.dtype)


def diagonal_quadratic(x: torch.Tensor) -> torch.Tensor:
    """``½ xᵀ diag(A) x``: ``Δu = tr A = -1`` along every Rademacher probe."""
    return 0.5 * (A.to(x.dtype) * x * x).sum(-1)


def _layer_jacobian(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(x @ W.T)
    return (1 - t * t)[:, :, None] * W


def _tanh_laplacian(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(x @ W.T)
    return (-2 * t * (1 - t * t) * W.square().sum(-1)).sum(-1)


def _quartic(x: torch.Tensor) -> torch.Tensor:
    return x.square().sum(-1) ** 2  # Δ²|x|⁴ = 8 n (n + 2)


EXACT = ["auto", "forward", "reverse", "structured"]
LAPLACIAN = ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]
STOCHASTIC = {"method": "hutchinson", "num_probes": 4, "probe": "rademacher"}
Call = Callable[[torch.Tensor], torch.Tensor]
Reference = Callable[[torch.Tensor], torch.Tensor]
CASES: dict[str, tuple[Call, Reference]] = {
    **{
        f"divergence {m}": (
            lambda x, m=m: torchdiv.divergence(tanh_layer, x, method=m),
            lambda x: _layer_jacobian(x).diagonal(dim1=-2, dim2=-1).sum(-1),
        )
        for m in EXACT
    },
    **{
        f"divergence {m}": (
            lambda x, m=m, p=p: torchdiv.divergence(
                diagonal_map, x, method=m, num_probes=6, probe=p
            ),
            lambda x: torch.full((len(x),), -1.0, dtype=f64),
        )
        for m, p in (("hutchinson", "rademacher"), ("hutch++", "gaussian"), ("xtrace", "gaussian"))
    },
    "estimate_divergence xtrace": (
        lambda x: (
            torchdiv.estimate_divergence(
                diagonal_map, x, method="xtrace", num_probes=6, probe="gaussian"
            ).value
        ),
        lambda x: torch.full((len(x),), -1.0, dtype=f64),
    ),
    **{
        f"jacobian {m}": (
            lambda x, m=m: torchdiv.jacobian(tanh_layer, x, method=m),
            _layer_jacobian,
        )
        for m in EXACT[:3]
    },
    **{
        f"jacobian_diagonal {m}": (
            lambda x, m=m: torchdiv.jacobian_diagonal(tanh_layer, x, method=m),
            lambda x: _layer_jacobian(x).diagonal(dim1=-2, dim2=-1),
        )
        for m in EXACT
    },
    "jacobian_diagonal hutchinson": (
        lambda x: torchdiv.jacobian_diagonal(diagonal_map, x, **STOCHASTIC),
        lambda x: A.expand(len(x), 3),
    ),
    **{
        f"laplacian {m}": (
            lambda x, m=m: torchdiv.laplacian(tanh_sum, x, method=m),
            _tanh_laplacian,
        )
        for m in LAPLACIAN
    },
    "laplacian hutchinson": (
        lambda x: torchdiv.laplacian(diagonal_quadratic, x, **STOCHASTIC),
        lambda x: torch.full((len(x),), -1.0, dtype=f64),
    ),
    "weighted_laplacian": (
        lambda x: torchdiv.weighted_laplacian(tanh_sum, x, diffusion=2 * torch.eye(3)),
        lambda x: 2 * _tanh_laplacian(x),
    ),
    "biharmonic": (
        lambda x: torchdiv.biharmonic(_quartic, x),
        lambda x: torch.full((len(x),), 8.0 * 3 * 5, dtype=f64),
    ),
    **{
        f"value_grad_laplacian {m}": (
            lambda x, m=m: torchdiv.value_grad_laplacian(tanh_sum, x, method=m).laplacian,
            _tanh_laplacian,
        )
        for m in ("auto", "taylor", "forward-over-reverse")
    },
    "graph_divergence": (
        lambda x: torchdiv.graph_divergence(tanh_layer(x), x),
        lambda x: _layer_jacobian(x).diagonal(dim1=-2, dim2=-1).sum(-1),
    ),
    "graph_laplacian": (lambda x: torchdiv.graph_laplacian(tanh_sum(x), x), _tanh_laplacian),
}


def _double(x: torch.Tensor) -> torch.Tensor:
    """``tanh_sum`` computed and returned in float64 for any ``x``."""
    return tanh_sum(x.double())


@pytest.mark.parametrize("method", [*LAPLACIAN, "hutchinson"])
def test_a_laplacian_of_an_f_that_changes_dtype_has_the_dtype_of_x(method):
    """float32 ``x``, ``f`` in float64: every method's result is float32 (the Taylor engine
    gave the jets' float64). Values: rounding the float64 closed form to float32 (the
    Hutchinson estimate of a 3-input Hessian with 4096 probes: within 0.15, ~4 standard
    errors of this one)."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    options = {"num_probes": 4096, "generator": torch.Generator().manual_seed(0)}
    options = options if method == "hutchinson" else {}
    out = torchdiv.laplacian(_double, x, method=method, **options)
    assert out.dtype == torch.float32
    tol = {"rtol": 0.0, "atol": 0.15} if method == "hutchinson" else tolerances(torch.float32)
    torch.testing.assert_close(out.double(), _tanh_laplacian(x.double()), **tol)
    out = torchdiv.value_grad_laplacian(_double, x, method="taylor")
    assert (out.value.dtype, out.gradient.dtype, out.laplacian.dtype) == (f64, *[torch.float32] * 2)


@pytest.fixture
def float64_default():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize("case", CASES)
def test_float32_x_under_a_float64_default(case):
    call, reference = CASES[case]
    x = torch.randn(4, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    if case.startswith("graph"):
        x.requires_grad_(True)
    out = call(x)
    assert out.dtype == torch.float32
    expected = reference(x.detach().double())
    torch.testing.assert_close(out.double(), expected, **tolerances(torch.float32))
