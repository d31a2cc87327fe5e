"""Norms, normalisations, distances, ``std`` and ``copysign`` in every engine.

PyTorch's backward formulas of ``linalg_vector_norm`` (and of every op built on it: ``norm``,
``linalg.norm``, ``matrix_norm('fro')``, ``F.normalize``, ``cosine_similarity``,
``pairwise_distance``), ``dist``, ``renorm`` and ``std``/``std_mean`` mask zeros in place
(``masked_fill_``), which forward mode cannot differentiate: before the fix, the gradient of a
Laplacian by forward over reverse, ``"hessian"`` and Hutchinson's Hessian-vector products raised
"modified by an inplace operation". ``copysign``'s backward divides by its input: second
derivatives ``nan`` where an entry is 0, in every engine (divergence gradients by the reverse
engine too). ``torchdiv._core.modes.SafeDerivatives`` replaces them by composites
(``torchdiv._core.linalg.vector_norm`` and the ops over it, ``_std``, ``_copysign``).

References independent of the engines: the grad-of-grad loop (``autograd.grad`` with
``create_graph``: reverse over reverse, whose values and weight gradients, a third derivative,
are checked here against float64 central differences: 1e-14-3e-11 measured, 1e-8 asserted),
with ``copysign`` written as ``where(signbit(b), -|a|, |a|)`` there (PyTorch's own gives
``nan``). The engines agree with the loop to 1e-15 (measured); 1e-10 asserted (float64).
Every norm's argument has an entry that is exactly 0 for every ``x`` (a masked one).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import central_difference, laplacian_by_grad_of_grad, tolerances

import torchdiv
from torchdiv._core.modes import SafeDerivatives

B, N, H = 3, 4, 5  # samples, inputs, hidden
RTOL = 1e-10  # engines against the loop
RTOL_DIFFERENCES = 1e-8  # the loop against central differences
MASK = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # entry 1: 0 for every x
A = torch.randn(H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def _layer() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(N, H).double()


def _x() -> torch.Tensor:
    return torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _u(x: torch.Tensor, lin: torch.nn.Module) -> torch.Tensor:
    """``(B, H)``, entry 1 exactly 0."""
    return torch.tanh(lin(x)) * MASK


def _matrices(x: torch.Tensor, lin: torch.nn.Module) -> torch.Tensor:
    """``(B, H, 2)``, row 1 exactly 0."""
    return _u(x, lin)[..., None] * torch.tensor([1.0, -0.5], dtype=x.dtype)


def _copysign(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference's ``copysign``: PyTorch's second derivatives of its own are nan at a 0."""
    return torch.where(torch.signbit(b), -a.abs(), a.abs())


def _signed(x: torch.Tensor, lin: torch.nn.Module, copysign=torch.copysign) -> torch.Tensor:
    z = lin(x) * MASK
    return (copysign(z, torch.sin(z)) * A).sum(-1).sin()


CASES = {
    "vector_norm_keepdim": lambda x, lin: (
        torch.sin(x).sum(-1, keepdim=True)
        * torch.linalg.vector_norm(_u(x, lin), dim=-1, keepdim=True)
    )[:, 0],
    "vector_norm_p1": lambda x, lin: torch.linalg.vector_norm(_u(x, lin), 1, -1) * x.sum(-1),
    "vector_norm_p3": lambda x, lin: torch.linalg.vector_norm(_u(x, lin), 3, -1),
    "vector_norm_inf": lambda x, lin: torch.linalg.vector_norm(_u(x, lin), math.inf, -1),
    "vector_norm_dims_p3": lambda x, lin: torch.linalg.vector_norm(_matrices(x, lin), 3, (1, 2)),
    "norm": lambda x, lin: torch.norm(_u(x, lin), dim=1),
    "tensor_norm_p3": lambda x, lin: _u(x, lin).norm(3, dim=-1),
    "linalg_norm": lambda x, lin: torch.linalg.norm(_u(x, lin), dim=-1),
    "matrix_norm_fro": lambda x, lin: torch.linalg.matrix_norm(_matrices(x, lin), "fro"),
    "normalize": lambda x, lin: (F.normalize(lin(x) * MASK, dim=-1) * A).sum(-1).sin(),
    "normalize_p3": lambda x, lin: (F.normalize(lin(x) * MASK, 3, -1) * A).sum(-1).sin(),
    "cosine_similarity": lambda x, lin: F.cosine_similarity(_u(x, lin), torch.sin(lin(x)), -1),
    "pairwise_distance": lambda x, lin: F.pairwise_distance(_u(x, lin), A),
    "pairwise_distance_p3": lambda x, lin: F.pairwise_distance(_u(x, lin), A, 3),
    "dist_p3": lambda x, lin: torch.stack([torch.dist(row, A, 3) for row in _u(x, lin)]),
    "renorm": lambda x, lin: (torch.renorm(_u(x, lin), 2, 0, 0.5) * A).sum(-1),
    "renorm_p3": lambda x, lin: (torch.renorm(_u(x, lin), 3, 0, 0.5) * A).sum(-1),
    "std": lambda x, lin: torch.std(lin(x), -1) * x.sum(-1),
    "std_mean": lambda x, lin: torch.mul(*torch.std_mean(lin(x), -1, correction=0)),
    "copysign": _signed,
}
REFERENCES = {"copysign": lambda x, lin: _signed(x, lin, _copysign)}
# no Taylor rule (p != 2 norms, dist): "taylor" raises, "auto" falls back (cosine similarity:
# recorded as its composite since rev-leftovers12, checked against the loop)
NO_TAYLOR_RULE = {
    "vector_norm_p1",
    "vector_norm_p3",
    "vector_norm_inf",
    "vector_norm_dims_p3",
    "tensor_norm_p3",
    "normalize_p3",
    "pairwise_distance_p3",
    "dist_p3",
    "renorm_p3",
}


def _hutchinson(f, x: torch.Tensor) -> torch.Tensor:
    """Hutchinson with the probes ``sqrt(n) e_i``: exactly the Laplacian, by Hessian-vector
    products where the Taylor engine has no rule."""
    probes = math.sqrt(N) * torch.eye(N, dtype=x.dtype)[:, None, :].expand(N, *x.shape)
    return torchdiv.laplacian(f, x, method="hutchinson", probes=probes.contiguous())


LAPLACIANS = {
    **{
        method: lambda f, x, method=method: torchdiv.laplacian(f, x, method=method)
        for method in ("taylor", "forward-over-reverse", "hessian", "grad-of-grad", "auto")
    },
    "hutchinson": _hutchinson,
}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _reference(case: str, lin: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The loop's Laplacian and its gradient with respect to the weight (reverse^3)."""
    g = REFERENCES.get(case, CASES[case])
    lap = laplacian_by_grad_of_grad(lambda z: g(z, lin), x)
    (grad,) = torch.autograd.grad(lap.sum(), lin.weight)
    return lap.detach(), grad


@pytest.mark.parametrize("case", CASES)
def test_laplacian_and_its_weight_gradient_in_every_method(case):
    lin, x = _layer(), _x()
    expected, expected_grad = _reference(case, lin, x)
    for method, laplacian in LAPLACIANS.items():
        if method == "taylor" and case in NO_TAYLOR_RULE:
            with pytest.raises(NotImplementedError, match="no propagation rule"):
                laplacian(lambda z: CASES[case](z, lin), x)
            continue
        lap = laplacian(lambda z: CASES[case](z, lin), x)
        (grad,) = torch.autograd.grad(lap.sum(), lin.weight)
        assert _relative(lap, expected) < RTOL, method
        assert _relative(grad, expected_grad) < RTOL, method


@pytest.mark.parametrize("case", ["vector_norm_p3", "normalize", "std_mean", "copysign"])
def test_the_loop_reference_matches_differences(case):
    """The reference's values and weight gradient (along a random direction) against central
    differences of first derivatives and of its values."""
    lin, x = _layer(), _x()
    g = REFERENCES.get(case, CASES[case])
    lap, grad = _reference(case, lin, x)

    def gradient(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_()
        return torch.autograd.grad(g(z, lin).sum(), z)[0]

    eye = torch.eye(N, dtype=x.dtype)
    by_differences = sum(
        central_difference(lambda t, i=i: gradient(x + t * eye[i])[:, i]) for i in range(N)
    )
    assert _relative(lap, by_differences) < RTOL_DIFFERENCES
    direction = torch.randn(lin.weight.shape, dtype=x.dtype)
    weight = lin.weight.detach().clone()

    def moved(t: float) -> torch.Tensor:
        with torch.no_grad():
            lin.weight.copy_(weight + t * direction)
        try:
            return laplacian_by_grad_of_grad(lambda z: g(z, lin), x).detach().sum()
        finally:
            with torch.no_grad():
                lin.weight.copy_(weight)

    slope = central_difference(moved)
    assert _relative((grad * direction).sum(), slope) < RTOL_DIFFERENCES


def _divergence_by_loop(field, x: torch.Tensor) -> torch.Tensor:
    """``sum_i d field_i / d x_i`` by a backward pass per coordinate, differentiable."""
    z = x.detach().requires_grad_()
    y = field(z)
    rows = [torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(N)]
    return torch.stack(rows).sum(0)


@pytest.mark.parametrize("case", CASES)
def test_divergence_and_its_weight_gradient_in_every_engine(case):
    """A field through the op: its divergence (first derivatives) and the divergence's weight
    gradient (second: ``nan`` through ``copysign`` in every engine before the fix)."""
    lin, x = _layer(), _x()
    g = REFERENCES.get(case, CASES[case])
    expected = _divergence_by_loop(lambda z: g(z, lin)[:, None] * torch.tanh(z), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), lin.weight)
    methods = ["forward", "reverse", "auto"] + ([] if case in NO_TAYLOR_RULE else ["structured"])
    for method in methods:
        div = torchdiv.divergence(
            lambda z: CASES[case](z, lin)[:, None] * torch.tanh(z), x, method=method
        )
        (grad,) = torch.autograd.grad(div.sum(), lin.weight)
        assert _relative(div, expected.detach()) < RTOL, method
        assert _relative(grad, expected_grad) < RTOL, method


def _values_and_gradients():
    """Calls whose values and first derivatives the replacements must keep: zeros, a zero
    vector, ``nan``/``inf``, complex input, ``dtype=``, broadcasting, every overload."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g)
    x[0, 1] = 0
    x[2] = 0  # a zero vector
    cube = torch.randn(2, 3, 4, generator=g)
    wide = x.clone()
    wide[1, 2], wide[1, 3] = math.inf, math.nan
    plural = torch.randn(3, 4, dtype=torch.complex128, generator=g)
    y = torch.randn(3, 5, dtype=torch.float64, generator=g)
    return [x, cube, plural, wide], {
        "vector_norm": lambda x, cube, plural, wide: [
            torch.linalg.vector_norm(x),
            torch.linalg.vector_norm(x, 3, 1, True),
            torch.linalg.vector_norm(cube, 2.5, [0, 2], dtype=torch.float64),
            torch.linalg.vector_norm(plural, 3, -1),
            torch.linalg.vector_norm(plural, dim=-1),
            torch.linalg.vector_norm(wide, 3, 1),
            torch.linalg.vector_norm(x, 0.5, 1),
            torch.linalg.vector_norm(x, -1, 1),
            torch.linalg.vector_norm(x, 2, None, True),
            torch.linalg.vector_norm(x[:0], 3, 0),
        ],
        "norm": lambda x, cube, plural, wide: [
            torch.norm(x),
            torch.norm(x, 3, 1),
            torch.norm(cube, "fro", (1, 2)),
            torch.norm(x, "nuc"),
            torch.norm(cube, 2, 1, dtype=torch.float64),
            x.norm(1, 0),
            cube.norm(p=3, dim=(0, 1), keepdim=True),
        ],
        "linalg.norm": lambda x, cube, plural, wide: [
            torch.linalg.norm(x),
            torch.linalg.norm(cube),
            torch.linalg.norm(x, 2),
            torch.linalg.norm(x, "fro"),
            torch.linalg.norm(cube, "nuc", (1, 2)),
            torch.linalg.norm(cube, 3, -1),
            torch.linalg.norm(cube, None, (0, 2), True),
            torch.linalg.norm(x[0], 3),
            torch.linalg.matrix_norm(cube),
            torch.linalg.matrix_norm(cube, 1, (0, 2)),
            torch.linalg.matrix_norm(cube, dtype=torch.float64, keepdim=True),
        ],
        "normalize, distances": lambda x, cube, plural, wide: [
            F.normalize(x),
            F.normalize(cube, 3, 0),
            F.cosine_similarity(x, y),
            F.cosine_similarity(cube[:, :, None], cube[:1, :1], dim=-1),
            F.pairwise_distance(x, y),
            F.pairwise_distance(x, y[0], 1, keepdim=True),
            F.pairwise_distance(cube, cube.flip(0), math.inf),
            torch.dist(x, y),
            x.dist(y[0], 3),
        ],
        "renorm, std, copysign": lambda x, cube, plural, wide: [
            torch.renorm(x, 2, 0, 1.0),
            cube.renorm(3, 1, 0.5),
            torch.std(x),
            torch.std(x, 1, False, True),
            x.std(dim=0, correction=0),
            torch.ones(3, 4, dtype=torch.float64).std(1),
            *torch.std_mean(cube, 1),
            torch.copysign(x, y),
            torch.copysign(x, -0.0),
            cube.copysign(torch.tensor(-1.0, dtype=torch.float64)),
        ],
    }


@pytest.mark.parametrize("group", list(_values_and_gradients()[1]))
def test_replacements_keep_pytorch_s_values_and_first_derivatives(group):
    inputs, calls = _values_and_gradients()
    leaves = [t.clone().requires_grad_() for t in inputs]
    want = calls[group](*leaves)
    with SafeDerivatives(3, "x"):
        got = calls[group](*leaves)
    for i, (w, v) in enumerate(zip(want, got, strict=True)):
        assert w.dtype == v.dtype and w.shape == v.shape, i
        torch.testing.assert_close(v, w, **tolerances(w.dtype), equal_nan=True, msg=str(i))
        if not w.requires_grad or not w.isfinite().all():
            continue
        weights = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(i))
        expected = torch.autograd.grad(
            (w * weights).sum(), leaves, retain_graph=True, allow_unused=True
        )
        actual = torch.autograd.grad(
            (v * weights).sum(), leaves, retain_graph=True, allow_unused=True
        )
        for e, a in zip(expected, actual, strict=True):
            assert (e is None) == (a is None), i
            if e is not None:
                torch.testing.assert_close(a, e, **tolerances(e.dtype), msg=str(i))


def test_group_norm_of_a_transposed_view_in_forward_mode():
    """An attention block's output handed on as a transposed view (diffusers' U-Nets): PyTorch's
    forward-mode formula of group norm views its input and raised "view size is not
    compatible" in the forward engine and forward over reverse; group norm now sees a
    contiguous copy there. Against the loops of backward passes."""
    lin = _layer()
    norm = torch.nn.GroupNorm(2, 4).double()

    def f(x: torch.Tensor) -> torch.Tensor:
        tokens = torch.tanh(lin(x))[:, None, :4] * torch.arange(1.0, 7.0)[:, None]  # (B, 6, 4)
        image = tokens.mT.reshape(B, 4, 3, 2)  # channels first: a view, strides (24, 1, 8, 4)
        return (norm(image).sin().flatten(1) * torch.arange(24.0)).sum(-1)

    x = _x()
    expected = laplacian_by_grad_of_grad(f, x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), lin.weight)
    lap = torchdiv.laplacian(f, x, method="forward-over-reverse")
    (grad,) = torch.autograd.grad(lap.sum(), lin.weight)
    assert _relative(lap, expected.detach()) < RTOL and _relative(grad, expected_grad) < RTOL
    field = lambda z: f(z)[:, None] * torch.tanh(z)  # noqa: E731
    expected = _divergence_by_loop(field, x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), lin.weight)
    div = torchdiv.divergence(field, x, method="forward")
    (grad,) = torch.autograd.grad(div.sum(), lin.weight)
    assert _relative(div, expected.detach()) < RTOL and _relative(grad, expected_grad) < RTOL


def test_complex_two_norm_squared_has_its_laplacian_at_zero_entries():
    """``||x + ix||_2^2 = 2 sum x_i^2``, Laplacian ``4 d`` at every x: the replacement's mask at
    zero entries once set the second derivative of the smooth ``re^2 + im^2`` to 0 there (8 for
    12 in the first sample)."""
    x = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 3.0]], dtype=torch.float64)

    def f(z):
        return torch.linalg.vector_norm(torch.complex(z, z), 2, dim=-1) ** 2

    for method in ("forward-over-reverse", "hessian", "auto"):
        lap = torchdiv.laplacian(f, x, method=method)
        torch.testing.assert_close(lap, torch.full((2,), 12.0, dtype=torch.float64), msg=method)
    sweep = torchdiv.value_grad_laplacian(f, x)
    torch.testing.assert_close(sweep.laplacian, torch.full((2,), 12.0, dtype=torch.float64))


def test_cosine_similarity_is_recorded_by_the_taylor_and_structured_engines() -> None:
    """``F.cosine_similarity`` clamps its norms in place under ``no_grad``, which no replay
    reproduces: ``method="taylor"`` and ``"structured"`` raised ``UnsupportedOp``
    (``clamp_min_`` under no_grad) and ``"auto"`` fell back. The recorders now run its
    composite: Laplacian and divergence values and the weights' gradients against a
    per-sample loop of plain autograd through PyTorch's own op (norms far above ``eps``)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(N, H, dtype=torch.float64)
    x = torch.randn(B, N, dtype=torch.float64)

    def similarity(z: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(layer(z))
        return F.cosine_similarity(h, A.expand_as(h), dim=-1)

    def field(z: torch.Tensor) -> torch.Tensor:
        return z * similarity(z)[:, None]

    params = list(layer.parameters())
    want = torch.stack([laplacian_by_grad_of_grad(similarity, x[b : b + 1])[0] for b in range(B)])
    want_grads = torch.autograd.grad(want.square().sum(), params)
    got = torchdiv.laplacian(similarity, x, method="taylor")
    torch.testing.assert_close(got, want.detach(), rtol=RTOL, atol=RTOL)
    for g, w in zip(torch.autograd.grad(got.square().sum(), params), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=RTOL)
    rows = []
    for b in range(B):
        leaf = x[b : b + 1].clone().requires_grad_(True)
        y = field(leaf).reshape(-1)
        rows.append(
            sum(
                torch.autograd.grad(y[i], leaf, create_graph=True)[0].reshape(-1)[i]
                for i in range(N)
            )
        )
    div_want = torch.stack(rows)
    div_grads = torch.autograd.grad(div_want.square().sum(), params)
    div = torchdiv.divergence(field, x, method="structured")
    torch.testing.assert_close(div, div_want.detach(), rtol=RTOL, atol=RTOL)
    for g, w in zip(torch.autograd.grad(div.square().sum(), params), div_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=RTOL)
