"""Linear algebra in every engine: Taylor rules, and PyTorch's wrong higher derivatives routed
around (``torchdiv._core.modes.SafeDerivatives``) or refused.

References are independent of both: float64 central differences (Richardson-extrapolated,
``conftest.central_difference``) of quantities built from first derivatives only, and the
grad-of-grad loop (reverse over reverse, which PyTorch gets right for these ops; checked
here too). Tolerance 1e-8 relative: the differences are good to 1e-12-1e-10 here. Before
the fix the gradients of the Laplacian through ``slogdet``/``det``/``logdet``/``solve`` by
nested autodiff were off by 2-90% and those of forward-mode Jacobians by up to 240%.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    central_difference,
    directional_gradient,
    laplacian_by_grad_of_grad,
    reference_divergence,
)

import torchdiv
from torchdiv._laplacian import methods as _laplacian
from torchdiv._taylor import RULES, capture

B, N, M = 3, 4, 3  # samples, inputs, matrix size
RTOL = 1e-8


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"W": 0.5 * rand(M * M, N), "V": 0.5 * rand(M, N), "c": rand(M * M)}


def _matrix(x: torch.Tensor, p: dict[str, torch.Tensor], symmetric: bool) -> torch.Tensor:
    t = torch.tanh(x @ p["W"].T).unflatten(-1, (M, M))
    a = t @ t.mT + 0.5 * torch.eye(M, dtype=x.dtype)
    return a if symmetric else a + 0.3 * t


def _rhs(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sin(x @ p["V"].T)


def _weighted(y: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """A scalar per sample from any ``(B, ...)`` output."""
    flat = y.flatten(1)
    return (flat * p["c"][: flat.shape[1]]).sum(-1)


CASES = {
    "slogdet": lambda x, p: torch.linalg.slogdet(_matrix(x, p, False)).logabsdet,
    "det": lambda x, p: torch.linalg.det(_matrix(x, p, False)),
    "logdet": lambda x, p: torch.logdet(_matrix(x, p, True)),
    "inv": lambda x, p: _weighted(torch.linalg.inv(_matrix(x, p, False)), p),
    "solve": lambda x, p: _weighted(torch.linalg.solve(_matrix(x, p, False), _rhs(x, p)), p),
    "solve_matrix_of_x": lambda x, p: _weighted(
        torch.linalg.solve(_matrix(x, p, False), p["c"][:M, None].expand(len(x), M, 1)), p
    ),
    "solve_rhs_of_x": lambda x, p: _weighted(
        torch.linalg.solve(_matrix(torch.ones_like(x), p, False), _rhs(x, p)[..., None]), p
    ),
    "cholesky": lambda x, p: _weighted(torch.linalg.cholesky(_matrix(x, p, True)), p),
    "cholesky_upper": lambda x, p: _weighted(
        torch.linalg.cholesky(_matrix(x, p, True), upper=True), p
    ),
    "eigvalsh": lambda x, p: _weighted(torch.linalg.eigvalsh(_matrix(x, p, True)), p),
}


def _with_a_zero(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 4)`` factors, the first exactly zero at the tests' ``x`` but varying with it."""
    return torch.cat([x[:, :1] - _ZERO_AT, torch.tanh(x @ p["V"].T)], -1)


# ops whose derivatives PyTorch gets wrong through forward mode only (reverse over reverse is
# right): layer norm's second derivative, prod's third at a zero factor (nan), cumprod's second
# at a zero (nan), householder_product's second; no Taylor rule for the last
FORWARD_WRONG = {
    "layer_norm": lambda x, p: _weighted(
        torch.nn.functional.layer_norm(torch.tanh(x @ p["W"].T), (M * M,), p["c"]).sin(), p
    ),
    "prod_at_a_zero": lambda x, p: torch.prod(_with_a_zero(x, p), -1).sin(),
    "cumprod_at_a_zero": lambda x, p: _weighted(torch.cumprod(_with_a_zero(x, p), -1).sin(), p),
    "householder_product": lambda x, p: _weighted(
        torch.linalg.householder_product(_matrix(x, p, False), torch.tanh(_rhs(x, p)[:, :2])), p
    ),
}
# "hessian" assembles the same Hessian-vector products ("forward-over-reverse"): one suffices
NESTED = ["forward-over-reverse"]


def _x() -> torch.Tensor:
    return torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


_ZERO_AT = _x()[:, :1]


def _laplacian_by_differences(f, x: torch.Tensor) -> torch.Tensor:
    """``sum_i d/dx_i (grad f)_i`` by central differences of the first-order gradient."""

    def grad(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_()
        return torch.autograd.grad(f(z).sum(), z)[0]

    total = torch.zeros(B, dtype=x.dtype)
    for i in range(N):
        e = torch.zeros_like(x)
        e[:, i] = 1
        total += central_difference(lambda t, e=e, i=i: grad(x + t * e)[:, i])
    return total


def _assert_close(actual: float | torch.Tensor, expected: float | torch.Tensor) -> None:
    """Relative error (norm) within ``RTOL``, the error in the message."""
    actual = torch.as_tensor(actual, dtype=torch.float64).detach()
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < RTOL, f"relative error {error:.2e}"


def _gradient_references(case: str):
    """The parameter and ``x`` directional derivatives of the grad-of-grad Laplacian (summed
    over samples with weights 1..B) by central differences, and the directions."""
    f, p, x = {**CASES, **FORWARD_WRONG}[case], _params(), _x()
    g = torch.Generator().manual_seed(2)
    dp = {k: torch.randn(v.shape, dtype=v.dtype, generator=g) for k, v in p.items()}
    dx = torch.randn(x.shape, dtype=x.dtype, generator=g)
    w = torch.arange(1.0, B + 1, dtype=x.dtype)

    def lap(q, z):
        return (laplacian_by_grad_of_grad(lambda u: f(u, q), z).detach() * w).sum()

    by_p = central_difference(lambda t: lap({k: p[k] + t * dp[k] for k in p}, x))
    # moving x moves the factor that is zero at x (the "at a zero" cases): PyTorch's prod and
    # cumprod backward divide by it, so their round-off grows as 1/h; at h = 3e-4 it read
    # 1.4e-8 relative on one machine, at 1e-3 4.7e-10 (truncation O(h^4) stays ~1e-12)
    by_x = central_difference(lambda t: lap(p, x + t * dx), h=1e-3)
    return f, p, x, dp, dx, w, by_p.item(), by_x.item()


def _check_gradients(case: str, laplacian) -> None:
    """``laplacian(g, z)``'s gradients along the reference directions match differences."""
    f, p, x, dp, dx, w, by_p, by_x = _gradient_references(case)
    q = {k: v.clone().requires_grad_() for k, v in p.items()}
    out = laplacian(lambda u: f(u, q), x) * w
    _assert_close(directional_gradient(out, list(q.values()), list(dp.values())), by_p)
    z = x.clone().requires_grad_()
    out = laplacian(lambda u: f(u, p), z) * w
    _assert_close(directional_gradient(out, [z], [dx]), by_x)


@pytest.mark.parametrize("case", CASES)
def test_taylor_rules_give_the_laplacian_and_run_under_auto(case):
    f, p, x = CASES[case], _params(), _x()
    g = lambda z: f(z, p)  # noqa: E731
    assert capture(g, x, RULES).unsupported == []  # "auto" runs "taylor", no fallback
    expected = _laplacian_by_differences(g, x)
    _assert_close(torchdiv.laplacian(g, x, method="taylor"), expected)
    _assert_close(laplacian_by_grad_of_grad(g, x), expected)  # the reference's own check


@pytest.mark.parametrize("case", CASES)
def test_gradients_of_the_taylor_laplacian_match_finite_differences(case):
    _check_gradients(case, lambda g, z: torchdiv.laplacian(g, z, method="taylor"))


@pytest.mark.parametrize("case", ["slogdet", "det", "logdet", "solve", "solve_matrix_of_x"])
@pytest.mark.parametrize("method", NESTED)
def test_nested_methods_replace_the_ops_pytorch_differentiates_wrongly(case, method):
    _check_gradients(case, lambda g, z: torchdiv.laplacian(g, z, method=method))


@pytest.mark.parametrize("case", FORWARD_WRONG)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # (jacrev, tril_)
def test_nested_and_forward_engines_route_around_wrong_forward_mode_derivatives(case):
    """The Laplacian's gradients by forward over reverse (``"auto"``'s fallback where the
    Taylor engine has no rule) and the forward engine's divergence gradients (second
    derivatives): 38-3900% off through layer norm, ``nan`` at a zero factor of prod/cumprod,
    5-14000% off through householder_product, before these ops were replaced."""
    _check_gradients(case, lambda g, z: torchdiv.laplacian(g, z, method="forward-over-reverse"))
    _check_divergence_gradients(FORWARD_WRONG[case], "forward")


@pytest.mark.parametrize("case", ["slogdet", "eigvalsh"])
def test_the_loop_of_backward_passes_leaves_them_alone(case):
    """Reverse over reverse is right for these ops: the loop needs no replacement, and must
    not refuse ``eigvalsh`` (``"auto"`` uses it at one or two inputs)."""
    _check_gradients(case, lambda g, z: torchdiv.laplacian(g, z, method="grad-of-grad"))


def test_grad_of_grad_reference_is_right():
    """The loop the nested tests' differences are built from, differentiated itself."""
    _check_gradients("slogdet", laplacian_by_grad_of_grad)


def test_hutchinson_fallback_replaces_them_too(monkeypatch):
    """Without the Taylor engine (an op it cannot run), Hutchinson uses Hessian-vector products
    by nested autodiff: the same replacements apply."""
    monkeypatch.setattr(_laplacian, "collapsed_or_none", lambda *args, **kwargs: None)
    probes = torch.randn(4, B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    f, p, x = CASES["slogdet"], _params(), _x()
    q = {k: v.clone().requires_grad_() for k, v in p.items()}

    def estimate(params):
        return torchdiv.laplacian(lambda u: f(u, params), x, method="hutchinson", probes=probes)

    def by_hvp(params):  # (1/r) sum_j v_j^T H v_j by reverse over reverse
        z = x.detach().requires_grad_()
        (grad,) = torch.autograd.grad(f(z, params).sum(), z, create_graph=True)
        hv = [torch.autograd.grad((grad * v).sum(), z, create_graph=True)[0] for v in probes]
        return sum((h * v).sum(-1) for h, v in zip(hv, probes, strict=True)) / len(probes)

    torch.testing.assert_close(estimate(p), by_hvp(p), rtol=1e-10, atol=1e-10)
    dp = {k: torch.ones_like(v) for k, v in p.items()}
    expected = central_difference(lambda t: by_hvp({k: p[k] + t * dp[k] for k in p}).sum().detach())
    actual = directional_gradient(estimate(q), list(q.values()), list(dp.values()))
    _assert_close(actual, expected)


@pytest.mark.parametrize("case", ["slogdet", "det", "solve", "solve_rhs_of_x", "cholesky"])
@pytest.mark.parametrize("method", ["forward", "structured"])
def test_divergence_gradients_in_every_engine(case, method):
    """A vector field through the op; its divergence's gradients (second derivatives) by each
    engine against differences of the divergence by first-order reverse mode. (The reverse
    engine, PyTorch's double backward, was right for every op.)"""
    _check_divergence_gradients(CASES[case], method)


def _check_divergence_gradients(f, method: str) -> None:
    p, x = _params(), _x()
    field = lambda z, q: f(z, q)[:, None] * torch.tanh(z)  # noqa: E731
    dp = {k: torch.randn(v.shape, dtype=v.dtype) for k, v in p.items()}
    dx = torch.randn(x.shape, dtype=x.dtype)
    reference = lambda q, z: reference_divergence(lambda u: field(u, q), z).sum()  # noqa: E731
    by_p = central_difference(lambda t: reference({k: p[k] + t * dp[k] for k in p}, x))
    by_x = central_difference(lambda t: reference(p, x + t * dx))
    q = {k: v.clone().requires_grad_() for k, v in p.items()}
    div = torchdiv.divergence(lambda u: field(u, q), x, method=method)
    torch.testing.assert_close(div, reference_divergence(lambda u: field(u, p), x).detach())
    _assert_close(directional_gradient(div, list(q.values()), list(dp.values())), by_p)
    z = x.clone().requires_grad_()
    div = torchdiv.divergence(lambda u: field(u, p), z, method=method)
    _assert_close(directional_gradient(div, [z], [dx]), by_x)


def test_forward_mode_jacobian_through_cholesky_inverse_is_right():
    """PyTorch's forward-mode derivative of ``cholesky_inverse`` is wrong at first order."""
    p, x = _params(), _x()
    f = lambda z: torch.cholesky_inverse(torch.linalg.cholesky(_matrix(z, p, True))).flatten(1)  # noqa: E731
    expected = torchdiv.jacobian(f, x, method="reverse")
    torch.testing.assert_close(torchdiv.jacobian(f, x, method="forward"), expected)
    lap = torchdiv.laplacian(lambda z: _weighted(f(z), p), x)  # falls back: no Taylor rule
    _assert_close(lap, _laplacian_by_differences(lambda z: _weighted(f(z), p), x))


def test_eigenvalues_refused_where_their_derivatives_are_nan():
    f, p, x = CASES["eigvalsh"], _params(), _x()
    with pytest.raises(NotImplementedError, match=r"^laplacian: torch.linalg.eigvalsh in f: .*"):
        torchdiv.laplacian(lambda z: f(z, p), x, method="forward-over-reverse")
    vectors = lambda z: torch.linalg.eigh(_matrix(z, p, True)).eigenvectors.abs().flatten(1)  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"^divergence: torch.linalg.eigh .*'reverse'"):
        torchdiv.divergence(lambda z: vectors(z)[:, :N], x, method="forward")
    with pytest.raises(NotImplementedError, match=r"eigenvectors of aten\._linalg_eigh"):
        torchdiv.laplacian(lambda z: vectors(z).sum(-1), x, method="taylor")
    # "auto" at few inputs falls back to the loop of backward passes, which is right for eigh
    g = lambda z: vectors(z).sum(-1)  # noqa: E731
    _assert_close(torchdiv.laplacian(g, x), _laplacian_by_differences(g, x))


def test_solve_from_the_right_falls_back_rightly():
    p, x = _params(), _x()

    def f(z):
        a, b = _matrix(z, p, False), _matrix(z, p, True)
        return _weighted(torch.linalg.solve(a, b, left=False), p)

    with pytest.raises(NotImplementedError, match="left=False"):
        torchdiv.laplacian(f, x, method="taylor")
    _assert_close(torchdiv.laplacian(f, x), _laplacian_by_differences(f, x))


def test_complex_intermediates_are_not_taken_for_constants():
    """``|FFT x|^2`` summed is ``n |x|^2`` (Parseval): Laplacian ``2 n^2``. Complex results
    were once recorded as independent of ``x``, and the Laplacian came out 0."""
    x = _x()
    lap = torchdiv.laplacian(lambda z: torch.fft.fft(z).abs().square().sum(-1), x)
    torch.testing.assert_close(lap, torch.full((B,), 2.0 * N * N, dtype=x.dtype))


def test_tensorsolve_is_refused_where_pytorch_would_be_silently_wrong():
    """``tensorsolve`` solves inside PyTorch, below ``SafeDerivatives``' reach: forward-over-
    reverse refuses it; the Taylor rule (``movedim`` and ``_linalg_solve_ex``) and the loop
    are right."""
    w = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(x: torch.Tensor) -> torch.Tensor:
        a = (w + torch.diag_embed(x)).reshape(2, 2, 2, 2)
        return torch.linalg.tensorsolve(a, torch.ones(2, 2, dtype=torch.float64)).sum()

    x = torch.rand(4, dtype=torch.float64) + 3
    with pytest.raises(NotImplementedError, match=r"^laplacian: torch.linalg.tensorsolve in f"):
        torchdiv.laplacian(f, x, batch_dims=0, method="forward-over-reverse")
    expected = laplacian_by_grad_of_grad(f, x[None]).reshape(())
    for method in ("taylor", "auto"):
        _assert_close(torchdiv.laplacian(f, x, batch_dims=0, method=method), expected)


def test_repeated_eigenvalues_sum_exactly():
    """Equal eigenvalues: the Taylor rule's pair terms cancel within the cluster (no 0/0)."""
    eye = torch.eye(3, dtype=torch.float64)
    u = lambda x: torch.linalg.eigvalsh(x[:, :1, None] * eye + x[:, 1:, None] ** 2 * eye).sum(-1)  # noqa: E731
    x = torch.randn(4, 2, dtype=torch.float64)
    _assert_close(torchdiv.laplacian(u, x, method="taylor"), torch.full((4,), 6.0).double())


def test_cholesky_inverse_replacement_reads_one_triangle():
    factor = torch.randn(3, 3, dtype=torch.float64)  # not triangular: PyTorch reads one half
    for upper in (False, True):
        with torch.no_grad():
            expected = torch.cholesky_inverse(factor, upper=upper)
        torch.testing.assert_close(torchdiv._core.linalg.cholesky_inverse(factor, upper), expected)


@pytest.mark.parametrize("method", ["taylor", "forward-over-reverse", "hessian"])
@pytest.mark.parametrize("op", ["slogdet", "det"])
def test_a_singular_sample_leaves_the_others_alone(method, op):
    """Orbitals of three electrons, two of them at the same place in sample 1: its matrix is
    exactly singular. The derivative rules' ``inv`` (the Taylor rule, ``SafeDerivatives``' log
    |det|, the per-particle sparse jets) raised LAPACK's "singular" error for the whole batch;
    now that sample's Laplacian is nan and the others' are as alone."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)

    def f(x):  # (B, 3 electrons, 2) -> (B,)
        m = torch.tanh(x @ w + b)
        return torch.linalg.slogdet(m).logabsdet if op == "slogdet" else torch.linalg.det(m)

    x = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    x[1, 2] = x[1, 0]
    lap = torchdiv.laplacian(f, x, method=method)
    assert not lap[1].isfinite()
    for i in (0, 2, 3):
        expected = torch.func.hessian(lambda z: f(z[None])[0])(x[i]).reshape(6, 6).trace()
        torch.testing.assert_close(lap[i], expected, rtol=1e-10, atol=1e-10)
