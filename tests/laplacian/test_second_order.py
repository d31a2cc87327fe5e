"""Partial Laplacians, tr(A ∇²u), the biharmonic and value + gradient + Laplacian, against
closed forms, per-sample torch.func Hessians and float64 finite differences."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    Stateful,
    assert_close,
    assert_one_state,
    assert_same_parameter_gradients,
    laplacian_by_grad_of_grad,
    one_state,
    tanh_mlp,
)
from torch import nn
from torch.func import hessian, vmap
from torch.nn import functional as F

import torchdiv

f64 = torch.float64
EXACT = ["auto", "taylor", "forward-over-reverse", "hessian"]


def gaussian(x: torch.Tensor) -> torch.Tensor:
    """``u = exp(-|x|²/2)``: ``∇u = -u x``, ``∇²u = u (x xᵀ - I)``."""
    return torch.exp(-0.5 * x.square().sum(-1))


def hessians(f, x: torch.Tensor) -> torch.Tensor:
    """Per-sample Hessians of a scalar-per-sample ``f`` of ``(N, n)`` inputs, ``(N, n, n)``."""
    return vmap(hessian(lambda z: f(z[None])[0]))(x)


def _net(n: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return tanh_mlp(n, 8, 1)


def _scalar(net: torch.nn.Module):
    return lambda x: net(x).squeeze(-1)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``autograd.grad`` with zeros for inputs ``out`` does not depend on (a last bias)."""
    grads = torch.autograd.grad(out, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, inputs, strict=True)]


def _fd_param_grad(loss, p: torch.Tensor, h: float = 1e-5) -> torch.Tensor:
    """Central differences of ``loss()`` in every entry of the parameter ``p`` (float64)."""
    out = torch.zeros_like(p)
    with torch.no_grad():
        for i in range(p.numel()):
            old = p.view(-1)[i].item()
            p.view(-1)[i] = old + h
            up = loss().item()
            p.view(-1)[i] = old - h
            down = loss().item()
            p.view(-1)[i] = old
            out.view(-1)[i] = (up - down) / (2 * h)
    return out


# ----------------------------------------------------------------------- partial Laplacian


@pytest.mark.parametrize("method", EXACT)
def test_partial_laplacian_closed_form(method):
    x = torch.randn(6, 3, dtype=f64)
    u = lambda x: torch.sin(x[:, 0]) * x[:, 1] ** 2 * torch.exp(x[:, 2])  # noqa: E731
    s, e = torch.sin(x[:, 0]), torch.exp(x[:, 2])
    d00, d11, d22 = -s * x[:, 1] ** 2 * e, 2 * s * e, s * x[:, 1] ** 2 * e
    for coordinates, expected in [
        ([1], d11),
        ([0, 2], d00 + d22),
        ([-1, 1], d22 + d11),
        (torch.tensor([2, 0]), d22 + d00),
        (torch.tensor([True, True, False]), d00 + d11),
        ([], torch.zeros(6, dtype=f64)),
    ]:
        actual = torchdiv.laplacian(u, x, method=method, coordinates=coordinates)
        assert_close(actual, expected)


@pytest.mark.parametrize("method", EXACT)
def test_partial_laplacian_of_a_multidimensional_event_and_batch(method):
    """Flat event indices of a (2, 3) event, two batch dimensions, a vector output."""
    net = tanh_mlp(6, 8, 2)
    f = lambda x: net(x.flatten(-2))  # noqa: E731
    x = torch.randn(2, 3, 2, 3, dtype=f64)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    flat = x.reshape(6, 6)
    expected = torch.stack(
        [hessians(lambda z, i=i: net(z)[:, i], flat) for i in range(2)], 1
    )  # (6, 2, 6, 6)
    expected = expected.diagonal(dim1=-2, dim2=-1)[..., mask.flatten()].sum(-1).reshape(2, 3, 2)
    actual = torchdiv.laplacian(f, x, batch_dims=2, method=method, coordinates=mask)
    assert_close(actual, expected)
    actual = torchdiv.laplacian(f, x, batch_dims=2, method=method, coordinates=[0, 2, 5])
    assert_close(actual, expected)


def test_heat_residual_over_space_only():
    """``u_t - Δ_x u`` for the heat kernel in one dimension vanishes: input ``(x, t)``."""
    xt = torch.rand(8, 2, dtype=f64) + torch.tensor([0.0, 0.5], dtype=f64)
    kernel = lambda z: torch.exp(-(z[:, 0] ** 2) / (4 * z[:, 1])) / z[:, 1].sqrt()  # noqa: E731
    u_t = torch.func.vmap(torch.func.grad(lambda z: kernel(z[None])[0]))(xt)[:, 1]
    assert_close(torchdiv.laplacian(kernel, xt, coordinates=[0]), u_t)


@pytest.mark.parametrize("method", ["taylor", "forward-over-reverse"])
def test_partial_laplacian_gradients_match_nested_autograd_and_finite_differences(method):
    net = _net()
    f = _scalar(net)
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    coordinates = [0, 2]

    def reference() -> torch.Tensor:
        h = hessians(f, x)
        return h.diagonal(dim1=-2, dim2=-1)[:, coordinates].sum(-1)

    actual = torchdiv.laplacian(f, x, method=method, coordinates=coordinates)
    weights = torch.randn(5, dtype=f64)
    params = [x, *net.parameters()]
    got = _grads((actual * weights).sum(), params)
    want = _grads((reference() * weights).sum(), params)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
    first = net[0].weight
    loss = lambda: (torchdiv.laplacian(f, x, coordinates=coordinates) * weights).sum()  # noqa: E731
    torch.testing.assert_close(got[1], _fd_param_grad(loss, first), rtol=1e-7, atol=1e-8)


def test_partial_hutchinson_uses_the_probes_restricted_to_the_coordinates():
    f = _scalar(_net())
    x = torch.randn(4, 3, dtype=f64)
    probes = torchdiv.draw_probes(x, 6, generator=torch.Generator().manual_seed(0))
    got = torchdiv.laplacian(f, x, method="hutchinson", probes=probes, coordinates=[0, 1])
    v = probes * torch.tensor([1.0, 1.0, 0.0], dtype=f64)
    expected = torch.einsum("rbi,bij,rbj->b", v, hessians(f, x), v) / 6
    assert_close(got, expected)


def test_partial_hutchinson_is_unbiased():
    f = _scalar(_net())
    x = torch.randn(3, 3, dtype=f64)
    exact = torchdiv.laplacian(f, x, coordinates=[1, 2])
    g = torch.Generator().manual_seed(1)
    draws = torch.stack(
        [
            torchdiv.laplacian(
                f, x, method="hutchinson", num_probes=4, generator=g, coordinates=[1, 2]
            )
            for _ in range(100)
        ]
    )
    stderr = draws.std(0) / 100**0.5
    assert ((draws.mean(0) - exact).abs() <= 4 * stderr + 1e-12).all()


@pytest.mark.parametrize(
    ("coordinates", "error", "match"),
    [
        ([0, 0], ValueError, r"laplacian: coordinates must not repeat.*\[0, 0\]"),
        ([3], ValueError, r"laplacian: coordinates must be indices .* 3 elements .*\[-3, 3\)"),
        ([-4], ValueError, r"laplacian: coordinates .*got \[-4\]"),
        (torch.tensor([0.5]), TypeError, r"laplacian: coordinates .* torch\.float32 tensor"),
        (torch.tensor([[0]]), TypeError, r"laplacian: coordinates .*shape \(1, 1\)"),
        # PyTorch reads a uint8 index tensor as a (deprecated) mask: [1, 0] was taken as the
        # indices {0, 1} here, the mask's coordinate 0 there
        (
            torch.tensor([1, 0], dtype=torch.uint8),
            TypeError,
            r"laplacian: coordinates .*torch\.uint8 .*mask.* bool",
        ),
        (
            torch.tensor([True, False]),
            ValueError,
            r"laplacian: a boolean coordinates mask .*\(2,\)",
        ),
        ("ab", TypeError, r"laplacian: coordinates must be .* got str"),
        (
            [True],
            TypeError,
            r"laplacian: coordinates must be .*mask \(a bool tensor\), got a list of bool",
        ),
        ([0, 1.0], TypeError, r"laplacian: coordinates must be .* got a list of float, int"),
    ],
)
def test_partial_laplacian_errors(coordinates, error, match):
    with pytest.raises(error, match=match):
        torchdiv.laplacian(gaussian, torch.randn(2, 3), coordinates=coordinates)


def test_coordinates_may_be_numpy_integers():
    np = pytest.importorskip("numpy")
    x = torch.randn(2, 3, dtype=f64)
    want = torchdiv.laplacian(gaussian, x, coordinates=[0, 2])
    assert_close(torchdiv.laplacian(gaussian, x, coordinates=[np.int64(0), np.int32(2)]), want)
    assert_close(torchdiv.laplacian(gaussian, x, coordinates=list(np.array([0, 2]))), want)


# ------------------------------------------------------------------- tr(A ∇²u)


def _gaussian_trace(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``tr(A ∇²u) = u (xᵀ A x - tr A)`` for the Gaussian, ``A`` shared or per sample."""
    a = a.expand(len(x), -1, -1)
    return gaussian(x) * (torch.einsum("bi,bij,bj->b", x, a, x) - a.diagonal(0, -2, -1).sum(-1))


def _matrices(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    b = torch.randn(n, n, generator=g, dtype=f64)
    low = torch.randn(n, 2, generator=g, dtype=f64)
    return {
        "positive definite": b @ b.T + torch.eye(n, dtype=f64),
        "indefinite, non-symmetric": b,
        "rank 2": low @ low.T,
        "diagonal, one zero": torch.diag(torch.tensor([2.0, 0.0, -1.0, 0.5], dtype=f64)),
        "per sample": torch.randn(5, n, n, generator=g, dtype=f64),
        "zero": torch.zeros(n, n, dtype=f64),
    }


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("kind", list(_matrices(4)))
def test_weighted_laplacian_of_a_gaussian(method, kind):
    a = _matrices(4)[kind]
    x = torch.randn(5, 4, dtype=f64)
    got = torchdiv.weighted_laplacian(gaussian, x, diffusion=a, method=method)
    assert_close(got, _gaussian_trace(a, x))


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per sample"])
def test_weighted_laplacian_keeps_small_eigenvalues_of_a_stiff_diffusion(per_sample):
    """``A = diag(±1e7, 1, -1, 1)`` in float32, ``u`` independent of ``x_0``: ``tr(A H) = 2``
    comes entirely from the eigenvalues 1e7 times smaller than the largest (they were dropped
    as rounding noise: 0 for a shared ``A``, 4 per sample, where only the negative part went)."""
    x = torch.randn(3, 4)
    u = lambda x: (x[:, 1:] ** 2).sum(-1)  # noqa: E731  (H = diag(0, 2, 2, 2))
    for big in (1e7, -1e7):
        a = torch.diag(torch.tensor([big, 1.0, -1.0, 1.0]))
        a = a.expand(3, 4, 4) if per_sample else a
        for method in EXACT:
            got = torchdiv.weighted_laplacian(u, x, diffusion=a, method=method)
            torch.testing.assert_close(got, torch.full((3,), 2.0), rtol=1e-5, atol=1e-5)
    a = torch.diag(torch.tensor([1.0, -1e-7, -1e7, 1.0]))  # a tiny negative eigenvalue too
    expected = torch.full((3,), 2.0 - 2e-7 - 2e7 + 2.0)
    got = torchdiv.weighted_laplacian(u, x, diffusion=a)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", EXACT)
def test_a_per_sample_diffusion_that_is_not_finite_leaves_the_other_samples_alone(method):
    """One sample's ``A`` with a nan, another's with an inf (a learned diffusion that diverged
    there): ``eigh`` raised for the whole batch ("no eigendecomposition"); now those samples
    get nan and the others ``tr(A H)``. A shared ``A`` that is not finite still raises."""
    a = _matrices(4)["per sample"].clone()
    a[1, 0, 2], a[3, 3, 3] = float("nan"), float("inf")
    x = torch.randn(5, 4, dtype=f64)
    got = torchdiv.weighted_laplacian(gaussian, x, diffusion=a, method=method)
    assert got[[1, 3]].isnan().all()
    good = [0, 2, 4]
    assert_close(got[good], _gaussian_trace(a[good], x[good]))
    with pytest.raises(ValueError, match=r"diffusion of shape \(4, 4\) has no eigendecomp"):
        torchdiv.weighted_laplacian(gaussian, x, diffusion=a[1], method=method)


@pytest.mark.parametrize("method", EXACT)
def test_weighted_laplacian_from_a_factor(method):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 4, dtype=f64)
    shared = torch.randn(4, 2, generator=g, dtype=f64)
    per_sample = torch.randn(5, 4, 3, generator=g, dtype=f64)
    for sigma in (shared, per_sample):
        got = torchdiv.weighted_laplacian(gaussian, x, sigma=sigma, method=method, chunk_size=2)
        assert_close(got, _gaussian_trace(sigma @ sigma.mT, x))


@pytest.mark.parametrize("method", [*EXACT, "grad-of-grad"])
def test_weighted_laplacian_of_factors_made_under_inference_mode(method):
    """An evaluation loop under ``torch.inference_mode()`` that makes ``sigma`` (or
    ``diffusion``) there too: the same numbers as outside. ``x`` was cloned out of inference
    mode, the keyword tensors were not: "Inference tensors cannot be saved for backward"
    (``"auto"`` at this size and ``"grad-of-grad"``)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 4, dtype=f64)
    s = torch.randn(4, 2, generator=g, dtype=f64)
    with torch.inference_mode():
        sigma, diffusion = s.clone(), s @ s.T
        by_sigma = torchdiv.weighted_laplacian(gaussian, x, sigma=sigma, method=method)
        by_diffusion = torchdiv.weighted_laplacian(gaussian, x, diffusion=diffusion, method=method)
    assert_close(by_sigma, _gaussian_trace(s @ s.T, x))
    assert_close(by_diffusion, _gaussian_trace(s @ s.T, x))


def test_weighted_laplacian_of_a_polynomial_with_vector_output():
    """``u = (x0² x1, x0 x1 x2)``: ``tr(A H)`` by hand."""
    x = torch.randn(4, 3, dtype=f64)
    u = lambda x: torch.stack([x[:, 0] ** 2 * x[:, 1], x[:, 0] * x[:, 1] * x[:, 2]], -1)  # noqa: E731
    a = torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 3.0], [0.0, 3.0, 5.0]], dtype=f64)
    first = a[0, 0] * 2 * x[:, 1] + 2 * a[0, 1] * 2 * x[:, 0]
    second = 2 * (a[0, 1] * x[:, 2] + a[0, 2] * x[:, 1] + a[1, 2] * x[:, 0])
    expected = torch.stack([first, second], -1)
    for method in EXACT:
        assert_close(torchdiv.weighted_laplacian(u, x, diffusion=a, method=method), expected)


@pytest.mark.parametrize("method", ["taylor", "forward-over-reverse"])
def test_weighted_laplacian_gradients(method):
    """w.r.t. x, the parameters and sigma, against per-sample Hessians; w.r.t. a diffusion
    matrix that requires grad (here 2 I: repeated eigenvalues), ``Σ_b H_b`` exactly."""
    net = _net(4)
    f = _scalar(net)
    x = torch.randn(5, 4, dtype=f64, requires_grad=True)
    sigma = torch.randn(4, 3, dtype=f64, requires_grad=True)
    weights = torch.randn(5, dtype=f64)
    params = [x, sigma, *net.parameters()]
    got = torchdiv.weighted_laplacian(f, x, sigma=sigma, method=method)
    want = torch.einsum("bij,ik,jk->b", hessians(f, x), sigma, sigma)
    assert_close(got, want)
    for a, b in zip(
        _grads((got * weights).sum(), params),
        _grads((want * weights).sum(), params),
        strict=True,
    ):
        assert_close(a, b)
    a = (2 * torch.eye(4, dtype=f64)).requires_grad_(True)
    got = torchdiv.weighted_laplacian(f, x, diffusion=a, method=method)
    (grad_a,) = torch.autograd.grad((got * weights).sum(), a)
    h = hessians(f, x).detach()
    assert_close(got, 2 * h.diagonal(0, -2, -1).sum(-1))
    assert_close(grad_a, torch.einsum("b,bij->ij", weights, h))


@pytest.mark.parametrize("name", ["sigma", "diffusion"])
def test_weighted_laplacian_by_taylor_names_itself_and_the_op_without_a_rule(name):
    """The error named ``laplacian``, the engine it runs, not the call the caller made."""
    x = torch.randn(4, 3, dtype=f64)
    options = {name: torch.eye(3, dtype=f64)}
    with pytest.raises(
        NotImplementedError, match=r"^weighted_laplacian: method='taylor' has no .*lgamma"
    ):
        torchdiv.weighted_laplacian(
            lambda z: torch.lgamma(z).sum(-1), x, method="taylor", **options
        )


def test_a_diffusion_that_requires_grad_names_a_way_out_that_runs():
    """A differentiable ``diffusion`` takes Hessian-vector products whatever ``method`` says;
    with an op refused through forward mode (``eigh``) the error named ``method='taylor' or
    'grad-of-grad'``, which the caller had passed and which ran the same products. Now it
    names ``sigma``, which runs with every method (here the loop, against the closed form)."""

    def u(z):  # eigh of a matrix made from z, ∂²/∂z_j² of its first eigenvector's sum
        m = z[:, :, None] * z[:, None, :] + torch.diag(torch.arange(1.0, 4.0, dtype=f64))
        return torch.linalg.eigh(m)[1][..., 0].sum(-1)

    x = torch.randn(4, 3, dtype=f64)
    factor = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.3]], dtype=f64, requires_grad=True)
    a = (factor @ factor.T).detach().requires_grad_(True)
    with pytest.raises(NotImplementedError, match=r"weighted_laplacian: .*eigh.* as sigma"):
        torchdiv.weighted_laplacian(u, x, diffusion=a, method="grad-of-grad")
    got = torchdiv.weighted_laplacian(u, x, sigma=factor, method="grad-of-grad")
    h = torch.stack([torch.autograd.functional.hessian(lambda z: u(z[None])[0], s) for s in x])
    assert_close(got, torch.einsum("ij,bij->b", a.detach(), h))
    (grad,) = torch.autograd.grad(got.sum(), factor)
    assert_close(grad, 2 * h.sum(0) @ factor.detach())


def test_weighted_laplacian_parameter_gradient_by_finite_differences():
    net = _net(4)
    f = _scalar(net)
    x = torch.randn(3, 4, dtype=f64)
    a = _matrices(4)["indefinite, non-symmetric"]
    loss = lambda: torchdiv.weighted_laplacian(f, x, diffusion=a).sum()  # noqa: E731
    (got,) = torch.autograd.grad(loss(), net[2].weight)
    torch.testing.assert_close(got, _fd_param_grad(loss, net[2].weight), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["sigma", "indefinite", "requires grad"])
def test_weighted_hutchinson_is_unbiased(name):
    f = _scalar(_net(4))
    x = torch.randn(3, 4, dtype=f64)
    options = {
        "sigma": {"sigma": _matrices(4)["per sample"][:3, :, :2]},
        "indefinite": {"diffusion": _matrices(4)["indefinite, non-symmetric"]},
        "requires grad": {"diffusion": _matrices(4)["indefinite, non-symmetric"].requires_grad_()},
    }[name]
    exact = torchdiv.weighted_laplacian(f, x, **options).detach()
    g = torch.Generator().manual_seed(2)
    draws = torch.stack(
        [
            torchdiv.weighted_laplacian(
                f, x, method="hutchinson", num_probes=2, generator=g, **options
            ).detach()
            for _ in range(100)
        ]
    )
    stderr = draws.std(0) / 100**0.5
    assert ((draws.mean(0) - exact).abs() <= 4 * stderr + 1e-12).all()


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({}, ValueError, "weighted_laplacian: give exactly one of diffusion"),
        (
            {"sigma": torch.ones(3, 1), "diffusion": torch.eye(3)},
            ValueError,
            "give exactly one",
        ),
        ({"diffusion": torch.eye(2)}, ValueError, r"diffusion must have shape \(3, 3\) .*\(2, 2\)"),
        ({"diffusion": torch.ones(2, 3, 3)}, ValueError, r"\(4,\) \+ \(3, 3\).*\(2, 3, 3\)"),
        ({"sigma": torch.ones(2, 1)}, ValueError, r"sigma must have shape \(3, k\)"),
        ({"sigma": torch.ones(3, 1, dtype=torch.int64)}, TypeError, "sigma must have a floating"),
        ({"sigma": [[1.0]]}, TypeError, "sigma must be a torch.Tensor, got list"),
        (
            {"diffusion": torch.full((3, 3), float("nan"))},
            ValueError,
            r"weighted_laplacian: diffusion of shape \(3, 3\) has no eigendecomposition",
        ),
        ({"sigma": torch.ones(3, 1), "num_probes": 3}, ValueError, "num_probes is only used"),
        ({"sigma": torch.ones(3, 1), "method": "nope"}, ValueError, "unknown method 'nope'"),
        (
            {"sigma": torch.ones(3, 1), "method": "hutchinson"},
            ValueError,
            "weighted_laplacian: method='hutchinson' needs num_probes",
        ),
    ],
)
def test_weighted_laplacian_errors(options, error, match):
    with pytest.raises(error, match=match):
        torchdiv.weighted_laplacian(gaussian, torch.randn(4, 3), **options)


UNBATCHED = {
    "sigma": (torchdiv.weighted_laplacian, {"sigma": torch.ones(3, 2)}),
    "diffusion": (torchdiv.weighted_laplacian, {"diffusion": torch.eye(3)}),
    "coordinates": (torchdiv.laplacian, {"coordinates": [0, 2]}),
    "mask": (torchdiv.laplacian, {"coordinates": torch.tensor([True, False, True])}),
}


@pytest.mark.parametrize("name", UNBATCHED)
def test_options_sized_by_the_event_of_an_unbatched_x_say_batch_dims_0(name):
    """One point without a batch dimension, and an option sized for its 3 coordinates: the
    shape error named only an event of one element (each element read as a sample); it now
    says why and names ``batch_dims=0``, as the sample-mixing error of the operators does."""
    operator, options = UNBATCHED[name]
    with pytest.raises(ValueError, match=r"no event dimensions.*batch_dims=0"):
        operator(gaussian, torch.randn(3), **options)
    assert operator(gaussian, torch.randn(3), batch_dims=0, **options).shape == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weighted_laplacian_in_half_precision(dtype):
    """PyTorch has no half ``eigh``: the diffusion matrix is decomposed in float32. Against
    float64 at the half-precision point, within the half dtype's few digits."""
    x = torch.randn(4, 3).to(dtype)
    a = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, -1.0]])
    got = torchdiv.weighted_laplacian(gaussian, x, diffusion=a.to(dtype))
    want = torchdiv.weighted_laplacian(gaussian, x.double(), diffusion=a.double())
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------- biharmonic


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
def test_biharmonic_closed_forms(method):
    x = torch.randn(4, 3, dtype=f64)
    n, r2 = 3, x.square().sum(-1)
    quartic = lambda x: x.square().sum(-1) ** 2  # noqa: E731
    assert_close(
        torchdiv.biharmonic(quartic, x, method=method),
        torch.full((4,), 8.0 * n * (n + 2), dtype=f64),
    )
    expected = gaussian(x) * (2 * n - 4 * r2 + (r2 - n) ** 2)
    assert_close(torchdiv.biharmonic(gaussian, x, method=method), expected)


def test_biharmonic_of_a_network_and_its_gradients():
    """Taylor inside Taylor against nested autodiff (values and parameter gradients), and the
    parameter gradient against float64 finite differences."""
    net = _net()
    f = _scalar(net)
    x = torch.randn(3, 3, dtype=f64)
    taylor = torchdiv.biharmonic(f, x, method="taylor")
    nested = torchdiv.biharmonic(f, x, method="forward-over-reverse")
    assert_close(taylor, nested)
    w = net[2].weight
    (g_taylor,) = torch.autograd.grad(taylor.sum(), w)
    (g_nested,) = torch.autograd.grad(nested.sum(), w)
    assert_close(g_taylor, g_nested)
    loss = lambda: torchdiv.biharmonic(f, x).sum()  # noqa: E731
    torch.testing.assert_close(g_taylor, _fd_param_grad(loss, w), rtol=1e-6, atol=1e-7)


def test_biharmonic_errors():
    with pytest.raises(ValueError, match="biharmonic: unknown method 'hessian'"):
        torchdiv.biharmonic(gaussian, torch.randn(2, 3), method="hessian")


# ------------------------------------------------------------------ value, grad, laplacian


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
def test_value_grad_laplacian_of_a_gaussian(method):
    x = torch.randn(5, 3, dtype=f64)
    out = torchdiv.value_grad_laplacian(gaussian, x, method=method, chunk_size=2)
    u = gaussian(x)
    assert_close(out.value, u)
    assert_close(out.gradient, -u[:, None] * x)
    assert_close(out.laplacian, u * (x.square().sum(-1) - 3))


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
def test_value_grad_laplacian_vector_output_and_batch_dims(method):
    net = tanh_mlp(6, 8, 2)
    f = lambda x: net(x.flatten(-2))  # noqa: E731
    x = torch.randn(2, 2, 2, 3, dtype=f64)
    out = torchdiv.value_grad_laplacian(f, x, batch_dims=2, method=method)
    assert_close(out.value, f(x))
    assert_close(out.gradient, torchdiv.jacobian(f, x, batch_dims=2))
    assert_close(out.laplacian, torchdiv.laplacian(f, x, batch_dims=2, method="hessian"))


def test_local_energy_and_its_parameter_gradients():
    """``-(Δ log ψ + |∇ log ψ|²)/2`` from one sweep, against per-sample Hessians and
    gradients by torch.func, parameter gradients included, and finite differences."""
    net = _net()
    log_psi = _scalar(net)
    x = torch.randn(5, 3, dtype=f64)

    def local_energy() -> torch.Tensor:
        out = torchdiv.value_grad_laplacian(log_psi, x)
        return -0.5 * (out.laplacian + out.gradient.square().sum(-1))

    grads = vmap(torch.func.grad(lambda z: log_psi(z[None])[0]))(x)
    want = -0.5 * (hessians(log_psi, x).diagonal(0, -2, -1).sum(-1) + grads.square().sum(-1))
    got = local_energy()
    assert_close(got, want)
    params = list(net.parameters())
    for a, b in zip(_grads(got.sum(), params), _grads(want.sum(), params), strict=True):
        assert_close(a, b)
    w = net[0].weight
    g = _grads(local_energy().sum(), [w])[0]
    torch.testing.assert_close(
        g, _fd_param_grad(lambda: local_energy().sum(), w), rtol=1e-7, atol=1e-8
    )


def test_value_grad_laplacian_falls_back_where_an_op_has_no_rule():
    f = lambda x: torch.lgamma(x.square() + 1).sum(-1)  # noqa: E731
    x = torch.randn(4, 3, dtype=f64)
    out = torchdiv.value_grad_laplacian(f, x)
    assert_close(out.gradient, torchdiv.jacobian(f, x))
    assert_close(out.laplacian, torchdiv.laplacian(f, x, method="hessian"))
    with pytest.raises(
        NotImplementedError, match=r"^value_grad_laplacian: method='taylor' .*lgamma"
    ):
        torchdiv.value_grad_laplacian(f, x, method="taylor")


def test_value_grad_laplacian_of_a_constant_and_of_an_empty_batch():
    x = torch.randn(3, 2, dtype=f64)
    out = torchdiv.value_grad_laplacian(lambda x: torch.ones_like(x[:, 0]), x)
    assert_close(out.gradient, torch.zeros(3, 2, dtype=f64))
    assert_close(out.laplacian, torch.zeros(3, dtype=f64))
    out = torchdiv.value_grad_laplacian(gaussian, torch.randn(0, 2, dtype=f64))
    assert out.value.shape == out.laplacian.shape == (0,) and out.gradient.shape == (0, 2)


# --------------------------------------------------------------------------- graph form


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_graph_laplacian_matches_the_function_form(chunk_size):
    net = tanh_mlp(6, 8, 2)
    x = torch.randn(2, 3, 2, 3, dtype=f64, requires_grad=True)
    f = lambda x: net(x.flatten(-2))  # noqa: E731
    y = f(x)
    for coordinates in (None, [0, 4, 5]):
        got = torchdiv.graph_laplacian(
            y, x, batch_dims=2, chunk_size=chunk_size, coordinates=coordinates
        )
        want = torchdiv.laplacian(f, x, batch_dims=2, coordinates=coordinates, method="hessian")
        assert_close(got, want.detach())
        assert not got.requires_grad
    assert y.grad_fn is not None and torch.autograd.grad(y.sum(), x)[0].shape == x.shape


def test_graph_laplacian_in_a_pinn_loss():
    """``create_graph=True``: the loss's parameter gradients match the function form's."""
    net = _net(2)
    x = torch.randn(6, 2, dtype=f64, requires_grad=True)
    y = net(x)  # (6, 1), as DeepXDE's pde(x, y) receives it
    got = torchdiv.graph_laplacian(y, x, create_graph=True, coordinates=[0])
    want = torchdiv.laplacian(net, x, coordinates=[0])
    assert got.shape == (6, 1)
    assert_close(got, want)
    params = list(net.parameters())
    for a, b in zip(
        _grads(got.square().sum(), params), _grads(want.square().sum(), params), strict=True
    ):
        assert_close(a, b)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_graph_forms_under_no_grad_and_inference_mode(mode):
    """``y`` built with grad, the graph form called inside ``no_grad`` / ``inference_mode`` (a
    validation loop): the same numbers as outside. The Laplacian's first-level gradients need
    a graph of their own; without one it returned zeros."""
    x = torch.randn(3, 2, dtype=f64, requires_grad=True)
    y, v = x.pow(3).sum(-1), x.pow(3)
    want_lap, want_div = 6 * x.sum(-1).detach(), 3 * x.square().sum(-1).detach()
    with mode():
        assert_close(torchdiv.graph_laplacian(y, x), want_lap)
        assert_close(torchdiv.graph_laplacian(y, x, coordinates=[1]), 6 * x[:, 1].detach())
        assert_close(torchdiv.graph_divergence(v, x), want_div)
        assert_close(torchdiv.graph_jacobian(v, x).diagonal(0, -2, -1).sum(-1), want_div)


def test_graph_laplacian_refuses_to_differentiate_wrong_third_derivatives():
    """A graph the caller built keeps PyTorch's formulas: with ``create_graph=True`` the
    Laplacian's gradients through these ops would be wrong (``nan`` for logcumsumexp, off
    by 20-230% for the norms); refused, naming the node and the function form. Without
    ``create_graph`` (second derivatives, right) and through an eval-mode batch norm (affine)
    it runs."""
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    wrong = {
        "LogcumsumexpBackward0": lambda z: torch.logcumsumexp(z, -1).sum(-1),
        "NativeLayerNormBackward0": lambda z: F.layer_norm(z, (4,)).pow(3).sum(-1),
        "NativeBatchNormBackward0": lambda z: F.instance_norm(z.view(3, 2, 2)).pow(3).sum((1, 2)),
    }
    for node, u in wrong.items():
        with pytest.raises(ValueError, match=f"graph_laplacian: y's graph holds {node}.*function"):
            torchdiv.graph_laplacian(u(x), x, create_graph=True)
        assert_close(torchdiv.graph_laplacian(u(x), x), torchdiv.laplacian(u, x).detach())
    norm = nn.BatchNorm1d(4).double().eval()
    u = lambda z: norm(z).pow(3).sum(-1)  # noqa: E731
    assert_close(torchdiv.graph_laplacian(u(x), x, create_graph=True), torchdiv.laplacian(u, x))
    w = torch.randn(4, dtype=f64, requires_grad=True)
    condition = lambda: F.layer_norm(torch.ones(3, 4, dtype=f64) * w, (4,))  # noqa: E731
    u = lambda z: (z.tanh() * condition()).sum(-1)  # noqa: E731  (off the paths to x: runs)
    got = torchdiv.graph_laplacian(u(x), x, create_graph=True)
    want = laplacian_by_grad_of_grad(u, x)  # its gradient in w: one derivative through the norm
    assert_close(got, want)
    assert_close(torch.autograd.grad(got.sum(), w)[0], torch.autograd.grad(want.sum(), w)[0])
    z = F.layer_norm(x, (4,))  # x's own history: runs
    assert_close(
        torchdiv.graph_laplacian(z.tanh().sum(-1), z, create_graph=True),
        torchdiv.laplacian(lambda t: t.tanh().sum(-1), z),
    )


def test_graph_laplacian_of_a_linear_map_is_zero_and_errors():
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(torchdiv.graph_laplacian(x @ torch.ones(2, 2), x), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="graph_laplacian: x does not require grad"):
        torchdiv.graph_laplacian(x.detach() ** 2, x.detach())
    with pytest.raises(ValueError, match="graph_laplacian: coordinates must not repeat"):
        torchdiv.graph_laplacian(x**2, x, coordinates=[1, 1])
    with pytest.raises(TypeError, match="graph_laplacian: create_graph must be True or False"):
        torchdiv.graph_laplacian(x**2, x, create_graph=None)


# ------------------------------------------------------------- the loop and "auto"'s rule


@pytest.mark.parametrize("batch_dims", [0, 1, 2])
def test_grad_of_grad_method(batch_dims):
    net = tanh_mlp(3, 8, 2)
    x = torch.randn(*[2] * batch_dims, 3, dtype=f64, requires_grad=True)
    got = torchdiv.laplacian(net, x, batch_dims=batch_dims, method="grad-of-grad")
    want = torchdiv.laplacian(net, x, batch_dims=batch_dims, method="taylor")
    assert_close(got, want)
    params = [x, *net.parameters()]
    for a, b in zip(_grads(got.sum(), params), _grads(want.sum(), params), strict=True):
        assert_close(a, b)
    with torch.no_grad():
        frozen = torchdiv.laplacian(net, x, batch_dims=batch_dims, method="grad-of-grad")
    assert not frozen.requires_grad
    assert_close(frozen, want.detach())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_auto_at_few_inputs_matches_closed_forms_and_gradients(n):
    """``"auto"`` loops over backward passes at one or two inputs: same values, same
    gradients (x and parameters) as the Taylor engine, also inside ``no_grad``."""
    x = torch.randn(5, n, dtype=f64, requires_grad=True)
    assert_close(torchdiv.laplacian(gaussian, x), gaussian(x) * (x.square().sum(-1) - n))
    net = _net(n)
    f = _scalar(net)
    got, want = torchdiv.laplacian(f, x), torchdiv.laplacian(f, x, method="taylor")
    params = [x, *net.parameters()]
    for a, b in zip(_grads(got.sum(), params), _grads(want.sum(), params), strict=True):
        assert_close(a, b)
    const = torchdiv.laplacian(lambda x: x.sum(-1) * 0 + 1, x)
    assert torch.equal(const, torch.zeros(5, dtype=f64))


def test_auto_routes_around_a_nan_of_double_backward():
    """``0.0 ** x``: PyTorch's double backward gives NaN, the JVP of the gradient 0."""
    u = lambda z: (2.0**z * 0.0**z + z**3).sum(-1)  # noqa: E731
    x = torch.rand(3, 2, dtype=f64) + 0.5
    assert torchdiv.laplacian(u, x, method="grad-of-grad").isnan().all()
    assert_close(torchdiv.laplacian(u, x), 6 * x.sum(-1))


def test_biharmonic_auto_falls_back_where_an_op_has_no_rule():
    u = lambda x: torch.lgamma(x.square() + 1).sum(-1)  # noqa: E731
    x = torch.randn(3, 2, dtype=f64)
    want = torchdiv.biharmonic(u, x, method="forward-over-reverse")
    assert_close(torchdiv.biharmonic(u, x), want)
    with pytest.raises(NotImplementedError, match=r"^biharmonic: method='taylor' .*lgamma"):
        torchdiv.biharmonic(u, x, method="taylor")


def test_value_grad_laplacian_at_two_inputs_by_the_loop():
    """``"auto"`` at two inputs (the loop): values and parameter gradients as ``"taylor"``'s;
    nothing keeps a graph inside ``no_grad``."""
    net = tanh_mlp(2, 8, 2)
    x = torch.randn(4, 2, dtype=f64, requires_grad=True)
    got = torchdiv.value_grad_laplacian(net, x)
    want = torchdiv.value_grad_laplacian(net, x, method="taylor")
    params = [x, *net.parameters()]
    for a, b in zip(got, want, strict=True):
        assert_close(a, b)
        for ga, gb in zip(_grads(a.sum(), params), _grads(b.sum(), params), strict=True):
            assert_close(ga, gb)
    with torch.no_grad():
        frozen = torchdiv.value_grad_laplacian(net, x)
    assert not any(t.requires_grad for t in frozen)


@pytest.mark.parametrize(
    "call",
    [
        lambda f, x: torchdiv.laplacian(f, x, coordinates=[1]),
        lambda f, x: torchdiv.laplacian(f, x, method="grad-of-grad"),
        lambda f, x: torchdiv.weighted_laplacian(f, x, diffusion=torch.eye(3, dtype=f64)),
        lambda f, x: torchdiv.biharmonic(f, x),
        lambda f, x: torchdiv.value_grad_laplacian(f, x)[1],
    ],
)
def test_nothing_the_caller_passed_is_mutated(call):
    net = _net()
    x = torch.randn(4, 3, dtype=f64)
    before = x.clone()
    call(_scalar(net), x)
    assert torch.equal(x, before) and not x.requires_grad
    assert all(p.grad is None for p in net.parameters()) and net.training


def test_frozen_loops_on_more_arithmetic_with_one_thread():
    """A frozen Laplacian at three inputs whose graph does 24k multiply-adds / 32 per call
    (``work * n`` between ``2 * LOOP_WORK`` and ``2 * LOOP_WORK_ONE_THREAD``): the loop on
    one thread, the Taylor engine on two; trained, the Taylor engine on both."""
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor import RULES, capture

    torch.manual_seed(0)
    layers = [torch.nn.Linear(3, 64), torch.nn.Tanh()]
    for _ in range(2):
        layers += [torch.nn.Linear(64, 64), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(64, 1))
    x = torch.randn(256, 3)
    trained = capture(net, x, RULES, batch_dims=1)
    frozen = capture(net.requires_grad_(False), x, RULES, batch_dims=1)
    work = frozen.work_per_call() * 3
    assert 2 * _laplacian.LOOP_WORK <= work < 2 * _laplacian.LOOP_WORK_ONE_THREAD
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _laplacian.loops_for(frozen, x, 1) and not _laplacian.loops_for(trained, x, 1)
        torch.set_num_threads(2)
        assert not _laplacian.loops_for(frozen, x, 1)
    finally:
        torch.set_num_threads(threads)


def _pinn(d: int, width: int = 64) -> nn.Module:
    """A DeepXDE-style PINN: ``d -> width x 3 (tanh) -> 1``."""
    layers: list[nn.Module] = [nn.Linear(d, width), nn.Tanh()]
    for _ in range(2):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1)).to(f64)


def _kan(d: int) -> nn.Module:
    return nn.Sequential(_Chebyshev(d, 8), _Chebyshev(8, 8), _Chebyshev(8, 1))


@pytest.mark.parametrize(
    "make, d, batch, trained, loops",
    [
        # frozen: the FNN loops up to batch 2048 at two inputs (n x work 379k: its work is
        # matrix products), the KAN, all elementwise, not at a third of that (248k)
        (_pinn, 2, 2048, False, True),
        (_pinn, 2, 4096, False, False),
        (_pinn, 3, 1024, False, True),
        (_pinn, 3, 2048, False, False),
        (_kan, 2, 4096, False, True),
        (_kan, 2, 8192, False, False),
        # trained: the FNN loops at two inputs and batch 256, not at three; the KAN at three
        (_pinn, 2, 256, True, True),
        (_pinn, 3, 256, True, False),
        (_pinn, 2, 1024, True, False),
        (_kan, 3, 256, True, True),
        (_kan, 3, 1024, True, False),
    ],
)
def test_one_thread_loops_by_work_and_its_share_of_products(make, d, batch, trained, loops):
    """On one thread ``"auto"``'s choice between the loop and the Taylor engine is fitted to
    ``bench/laplacian_crossover.py``'s measurements (``loops_for``): the loop's limit on
    ``n x work`` grows with the share of matrix products in the work, which the loop runs as
    well as the Taylor engine (a tanh FNN), not with elementwise ops (a Chebyshev KAN).
    Before, the FNN at D = 2, B = 2048 frozen (1.1x the loop) and at B = 256 trained (1.2x
    DeepXDE's loop), the KAN at D = 2, B = 2048 frozen (1.16x) took the Taylor engine."""
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor import RULES, capture

    torch.manual_seed(0)
    net = make(d).requires_grad_(trained)
    x = torch.randn(batch, d, dtype=f64)
    graph = capture(net, x, RULES, batch_dims=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _laplacian.loops_for(graph, x, 1) == loops
    finally:
        torch.set_num_threads(threads)


def test_one_thread_trained_loop_gives_the_reference_values_and_gradients(monkeypatch):
    """The trained FNN at D = 2, B = 256 on one thread: ``"auto"`` runs the loop (its new
    choice), and the Laplacian and its parameter gradients are the float64 grad-of-grad
    loop's (``laplacian_by_grad_of_grad``, its own code)."""
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    looped, grad_of_grad = [], _laplacian.grad_of_grad
    monkeypatch.setattr(_laplacian, "grad_of_grad", lambda *a: looped.append(1) or grad_of_grad(*a))
    torch.manual_seed(0)
    net, x = _pinn(2), torch.randn(256, 2, dtype=f64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for call in range(3):  # decided (the Taylor engine from its recording), remembered
            looped.clear()
            got = torchdiv.laplacian(net, x).reshape(len(x))
            assert bool(looped) == (call > 0)
            want = laplacian_by_grad_of_grad(net, x)
            assert_close(got, want)
            assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())
    finally:
        torch.set_num_threads(threads)


def test_auto_loops_where_the_graph_does_little_arithmetic_per_call(monkeypatch):
    """The rule: the loop at one input and a small batch (f not recorded); where the recorded
    graph does little arithmetic per call at up to three inputs (two if the result is
    differentiated), remembered per structure, so that a second call does not record f; the
    Taylor engine otherwise. The rule on two threads (one thread's:
    ``test_one_thread_loops_by_work_and_its_share_of_products``)."""
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    calls, recorded = [], []
    monkeypatch.setattr(_laplacian, "grad_of_grad", lambda *a: calls.append(a) or 0 * a[1][:, 0])
    capture = _laplacian.capture
    monkeypatch.setattr(
        _laplacian, "capture", lambda *a, **k: recorded.append(1) or capture(*a, **k)
    )
    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(_laplacian, "CHAIN_INPUTS", 0)  # (a frozen chain's plan: its own tests)
    wide = tanh_mlp(2, 64, 1)  # trained: the Laplacian is differentiated
    narrow = tanh_mlp(2, 16, 1)  # trained, little arithmetic per call
    frozen = tanh_mlp(2, 64, 1).requires_grad_(False)
    frozen3 = tanh_mlp(3, 256, 1).requires_grad_(False)
    cases = [
        (gaussian, (1024, 1), True),
        (gaussian, (512, 2), True),
        (gaussian, (8, 3), True),
        (gaussian, (8, 4), False),
        (narrow, (256, 2), True),  # loops when trained too (LOOP_WORK_TRAINED)
        (wide, (256, 2), False),  # 20k per call: the Taylor engine, trained
        (wide, (2048, 2), False),
        (frozen, (256, 2), True),
        (frozen3, (256, 3), False),
        (gaussian, (64 * 1024, 2), False),  # a large batch: much arithmetic per call
    ]
    for f, shape, looped in cases:
        for call in range(2):
            calls.clear()
            recorded.clear()
            torchdiv.laplacian(f, torch.randn(shape, dtype=f64))
            # the call that decides at 2-3 inputs: the Taylor engine from its recording
            assert bool(calls) == (looped and (call > 0 or shape[1] == 1)), (shape, call)
            # second passes batched where the graph does little arithmetic per call
            batched = bool(calls) and calls[0][4] is not None and calls[0][4].batched
            assert batched == (bool(calls) and f in (gaussian, narrow) and shape[1] > 1), (
                shape,
                call,
            )
            # recorded once to decide at 2-3 inputs; then remembered if it loops
            assert bool(recorded) == (not looped or (call == 0 and shape[1] > 1)), (shape, call)


def test_auto_makes_a_structure_key_only_for_a_function_that_loops(monkeypatch):
    """At 2-3 inputs a call the Taylor engine runs makes no structure key for ``f`` (~50 us of
    Python per call, issue 18) unless ``f`` looped at some structure before, or it is the
    site's first call (the key before ``f`` runs, where a loop decided marks its pass): then
    the key is made before recording, and a remembered loop is found without recording.
    Values: the loop of backward passes (float64, independent of both engines). Two
    threads' rule."""
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor import mixing
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)

    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(_laplacian, "_LOOPING_SITES", PlanCache(256), raising=False)
    keys, recorded = [], []
    structure, capture = mixing.structure, _laplacian.capture
    monkeypatch.setattr(mixing, "structure", lambda *a: keys.append(1) or structure(*a))
    monkeypatch.setattr(
        _laplacian, "capture", lambda *a, **k: recorded.append(1) or capture(*a, **k)
    )
    torch.manual_seed(0)
    wide = tanh_mlp(2, 64, 1).to(f64)  # trained, 20k per call: the Taylor engine
    cases = [  # f, shape, (structure keys, recordings) at the first and the second call
        (wide, (256, 2), [(1, 1), (0, 1)]),  # (a new site: its first call makes the key)
        (gaussian, (512, 2), [(1, 1), (1, 0)]),  # loops: the key made once decided, then found
        (gaussian, (64 * 1024, 2), [(1, 1), (1, 1)]),  # the Taylor engine, for a looping site
    ]
    for f, shape, counts in cases:
        x = torch.randn(shape, dtype=f64)
        for call, expected in enumerate(counts):
            keys.clear(), recorded.clear()
            got = torchdiv.laplacian(f, x)
            assert (len(keys), len(recorded)) == expected, (shape, call)
            assert_close(got.reshape(len(x)), laplacian_by_grad_of_grad(f, x).reshape(len(x)))


def test_a_remembered_loop_is_found_by_a_lambda_over_another_time(monkeypatch):
    """An ODE solve's ``laplacian(lambda z: net(z, t), x)`` makes a new lambda over another
    time ``t`` at every step: the decision to loop is found again (kept per code and
    structure key: recorded once in 6 steps, at every step before, when the decision was
    keyed by the lambda's values too), while each new lambda is watched (a step whose
    ``t`` turns mixing on raises). Values: grad of grad (float64)."""
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(_laplacian, "_LOOPING_SITES", PlanCache(256))
    recorded, capture = [], _laplacian.capture
    monkeypatch.setattr(
        _laplacian, "capture", lambda *a, **k: recorded.append(1) or capture(*a, **k)
    )
    torch.manual_seed(0)
    net = tanh_mlp(3, 8, 1).requires_grad_(False)
    x = torch.randn(64, 2, dtype=f64)

    def velocity(t: float):  # (over net and t only: a function made anew is structure)
        return lambda z: net(
            torch.cat([z - (z.mean(0) if t > 1 else 0), torch.full_like(z[:, :1], t)], -1)
        ).squeeze(-1)

    for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        got = torchdiv.laplacian(velocity(t), x)
        assert_close(got, laplacian_by_grad_of_grad(velocity(t), x))
    assert len(recorded) == 1
    with pytest.raises(torchdiv.BatchInteractionError, match="a mean over samples"):
        torchdiv.laplacian(velocity(1.2), x)


class _Chebyshev(torch.nn.Module):
    """A Chebyshev KAN layer (many small ops: where the loop batches its second passes)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.c = torch.nn.Parameter(torch.randn(d_in, d_out, 4, dtype=f64) / d_in)
        self.register_buffer("orders", torch.arange(4, dtype=f64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.cos(self.orders * torch.acos(torch.tanh(x).unsqueeze(-1)))
        return torch.einsum("...id,iod->...o", features, self.c)


class _Cube(torch.autograd.Function):
    """``x³`` whose derivative ``3x²`` is a ``_ThreeSquares``: the second-level passes run
    that function's backward, which branches on a value (PyTorch cannot batch it)."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return grad * _ThreeSquares.apply(ctx.saved_tensors[0])


class _ThreeSquares(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 3 * x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return 6 * ctx.saved_tensors[0] * grad if bool(grad.abs().sum() >= 0) else None


@pytest.mark.parametrize("batch_dims", [1, 2])
@pytest.mark.parametrize("outputs", [1, 2])
def test_batched_loop_matches_the_plain_loop_values_and_gradients(batch_dims, outputs):
    """One backward pass with the unit cotangents batched: values, x and parameter gradients
    as the plain loop's n passes (float64); a backward that cannot be batched (it reads a
    value) runs the plain passes, with the same results."""
    from torchdiv._laplacian import loop

    torch.manual_seed(0)
    net = torch.nn.Sequential(_Chebyshev(3, 4), _Chebyshev(4, outputs))
    x = torch.rand(*[3] * batch_dims, 3, dtype=f64, requires_grad=True) * 1.6 - 0.8
    params = [x, *net.parameters()]
    cube = lambda z: net(z) + _Cube.apply(z).sum(-1, keepdim=True)  # noqa: E731
    for f in (net, cube):
        plain = loop.grad_of_grad(f, x, batch_dims)
        batched = loop.grad_of_grad(f, x, batch_dims, settings=loop.Settings(batched=True))
        assert_close(batched, plain)
        for a, b in zip(_grads(batched.sum(), params), _grads(plain.sum(), params), strict=True):
            assert_close(a, b)
    want = torchdiv.laplacian(net, x, batch_dims=batch_dims, method="taylor")
    assert_close(loop.grad_of_grad(net, x, batch_dims, settings=loop.Settings(True)), want)


@pytest.mark.parametrize("inputs", [2, 1])
@pytest.mark.parametrize("op", ["layer_norm", "cdist"])
def test_the_remembered_loop_evaluates_f_under_its_modes_where_the_graph_needs_them(op, inputs):
    """A small ``f`` with a layer norm (its third derivative is wrong in PyTorch) or ``cdist``
    (no double backward): ``"auto"`` loops; its plain evaluation shows the op, ``f`` is
    evaluated again under the modes, and later calls start there: values and parameter
    gradients as the Taylor engine's (float64) at every call. At one input (a plan kept
    without recording) the first call loops too."""
    from torchdiv._laplacian import methods
    from torchdiv._taylor.cache import PlanCache

    torch.manual_seed(0)
    lin = torch.nn.Linear(inputs, 3).double()
    centres = torch.randn(4, 2, dtype=f64)
    if op == "layer_norm":
        f = lambda z: torch.nn.functional.layer_norm(lin(z), (3,)).square().sum(-1)  # noqa: E731
    else:
        f = lambda z: torch.cdist(lin(z)[:, :2], centres).square().sum(-1)  # noqa: E731
    x = torch.randn(6, inputs, dtype=f64, requires_grad=True)
    cache = PlanCache(256)
    methods._LOOPS, saved = cache, methods._LOOPS
    try:
        for call in range(3):  # decided (the Taylor engine from its recording), remembered
            got = torchdiv.laplacian(f, x)
            (plan,) = [v for _, v in cache._entries.values()]
            plain = call == 0 and inputs == 2  # (the deciding call ran the Taylor engine)
            assert plan and plan.settings.plain == plain, call  # looped, under the modes
            want = torchdiv.laplacian(f, x, method="taylor")
            params = [x, *lin.parameters()]
            for a, b in zip(_grads(got.sum(), params), _grads(want.sum(), params), strict=True):
                assert_close(a, b)
    finally:
        methods._LOOPS = saved


def test_value_grad_laplacian_remembers_that_auto_loops(monkeypatch):
    """Its ``"auto"`` decides as ``laplacian``'s: a looping structure is recorded once."""
    from torchdiv._laplacian import methods as _laplacian
    from torchdiv._taylor.cache import PlanCache

    recorded = []
    capture = _laplacian.capture
    monkeypatch.setattr(
        _laplacian, "capture", lambda *a, **k: recorded.append(1) or capture(*a, **k)
    )
    monkeypatch.setattr(_laplacian, "_LOOPS", PlanCache(256))
    x = torch.randn(16, 2, dtype=f64)
    for call in range(2):
        recorded.clear()
        out = torchdiv.value_grad_laplacian(gaussian, x)
        assert_close(out.laplacian, gaussian(x) * (x.square().sum(-1) - 2))
        assert len(recorded) == (call == 0)


def test_all_finite_reads_nan_and_infinity_off_the_sum():
    """The loop's finiteness check (a sum, not ``isfinite().all()``): any NaN or infinity,
    opposite infinities included, reads as not finite; an overflowing sum of finite entries
    too (the caller then takes its other exact method)."""
    from torchdiv._laplacian.loop import all_finite

    inf, nan = float("inf"), float("nan")
    assert all_finite(torch.tensor([1.0, -2.0])) and all_finite(torch.zeros(0))
    for bad in ([1.0, nan], [inf, 1.0], [1.0, inf, -inf], [-inf]):
        assert not all_finite(torch.tensor(bad, requires_grad=True)), bad
    assert not all_finite(torch.full((4,), 3e38))  # float32: finite entries, the sum is not


def _hessians(f, x: torch.Tensor) -> torch.Tensor:
    """Every sample's Hessian of ``f: (B, n) -> (B,)``, ``(B, n, n)``, by a loop of backward
    passes from one evaluation of ``f``."""
    z = x.detach().requires_grad_()
    (grad,) = torch.autograd.grad(f(z).sum(), z, create_graph=True)
    rows = [
        torch.autograd.grad(grad[:, i].sum(), z, retain_graph=True)[0] for i in range(len(z[0]))
    ]
    return torch.stack(rows, 1)


_INDEFINITE = torch.tensor(
    [[1.0, 2.0, 0.0, 0.5], [2.0, -1.0, 0.3, 0.0], [0.0, 0.3, 0.5, 1.0], [0.5, 0.0, 1.0, -2.0]],
    dtype=f64,
)


@pytest.mark.parametrize(
    "method", ["auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"]
)
def test_weighted_laplacian_of_an_indefinite_diffusion_is_of_one_evaluation(method):
    """One Laplacian per sign of ``A``'s eigenvalues, each evaluating ``f``: from one state
    (``Once``). Before, the second part saw the buffer moved and another mask (0.25-0.8
    off, spectral norm 1.6e-2), whatever the method."""
    assert torch.linalg.eigvalsh(_INDEFINITE).min() < 0 < torch.linalg.eigvalsh(_INDEFINITE).max()
    net, x = Stateful(4), torch.randn(3, 4, dtype=f64)
    once, state = one_state(net, x, seed=8)
    torch.manual_seed(8)
    got = torchdiv.weighted_laplacian(
        lambda z: net(z)[:, 0], x, diffusion=_INDEFINITE, method=method
    )
    expected = torch.einsum("ij,bij->b", _INDEFINITE, _hessians(lambda z: once(z)[:, 0], x))
    assert_close(got, expected)
    assert_one_state(net, once, state)


def test_weighted_hutchinson_of_an_indefinite_diffusion_is_of_one_evaluation():
    """The estimate's two parts (new probes each) of one function: the same probes on the
    function frozen at one evaluation give the same estimate."""
    net, x = Stateful(4), torch.randn(3, 4, dtype=f64)
    once, state = one_state(net, x, seed=9)
    options = {"diffusion": _INDEFINITE, "method": "hutchinson", "num_probes": 3}
    torch.manual_seed(9)
    got = torchdiv.weighted_laplacian(
        lambda z: net(z)[:, 0], x, generator=torch.Generator().manual_seed(1), **options
    )
    assert_one_state(net, once, state)
    expected = torchdiv.weighted_laplacian(
        lambda z: once(z)[:, 0], x, generator=torch.Generator().manual_seed(1), **options
    )
    assert_close(got, expected)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_value_grad_laplacian_without_taylor_rules_is_of_one_evaluation(chunk_size):
    """Where an op has no Taylor rule (``lgamma``) ``"auto"`` computes ``f(x)``, the
    Jacobian and the Laplacian separately, each evaluating ``f``: from one state. Before:
    value, gradient and Laplacian of different masks (0.4-1.4 off), the buffer moved three
    times and more."""
    head = lambda y: torch.lgamma(y.square() + 1).sum(-1)  # noqa: E731
    net, x = Stateful(4, 3, head=head), torch.randn(5, 4, dtype=f64)
    once, state = one_state(net, x, seed=2)
    torch.manual_seed(2)
    got = torchdiv.value_grad_laplacian(net, x, chunk_size=chunk_size)
    z = x.clone().requires_grad_()
    value = once(z)
    (gradient,) = torch.autograd.grad(value.sum(), z)
    assert_close(got.value, value.detach())
    assert_close(got.gradient, gradient)
    assert_close(got.laplacian, laplacian_by_grad_of_grad(once, x))
    assert_one_state(net, once, state)


@pytest.mark.parametrize(
    ("method", "chunk_size"), [("auto", None), ("auto", 1), ("forward-over-reverse", 2)]
)
def test_biharmonic_of_a_stateful_f_is_of_one_evaluation(method, chunk_size):
    """``"auto"`` tries Taylor in Taylor, which refuses the dropout (its recording's changes
    put back: ``methods._refuse``), then nested forward-over-reverse, every chunk of either
    level from one state. Before: 0.5 off with ``chunk_size=1``, vmap's randomness error
    (named ``laplacian:``) with one chunk, the buffer moved at every evaluation."""
    net, x = Stateful(3), torch.randn(3, 3, dtype=f64)
    once, state = one_state(net, x, seed=3)
    torch.manual_seed(3)
    got = torchdiv.biharmonic(lambda z: net(z)[:, 0], x, method=method, chunk_size=chunk_size)
    frozen = lambda z: once(z)[:, 0]  # noqa: E731
    assert_close(got, laplacian_by_grad_of_grad(lambda z: laplacian_by_grad_of_grad(frozen, z), x))
    assert_one_state(net, once, state)


@pytest.mark.parametrize("trained", [False, True])
def test_the_one_input_loop_runs_f_plain_and_takes_the_chain_frozen(monkeypatch, trained):
    """At one input and a small batch (a 1-D Poisson residual) ``"auto"`` loops without
    recording ``f``, by a plan kept for its structure: ``f`` evaluated outside the modes (they
    ran at every call: 1.3-1.4x the user's loop) and, frozen, the chain's forward Laplacian
    (0.6-0.75x); trained, the loop's two passes (the chain's graph is 1.1x slower there).
    Values and parameter gradients as the float64 grad-of-grad loop at each call."""
    from torchdiv._laplacian import loop, methods
    from torchdiv._taylor.cache import PlanCache

    monkeypatch.setattr(methods, "_LOOPS", PlanCache(256))
    modes, chained = [], []
    evaluated, chain = loop._evaluated, loop.chain_laplacian
    monkeypatch.setattr(
        loop,
        "_evaluated",
        lambda *a, safe, **k: modes.append(safe) or evaluated(*a, safe=safe, **k),
    )
    monkeypatch.setattr(
        loop, "chain_laplacian", lambda *a: chained.append(chain(*a) is not None) or chain(*a)
    )
    torch.manual_seed(7)
    net = tanh_mlp(1, 16, 1).requires_grad_(trained)
    x = torch.rand(64, 1, dtype=f64)
    want = laplacian_by_grad_of_grad(net, x)
    for _ in range(3):
        got = torchdiv.laplacian(net, x)[:, 0]
        assert_close(got, want)
        if trained:
            assert_same_parameter_gradients(net, got.square().mean(), want.square().mean())
    assert modes == [False] * 3
    assert chained == ([] if trained else [True] * 3)
