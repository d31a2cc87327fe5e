"""torchdiv.flows: log-likelihoods along an ODE solve, against closed forms.

Closed forms (float64, solver tolerance 1e-10, compared at 1e-7 — the solver's error is
controlled per step relative to 1e-10, and a few hundred steps accumulate far less than 1e-7):

* ``dz/dt = a(t) (A z + b)``: ``z(t1) = e^{tau A} z(t0) + A^{-1} (e^{tau A} - I) b`` with
  ``tau = integral a``, so the log-density changes by ``-tau tr(A)`` and a Gaussian base stays
  Gaussian with a known mean and covariance.
* A same-padded convolution: its Jacobian's diagonal is the centre tap of each channel's own
  kernel at every pixel, so ``tr = H W sum_c w[c, c, 1, 1]`` for image-shaped states.

Estimators are checked statistically: the batch holds copies of one point, each with its own
probes, so one solve gives many independent estimates (fixed seeds).
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from typing import ClassVar

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

import torchdiv
from torchdiv.flows import AugmentedDynamics, log_likelihood

TIGHT = {"rtol": 1e-10, "atol": 1e-10}
STOCHASTIC = {"hutchinson": 8, "hutch++": 24, "xtrace": 16}  # 8 terms each


def normal_log_prob(z: torch.Tensor, batch_dims: int = 1) -> torch.Tensor:
    flat = z.reshape(*z.shape[:batch_dims], -1)
    return -0.5 * flat.square().sum(-1) - 0.5 * flat.shape[-1] * math.log(2 * math.pi)


class Linear(nn.Module):
    """``f(t, z) = (1 + t) (z A^T + b)``: ``tau = (t1 - t0) + (t1^2 - t0^2) / 2``."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.A, self.b = nn.Parameter(A), nn.Parameter(b)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (1 + t) * (z @ self.A.T + self.b)

    @staticmethod
    def tau(t0: float, t1: float) -> float:
        return (t1 - t0) + (t1**2 - t0**2) / 2


def problem(n: int = 3, seed: int = 0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.6
    b = torch.randn(n, generator=g, dtype=torch.float64)
    return Linear(A, b)


class MLPField(nn.Module):
    """A small nonlinear time-dependent field (no closed form; used against the exact method)."""

    def __init__(self, n: int, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(n + 1, hidden), nn.Tanh(), nn.Linear(hidden, n))
        self.double()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(*z.shape[:-1], 1)], -1))


def _latin_square(methods: list[str], times: list[tuple]) -> list[object]:
    """Every ``(method, t0, t1)``: the diagonal (each method and each time once) in every run,
    the rest slow (sampled): each case is an adaptive solve at 1e-10."""
    return [
        pytest.param(m, *t, marks=() if i == j else pytest.mark.slow, id=f"{t[0]}-{t[1]}-{m}")
        for j, t in enumerate(times)
        for i, m in enumerate(methods)
    ]


LINEAR_TIMES = [(0.0, 1.0), (1.0, 0.2), (torch.tensor(0.5), 1.5)]


@pytest.mark.parametrize(
    "method, t0, t1", _latin_square(["auto", "forward", "reverse"], LINEAR_TIMES)
)
def test_linear_ode_changes_log_density_by_tau_trace(method, t0, t1):
    flow = problem()
    x = torch.randn(5, 3, dtype=torch.float64)
    zero = lambda z: z.new_zeros(z.shape[0])  # noqa: E731
    logp = log_likelihood(flow, x, t0, t1, zero, method=method, **TIGHT)
    tau = Linear.tau(float(t0), float(t1))
    expected = torch.full((5,), -tau * torch.trace(flow.A).item(), dtype=torch.float64)
    torch.testing.assert_close(logp.detach(), expected, rtol=1e-7, atol=1e-7)


# backward in time: slow (sampled; an adaptive solve at 1e-10), as the linear ODE's (1.0, 0.2)
# runs in every run
@pytest.mark.parametrize("t0, t1", [(0.0, 0.8), pytest.param(1.0, 0.1, marks=pytest.mark.slow)])
def test_gaussian_through_a_linear_flow_has_its_closed_form_density(t0, t1):
    flow = problem(n=4, seed=1)
    mu0 = torch.tensor([0.3, -1.0, 0.5, 2.0], dtype=torch.float64)
    L0 = torch.tril(torch.randn(4, 4, dtype=torch.float64)) * 0.3 + torch.eye(4).double()
    base = torch.distributions.MultivariateNormal(mu0, scale_tril=L0)
    E = torch.linalg.matrix_exp(Linear.tau(t0, t1) * flow.A.detach())
    c = torch.linalg.solve(flow.A.detach(), (E - torch.eye(4).double()) @ flow.b.detach())
    pushed = torch.distributions.MultivariateNormal(E @ mu0 + c, E @ L0 @ L0.T @ E.T)
    x = pushed.sample((6,))
    logp = log_likelihood(flow, x, t0, t1, base.log_prob, **TIGHT)
    torch.testing.assert_close(logp.detach(), pushed.log_prob(x), rtol=1e-7, atol=1e-7)


def test_image_states_with_a_convolution_have_the_closed_form_trace():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1, bias=False).double()
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    zero = lambda z: z.new_zeros(z.shape[0])  # noqa: E731
    logp = log_likelihood(lambda t, z: conv(z), x, 0.0, 0.7, zero, **TIGHT)
    trace = 4 * 5 * conv.weight.detach()[[0, 1], [0, 1], 1, 1].sum()
    torch.testing.assert_close(logp.detach(), (-0.7 * trace).expand(3), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_image_and_multi_batch_states_equal_the_flattened_problem(method):
    """(B, C, H, W) with batch_dims=1 and a (2, 3) batch of vectors (batch_dims=2) give what the
    same field on flat (N, n) states gives, with the same probes."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3, padding=1))
    conv.double()
    image = lambda t, z: conv(z) * (1 + t)  # noqa: E731
    flat = lambda t, z: image(t, z.reshape(-1, 2, 3, 3)).flatten(1)  # noqa: E731
    options = {"solver": "rk4", "options": {"step_size": 0.25}}
    for x, batch_dims in [
        (torch.randn(4, 2, 3, 3, dtype=torch.float64), 1),
        (torch.randn(2, 2, 2, 3, 3, dtype=torch.float64), 2),
    ]:
        kw = {}
        if method != "auto":
            kw["probes"] = torchdiv.draw_probes(x, 4, batch_dims=batch_dims, method=method)
        f = image if batch_dims == 1 else (lambda t, z: image(t, z.flatten(0, 1)).view(z.shape))
        logp = log_likelihood(
            f, x, 0.0, 1.0, lambda z, d=batch_dims: normal_log_prob(z, d),
            batch_dims=batch_dims, method=method, **kw, **options,
        )  # fmt: skip
        x_flat = x.reshape(-1, 18)
        kw_flat = {k: v.reshape(len(v), -1, 18) for k, v in kw.items()}
        expected = log_likelihood(
            flat, x_flat, 0.0, 1.0, normal_log_prob, method=method, **kw_flat, **options
        )
        assert logp.shape == x.shape[:batch_dims]
        torch.testing.assert_close(logp, expected.reshape(x.shape[:batch_dims]))


@pytest.mark.parametrize("method", sorted(STOCHASTIC))
def test_estimators_are_unbiased_with_calibrated_stderr(method):
    """400 independent estimates of one point's log-likelihood (rk4, fixed steps, so exact and
    estimated share the quadrature exactly), 8 terms each, n = 16 (above Hutch++'s sketch of
    8, so no estimator is exact). The mean error is within 4 standard errors of the mean; at
    least 94% land within 3 reported stderrs (error / stderr is t-distributed with 7 degrees of
    freedom for Gaussian terms: 98% within 3; measured 97-98.5%); the reported stderr's RMS
    matches the observed spread (Hutchinson and Hutch++: unbiased variance estimates, within
    20%, measured 0.97-1.06; XTrace's is the paper's heuristic, which can run low on decaying
    spectra: within a factor 2, measured 1.00)."""
    field = MLPField(16, seed=3)
    x = torch.randn(1, 16, dtype=torch.float64).expand(400, 16)
    options = {"solver": "rk4", "options": {"step_size": 0.125}}
    exact = log_likelihood(field, x[:1], 0.0, 1.0, normal_log_prob, **options).detach()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        value, stderr = log_likelihood(
            field, x, 0.0, 1.0, normal_log_prob, method=method, num_probes=STOCHASTIC[method],
            generator=g, return_stderr=True, **options,
        )  # fmt: skip
    err = value - exact
    assert err.mean().abs() <= 4 * err.std() / math.sqrt(len(err))
    assert ((err.abs() <= 3 * stderr).double().mean()) >= 0.94
    ratio = stderr.square().mean().sqrt() / err.std()
    low, high = (0.8, 1.2) if method != "xtrace" else (0.5, 2.0)
    assert low <= ratio <= high, ratio


def test_exact_methods_report_zero_stderr_and_one_probe_nan():
    flow = problem()
    x = torch.randn(2, 3, dtype=torch.float64)
    _, stderr = log_likelihood(flow, x, 0.0, 1.0, normal_log_prob, return_stderr=True)
    assert torch.equal(stderr, torch.zeros(2, dtype=torch.float64))
    for method, one_term in (("hutchinson", 1), ("hutch++", 3), ("xtrace", 2)):  # documented
        options = {"method": method, "num_probes": one_term, "return_stderr": True}
        _, stderr = log_likelihood(flow, x, 0.0, 1.0, normal_log_prob, **options)
        assert stderr.isnan().all(), method


def _finite_difference(loss, params, direction, eps=1e-6):
    """Central difference of ``loss`` along ``direction`` (float64: error ~eps^2 + 1e-16/eps)."""
    with torch.no_grad():
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
        plus = loss().item()
        for p, d in zip(params, direction, strict=True):
            p.sub_(2 * eps * d)
        minus = loss().item()
        for p, d in zip(params, direction, strict=True):
            p.add_(eps * d)
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize(
    "method, num_probes",
    [("forward", None), ("reverse", None), ("hutchinson", 1), ("hutchinson", 3)],
)
def test_parameter_gradients_match_finite_differences(method, num_probes):
    """Direct backpropagation through a fixed-step solve is the derivative of that discrete
    solve, so it matches float64 central differences to ~1e-8 (same probes on both sides;
    one probe takes the plain-autograd path). Hutch++ and XTrace hold their sketch basis
    constant for gradients (unbiased for the gradient of the trace, not the derivative of the
    estimate: see torchdiv._estimators.hutchpp), so finite differences are no reference for them."""
    field = MLPField(4, seed=1)
    x = torch.randn(3, 4, dtype=torch.float64)
    kw = {"solver": "rk4", "options": {"step_size": 0.25}, "method": method}
    if num_probes:
        kw["probes"] = torchdiv.draw_probes(x, num_probes, method=method)

    def loss():
        return log_likelihood(field, x, 0.0, 1.0, normal_log_prob, **kw).sum()

    params = list(field.parameters())
    grads = torch.autograd.grad(loss(), params)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction, strict=True)).item()
    assert analytic == pytest.approx(_finite_difference(loss, params, direction), rel=1e-6)


@pytest.mark.parametrize(
    "method, num_probes, rtol",
    [("auto", None, 1e-5), ("hutchinson", 1, 1e-5), ("hutch++", 6, 2e-3), ("xtrace", 4, 2e-3)],
)
def test_adjoint_gradients_agree_with_direct_ones(method, num_probes, rtol):
    """Both differentiate the same ODE solution; at rtol=atol=1e-9 they agree to ~1e-7 for
    exact and Hutchinson divergences. Hutch++ and XTrace differentiate with their sketch basis
    held constant, which is no exact derivative of the dynamics, so the adjoint ODE and the
    discrete backward pass are two approximations of it that converge slowly with the
    tolerance (measured 3e-4 and 2e-5 relative at 1e-9, 1e-4 and 7e-6 at 1e-11)."""
    field = MLPField(6, seed=2)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    kw = {"method": method, "rtol": 1e-9, "atol": 1e-9}
    if num_probes:
        kw["probes"] = torchdiv.draw_probes(x, num_probes, method=method)
    grads = []
    for adjoint in (False, True):
        loss = log_likelihood(field, x, 0.0, 1.0, normal_log_prob, adjoint=adjoint, **kw).sum()
        grads.append(torch.autograd.grad(loss, [x, *field.parameters()]))
    for direct, adjoint in zip(*grads, strict=True):
        scale = direct.abs().max().item()
        torch.testing.assert_close(adjoint, direct, rtol=0, atol=rtol * scale)


def test_generator_reproduces_and_probes_are_drawn_once_per_solve():
    """Same seed, same result; and it equals the result with probes drawn beforehand from the
    same seed, which every evaluation reuses: one draw per solve."""
    field = MLPField(5, seed=4)
    x = torch.randn(3, 5, dtype=torch.float64)
    kw = {"method": "xtrace", "solver": "rk4", "options": {"step_size": 0.5}}
    run = lambda **extra: log_likelihood(field, x, 0.0, 1.0, normal_log_prob, **kw, **extra)  # noqa: E731
    a = run(num_probes=4, generator=torch.Generator().manual_seed(5))
    b = run(num_probes=4, generator=torch.Generator().manual_seed(5))
    probes = torchdiv.draw_probes(
        x, 4, method="xtrace", probe="gaussian", generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, run(probes=probes), rtol=0, atol=0)
    assert not torch.equal(a, run(num_probes=4, generator=torch.Generator().manual_seed(6)))


def test_float32_stays_float32_and_nothing_is_mutated():
    field = MLPField(3, seed=0).float()
    x = torch.randn(4, 3)
    before = x.clone()
    logp = log_likelihood(field, x, 0.0, 1.0, normal_log_prob, method="hutch++", num_probes=3)
    assert logp.dtype == torch.float32 and logp.shape == (4,)
    assert torch.equal(x, before) and not x.requires_grad
    assert all(p.grad is None for p in field.parameters())


def test_no_grad_gives_the_same_value_without_a_graph():
    field = MLPField(3)
    x = torch.randn(2, 3, dtype=torch.float64)
    with_grad = log_likelihood(field, x, 0.0, 1.0, normal_log_prob)
    with torch.no_grad():
        without = log_likelihood(field, x, 0.0, 1.0, normal_log_prob)
    assert with_grad.requires_grad and not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())


def test_equal_times_give_the_base_density():
    x = torch.randn(3, 2, dtype=torch.float64)
    logp = log_likelihood(lambda t, z: z * 2, x, 0.5, 0.5, normal_log_prob)
    torch.testing.assert_close(logp, normal_log_prob(x))


class _Syncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that copy a device value to the host (``.item()``, ``bool(t)``, data-dependent
    shapes): on a GPU each is a synchronisation."""

    HOST: ClassVar = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.HOST
        return func(*args, **(kwargs or {}))


def test_the_sync_counter_sees_item_and_bool():
    with _Syncs() as syncs:
        torch.ones(2).sum().item()
        bool(torch.ones(()) > 0)
    assert syncs.count == 2


@pytest.mark.parametrize(
    "method, num_probes",
    [("auto", None), ("forward", None), ("hutchinson", 1), ("hutchinson", 6), ("hutch++", 6),
     ("xtrace", 6)],
)  # fmt: skip
@pytest.mark.parametrize("n", [4, 40])  # 40: large enough for "auto" to watch f (its plan)
def test_function_evaluations_do_not_synchronise(method, num_probes, n):
    field = MLPField(n)
    x = torch.randn(64, n, dtype=torch.float64)
    dynamics = AugmentedDynamics(field, x, method=method, num_probes=num_probes)
    with _Syncs() as syncs:
        v, d = dynamics(torch.tensor(0.3, dtype=torch.float64), dynamics.initial_state(x))
    assert syncs.count == 0
    assert v.shape == x.shape and d.shape == (dynamics.num_terms, 64)


def test_augmented_dynamics_is_what_log_likelihood_solves():
    field = MLPField(3)
    x = torch.randn(2, 3, dtype=torch.float64)
    dynamics = AugmentedDynamics(field, x)
    assert set(dynamics.parameters()) == set(field.parameters())  # found by odeint_adjoint
    times = torch.tensor([1.0, 0.0], dtype=torch.float64)
    z, delta = odeint(dynamics, dynamics.initial_state(x), times, rtol=1e-8, atol=1e-8)
    expected = normal_log_prob(z[-1]) - delta[-1, 0]
    actual = log_likelihood(field, x, 0.0, 1.0, normal_log_prob, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    ("method", "num_probes"),
    [
        ("auto", None),
        ("forward", None),
        ("reverse", None),
        ("hutchinson", 1),
        ("hutchinson", 4),
        ("hutch++", 6),
    ],
)
def test_each_function_evaluation_evaluates_an_mlp_field_once(method, num_probes):
    """The guide's claim: the velocity is the divergence engine's own evaluation of ``f`` (one
    for exact methods and reverse-mode estimators, as on an MLP)."""
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))
    calls = []

    def field(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        calls.append(t)
        return net(z)

    x = torch.randn(64, 3)
    dynamics = AugmentedDynamics(field, x, method=method, num_probes=num_probes)
    state = dynamics.initial_state(x)
    for _ in range(3):
        calls.clear()
        dynamics(torch.tensor(0.5), state)
        assert len(calls) == 1


@pytest.mark.slow
def test_import_torchdiv_does_not_need_torchdiffeq():
    code = "import sys; sys.modules['torchdiffeq'] = None; import torchdiv; torchdiv.flows.__all__"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_torchdiffeq_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ImportError, match=r"pip install 'torchdiv\[ode\]'"):
        log_likelihood(lambda t, z: z, torch.randn(2, 2), 0.0, 1.0, normal_log_prob)


X = torch.randn(2, 3)
GOOD = {"f": lambda t, z: -z, "x": X, "t0": 0.0, "t1": 1.0, "base_log_prob": normal_log_prob}


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"f": 3}, TypeError, "log_likelihood: f must be callable"),
        ({"x": [1.0]}, TypeError, "x must be a torch.Tensor"),
        ({"base_log_prob": "normal"}, TypeError, "base_log_prob must be callable"),
        ({"t0": "0"}, TypeError, "t0 must be a float or a 0-dim tensor, got str"),
        ({"t1": torch.ones(2)}, ValueError, r"t1 must be a float .* shape \(2,\)"),
        ({"t1": True}, TypeError, "t1 must be a float"),
        ({"t0": math.inf}, ValueError, "t0 must be finite"),
        ({"t0": torch.tensor(1j)}, TypeError, "t0 must be a real number"),
        ({"method": "exact"}, ValueError, "unknown method 'exact'; valid methods are 'auto'"),
        ({"method": "hutchinson"}, ValueError, "needs num_probes"),
        ({"method": "hutch++", "num_probes": 4}, ValueError, "multiple of 3"),
        ({"num_probes": 4}, ValueError, "num_probes is only used by stochastic methods"),
        ({"generator": torch.Generator()}, ValueError, "generator is only used"),
        ({"rtol": 0.0}, ValueError, "rtol must be a finite number > 0"),
        ({"atol": "1e-5"}, TypeError, "atol must be a float"),
        ({"solver": "rk5"}, ValueError, "unknown solver 'rk5'; valid solvers are 'dopri8'"),
        ({"return_stderr": 1}, TypeError, "return_stderr must be True or False"),
        (
            {"adjoint": True},
            TypeError,
            "adjoint=True .* f must be an nn.Module or a bound method of one, got function",
        ),
        ({"options": 0.1}, TypeError, "options must be a dict"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be at least 1"),
        ({"batch_dims": 3}, ValueError, "batch_dims must be in"),
        (
            {"method": "hutchinson", "probes": torch.ones(2, 3)},
            ValueError,
            r"probes must have shape \(r,\) \+ x.shape",
        ),
        ({"f": lambda t, z: z[:, :2]}, ValueError, r"velocity shaped like z: .*\(2, 3\).*\(2, 2\)"),
        ({"f": lambda t, z: z.double()}, TypeError, "f\\(t, z\\) must return z's dtype"),
        ({"f": lambda t, z: [z]}, TypeError, "f\\(t, z\\) must return a torch.Tensor"),
        (
            {"f": lambda t, z: types.SimpleNamespace(sample=z)},  # a diffusers model output
            TypeError,
            r"got SimpleNamespace; its .sample is one: wrap the model, e.g. lambda t, z: unet",
        ),
        (
            {"base_log_prob": lambda z: z},
            ValueError,
            r"one log-density per sample, shape .*\(2,\).*got shape \(2, 3\)",
        ),
        ({"base_log_prob": lambda z: 0.0}, TypeError, "base_log_prob\\(z\\) must return"),
    ],
)
def test_bad_arguments_are_named(changes, error, match):
    kwargs = {**GOOD, **changes}
    with pytest.raises(error, match=match):
        log_likelihood(**kwargs)


def test_augmented_dynamics_checks_its_arguments():
    with pytest.raises(ValueError, match="AugmentedDynamics: method='xtrace' needs num_probes"):
        AugmentedDynamics(lambda t, z: z, X, method="xtrace")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_everything_stays_on_the_gpu():
    field = MLPField(4).cuda()
    x = torch.randn(8, 4, dtype=torch.float64, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    value, stderr = log_likelihood(
        field, x, 0.0, 1.0, normal_log_prob, method="hutch++", num_probes=6, generator=g,
        return_stderr=True,
    )  # fmt: skip
    exact = log_likelihood(field, x, 0.0, 1.0, normal_log_prob)
    assert value.device == stderr.device == exact.device == x.device
    assert ((value - exact).abs() <= 5 * stderr).all()
