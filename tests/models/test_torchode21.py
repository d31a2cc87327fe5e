"""Neural-ODE training stacks: torchode's batch-parallel solver (per-sample time steps and a
per-sample ``t`` of shape ``(B,)`` passed to the dynamics), regularised CNFs (RNODE's kinetic
energy and Hutchinson Frobenius norm, STEER's random end times, OT-Flow's potential with its
exact Hessian trace), and torchdiffeq's ``odeint_adjoint`` with ``adjoint_params`` given, each
with ``torchdiv`` inside the dynamics the way those repositories' users write them: the
augmented state ``[x, delta]`` (``delta`` the integrated ``-div``, more columns for the
regularisers).

Not project extras: the torchode tests skip without ``torchode`` (installed here ``--no-deps``
with ``torchtyping`` and ``typeguard<3``, its own dependencies; torch untouched), the adjoint
tests without ``torchdiffeq``.

References are independent: float64 ``vmap(jacrev)`` per sample (each sample with its own
``t``) inside the same solver, which then takes the same steps to round-off (tolerance
``conftest.tolerances``: 1e-10 relative), each sample solved alone (torchode's steps are per
sample, so the batch must not matter), closed forms (OT-Flow's Hessian trace, the exact
Frobenius norm from ``torchdiv.jacobian``'s ``vmap(jacrev)`` counterpart), and the direct
backpropagation for the adjoint.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients
from torch import nn
from torch.func import jacrev, vmap

import torchdiv

f64 = torch.float64
D, B = 3, 5


class ConcatField(nn.Module):
    """FFJORD's ``ConcatSquash``-free concat MLP as torchode users write it: ``t`` arrives
    with shape ``(B,)``, one time per sample, and is appended to each sample's input."""

    def __init__(self, dim: int = D, hidden: int = 16, mix: str | None = None):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, hidden),
            nn.Softplus(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, dim),
        ).to(f64)
        self.mix = mix

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.mix == "mean":  # a real cross-sample term: the batch mean of the state
            x = x - x.mean(0, keepdim=True)
        if (
            self.mix == "late" and float(t.detach().max()) > 0.5
        ):  # the same, only later in the solve
            x = x - x.mean(0, keepdim=True)
        out = self.net(torch.cat([x, t[:, None]], 1))
        if self.mix == "time":  # the mean of the times: other samples' t, never their x
            out = out * (1 + t.mean())
        return out


def trace_loop(field: nn.Module, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``tr d field(t_b, x_b) / d x_b``, each sample alone with its own time
    (``vmap(jacrev)``)."""
    jac = vmap(jacrev(lambda xb, tb: field(tb[None], xb[None])[0]))(x, t)
    return jac.diagonal(dim1=1, dim2=2).sum(-1)


def cnf_dynamics(field: nn.Module, divergence):
    """torchode's ``f(t, y)`` on the flat state ``y = [x, delta]`` of shape ``(B, D + 1)``."""

    def dynamics(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = y[:, :-1]
        return torch.cat([field(t, x), -divergence(t, x)[:, None]], 1)

    return dynamics


def torchode_solve(dynamics, y0: torch.Tensor, t_end: torch.Tensor, tol: float = 1e-10):
    """Dopri5 with torchode's integral controller from ``t = 0`` to each sample's own
    ``t_end``; the final states ``(B, n)`` and each sample's number of steps."""
    to = pytest.importorskip("torchode")
    term = to.ODETerm(dynamics)
    solver = to.AutoDiffAdjoint(
        to.Dopri5(term=term), to.IntegralController(atol=tol, rtol=tol, term=term)
    )
    problem = to.InitialValueProblem(y0=y0, t_start=torch.zeros_like(t_end), t_end=t_end)
    solution = solver.solve(problem)
    assert (solution.status == 0).all()
    return solution.ys[:, -1], solution.stats["n_steps"]


def steer_end_times(generator: torch.Generator, n: int = B) -> torch.Tensor:
    """STEER's random end times, one per sample: ``T + U(-b, b)`` with ``T = 1``, ``b = 0.5``."""
    return 1 + (torch.rand(n, generator=generator, dtype=f64) - 0.5)


def likelihood_loss(state: torch.Tensor) -> torch.Tensor:
    """FFJORD's loss on the final ``[z, delta]``: ``-mean(log N(z) - delta)``."""
    z, delta = state[:, :-1], state[:, -1]
    return -(-0.5 * z.square().sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) - delta).mean()


@pytest.fixture
def problem():
    pytest.importorskip("torchode")
    generator = torch.Generator().manual_seed(21)
    field = ConcatField()
    x = torch.randn(B, D, generator=generator, dtype=f64)
    y0 = torch.cat([x, torch.zeros(B, 1, dtype=f64)], 1)
    return field, y0, steer_end_times(generator), generator


@pytest.mark.parametrize("method", ["auto", "structured", "forward", "reverse"])
def test_torchode_per_sample_times_exact(problem, method: str) -> None:
    """The exact divergence in torchode's dynamics with per-sample ``t`` and STEER end times:
    values and parameter gradients equal the same solve with the per-sample ``jacrev``
    trace, and (``"auto"``) each sample solved alone (the batch changes nothing)."""
    field, y0, t_end, _ = problem
    solve = lambda div, y, t: torchode_solve(cnf_dynamics(field, div), y, t)  # noqa: E731
    ours = lambda t, x: torchdiv.divergence(lambda x: field(t, x), x, method=method)  # noqa: E731
    loop = lambda t, x: trace_loop(field, t, x)  # noqa: E731
    state, steps = solve(ours, y0, t_end)
    expected, expected_steps = solve(loop, y0, t_end)
    assert len(set(steps.tolist())) > 1  # the samples really took their own steps
    assert torch.equal(steps, expected_steps)
    assert_close(state, expected)
    assert_same_parameter_gradients(field, likelihood_loss(state), likelihood_loss(expected))
    if method == "auto":  # each sample solved alone: the batch changes nothing
        alone = torch.cat([solve(ours, y0[b : b + 1], t_end[b : b + 1])[0] for b in range(B)])
        assert_close(state, alone)


@pytest.mark.parametrize("estimate", [False, True])
def test_torchode_hutchinson_with_the_solve_s_probes(problem, estimate: bool) -> None:
    """FFJORD's Hutchinson recipe (one probe ``e`` per sample drawn once per solve,
    ``e^T (e^T J)`` by one VJP) against ``divergence``/``estimate_divergence`` given the same
    probes, in a torchode solve: equal values and parameter gradients."""
    field, y0, t_end, generator = problem
    probes = torch.randn(1, B, D, generator=generator, dtype=f64)

    def recipe(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x if x.requires_grad else x.requires_grad_()
            (vjp,) = torch.autograd.grad(field(t, x), x, probes[0], create_graph=True)
        return (vjp * probes[0]).sum(1)

    def ours(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        g = lambda x: field(t, x)  # noqa: E731
        if estimate:
            return torchdiv.estimate_divergence(g, x, probes=probes).value
        return torchdiv.divergence(g, x, method="hutchinson", probes=probes)

    state, _ = torchode_solve(cnf_dynamics(field, ours), y0, t_end)
    expected, _ = torchode_solve(cnf_dynamics(field, recipe), y0, t_end)
    assert_close(state, expected)
    assert_same_parameter_gradients(field, likelihood_loss(state), likelihood_loss(expected))


@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
@pytest.mark.parametrize("mix", ["mean", "late"])
def test_torchode_watch_catches_mixing(problem, method: str, mix: str) -> None:
    """A field that subtracts the batch mean of the state (from the start, or only once a
    time passes 0.5, read on the host) is refused inside torchode's solve."""
    field, y0, t_end, generator = problem
    mixing = ConcatField(mix=mix)
    mixing.load_state_dict(field.state_dict())
    options = (
        {"probes": torch.randn(1, B, D, generator=generator, dtype=f64)}
        if method == "hutchinson"
        else {}
    )
    ours = lambda t, x: torchdiv.divergence(lambda x: mixing(t, x), x, method=method, **options)  # noqa: E731
    with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
        torchode_solve(cnf_dynamics(mixing, ours), y0, t_end)


@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
def test_torchode_per_sample_time_is_not_mixing(problem, method: str) -> None:
    """A field scaled by the mean of the per-sample times reads other samples' ``t``, never
    their ``x``: each Jacobian is still block diagonal, so nothing is refused and at every
    evaluation of the solve the divergence is the per-sample trace. (The ODE itself couples
    the samples through their times, so two solves are compared evaluation by evaluation.)"""
    field, y0, t_end, _ = problem
    timed = ConcatField(mix="time")
    timed.load_state_dict(field.state_dict())
    options = {}
    if method == "hutchinson":  # exact for probes that span: the D scaled basis vectors
        options["probes"] = torch.eye(D, dtype=f64)[:, None].expand(D, B, D) * math.sqrt(D)
    seen = []

    def checked(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        div = torchdiv.divergence(lambda x: timed(t, x), x, method=method, **options)
        assert_close(div, (1 + t.mean()) * trace_loop(field, t, x))  # (1 + mean t) J_b
        seen.append(t)
        return div

    torchode_solve(cnf_dynamics(timed, checked), y0, t_end, tol=1e-6)
    assert len(seen) > 10


def jjt_products(field: nn.Module, t: torch.Tensor, x: torch.Tensor):
    """``V -> J J^T V`` per sample (a VJP, then a JVP), for ``estimate_trace``: its trace is
    ``||J||_F^2``, and ``v^T J J^T v = ||v^T J||^2`` is RNODE's Frobenius term for probe ``v``."""

    def matmat(probes: torch.Tensor) -> torch.Tensor:
        g = lambda x: field(t, x)  # noqa: E731
        _, vjp = torch.func.vjp(g, x)
        return vmap(lambda v: torch.func.jvp(g, (x,), vjp(v))[1])(probes)

    return matmat


def test_rnode_frobenius_estimate_is_unbiased() -> None:
    """RNODE's Jacobian Frobenius term by ``estimate_trace`` on ``J J^T`` with the probes that
    also give the divergence: the mean of 4000 Gaussian probes lies within 4 standard errors
    of the exact ``||J_b||_F^2`` (``torchdiv.jacobian``'s, checked against ``vmap(jacrev)``),
    and the reported standard error is the Gaussian-probe theory's,
    ``sqrt(2 ||J J^T||_F^2 / m)``, within 10%. The divergence from the same probes is the
    per-probe ``v^T J v``."""
    generator = torch.Generator().manual_seed(5)
    field = ConcatField()
    x = torch.randn(B, D, generator=generator, dtype=f64)
    t = torch.rand(B, generator=generator, dtype=f64)
    jac = torchdiv.jacobian(lambda x: field(t, x), x)
    assert_close(jac, vmap(jacrev(lambda xb, tb: field(tb[None], xb[None])[0]))(x, t))
    m = 4000
    probes = torchdiv.draw_probes(x, m, probe="gaussian", generator=generator)
    frobenius = torchdiv.estimate_trace(jjt_products(field, t, x), x, probes=probes)
    exact = jac.square().sum((1, 2))
    gram = jac @ jac.transpose(1, 2)
    theory = (2 * gram.square().sum((1, 2)) / m).sqrt()
    assert ((frobenius.value - exact).abs() < 4 * frobenius.stderr).all()
    assert ((frobenius.stderr / theory - 1).abs() < 0.1).all()
    divergence = torchdiv.divergence(
        lambda x: field(t, x), x, method="hutchinson", probes=probes[:8]
    )
    assert_close(divergence, torch.einsum("kbi,bij,kbj->b", probes[:8], jac, probes[:8]) / 8)


def rnode_dynamics(field: nn.Module, probes: torch.Tensor, recipe: bool):
    """RNODE's augmented dynamics (Finlay et al. 2020) on ``[x, delta, E, F]``: ``-div`` by
    Hutchinson with the solve's probe ``e``, the kinetic energy ``|f|^2`` and the Frobenius
    term ``|e^T J|^2``. The recipe of their repository takes both from one VJP ``e^T J``;
    with torchdiv, ``divergence`` and ``estimate_trace`` of ``J J^T`` share the probe."""

    def dynamics(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = y[:, :D]
        if recipe:
            with torch.enable_grad():
                x = x if x.requires_grad else x.requires_grad_()
                velocity = field(t, x)
                (ej,) = torch.autograd.grad(velocity, x, probes[0], create_graph=True)
            div, frobenius = (ej * probes[0]).sum(1), ej.square().sum(1)
        else:
            velocity = field(t, x)
            div = torchdiv.divergence(lambda x: field(t, x), x, method="hutchinson", probes=probes)
            frobenius = torchdiv.estimate_trace(jjt_products(field, t, x), x, probes=probes).value
        return torch.cat(
            [velocity, -div[:, None], velocity.square().sum(1, keepdim=True), frobenius[:, None]], 1
        )

    return dynamics


def rnode_loss(state: torch.Tensor) -> torch.Tensor:
    """RNODE's objective: the likelihood loss plus ``0.1 E + 0.1 F``."""
    return likelihood_loss(state[:, : D + 1]) + 0.1 * state[:, D + 1 :].sum(1).mean()


def test_rnode_in_torchode_against_their_recipe(problem) -> None:
    """RNODE with STEER's random end times in torchode: torchdiv's divergence and
    Frobenius term from the shared probe give the recipe's values and parameter gradients."""
    field, y0, t_end, generator = problem
    probes = torch.randn(1, B, D, generator=generator, dtype=f64)
    y0 = torch.cat([y0, torch.zeros(B, 2, dtype=f64)], 1)
    state, _ = torchode_solve(rnode_dynamics(field, probes, recipe=False), y0, t_end)
    expected, _ = torchode_solve(rnode_dynamics(field, probes, recipe=True), y0, t_end)
    assert_close(state, expected)
    assert_same_parameter_gradients(field, rnode_loss(state), rnode_loss(expected))


class RegularisedDynamics(nn.Module):
    """torchdiffeq's augmented dynamics on the tuple ``(x, delta, E)`` with a time shared by
    the batch (0-dim ``t``): ``-div`` by ``torchdiv`` and RNODE's kinetic energy ``|f|^2``."""

    def __init__(self, field: nn.Module, method: str, mix: bool = False, **options):
        super().__init__()
        self.field, self.method, self.mix, self.options = field, method, mix, options

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.field(t.expand(len(x)), x - x.mean(0) if self.mix else x)

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = state[0]
        velocity = self.velocity(t, x)
        div = torchdiv.divergence(
            lambda x: self.velocity(t, x), x, method=self.method, **self.options
        )
        return velocity, -div, velocity.square().sum(1)


@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
def test_odeint_adjoint_with_adjoint_params(method: str) -> None:
    """``odeint_adjoint`` with ``adjoint_params`` given explicitly (the dynamics' own
    parameters, as the RNODE and FFJORD repositories pass them), float64, tolerances 1e-11:
    the parameter gradients of the regularised likelihood equal direct backpropagation
    through ``odeint`` (to 1e-8 of the largest gradient: both solves' error)."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    generator = torch.Generator().manual_seed(3)
    field = ConcatField()
    x = torch.randn(B, D, generator=generator, dtype=f64)
    options = (
        {"probes": torch.randn(1, B, D, generator=generator, dtype=f64)}
        if method == "hutchinson"
        else {}
    )
    dynamics = RegularisedDynamics(field, method, **options)
    zeros = torch.zeros(B, dtype=f64)
    times, tol = torch.tensor([0.0, 1.0], dtype=f64), {"rtol": 1e-11, "atol": 1e-11}

    def loss(solution: tuple[torch.Tensor, ...]) -> torch.Tensor:
        z, delta, kinetic = (s[-1] for s in solution)
        return likelihood_loss(torch.cat([z, delta[:, None]], 1)) + 0.1 * kinetic.mean()

    params = tuple(field.parameters())
    direct = torch.autograd.grad(
        loss(torchdiffeq.odeint(dynamics, (x, zeros, zeros), times, **tol)), params
    )
    solution = torchdiffeq.odeint_adjoint(
        dynamics,
        (x, zeros, zeros),
        times,
        adjoint_params=params,
        adjoint_rtol=1e-11,
        adjoint_atol=1e-11,
        **tol,
    )
    adjoint = torch.autograd.grad(loss(solution), params)
    largest = max(g.abs().max() for g in direct)
    for ours, expected in zip(adjoint, direct, strict=True):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-8 * largest)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_odeint_adjoint_watch_catches_mixing(method: str) -> None:
    """The batch mean in the dynamics of an ``odeint_adjoint`` solve is refused."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = ConcatField()
    x = torch.randn(B, D, dtype=f64)
    options = {"probes": torch.randn(1, B, D, dtype=f64)} if method == "hutchinson" else {}
    dynamics = RegularisedDynamics(field, method, mix=True, **options)
    zeros = torch.zeros(B, dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
        torchdiffeq.odeint_adjoint(
            dynamics,
            (x, zeros, zeros),
            torch.tensor([0.0, 1.0], dtype=f64),
            adjoint_params=tuple(field.parameters()),
        )


def antiderivative_tanh(x: torch.Tensor) -> torch.Tensor:
    """OT-Flow's activation ``log(2 cosh x)``, the antiderivative of ``tanh``, written as their
    repository does to stay finite: ``|x| + log(1 + exp(-2 |x|))``."""
    return x.abs() + torch.log1p(torch.exp(-2 * x.abs()))


class OTFlowPotential(nn.Module):
    """OT-Flow's potential ``Phi(s) = w^T N(s) + s^T A^T A s / 2 + c^T s + c_0`` of
    ``s = (x, t)``, ``N`` their two-layer ResNet with step 1/2 (Onken et al. 2021)."""

    def __init__(self, dim: int = D, width: int = 8, rank: int = 3):
        super().__init__()
        generator = torch.Generator().manual_seed(8)
        self.opening, self.layer = nn.Linear(dim + 1, width), nn.Linear(width, width)
        self.w = nn.Parameter(torch.randn(width, generator=generator) / width)
        self.A = nn.Parameter(torch.randn(rank, dim + 1, generator=generator) / 10)
        self.c = nn.Linear(dim + 1, 1)
        self.to(f64)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        u = antiderivative_tanh(self.opening(s))
        u = u + 0.5 * antiderivative_tanh(self.layer(u))
        return u @ self.w + 0.5 * (s @ self.A.T).square().sum(-1) + self.c(s)[..., 0]


def otflow_dynamics(potential: OTFlowPotential, method: str | None):
    """OT-Flow's dynamics on ``[x, l, L, R]`` with the time shared by the batch:
    ``dx/dt = -grad_x Phi``, ``dl/dt = -Delta_x Phi``, the transport cost
    ``dL/dt = |grad_x Phi|^2 / 2`` and the HJB penalty ``dR/dt = |d_t Phi - |grad_x Phi|^2 / 2|``
    from ``value_grad_laplacian`` over ``s = (x, t)`` with the Laplacian over ``x`` only
    (``coordinates``), or (``method=None``) from the per-sample ``vmap(hessian)``."""

    def dynamics(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = torch.cat([y[:, :D], t.expand(len(y), 1)], 1)
        if method is None:
            gradient = vmap(torch.func.grad(lambda sb: potential(sb[None])[0]))(s)
            hessians = vmap(torch.func.hessian(lambda sb: potential(sb[None])[0]))(s)
            trace = hessians[:, :D, :D].diagonal(dim1=1, dim2=2).sum(-1)
        else:
            out = torchdiv.value_grad_laplacian(potential, s, coordinates=range(D), method=method)
            gradient, trace = out.gradient, out.laplacian
        cost = gradient[:, :D].square().sum(1) / 2
        hjb = (gradient[:, D] - cost).abs()
        return torch.cat([-gradient[:, :D], -trace[:, None], cost[:, None], hjb[:, None]], 1)

    return dynamics


@pytest.mark.parametrize("method", ["auto", "taylor", "forward-over-reverse"])
def test_otflow_exact_hessian_trace_in_rk4(method: str) -> None:
    """OT-Flow's training loss (negative log-likelihood, transport cost, HJB penalty) through
    RK4 with 4 steps, as their repository integrates: values and parameter gradients from
    ``value_grad_laplacian`` (the Laplacian over ``x`` only) equal the per-sample Hessian's."""
    torchdiffeq = pytest.importorskip("torchdiffeq")
    generator = torch.Generator().manual_seed(13)
    potential = OTFlowPotential()
    y0 = torch.cat(
        [torch.randn(B, D, generator=generator, dtype=f64), torch.zeros(B, 3, dtype=f64)], 1
    )
    times = torch.tensor([0.0, 1.0], dtype=f64)

    def solve(method: str | None) -> torch.Tensor:
        dynamics = otflow_dynamics(potential, method)
        return torchdiffeq.odeint(dynamics, y0, times, method="rk4", options={"step_size": 0.25})[
            -1
        ]

    def loss(state: torch.Tensor) -> torch.Tensor:
        return likelihood_loss(state[:, : D + 1]) + state[:, D + 1 :].mean(0) @ torch.tensor(
            [5.0, 1.0], dtype=f64
        )

    state, expected = solve(method), solve(None)
    assert_close(state, expected)
    assert_same_parameter_gradients(potential, loss(state), loss(expected))


@pytest.mark.parametrize("method", ["auto", "reverse", "hutchinson"])
def test_otflow_divergence_of_the_gradient_field(method: str) -> None:
    """The velocity ``-grad_x Phi`` written with ``autograd.grad`` inside ``f`` (its seed sum is
    not mixing): its divergence is ``-Delta_x Phi`` (probes: the scaled basis, exact)."""
    generator = torch.Generator().manual_seed(14)
    potential = OTFlowPotential()
    x = torch.randn(B, D, generator=generator, dtype=f64)
    t = torch.rand(B, 1, generator=generator, dtype=f64)

    def velocity(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x if x.requires_grad else x.requires_grad_()
            value = potential(torch.cat([x, t], 1))
            return -torch.autograd.grad(value.sum(), x, create_graph=True)[0]

    options = {}
    if method == "hutchinson":
        options["probes"] = torch.eye(D, dtype=f64)[:, None].expand(D, B, D) * math.sqrt(D)
    hessians = vmap(torch.func.hessian(lambda sb: potential(sb[None])[0]))(torch.cat([x, t], 1))
    expected = -hessians[:, :D, :D].diagonal(dim1=1, dim2=2).sum(-1)
    assert_close(torchdiv.divergence(velocity, x, method=method, **options), expected)


class AnyBatchDynamics(nn.Module):
    """torchode dynamics that also run per sample: ``BacksolveAdjoint``'s backward pass calls
    ``functional_call`` of this module under ``torch.func.vmap`` over the batch, so ``y`` is
    then one sample's ``(D + 1,)`` and ``t`` 0-dim: ``batch_dims = y.dim() - 1``."""

    def __init__(self, field: nn.Module, method: str):
        super().__init__()
        self.field, self.method = field, method

    def velocity(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.field(t, x) if x.dim() == 2 else self.field(t[None], x[None])[0]

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = y[..., :-1]
        div = torchdiv.divergence(
            lambda x: self.velocity(t, x), x, batch_dims=y.dim() - 1, method=self.method
        )
        return torch.cat([self.velocity(t, x), -div[..., None]], -1)


@pytest.mark.parametrize("method", ["auto", "forward"])
def test_torchode_backsolve_adjoint_runs_the_divergence_under_vmap(problem, method: str) -> None:
    """torchode's ``BacksolveAdjoint`` (the adjoint ODE per sample under ``vmap``, parameter
    gradients by ``torch.func.vjp``): the divergence with ``batch_dims=0`` there gives the
    parameter gradients of backpropagation through the per-sample-trace solve (to 1e-8 of the
    largest: the two solves' error at tolerance 1e-10)."""
    to = pytest.importorskip("torchode")
    field, y0, t_end, _ = problem
    term = to.ODETerm(AnyBatchDynamics(field, method))
    controller = to.IntegralController(atol=1e-10, rtol=1e-10, term=term)
    solver = to.BacksolveAdjoint(term, to.Dopri5(term=term), controller)
    start = torch.zeros_like(t_end)
    state = solver.solve(to.InitialValueProblem(y0=y0, t_start=start, t_end=t_end)).ys[:, -1]
    expected, _ = torchode_solve(
        cnf_dynamics(field, lambda t, x: trace_loop(field, t, x)), y0, t_end
    )
    assert_close(state, expected)
    ours = torch.autograd.grad(likelihood_loss(state), list(field.parameters()))
    direct = torch.autograd.grad(likelihood_loss(expected), list(field.parameters()))
    largest = max(g.abs().max() for g in direct)
    for got, want in zip(ours, direct, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-8 * largest)


def total_derivative(dynamics, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TayNODE's second Taylor coefficient (Kelly et al. 2020), up to 1/2: ``d^2 y/dt^2 =
    d_t g + (dg/dy) g`` of the augmented dynamics ``g`` along its own trajectory, by one
    ``torch.func.jvp`` with tangent ``(1, g(t, y))``."""
    velocity = dynamics(t, y)
    return torch.func.jvp(dynamics, (t, y), (torch.ones_like(t), velocity))[1]


@pytest.mark.parametrize("method", ["auto", "reverse", "hutchinson"])
def test_taynode_regulariser_through_the_divergence(problem, method: str) -> None:
    """The TayNODE regulariser ``|d^2 [x, delta] / dt^2|^2`` of a CNF's augmented dynamics
    takes forward-mode AD through the divergence: its value (against the per-sample trace's,
    itself against central differences along the trajectory) and parameter gradients."""
    field, y0, _, generator = problem
    t = torch.rand(B, generator=generator, dtype=f64)
    probes = torch.randn(1, B, D, generator=generator, dtype=f64)
    options = {"probes": probes} if method == "hutchinson" else {}
    ours = lambda t, x: torchdiv.divergence(lambda x: field(t, x), x, method=method, **options)  # noqa: E731

    def reference(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if method != "hutchinson":
            return trace_loop(field, t, x)
        _, vjp = torch.func.vjp(lambda x: field(t, x), x)
        return (vjp(probes[0])[0] * probes[0]).sum(1)

    value = total_derivative(cnf_dynamics(field, ours), t, y0)
    expected_dynamics = cnf_dynamics(field, reference)
    expected = total_derivative(expected_dynamics, t, y0)
    assert_close(value, expected)
    h, velocity = 1e-5, expected_dynamics(t, y0).detach()
    ahead, behind = (expected_dynamics(t + s * h, y0 + s * h * velocity) for s in (1, -1))
    torch.testing.assert_close(expected, (ahead - behind) / (2 * h), rtol=1e-7, atol=1e-7)
    assert_same_parameter_gradients(field, value.square().sum(), expected.square().sum())


def test_taynode_structured_refuses_clearly(problem) -> None:
    """``method="structured"`` inside ``torch.func.jvp`` refuses (``UnsupportedOp``, a
    ``NotImplementedError``) naming the transform and ``"auto"``."""
    field, y0, _, _ = problem
    t = torch.zeros(B, dtype=f64)
    ours = lambda t, x: torchdiv.divergence(lambda x: field(t, x), x, method="structured")  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"torch\.func transform.*method='auto'"):
        total_derivative(cnf_dynamics(field, ours), t, y0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.filterwarnings("ignore:`torch._prims_common.check` is deprecated:FutureWarning")
def test_torchode_with_compiled_dynamics(problem) -> None:
    """The dynamics compiled (``torch.compile(dynamics)`` as the term's ``f``; torchode's
    README compiles the solver module, whose ``solve`` then runs eagerly: ``OptimizedModule``
    compiles ``forward`` only), the divergence traced into the graph: values and parameter
    gradients as the eager per-sample-trace solve (sample mixing is not watched inside a
    compiled region: the training guide)."""
    field, y0, t_end, _ = problem
    ours = lambda t, x: torchdiv.divergence(lambda x: field(t, x), x)  # noqa: E731
    loop = lambda t, x: trace_loop(field, t, x)  # noqa: E731
    state, _ = torchode_solve(torch.compile(cnf_dynamics(field, ours)), y0, t_end, tol=1e-8)
    expected, _ = torchode_solve(cnf_dynamics(field, loop), y0, t_end, tol=1e-8)
    assert_close(state, expected)
    assert_same_parameter_gradients(field, likelihood_loss(state), likelihood_loss(expected))


class TimeSwitchedField(nn.Module):
    """A field whose structure per sample follows its own time: two branches chosen by
    ``t_b > 1/2`` (``where``), or the input rotated by ``floor(10 t_b)`` places (``gather``
    with indices made from ``t``, as a time-dependent coupling order)."""

    def __init__(self, kind: str, dim: int = 16):
        super().__init__()
        self.kind = kind
        self.early, self.late = tanh_pair(dim), tanh_pair(dim)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "where":
            return torch.where(t[:, None] > 0.5, self.late(x), self.early(x))
        index = (torch.arange(x.shape[1]) + (10 * t).long()[:, None]) % x.shape[1]
        return self.late(torch.gather(x, 1, index))


def tanh_pair(dim: int) -> nn.Module:
    """``dim -> 32 -> dim`` tanh MLP in float64."""
    return nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, dim)).to(f64)


@pytest.mark.parametrize("method", ["auto", "structured"])
@pytest.mark.parametrize("kind", ["where", "gather"])
def test_per_sample_time_switches_structure_between_calls(method: str, kind: str) -> None:
    """Plans kept across calls (64 samples of 16: above the tiny-problem size, so ``"auto"``
    plans) must not keep one call's per-sample times: three calls of the same field at new
    ``t`` (samples crossing 1/2, new rotations) each give the per-sample trace."""
    field = TimeSwitchedField(kind)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 16, generator=generator, dtype=f64)
        t = torch.rand(64, generator=generator, dtype=f64)
        ours = torchdiv.divergence(lambda x: field(t, x), x, method=method)  # noqa: B023
        assert_close(ours, trace_loop(field, t, x))
