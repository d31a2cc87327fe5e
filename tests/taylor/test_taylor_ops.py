"""Taylor rules of prod, cumprod, acos, asin, atan2, hypot, logsumexp, logaddexp, erfinv, the
order statistics and cdist: values against float64 finite differences and a grad-of-grad loop,
and the gradient of the Laplacian with respect to parameters (a third derivative) against
finite differences of the Laplacian and autograd through the grad-of-grad loop.

Every case feeds the op ``h = x @ W + b`` (``W``, ``b`` the parameters), so that the rule sees
a jet with dense first derivatives and the parameter gradient passes through it.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchdiv
from torchdiv._laplacian import methods as _laplacian
from torchdiv._taylor import RULES, capture

f64 = torch.float64
B, D, H = 3, 4, 6  # samples, inputs, width of h


def _bounded(h):  # into (-0.9, 0.9), the domain of acos, asin, erfinv
    return 0.9 * torch.tanh(h)


CENTRES = torch.randn(5, 3, dtype=f64, generator=torch.Generator().manual_seed(3))

# name -> function of h (B, H); outputs (B,) or (B, m)
CASES = {
    "prod": lambda h: h.prod(-1),
    "prod_keepdim": lambda h: torch.sin(h).view(B, 2, 3).prod(1, keepdim=True),
    "cumprod": lambda h: h.cumprod(-1),
    "acos": lambda h: torch.acos(_bounded(h)).sum(-1),
    "asin": lambda h: torch.asin(_bounded(h)),
    "erfinv": lambda h: torch.erfinv(_bounded(h)),
    "atan2": lambda h: torch.atan2(h[:, :3], h[:, 3:]),
    "atan2_constant": lambda h: torch.atan2(torch.ones(3, dtype=f64), h[:, 3:]),
    "hypot": lambda h: torch.hypot(h[:, :3], h[:, 3:]),
    "logsumexp": lambda h: torch.logsumexp(h, -1),
    "logsumexp_dims": lambda h: torch.logsumexp(h.view(B, 2, 3), (1, 2)),
    "logaddexp": lambda h: torch.logaddexp(h[:, :3], h[:, 3:]),
    "sort": lambda h: torch.sin(h).sort(-1, descending=True).values,
    "sort_stable": lambda h: torch.sin(h).sort(stable=True, dim=-1).values,
    "topk": lambda h: torch.sin(h).topk(2, -1).values,
    "kthvalue": lambda h: torch.sin(h).kthvalue(2, -1).values,
    "min": lambda h: torch.sin(h).min(-1).values,
    "amin": lambda h: torch.sin(h).view(B, 2, 3).amin(1),
    "cdist": lambda h: torch.cdist(h.view(B, 2, 3), CENTRES).sum(-1),
    # distances among the points themselves: the diagonal is zero for every x
    "cdist_self": lambda h: torch.cdist(h.view(B, 2, 3), h.view(B, 2, 3)).flatten(1),
    "cdist_p1": lambda h: torch.cdist(torch.sin(h).view(B, 2, 3), CENTRES, p=1).flatten(1),
    "cdist_inf": lambda h: torch.cdist(torch.sin(h).view(B, 2, 3), CENTRES, p=math.inf),
}


def _parameters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D, H, dtype=f64, generator=g) / math.sqrt(D)
    return weight, 0.3 * torch.randn(H, dtype=f64, generator=g)


def _model(op, weight, bias):
    return lambda x: op(x @ weight + bias)


def _finite_difference_laplacian(u, x, step=1e-4):
    """Central second differences: error ~ step^2 f''''/12 + 4 eps |f| / step^2 ~ 1e-8."""
    with torch.no_grad():
        centre, total = u(x), 0
        for j in range(x.shape[-1]):
            e = torch.zeros_like(x)
            e[..., j] = step
            total = total + u(x + e) - 2 * centre + u(x - e)
    return total / step**2


def _loop_laplacian(u, x):
    """The grad-of-grad loop PINN codes write, kept differentiable (``create_graph``)."""
    x = x if x.requires_grad else x.detach().requires_grad_(True)
    y = u(x)
    flat = y.reshape(len(x), -1)
    columns = []
    for i in range(flat.shape[1]):
        (g,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True)
        column = 0
        for j in range(x.shape[1]):
            (gj,) = torch.autograd.grad(g[:, j].sum(), x, create_graph=True)
            column = column + gj[:, j]
        columns.append(column)
    return torch.stack(columns, 1).reshape(y.shape)


def _points(name: str) -> torch.Tensor:
    return torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_values_match_finite_differences_and_the_loop(name, monkeypatch):
    weight, bias = _parameters()
    u, x = _model(CASES[name], weight, bias), _points(name)
    assert capture(u, x, RULES).unsupported == []
    # "auto" must run the Taylor engine: its fallback is disabled here
    monkeypatch.setattr(_laplacian, "forward_over_reverse", None)
    out = torchdiv.laplacian(u, x)
    torch.testing.assert_close(
        torchdiv.laplacian(u, x, method="taylor"), out, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(out, _finite_difference_laplacian(u, x), rtol=1e-6, atol=1e-6)
    if not name.startswith("cdist"):  # PyTorch has no double backward for cdist
        torch.testing.assert_close(out, _loop_laplacian(u, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_gradients_of_the_laplacian(name):
    """d/dtheta <c, Δu> (third derivatives) against central differences of the Laplacian along
    a random direction of the parameters, and against autograd through the loop."""
    weight, bias = _parameters()
    x = _points(name)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    u = _model(CASES[name], weight, bias)
    lap = torchdiv.laplacian(u, x, method="taylor")
    c = torch.linspace(-1, 1, lap.numel(), dtype=f64).reshape(lap.shape)
    grads = torch.autograd.grad((c * lap).sum(), (weight, bias))

    g = torch.Generator().manual_seed(2)
    dw, db = torch.randn(D, H, dtype=f64, generator=g), torch.randn(H, dtype=f64, generator=g)
    eps = 1e-6  # error eps^2 |d^5 u| + 1e-16 / eps: about 1e-10 relative

    def shifted(sign):
        with torch.no_grad():
            v = _model(CASES[name], weight + sign * eps * dw, bias + sign * eps * db)
            return (c * torchdiv.laplacian(v, x, method="taylor")).sum()

    directional = (grads[0] * dw).sum() + (grads[1] * db).sum()
    expected = (shifted(1) - shifted(-1)) / (2 * eps)
    torch.testing.assert_close(directional, expected, rtol=1e-7, atol=1e-7)
    if not name.startswith("cdist"):
        loop = torch.autograd.grad((c * _loop_laplacian(u, x)).sum(), (weight, bias))
        for got, want in zip(grads, loop, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_prod_over_every_dimension_of_one_sample():
    weight, bias = _parameters()
    u = lambda x: (x @ weight + bias).prod()  # noqa: E731
    x = torch.randn(D, dtype=f64)
    out = torchdiv.laplacian(u, x, batch_dims=0, method="taylor")
    torch.testing.assert_close(out, _loop_laplacian(lambda z: u(z[0])[None], x[None])[0])


@pytest.mark.parametrize("zeros", [1, 2, 3])
def test_prod_and_cumprod_at_exact_zeros(zeros):
    """A rule dividing by the input would give nan; with ``a = x^2``,
    ``Δ prod_i a_i = 2 sum_j prod_{i != j} x_i^2`` (0 at two zeros or more)."""
    x = torch.tensor([[0.7, -1.3, 0.4, 2.0, -0.6]], dtype=f64)
    x[0, :zeros] = 0
    x.requires_grad_(True)
    a = x.square()
    expected = (
        2 * torch.stack([torch.cat([a[0, :j], a[0, j + 1 :]]).prod() for j in range(5)]).sum()
    )
    out = torchdiv.laplacian(lambda z: z.square().prod(-1), x, method="taylor")
    torch.testing.assert_close(out, expected[None], rtol=1e-14, atol=1e-14)
    cumulative = torchdiv.laplacian(lambda z: z.square().cumprod(-1), x, method="taylor")
    torch.testing.assert_close(cumulative[0, -1], out[0], rtol=1e-14, atol=1e-14)
    assert torch.isfinite(cumulative).all()
    # the gradient through zeros: d/dx of the Laplacian, against the loop
    (grad,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(_loop_laplacian(lambda z: z.square().prod(-1), x).sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_cdist_between_coincident_points_returns_zero_derivatives():
    """Documented convention: where two different points coincide, the distance is not
    differentiable; every derivative there is 0 (a point's distance to itself is 0 for all x,
    so there this is exact)."""
    r = torch.zeros(1, 2, 3, dtype=f64)  # both points at the origin
    lap = torchdiv.laplacian(lambda z: torch.cdist(z.view(1, 2, 3), z.view(1, 2, 3)), r.view(1, 6))
    assert torch.equal(lap, torch.zeros(1, 2, 2, dtype=f64))


def test_cdist_with_many_points_is_exact_at_zero_distance():
    """Above 25 points PyTorch computes ``sqrt(|a|^2 + |b|^2 - 2 a.b)``, whose derivatives are
    infinite on the diagonal; the recording sees differences instead."""
    n = 27
    x = torch.randn(2, n * 3, dtype=f64, generator=torch.Generator().manual_seed(4))

    def u(z):
        r = z.view(len(z), n, 3)
        return torch.cdist(r, r).sum((1, 2))

    # Δ_x sum_{i != j} |r_i - r_j| = sum_{i != j} 2 * 2 / |r_i - r_j| (each pair twice, 3-D)
    r = x.view(2, n, 3)
    dist = (r[:, :, None] - r[:, None]).norm(dim=-1) + torch.eye(n, dtype=f64)
    expected = (4 / dist).sum((1, 2)) - 4 * n
    torch.testing.assert_close(torchdiv.laplacian(u, x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_cdist_in_every_operator_and_engine(method):
    """``cdist`` has no forward-mode derivative and no double backward in PyTorch; every
    engine computes it from differences. Values against torch.func on the differences form,
    parameter gradients against finite differences."""
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(4, 3, dtype=f64, generator=g)
    weight = torch.randn(6, 6, dtype=f64, generator=g).requires_grad_(True)

    def field(z):  # (N, 6) -> (N, 6): two points, each moved by its distances to the centres
        r = (z @ weight).view(len(z), 2, 3)
        near = torch.cdist(r, centres)  # (N, 2, 4)
        return (torch.tanh(near) @ centres).flatten(1) + z

    def by_differences(z):
        r = (z @ weight).view(len(z), 2, 3)
        near = (r[:, :, None] - centres).norm(dim=-1)
        return (torch.tanh(near) @ centres).flatten(1) + z

    x = torch.randn(3, 6, dtype=f64, generator=g)
    jac = torch.func.vmap(torch.func.jacrev(lambda z: by_differences(z[None])[0]))(x)
    cases = [
        (torchdiv.jacobian, jac),
        (torchdiv.jacobian_diagonal, jac.diagonal(dim1=1, dim2=2)),
        (torchdiv.divergence, jac.diagonal(dim1=1, dim2=2).sum(-1)),
    ]
    for operator, expected in cases:
        out = operator(field, x, method=method)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        (grad,) = torch.autograd.grad(out.square().sum(), weight)
        (want,) = torch.autograd.grad(expected.square().sum(), weight, retain_graph=True)
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)
    if method == "auto":  # the one-probe estimate takes plain autograd: v^T J v
        probes = torch.randn(1, *x.shape, dtype=f64, generator=g)
        out = torchdiv.divergence(field, x, method="hutchinson", probes=probes)
        expected = torch.einsum("ni,nij,nj->n", probes[0], jac, probes[0])
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        (grad,) = torch.autograd.grad(out.sum(), weight)
        (want,) = torch.autograd.grad(expected.sum(), weight)
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse", "hessian"])
def test_cdist_laplacian_in_every_method(method):
    weight, bias = _parameters()
    weight.requires_grad_(True)
    u = _model(CASES["cdist_self"], weight, bias)
    x = _points("cdist_self")
    out = torchdiv.laplacian(u, x, method=method)
    torch.testing.assert_close(out, _finite_difference_laplacian(u, x), rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(out.sum(), weight)
    (want,) = torch.autograd.grad(torchdiv.laplacian(u, x, method="taylor").sum(), weight)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


def test_structured_divergence_and_diagonal_through_the_new_rules():
    """The structured engine (``"auto"`` for divergences) propagates the same rules. The
    reference computes the distances from differences: ``torch.func.jacrev`` of ``cdist``
    itself is wrong in PyTorch 2.13 (its batched backward; relative error ~1)."""
    from conftest import reference_diagonal, reference_divergence

    centres = CENTRES[:2]

    def field(z, distances=torch.cdist):  # (N, 6) -> (N, 6)
        r = z.view(len(z), 2, 3)
        scale = distances(r, centres).sum((1, 2), keepdim=True).squeeze(-1)
        gate = torch.sin(z).prod(-1, keepdim=True) + torch.logsumexp(z, -1, keepdim=True)
        return z * gate + torch.atan2(z, scale) + torch.sin(z).sort(-1).values

    def by_differences(z):
        return field(z, lambda r, c: (r[:, :, None] - c).norm(dim=-1))

    x = torch.randn(3, 6, dtype=f64, generator=torch.Generator().manual_seed(6))
    assert capture(field, x, RULES).unsupported == []
    for method in ("structured", "auto"):
        torch.testing.assert_close(
            torchdiv.divergence(field, x, method=method), reference_divergence(by_differences, x)
        )
        torch.testing.assert_close(
            torchdiv.jacobian_diagonal(field, x, method=method),
            reference_diagonal(by_differences, x),
        )


def test_norm_of_a_difference_that_is_zero_for_every_x():
    """Pairwise distances written by hand include each point's distance to itself, ``|r_i -
    r_i| = 0``: zero derivatives there (as PyTorch's norm backward), not ``0 * inf = nan``."""
    x = torch.randn(2, 6, dtype=f64, generator=torch.Generator().manual_seed(7))

    def u(z):
        r = z.view(2, 2, 3)
        return (r[:, :, None] - r[:, None]).norm(dim=-1).sum((1, 2))

    r = x.view(2, 2, 3)
    expected = 2 * 2 * 2 / (r[:, 0] - r[:, 1]).norm(dim=-1)  # Δ|r_0 - r_1| = 2 * 2/|.|, twice
    torch.testing.assert_close(torchdiv.laplacian(u, x, method="taylor"), expected)


@pytest.mark.parametrize("op", [torch.hypot, torch.atan2])
def test_hypot_and_atan2_at_the_origin_return_zero_derivatives(op):
    """Not differentiable at (0, 0): the rules return 0 there (PyTorch's nested autodiff gives
    nan for hypot), exact for arguments that are zero for every x."""
    x = torch.randn(3, 4, dtype=f64, generator=torch.Generator().manual_seed(8))
    u = lambda z: op(z[:, :2] * 0, z[:, 2:] * 0) + z.square().sum(-1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(
        torchdiv.laplacian(u, x, method="taylor"), torch.full((3, 2), 8.0, dtype=f64)
    )


@pytest.mark.parametrize(
    "reduce",
    [
        lambda h: torch.logsumexp(h.sum() ** 2, 0),  # a 0-dimensional input, dimension 0
        lambda h: torch.amax(torch.sin(h)),  # no dimensions given: every one
        lambda h: torch.amin(torch.cos(h)),
    ],
    ids=["logsumexp_of_a_scalar", "amax_of_all", "amin_of_all"],
)
def test_reductions_over_every_element_of_one_sample(reduce):
    """``logsumexp`` of a 0-dimensional tensor raised ``IndexError`` (past "auto"'s fallback);
    ``amax``/``amin`` without dimensions were refused for want of an argument."""
    weight, bias = _parameters()
    u = _model(reduce, weight, bias)
    x = torch.randn(D, dtype=f64, generator=torch.Generator().manual_seed(1))
    expected = _loop_laplacian(lambda z: u(z[0])[None], x[None])[0]
    torch.testing.assert_close(torchdiv.laplacian(u, x, batch_dims=0, method="taylor"), expected)
    torch.testing.assert_close(torchdiv.laplacian(u, x, batch_dims=0), expected)


@pytest.mark.parametrize("method", ["auto", "taylor"])
@pytest.mark.filterwarnings("ignore:var\\(\\). degrees of freedom")
def test_variance_without_degrees_of_freedom(method):
    """One element with Bessel's correction: PyTorch's variance is 0/0 = nan, and so is its
    Laplacian in every engine; the rule divided by ``count - correction`` in Python and raised
    ``ZeroDivisionError``, past "auto"'s fallback."""
    weight, bias = _parameters()
    u = _model(lambda h: torch.var(h[:, :1], -1), weight, bias)
    x = _points("var")
    out = torchdiv.laplacian(u, x, method=method)
    expected = torchdiv.laplacian(u, x, method="forward-over-reverse")
    assert bool(expected.isnan().all())
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize(
    "reduce",
    [
        lambda s: torch.softmax(s, 0) * s,
        lambda s: torch.sort(s).values,
        lambda s: torch.max(s, 0).values,
        lambda s: torch.amin(s, -1),
        lambda s: torch.var(s, 0, correction=0) + s,
    ],
    ids=["softmax", "sort", "max_dim", "amin", "var"],
)
def test_ops_along_dimension_0_of_a_scalar(reduce):
    """PyTorch takes a 0-dimensional tensor for a 1-element one along dimension 0; the
    rules' ``dim % ndim`` raised ``ZeroDivisionError`` (``IndexError`` for ``var``) past
    "auto"'s fallback. Such a use is now reported as unsupported: "auto" takes another
    method, "taylor" names the op."""
    weight, bias = _parameters()
    u = _model(lambda h: reduce(torch.sin(h).sum() ** 2), weight, bias)
    x = torch.randn(D, dtype=f64, generator=torch.Generator().manual_seed(1))
    expected = _loop_laplacian(lambda z: u(z[0])[None], x[None])[0]
    torch.testing.assert_close(torchdiv.laplacian(u, x, batch_dims=0), expected)
    with pytest.raises(NotImplementedError, match="method='taylor' has no propagation rule"):
        torchdiv.laplacian(u, x, batch_dims=0, method="taylor")


@pytest.mark.parametrize(
    "write",
    [
        lambda h: h.pow_(2),
        lambda h: h.mul_(2),
        lambda h: h.add_(torch.exp(h), alpha=2),
        lambda h: h.clamp_(min=0.1),
        lambda h: h.div_(3),
        lambda h: (torch.sigmoid(h) * 1.0).float_power_(3),
        lambda h: (h[:, :, None] * h[:, None, :2]).transpose_(1, 2).reshape(len(h), -1),
    ],
    ids=["pow_", "mul_", "add_alpha", "clamp_min", "div_", "float_power_", "transpose_"],
)
def test_in_place_ops_against_the_loop(write):
    """Each in-place op recorded as the out-of-place overload with its argument types
    (``capture._out_of_place``; ``float_power_.Scalar`` was taken for ``number ** Tensor``
    and ``transpose_`` had none): Laplacians and their weight gradients against the loop."""
    weight, bias = _parameters()
    weight.requires_grad_(True)
    u = _model(lambda h: write(torch.tanh(h) * 1.0).sum(-1, keepdim=True), weight, bias)
    x = _points("in place")
    got = torchdiv.laplacian(u, x, method="taylor")
    expected = _loop_laplacian(u, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), weight)[0], torch.autograd.grad(expected.sum(), weight)[0]
    )


@pytest.mark.parametrize(
    "kept",
    [
        lambda h: torch.zeros_like(h).fill_(2.0),
        lambda h: torch.zeros_like(h).masked_fill_(torch.arange(H) > 2, 1.5),
        lambda h: torch.ones_like(h).bernoulli_(1.0),
        lambda h: torch.rand(h.shape, dtype=f64, generator=torch.Generator().manual_seed(2)),
        lambda h: torch.rand(
            len(h), 2 * H, dtype=f64, generator=torch.Generator().manual_seed(2)
        ).unsafe_chunk(2, 1)[0],
    ],
    ids=["fill_", "masked_fill_", "bernoulli_", "rand", "rand_chunk"],
)
@pytest.mark.parametrize("method", ["auto", "taylor"])
def test_a_kept_output_written_with_values_from_x(kept, method):
    """A replay takes the output of a random draw or of a constant in-place write (replayed
    since rev-attention11) as the tensor object f made (``Node.kept``); a later write into
    it of values computed from ``x``, recorded out of place, changed that object, so the
    calls reading it read the value after the write: a VAE's ``eps.mul_(std).add_(mu)``
    with ``eps = randn_like(std)`` made the Laplacian 37 off, ``zeros_like(h).fill_(2)
    .mul_(tanh(h))`` 5.4, with wrong weight gradients, by "auto" too. The kept values are
    copied before such a write. The random draws are seeded inside ``f``, and the batch's
    loop of backward passes is the reference (``f`` keeps samples apart)."""
    weight, bias = _parameters()
    weight.requires_grad_(True)

    def write(h: torch.Tensor) -> torch.Tensor:
        m = kept(h)
        m.mul_(torch.tanh(h)).add_(h)
        return (m * h).sum(-1, keepdim=True)

    u = _model(write, weight, bias)
    x = _points("kept")
    expected = _loop_laplacian(u, x)
    got = torchdiv.laplacian(u, x, method=method)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), weight)[0], torch.autograd.grad(expected.sum(), weight)[0]
    )


def test_a_kept_output_with_parameter_values_written_with_values_from_x():
    """A constant written with a parameter's values (``Node.kept`` requires grad) cannot be
    copied below autograd before a write of values computed from ``x``: "taylor" names the
    op, "auto" loops (the replay read the product: the Laplacian 2.5 off)."""
    weight, bias = _parameters()
    bias.requires_grad_(True)

    def write(h: torch.Tensor) -> torch.Tensor:
        m = torch.zeros_like(h).copy_(torch.tanh(bias).expand_as(h))
        m.mul_(torch.sin(h))
        return (m * h).sum(-1, keepdim=True)

    u = _model(write, weight, bias)
    x = _points("kept")
    expected = _loop_laplacian(u, x)
    with pytest.raises(NotImplementedError, match=r"mul_.* requires grad and a random"):
        torchdiv.laplacian(u, x, method="taylor")
    got = torchdiv.laplacian(u, x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(
        torch.autograd.grad(got.sum(), bias)[0], torch.autograd.grad(expected.sum(), bias)[0]
    )
