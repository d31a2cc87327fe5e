"""Stochastic divergence and Jacobian diagonal of functions and graphs.

References: per-sample Jacobians from ``torch.func.jacrev`` of the whole batch (conftest), and
the estimators' formulas applied to them with the same probes. Which of ``J`` or ``J^T`` an
engine multiplies by does not change a Hutchinson estimate (``v^T J v = v^T J^T v``), so
Hutchinson is compared term by term; Hutch++ and XTrace are checked where they must be exact
(rank below the sketch) and for unbiasedness.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    Stateful,
    assert_close,
    assert_one_state,
    assert_same_parameter_gradients,
    conv_net,
    one_state,
    reference_divergence,
    reference_jacobian,
    tanh_mlp,
)

import torchdiv

F64 = torch.float64
METHODS = ["hutchinson", "hutch++", "xtrace"]


def hutchinson_reference(f, x, probes, batch_dims=1):
    """mean_j v_j^T J_b v_j per sample, from dense reference Jacobians."""
    n = x[(0,) * batch_dims].numel()
    jac = reference_jacobian(f, x, batch_dims).reshape(-1, n, n)
    v = probes.reshape(len(probes), -1, n)
    return torch.einsum("kbi,bij,kbj->b", v, jac, v).reshape(x.shape[:batch_dims]) / len(probes)


@pytest.mark.parametrize("batch_dims", [0, 1, 2])
def test_hutchinson_equals_reference_terms(batch_dims):
    net = tanh_mlp(6, 16, 6)
    x = torch.randn(*[(3,), (3,), (2, 3)][batch_dims][:batch_dims], 6, dtype=F64)
    probes = torchdiv.draw_probes(x, 5, batch_dims=batch_dims)
    div = torchdiv.divergence(net, x, batch_dims=batch_dims, method="hutchinson", probes=probes)
    torch.testing.assert_close(div, hutchinson_reference(net, x, probes, batch_dims))


def test_image_shaped_x_conv_net():
    net = conv_net(2)
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    probes = torchdiv.draw_probes(x, 4, probe="sphere")
    div = torchdiv.divergence(net, x, method="hutchinson", probes=probes)
    torch.testing.assert_close(div, hutchinson_reference(net, x, probes))
    # a sketch as wide as the event (2*2*2 = 8 elements) makes Hutch++ exact
    small = torch.randn(3, 2, 2, 2, dtype=F64)
    exact = torchdiv.divergence(net, small)
    torch.testing.assert_close(
        torchdiv.divergence(net, small, method="hutch++", num_probes=24), exact
    )


@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 3, 6), (2, 1, 2, 3)])
def test_one_probe_path_on_other_shapes(shape):
    """One product: the lean path, any batch and event shape, a non-square-shaped event."""
    batch_dims = len(shape) - 1 if len(shape) < 4 else 1
    f = lambda x: torch.tanh(x).flip(-1).reshape(x.shape)  # noqa: E731
    x = torch.randn(shape, dtype=F64)
    probes = torchdiv.draw_probes(x, 1, batch_dims=batch_dims)
    div = torchdiv.divergence(f, x, batch_dims=batch_dims, method="hutchinson", probes=probes)
    torch.testing.assert_close(div, hutchinson_reference(f, x, probes, batch_dims))
    est = torchdiv.estimate_divergence(f, x, batch_dims=batch_dims, probes=probes)
    assert torch.equal(est.value, div) and est.stderr.isnan().all() and est.num_probes == 1


def test_one_probe_path_equals_reference():
    net = tanh_mlp(5, 16, 5)
    x = torch.randn(4, 5, dtype=F64)
    probes = torchdiv.draw_probes(x, 1, probe="gaussian")
    div = torchdiv.divergence(net, x, method="hutchinson", probes=probes)
    torch.testing.assert_close(div, hutchinson_reference(net, x, probes))


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_low_rank_jacobian_is_exact(method):
    """f(x) = U tanh(V x): rank-2 Jacobian, sketches of >= 3 vectors capture it."""
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(10, 2, generator=g, dtype=F64), torch.randn(2, 10, generator=g, dtype=F64)

    def f(x):
        return torch.tanh(x @ V.T) @ U.T

    x = torch.randn(6, 10, dtype=F64)
    exact = torchdiv.divergence(f, x)
    for est in (
        torchdiv.divergence(f, x, method=method, num_probes=12, probe="gaussian"),
        graph_form(f, x, method=method, num_probes=12, probe="gaussian"),
    ):
        torch.testing.assert_close(est, exact, rtol=1e-9, atol=1e-9)


def graph_form(f, x, **kw):
    xg = x.clone().requires_grad_(True)
    return torchdiv.graph_divergence(f(xg), xg, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["function", "graph"])
def test_unbiased_on_a_network_jacobian(method, form):
    """One point repeated 2000 times: 2000 independent estimates of the same divergence."""
    net = tanh_mlp(8, 16, 8)
    x = torch.randn(1, 8, dtype=F64).expand(2000, 8)
    g = torch.Generator().manual_seed(0)
    kw = {"method": method, "num_probes": 6, "generator": g}
    est = torchdiv.divergence(net, x, **kw) if form == "function" else graph_form(net, x, **kw)
    exact = reference_divergence(net, x[:1])
    assert abs(est.mean() - exact) <= 5 * est.std() / math.sqrt(2000)


def test_graph_and_function_hutchinson_agree():
    net = tanh_mlp(6, 16, 6)
    x = torch.randn(4, 6, dtype=F64)
    probes = torchdiv.draw_probes(x, 3)
    a = torchdiv.divergence(net, x, method="hutchinson", probes=probes)
    torch.testing.assert_close(graph_form(net, x, method="hutchinson", probes=probes), a)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_parameters(method):
    """d(estimate)/d(weights) equals the gradient of the same estimator applied to
    Jacobians from torch.func (differentiable in the weights), with the same probes."""
    net = tanh_mlp(5, 8, 5)
    x = torch.randn(3, 5, dtype=F64)
    probes = torchdiv.draw_probes(x, 6, method=method, probe="gaussian")
    params = list(net.parameters())

    def grad(value):  # the last bias does not enter the Jacobian: its gradient is zero
        return torch.autograd.grad(
            value.sum(), params, retain_graph=True, allow_unused=True, materialize_grads=True
        )

    ours = grad(torchdiv.divergence(net, x, method=method, probes=probes))
    assert any(g.abs().sum() > 0 for g in ours)
    jac = reference_jacobian(net, x)
    # "auto" multiplies by J^T (reverse mode) for this MLP; the gradient must match either
    grads = []
    for A in (jac, jac.transpose(1, 2)):
        est = torchdiv.estimate_trace(
            lambda V, A=A: torch.einsum("bij,kbj->kbi", A, V), x, method=method, probes=probes
        )
        grads.append(grad(est.value))
    assert any(
        all(torch.allclose(a, b, rtol=1e-8, atol=1e-10) for a, b in zip(ours, ref, strict=True))
        for ref in grads
    )


def test_gradient_with_respect_to_x():
    """Hutchinson is linear in J, so d/dx of the estimate is d/dx of v^T J(x) v."""
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    probes = torchdiv.draw_probes(x, 2)
    (ours,) = torch.autograd.grad(
        torchdiv.divergence(net, x, method="hutchinson", probes=probes).sum(), x
    )
    (ref,) = torch.autograd.grad(hutchinson_reference(net, x, probes).sum(), x)
    torch.testing.assert_close(ours, ref)


def test_probes_reused_along_an_ode_solve():
    """FFJORD: the same probes at every function evaluation of one solve."""
    net = tanh_mlp(4, 8, 4)
    x = torch.randn(5, 4, dtype=F64)
    probes = torchdiv.draw_probes(x, 1)
    t = torch.rand(5, dtype=F64)

    def field(z):
        return net(z) * t[:, None]

    first = torchdiv.divergence(field, x, method="hutchinson", probes=probes)
    again = torchdiv.divergence(field, x, method="hutchinson", probes=probes)
    assert torch.equal(first, again)
    later = x + 0.1 * net(x)  # a second point of the solve: the same noise, a new state
    expected = hutchinson_reference(field, later, probes)
    torch.testing.assert_close(
        torchdiv.divergence(field, later, method="hutchinson", probes=probes), expected
    )


def test_no_grad_dtype_and_no_mutation():
    net = tanh_mlp(4, 8, 4, dtype=torch.float32)
    x = torch.randn(3, 4)
    before = x.clone()
    with torch.no_grad():
        div = torchdiv.divergence(net, x, method="xtrace", num_probes=4)
    assert div.dtype == torch.float32 and not div.requires_grad
    assert torch.equal(x, before) and not x.requires_grad
    assert all(p.grad is None for p in net.parameters())


class TestJacobianDiagonal:
    def test_equals_bekas_formula(self):
        """v * (J^T v) (reverse mode, this MLP) or v * (J v): both unbiased; match one."""
        net = tanh_mlp(5, 8, 5)
        x = torch.randn(3, 5, dtype=F64)
        probes = torchdiv.draw_probes(x, 4)
        est = torchdiv.jacobian_diagonal(net, x, method="hutchinson", probes=probes)
        jac = reference_jacobian(net, x)
        refs = [
            (probes * torch.einsum("bij,kbj->kbi", A, probes)).mean(0)
            for A in (jac, jac.transpose(1, 2))
        ]
        assert any(torch.allclose(est, r) for r in refs)

    def test_unbiased(self):
        net = tanh_mlp(6, 16, 6)
        x = torch.randn(1, 6, dtype=F64).expand(3000, 6)
        est = torchdiv.jacobian_diagonal(
            net, x, method="hutchinson", num_probes=2, generator=torch.Generator().manual_seed(0)
        )
        exact = torchdiv.jacobian_diagonal(net, x[:1])[0]
        assert ((est.mean(0) - exact).abs() <= 5 * est.std(0) / math.sqrt(3000)).all()

    def test_diagonal_jacobian_is_exact_with_rademacher(self):
        x = torch.randn(2, 3, 4)
        est = torchdiv.jacobian_diagonal(torch.sin, x, method="hutchinson", num_probes=1)
        torch.testing.assert_close(est, x.cos())


class TestEstimateDivergence:
    @pytest.mark.parametrize("method", METHODS)
    def test_tolerance_mode_against_exact(self, method):
        """x + net(x): divergence near D, so a relative target is meaningful."""
        net = tanh_mlp(12, 24, 12)
        x = torch.randn(150, 12, dtype=F64)
        exact = reference_divergence(lambda z: z + net(z), x)
        est = torchdiv.estimate_divergence(
            lambda z: z + net(z),
            x,
            method=method,
            rtol=0.02,
            max_probes=2000,
            generator=torch.Generator().manual_seed(0),
        )
        assert est.num_probes <= 2000
        assert (est.stderr <= 0.02 * est.value.abs()).all()
        assert ((est.value - exact).abs() <= 2 * 0.02 * exact.abs()).float().mean() >= 0.9

    @pytest.mark.parametrize("method", METHODS)
    def test_tolerance_mode_one_sample_at_a_time(self, method):
        """A batch keeps every sample drawing until the slowest converges, which hides an error
        bar that runs low (XTrace's, 2-5x on x + net(x)); one sample per call does not."""
        net = tanh_mlp(12, 24, 12)
        x = torch.randn(60, 12, dtype=F64)
        exact = reference_divergence(lambda z: z + net(z), x)
        within = []
        for i in range(len(x)):
            g = torch.Generator().manual_seed(i)
            est = torchdiv.estimate_divergence(
                lambda z: z + net(z), x[i : i + 1], method=method, rtol=0.05, generator=g
            )
            within.append(bool((est.value - exact[i]).abs() <= 2 * 0.05 * exact[i].abs()))
        assert sum(within) >= 0.9 * len(within)

    def test_fixed_probes_with_stderr(self):
        net = tanh_mlp(6, 16, 6)
        x = torch.randn(4, 6, dtype=F64)
        g = torch.Generator().manual_seed(0)
        est = torchdiv.estimate_divergence(net, x, method="hutch++", num_probes=12, generator=g)
        g = torch.Generator().manual_seed(0)
        plain = torchdiv.divergence(net, x, method="hutch++", num_probes=12, generator=g)
        torch.testing.assert_close(est.value, plain)
        assert est.num_probes == 12 and est.stderr.shape == (4,) and (est.stderr > 0).all()

    def test_warns_when_max_probes_is_reached(self):
        net = tanh_mlp(6, 16, 6)
        with pytest.warns(UserWarning, match=r"estimate_divergence: stopped at max_probes=32"):
            est = torchdiv.estimate_divergence(
                net, torch.randn(4, 6, dtype=F64), rtol=1e-9, max_probes=32
            )
        assert est.num_probes == 32


# Found in review.


def test_user_probes_in_another_dtype_give_x_dtype():
    net, x = tanh_mlp(3, 8, 3, dtype=torch.float32), torch.randn(4, 3)
    for r in (1, 2):
        probes = torchdiv.draw_probes(x.double(), r)
        out = torchdiv.divergence(net, x, method="hutchinson", probes=probes)
        assert out.dtype == torch.float32


@pytest.mark.parametrize(("method", "num_probes"), [("hutch++", 6), ("xtrace", 4)])
def test_two_dimensional_field_gradients_are_finite(method, num_probes):
    """Rademacher sketches of a 2-D event coincide up to sign half of the time: rank deficient."""
    torch.manual_seed(0)
    net = tanh_mlp(2, 16, 2, dtype=torch.float32)
    x = torch.randn(256, 2)
    torchdiv.divergence(net, x, method=method, num_probes=num_probes).mean().backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]  # not the last bias
    assert len(grads) == 5 and all(g.isfinite().all() for g in grads)


def test_tolerance_warning_points_at_the_callers_line():
    net, x = tanh_mlp(4, 8, 4), torch.randn(3, 4, dtype=F64)
    with pytest.warns(UserWarning, match="stopped at max_probes") as record:
        torchdiv.estimate_divergence(net, x, rtol=1e-9, max_probes=32)
    assert record[0].filename == __file__


@pytest.mark.parametrize(
    ("method", "num_probes"), [("hutchinson", 1), ("hutchinson", 2), ("hutch++", 3), ("xtrace", 2)]
)
def test_empty_batches(method, num_probes):
    net, x = tanh_mlp(4, 8, 4), torch.empty(0, 4, dtype=F64)
    assert torchdiv.divergence(net, x, method=method, num_probes=num_probes).shape == (0,)
    est = torchdiv.estimate_divergence(net, x, method=method, num_probes=2 * num_probes)
    assert est.value.shape == est.stderr.shape == (0,)
    tolerance = torchdiv.estimate_divergence(
        net, x, method=method, num_probes=2 * num_probes, rtol=0.1
    )
    assert tolerance.value.shape == (0,)
    diag = torchdiv.jacobian_diagonal(net, x, method="hutchinson", num_probes=num_probes)
    assert diag.shape == (0, 4)


def test_xtrace_with_one_vector_has_no_stderr_and_no_warning():
    """num_probes=2: one sketch vector, one left-out estimate, no spread (warnings are errors
    in this suite's configuration)."""
    est = torchdiv.estimate_divergence(
        tanh_mlp(4, 8, 4), torch.randn(3, 4, dtype=F64), method="xtrace", num_probes=2
    )
    assert est.stderr.isnan().all() and est.value.isfinite().all()


def test_one_probe_estimates_leave_safe_derivatives_unless_the_graph_needs_them(monkeypatch):
    """A one-product Hutchinson estimate evaluates ``f`` outside ``SafeDerivatives``; where
    the graph shows an op the mode changes (``cdist``, whose PyTorch backward has no
    derivative: the estimate's parameter gradient raised), ``f`` is evaluated again under
    it, and later calls at that structure start there. Values and parameter gradients as
    ``v^T J v`` by ``torch.func`` over the replacement, with the same probes, every call."""
    from torchdiv._core import modes
    from torchdiv._core.modes import _cdist

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    evaluations = []

    def f(z, distance=torch.cdist):
        evaluations.append(1)
        points = lin(z).reshape(-1, 2, 2)
        return distance(points, points).reshape(-1, 4) + z.sin()

    x = torch.randn(6, 4, dtype=torch.float64)
    probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(1))
    v = probes[0]
    jac = reference_jacobian(lambda z: f(z, _cdist), x)
    want = torch.einsum("bi,bij,bj->b", v, jac, v)
    (want_grad,) = torch.autograd.grad(want.sum(), lin.weight)
    for call in range(3):  # plain, then again under the mode; under the mode
        evaluations.clear()
        est = torchdiv.divergence(f, x, method="hutchinson", probes=probes)
        assert len(evaluations) == (2 if call == 0 else 1), call
        assert_close(est, want)
        assert_close(torch.autograd.grad(est.sum(), lin.weight)[0], want_grad)
    entered = []
    enter = modes.SafeDerivatives.__enter__
    monkeypatch.setattr(modes.SafeDerivatives, "__enter__", lambda s: entered.append(1) or enter(s))
    for _ in range(2):  # without an op the mode changes, f stays outside it
        est = torchdiv.divergence(lin, x, method="hutchinson", probes=probes)
        assert_close(est, torch.einsum("bi,ij,bj->b", v, lin.weight, v))
    assert not entered


def test_one_probe_estimates_of_lambdas_made_anew_remember_the_mode_by_their_code():
    """A lambda made anew at every call (inside an ODE function) is found again by its code:
    after the first call, an ``f`` that needs ``SafeDerivatives`` is evaluated once per call,
    under the mode."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    probes = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(1))
    evaluations = []

    def g(z):
        evaluations.append(1)
        points = lin(z).reshape(-1, 2, 2)
        return torch.cdist(points, points).reshape(-1, 4) + z.sin()

    for call in range(3):
        evaluations.clear()
        f = lambda z: g(z)  # noqa: E731 (a new object at every call, one code)
        torchdiv.divergence(f, x, method="hutchinson", probes=probes)
        assert len(evaluations) == (2 if call == 0 else 1), call


@pytest.mark.parametrize(("chunk_size", "pullbacks"), [(None, 1), (3, 3)])
def test_probes_not_chunked_by_the_event_size(monkeypatch, chunk_size, pullbacks):
    """More probes than elements per sample (a 2-D CNF's 8-probe Hutchinson) go through one
    batched pullback, unless the caller's ``chunk_size`` says otherwise: "auto" chunked them
    by the event's 2 basis vectors (4 pullbacks, 3.3x the hand-written recipe). Values and
    parameter gradients against a per-sample loop of plain autograd with the same probes."""
    import torchdiv._exact.reverse as reverse

    calls = []

    def counted(pullback, vectors):
        calls.append(len(vectors))
        return batched(pullback, vectors)

    batched = reverse.batched
    monkeypatch.setattr(reverse, "batched", counted)
    net = tanh_mlp(2, 16, 2)
    x = torch.randn(32, 2, dtype=F64)
    probes = torch.randint(0, 2, (8, 32, 2), dtype=F64) * 2 - 1
    ours = torchdiv.divergence(net, x, method="hutchinson", probes=probes, chunk_size=chunk_size)
    assert len(calls) == pullbacks
    reference = probed_loop(net, x, probes)
    assert_close(ours, reference)
    weights = torch.linspace(-1.0, 2.0, len(x), dtype=F64)
    assert_same_parameter_gradients(net, (weights * ours).sum(), (weights * reference).sum())


def probed_loop(f, x, probes):
    """Every sample's ``mean_j v_j^T J v_j``, one sample and one probe at a time by plain
    autograd (``create_graph``: differentiable in ``f``'s parameters)."""
    terms = []
    for b in range(len(x)):
        z = x[b : b + 1].clone().requires_grad_(True)
        y = f(z)
        for v in probes[:, b : b + 1]:
            (g,) = torch.autograd.grad(y, z, v, create_graph=True)
            terms.append((g * v).sum())
    return torch.stack(terms).reshape(len(x), len(probes)).mean(1)


def test_later_calls_by_plain_autograd(monkeypatch):
    """A small square problem that passed the watch for sample mixing (its first call) is
    estimated by plain autograd at later calls, one batched backward pass, as the exact
    divergence is (a D = 16 CNF, 8 probes: 2.15x the hand recipe through ``torch.func``'s
    ``vjp``, 1.49x so): values and parameter gradients against the per-sample loop at both
    calls; the caller's state (a buffer written in place, a dropout draw) changed as by one
    plain evaluation at each call; an ``f`` that mixes samples is refused at its first call."""
    import torchdiv._exact.reverse as reverse

    made = []
    vjp = reverse.vjp
    monkeypatch.setattr(reverse, "vjp", lambda *a: made.append(1) or vjp(*a))
    net = tanh_mlp(4, 16, 4)
    x = torch.randn(8, 4, dtype=F64)
    probes = torch.randint(0, 2, (8, 8, 4), dtype=F64) * 2 - 1
    x4, probes4 = x, probes
    weights = torch.linspace(-1.0, 2.0, len(x), dtype=F64)
    for pullbacks in (1, 0):
        made.clear()
        ours = torchdiv.divergence(net, x, method="hutchinson", probes=probes)
        assert len(made) == pullbacks
        reference = probed_loop(net, x, probes)
        assert_close(ours, reference)
        assert_same_parameter_gradients(net, (weights * ours).sum(), (weights * reference).sum())

    stateful = Stateful(3, 3)
    x = torch.randn(5, 3, dtype=F64)
    probes = torch.randint(0, 2, (4, 5, 3), dtype=F64) * 2 - 1
    for seed in (7, 8):
        stateful.calls.zero_()
        once, state = one_state(stateful, x, seed)
        torch.manual_seed(seed)
        ours = torchdiv.divergence(stateful, x, method="hutchinson", probes=probes)
        assert_one_state(stateful, once, state)
        assert_close(ours, hutchinson_reference(once, x, probes))

    mixing = lambda z: net(z - z.mean(0))  # noqa: E731
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(mixing, x4, method="hutchinson", probes=probes4)


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_sketching_estimates_equal_at_every_call_from_one_generator_state(method):
    """Hutch++ and XTrace from the same generator state give the same estimate at the first
    call (watched) and later ones: a rank-deficient sketch (Rademacher probes of a 3-D event
    coincide) turns the rounding of another engine into another estimate (one sample 0.015
    against 0.140 when later calls went by plain autograd)."""
    torch.manual_seed(0)
    net = tanh_mlp(3, 16, 3)
    x = torch.randn(5, 3, dtype=F64)
    generator = torch.Generator()
    first, *later = (
        torchdiv.divergence(net, x, method=method, num_probes=6, generator=generator.manual_seed(1))
        for _ in range(3)
    )
    for estimate in later:
        assert torch.equal(estimate, first)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_later_calls_by_plain_autograd_keep_chunks_and_probes(monkeypatch, probe):
    """At later calls (plain autograd, after the watch passed) the caller's ``chunk_size``
    still bounds the probes multiplied at once (8 probes in chunks of 3, 3 and 2),
    and the same generator state draws the same probes as at the first call (``torch.func``):
    values and parameter gradients against the per-sample loop at every call, the generator
    left where one draw leaves it."""
    torch.manual_seed(0)
    net = tanh_mlp(3, 16, 3)
    x = torch.randn(6, 3, dtype=F64)
    generator = torch.Generator()
    probes = torchdiv.draw_probes(x, 8, probe=probe, generator=generator.manual_seed(5))
    drawn = generator.get_state()
    reference = probed_loop(net, x, probes)
    weights = torch.linspace(-1.0, 2.0, len(x), dtype=F64)
    import torchdiv._exact.autograd as plain

    backward = []
    vjps = plain.GraphJacobian._vjps

    def counted(self, cotangents):
        backward.append(len(cotangents))
        return vjps(self, cotangents)

    monkeypatch.setattr(plain.GraphJacobian, "_vjps", counted)
    for call in range(3):
        backward.clear()
        ours = torchdiv.divergence(
            net, x, method="hutchinson", num_probes=8, probe=probe, chunk_size=3,
            generator=generator.manual_seed(5),
        )  # fmt: skip
        assert backward == ([] if call == 0 else [3, 3, 2]), call
        assert torch.equal(generator.get_state(), drawn)
        assert_close(ours, reference)
        assert_same_parameter_gradients(net, (weights * ours).sum(), (weights * reference).sum())
