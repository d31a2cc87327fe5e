"""Score-based likelihoods as score_sde, diffusers and k-diffusion users compute them: the
probability-flow ODE ``dx/dt = f(x, t) - g(t)^2 / 2 * score(x, t)`` of a VP SDE, and the
EDM/k-diffusion denoiser form ``d = (x - D(x; sigma)) / sigma``, with
``log p(x0) = log p(xT) + int div``, the divergence by torchdiv (exact, or Hutchinson with
probes fixed for the whole solve, as score_sde draws its ``epsilon`` once per likelihood).

Solvers: score_sde's ``scipy.integrate.solve_ivp`` on a flattened float64 state (cast to
float32 inside the ODE function, ``t`` a Python float), and k-diffusion's ``torchdiffeq``
``odeint`` of the tuple ``(x, delta)`` (dopri5 with tolerances, rk4 on a fixed grid), with
gradients to the parameters by backpropagation through the solver. References: the same
solves with per-sample ``torch.func.jacrev`` traces (float64).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import sampled_daily
from torch import nn

import torchdiv
from torchdiv._core import walk

f64 = torch.float64


class GaussianFourierProjection(nn.Module):
    """score_sde's time features: ``[sin 2 pi W t, cos 2 pi W t]``, ``W`` fixed."""

    def __init__(self, size: int, scale: float = 1.0):
        super().__init__()
        self.W = nn.Parameter(torch.randn(size // 2) * scale, requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(angles), torch.cos(angles)], -1)


class ScoreMLP(nn.Module):
    """``s(x, t)``: an MLP on ``x`` plus a dense projection of the time features."""

    def __init__(self, dim: int = 3, hidden: int = 16, embedding: int = 8):
        super().__init__()
        self.embed = GaussianFourierProjection(embedding)
        self.dense = nn.Linear(embedding, hidden)
        self.inp, self.mid = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.inp(x) + self.dense(self.embed(t)))
        return self.out(F.silu(self.mid(h)))


BETA_MIN, BETA_MAX = 0.1, 4.0


def vp_drift(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """score_sde's probability-flow drift of the VP SDE, the score ``-eps(x, t) / std(t)``."""
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    log_mean = -0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN
    std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean))
    score = -model(x, t) / std[:, None]
    return -0.5 * beta[:, None] * x - 0.5 * beta[:, None] * score


def _per_sample_traces(fn, x: torch.Tensor) -> torch.Tensor:
    """The reference: the traces of the diagonal blocks of the whole batch's Jacobian
    (``jacrev``), each sample's own Jacobian."""
    b, n = x.shape[0], x[0].numel()
    blocks = torch.func.jacrev(fn)(x).reshape(b, n, b, n).diagonal(0, 0, 2)  # (n, n, b)
    return blocks.diagonal(0, 0, 1).sum(-1)


def _solve_ivp_log_likelihood(divergence, x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """score_sde's ``likelihood_fn``: ``solve_ivp`` (RK45) from ``eps`` to 1 of the flattened
    float64 state ``[x, delta]``, each evaluation casting the sample to ``x``'s dtype and
    ``t`` a Python float (``vec_t = ones(B) * t``); the prior a standard normal."""
    np = pytest.importorskip("numpy")
    integrate = pytest.importorskip("scipy.integrate")
    shape, b = x.shape, x.shape[0]

    def ode_func(t: float, state):
        sample = torch.from_numpy(state[:-b].reshape(shape)).to(x.dtype)
        vec_t = torch.ones(b, dtype=x.dtype) * t
        with torch.no_grad():
            drift = vp_drift(model, sample, vec_t)
            div = divergence(lambda xx: vp_drift(model, xx, vec_t), sample, vec_t)
        return np.concatenate([drift.numpy().reshape(-1), div.numpy().reshape(-1)])

    init = np.concatenate([x.numpy().reshape(-1).astype(np.float64), np.zeros(b)])
    solution = integrate.solve_ivp(ode_func, (1e-3, 1.0), init, rtol=1e-4, atol=1e-4)
    z, delta = solution.y[:-b, -1].reshape(b, -1), solution.y[-b:, -1]
    prior = -0.5 * z.shape[1] * math.log(2 * math.pi) - 0.5 * (z**2).sum(1)
    return torch.from_numpy(prior + delta)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_score_sde_solve_ivp_likelihood_against_float64_jacrev(method, watches):
    """float32 ``divergence`` inside score_sde's scipy loop (Rademacher ``epsilon`` drawn once
    for the whole solve, as ``get_likelihood_fn`` does): the log-likelihood equals the same
    loop with the float64 per-sample Jacobians' traces (or quadratic forms) to float32's
    accuracy over the solve, and the field is watched for sample mixing at most once."""
    torch.manual_seed(0)
    model = ScoreMLP().eval()
    x = torch.randn(4, 3)
    epsilon = torch.randint(0, 2, x.shape).float() * 2 - 1
    double = ScoreMLP().eval().to(f64)
    double.load_state_dict(model.state_dict())

    def got(fn, sample, vec_t):
        probes = {"probes": epsilon[None]} if method == "hutchinson" else {}
        return torchdiv.divergence(fn, sample, method=method, **probes)

    def want(fn, sample, vec_t):
        sample, t = sample.to(f64), vec_t.to(f64)
        if method == "auto":
            return _per_sample_traces(lambda z: vp_drift(double, z, t), sample).float()
        e = epsilon.to(f64)
        _, vjp = torch.func.vjp(lambda z: vp_drift(double, z, t), sample)
        return (vjp(e)[0] * e).sum(1).float()

    torch.testing.assert_close(
        _solve_ivp_log_likelihood(got, x, model),
        _solve_ivp_log_likelihood(want, x, model),
        rtol=1e-4,
        atol=1e-4,
    )
    assert len(watches) <= 1


class _CountedKinds(dict):
    """``walk._KINDS`` counting its look-ups: one per autograd node that ``walk.search``
    visits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.visits = 0

    def get(self, *args):
        self.visits += 1
        return super().get(*args)


class _EdmDenoiser(nn.Module):
    """k-diffusion's EDM wrapper ``D(x; sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4)``
    around a small conv net with a group norm and a sinusoidal noise embedding."""

    def __init__(self, sigma_data: float = 0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.conv_in, self.conv_out = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 2, 3, padding=1)
        self.norm, self.emb = nn.GroupNorm(2, 8), nn.Linear(8, 8)
        self.register_buffer("freqs", torch.arange(1.0, 5.0))

    def inner(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs
        emb = self.emb(torch.cat([angles.sin(), angles.cos()], 1))
        return self.conv_out(F.silu(self.norm(self.conv_in(x) + emb[:, :, None, None])))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma[:, None, None, None]
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s * self.sigma_data / (s**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (s**2 + self.sigma_data**2).sqrt()
        return self.inner(x * c_in, sigma.log() / 4) * c_out + x * c_skip


def _to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    return (x - denoised) / sigma[:, None, None, None]


def test_a_solve_s_history_is_not_walked_at_every_evaluation(monkeypatch):
    """Backpropagation through the solver (maximum-likelihood training, ``adjoint=False``):
    the state ``z`` handed to the engines carries the graph of every earlier step. ``"auto"``
    walked all of it at every function evaluation (``walk.search`` below ``x.view_as(x)``),
    so a solve's cost grew with the square of its length: dopri5 on the EDM denoiser
    (92 evaluations) took 15 s where ``"reverse"`` took 0.6 s. The nodes walked per
    evaluation stay as many as at the first searched (they grew 40-fold over 40 rk4 steps)."""
    pytest.importorskip("torchdiffeq")
    from torchdiv.flows import log_likelihood

    torch.manual_seed(0)
    model = _EdmDenoiser().to(f64)
    x = 0.5 * torch.randn(2, 2, 4, 4, dtype=f64)
    counted = _CountedKinds(walk._KINDS)
    monkeypatch.setattr(walk, "_KINDS", counted)
    per_evaluation: list[int] = []

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        per_evaluation.append(counted.visits)
        sigma = t.expand(len(z))
        return _to_d(z, sigma, model(z, sigma))

    normal = lambda z: torch.distributions.Normal(0.0, 5.0).log_prob(z).flatten(1).sum(1)  # noqa: E731
    solve = {"solver": "rk4", "options": {"step_size": 0.5}}
    logp = log_likelihood(velocity, x, 5.0, 0.01, normal, **solve)
    walked = torch.tensor([*per_evaluation, counted.visits]).diff()
    searched = walked[walked > 0]  # (the first evaluations are watched instead)
    assert len(walked) == 40 and len(searched) >= 30
    assert searched.max() <= 2 * searched[0], walked.tolist()
    reference = log_likelihood(velocity, x, 5.0, 0.01, normal, method="reverse", **solve)
    torch.testing.assert_close(logp, reference, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(logp.sum(), list(model.parameters()))
    want = torch.autograd.grad(reference.sum(), list(model.parameters()))
    torch.testing.assert_close(grads, want, rtol=1e-10, atol=1e-12)


def _vp_velocity(model: nn.Module):
    """The probability-flow velocity ``f(t, z)`` of ``log_likelihood`` for ``vp_drift``."""
    return lambda t, z: vp_drift(model, z, t.expand(len(z)))


def _integrated_jacobians(velocity, x: torch.Tensor, t0: float, t1: float, step: float):
    """``z(t0)`` and ``M = integral_{t1}^{t0} J(t, z(t)) dt`` per sample by the same rk4 grid:
    the state ``(z, M)``, ``J`` each sample's Jacobian by ``jacrev`` (float64). A Hutchinson
    solve with probes ``p`` then gives exactly ``base(z(t0)) + p^T M p``."""
    from torchdiffeq import odeint

    def dynamics(t, state):
        z, _ = state
        one = lambda zi: velocity(t, zi[None])[0]  # noqa: E731
        return velocity(t, z), torch.stack([torch.func.jacrev(one)(zi) for zi in z])

    zero = x.new_zeros(len(x), x.shape[1], x.shape[1])
    times = x.new_tensor([t1, t0])
    z, m = odeint(dynamics, (x, zero), times, method="rk4", options={"step_size": step})
    return z[-1], m[-1]


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_hutchinson_solve_is_the_quadratic_form_of_the_integrated_jacobian(kind):
    """score_sde's likelihood with ``epsilon`` fixed for the solve, through
    ``log_likelihood(method="hutchinson")`` on a fixed rk4 grid: each sample's estimate is
    ``base(z(t0)) + mean_j p_j^T M p_j`` (``M`` the integrated Jacobian, float64, to 1e-10);
    over 1200 copies of 4 points with fresh probes, the mean is within 4 standard errors of
    the exact ``base + tr M`` and the sample variance within 25% of the exact variance
    (``2 sum_{i != j} S_ij^2`` for Rademacher probes, ``2 |S|_F^2`` for Gaussian ones,
    ``S = (M + M^T) / 2``); ``return_stderr`` is the standard error of the probes' mean."""
    pytest.importorskip("torchdiffeq")
    from torchdiv.flows import log_likelihood

    torch.manual_seed(0)
    model = ScoreMLP().to(f64)
    velocity = _vp_velocity(model)
    points = torch.randn(4, 3, dtype=f64)
    normal = lambda z: -0.5 * z.square().sum(-1) - 1.5 * math.log(2 * math.pi)  # noqa: E731
    solve = {"solver": "rk4", "options": {"step_size": 0.25}}
    z, m = _integrated_jacobians(velocity, points, 1.0, 1e-3, 0.25)
    exact = normal(z) + m.diagonal(0, 1, 2).sum(-1)
    s = (m + m.transpose(1, 2)) / 2
    variance = 2 * s.square().sum((1, 2))
    if kind == "rademacher":
        variance = variance - 2 * s.diagonal(0, 1, 2).square().sum(-1)

    copies = 300
    x = points.repeat(copies, 1)
    generator = torch.Generator().manual_seed(1)
    probes = torchdiv.draw_probes(x, 2, probe=kind, generator=generator)
    got, stderr = log_likelihood(
        velocity,
        x,
        1.0,
        1e-3,
        normal,
        method="hutchinson",
        probes=probes,
        return_stderr=True,
        **solve,
    )
    terms = torch.einsum("kbi,bij,kbj->kb", probes, m.repeat(copies, 1, 1), probes)
    torch.testing.assert_close(
        got, normal(z).repeat(copies) + terms.mean(0), rtol=1e-10, atol=1e-10
    )
    torch.testing.assert_close(stderr, terms.std(0) / math.sqrt(2), rtol=1e-8, atol=1e-10)
    one = terms.reshape(-1, copies, 4)  # (probe, copy, point): 2 * 300 single-probe estimates
    one = one.transpose(0, 1).reshape(-1, 4) + normal(z)
    mean_error = (one.mean(0) - exact).abs()
    assert (mean_error <= 4 * (variance / len(one)).sqrt()).all(), (mean_error, variance)
    ratio = one.var(0) / variance
    assert ((ratio > 0.75) & (ratio < 1.25)).all(), ratio


class _KDiffusionODE:
    """k-diffusion's ``log_likelihood`` dynamics on the tuple ``(x, delta)``: ``d`` from the
    denoiser, its divergence from ``divergence(fn, x)`` under ``enable_grad``; ``t`` is
    ``sigma``."""

    def __init__(self, model: nn.Module, divergence):
        self.model, self.divergence = model, divergence

    def __call__(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        x = state[0]
        sigma = t * x.new_ones([x.shape[0]])
        with torch.enable_grad():
            fn = lambda xx: _to_d(xx, sigma, self.model(xx, sigma))  # noqa: E731
            return fn(x), self.divergence(fn, x)


def _k_diffusion_log_likelihood(model, x, divergence, **solve) -> torch.Tensor:
    """``odeint`` from ``sigma_min`` to ``sigma_max``; the prior ``N(0, sigma_max^2)``."""
    from torchdiffeq import odeint

    sigma_max = 5.0
    times = x.new_tensor([0.01, sigma_max])
    latent, delta = odeint(
        _KDiffusionODE(model, divergence), (x, x.new_zeros(len(x))), times, **solve
    )
    prior = torch.distributions.Normal(0.0, sigma_max).log_prob(latent[-1]).flatten(1).sum(1)
    return prior + delta[-1]


# (16-31 s each: both in the daily sample of slow tests; the scipy solve above runs always)
@pytest.mark.parametrize("method", sampled_daily(["auto", "hutchinson"], {"auto", "hutchinson"}))
def test_k_diffusion_dopri5_likelihood_and_parameter_gradients(method, watches):
    """The EDM denoiser's likelihood by dopri5 (tolerances 1e-5), backpropagated through the
    solver to every parameter: the same as with per-sample ``jacrev`` traces (or the
    quadratic forms of k-diffusion's fixed Rademacher ``v``) to 1e-9; watched at most twice."""
    pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    model = _EdmDenoiser().to(f64)
    x = 0.5 * torch.randn(2, 2, 4, 4, dtype=f64)
    v = (torch.randint(0, 2, x.shape) * 2 - 1).to(f64)

    def got(fn, z):
        probes = {"probes": v[None]} if method == "hutchinson" else {}
        return torchdiv.divergence(fn, z, method=method, **probes)

    def want(fn, z):
        if method == "hutchinson":
            _, vjp = torch.func.vjp(fn, z)
            return (vjp(v)[0] * v).flatten(1).sum(1)
        return _per_sample_traces(fn, z)

    solve = {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5}
    params = list(model.parameters())
    values = [_k_diffusion_log_likelihood(model, x, d, **solve) for d in (got, want)]
    grads = [torch.autograd.grad(value.sum(), params) for value in values]
    torch.testing.assert_close(values[0], values[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-9)
    assert len(watches) <= 2


class _BatchNormScore(nn.Module):
    """An NCSN-style conv score net normalised by ``BatchNorm2d`` (as early NCSN variants
    were), divided by each sample's noise level."""

    def __init__(self):
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(2, 6, 3, padding=1), nn.Conv2d(6, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.elu(self.norm(self.conv_in(x)))) / sigma[:, None, None, None]


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
def test_a_train_mode_batch_norm_in_the_score_net_is_refused(method):
    """In train mode the batch norm normalises with the whole batch's statistics: the
    divergence and the likelihood are refused, naming it; in eval mode they are the
    per-sample Jacobians' traces (float64)."""
    pytest.importorskip("torchdiffeq")
    from torchdiv import BatchInteractionError
    from torchdiv.flows import log_likelihood

    torch.manual_seed(0)
    net = _BatchNormScore().to(f64)
    x = torch.randn(3, 2, 4, 4, dtype=f64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    options = {"num_probes": 1} if method == "hutchinson" else {}
    velocity = lambda t, z: net(z, sigma * (1 + t))  # noqa: E731
    normal = lambda z: -0.5 * z.square().flatten(1).sum(1)  # noqa: E731
    with pytest.raises(BatchInteractionError, match="batch norm in train mode"):
        torchdiv.divergence(lambda z: net(z, sigma), x, method=method, **options)
    with pytest.raises(BatchInteractionError, match="batch norm in train mode"):
        log_likelihood(velocity, x, 1.0, 0.0, normal, method=method, solver="rk4", **options)
    net.eval()
    got = torchdiv.divergence(lambda z: net(z, sigma), x)
    want = _per_sample_traces(lambda z: net(z, sigma), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form", ["divergence", "hutchinson", "jacobian"])
def test_graph_form_on_batch_normalised_features_is_not_refused(form):
    """``h = BatchNorm1d(raw)`` in train mode, then the graph form on a per-sample score head
    ``graph_divergence(head(h), h)``: the batch norm made ``h`` (it is ``h.grad_fn``, below
    which lies ``h``'s history), ``head`` does not mix ``h``'s samples. The graph forms refused
    it as "a batch norm in train mode" (their check took ``h``'s own producer for an op of
    ``f``); the function form never did. Values against the per-sample jacrev traces."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(3).to(f64).train()
    head = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).to(f64)
    h = norm(torch.randn(6, 3, dtype=f64, requires_grad=True))
    want = _per_sample_traces(head, h.detach())
    y = head(h)
    if form == "divergence":
        got = torchdiv.graph_divergence(y, h)
    elif form == "hutchinson":  # probes of ones: each sample's sum of Jacobian entries
        got = torchdiv.graph_divergence(
            y, h, method="hutchinson", probes=torch.ones(1, 6, 3, dtype=f64)
        )
        want = torch.func.vjp(head, h.detach())[1](torch.ones(6, 3, dtype=f64))[0].sum(1)
    else:
        got = torchdiv.graph_jacobian(y, h).diagonal(0, 1, 2).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mixed = head(nn.BatchNorm1d(3).to(f64).train()(h))  # one applied to h is still refused
    with pytest.raises(torchdiv.BatchInteractionError, match="batch norm in train mode"):
        torchdiv.graph_divergence(mixed, h)


class _Tagged(torch.autograd.Function):
    """The identity as a custom ``autograd.Function`` (differentiable twice)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:
        return v.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


@pytest.mark.parametrize("create_graph", sampled_daily([False, True], {True}))
def test_ffjord_graph_form_does_not_walk_the_solve_s_history(create_graph, monkeypatch):
    """FFJORD's dynamics backpropagated through the solver: ``z.requires_grad_(True)`` (a
    no-op on a state that already requires grad), ``dz = f(t, z)``, then
    ``graph_divergence(dz, z, create_graph=...)``. Its batch-norm check, and with
    ``create_graph`` its search for custom ``autograd.Function``s, walked every node of
    ``dz``'s graph, the solve's history below ``z`` included, at every evaluation (the EDM
    denoiser over 400 rk4 evaluations: 3 -> 8 ms per evaluation, with ``create_graph``
    11 -> 45 ms, 11.9 s in all; now flat, 1.6 s). Counted: the nodes the batch-norm check
    visits per evaluation stay as many as at the first, and the custom Functions found are
    none of the earlier steps' (the velocity leaves each step through one); values and
    parameter gradients against ``"reverse"`` on the same solve."""
    pytest.importorskip("torchdiffeq")
    from torchdiffeq import odeint

    from torchdiv._core.mixing import watch
    from torchdiv._exact import autograd

    torch.manual_seed(0)
    model = _EdmDenoiser().to(f64)
    x = 0.5 * torch.randn(2, 2, 4, 4, dtype=f64)
    visited: list[int] = []
    customs: list[int] = []

    def counted(*args):
        for node in walk.nodes(*args):
            visited[-1] += 1
            yield node

    search = autograd._custom_functions

    def found(*args):
        result = search(*args)
        customs.append(len(result))
        return result

    monkeypatch.setattr(watch, "nodes", counted)
    monkeypatch.setattr(autograd, "_custom_functions", found)

    def dynamics(method: str):
        def f(t, state):
            z = state[0]
            visited.append(0)
            with torch.enable_grad():
                z.requires_grad_(True)
                sigma = t.expand(len(z))
                dz = _to_d(z, sigma, model(z, sigma))
                div = torchdiv.graph_divergence(dz, z, method=method, create_graph=create_graph)
            return _Tagged.apply(dz), -div

        return f

    solve = {"method": "rk4", "options": {"step_size": 0.5}}
    times = x.new_tensor([0.01, 5.0])
    got = odeint(dynamics("auto"), (x, x.new_zeros(2)), times, **solve)[1][-1]
    per_evaluation = torch.tensor(visited[1:])  # (the first has no history yet)
    assert len(per_evaluation) == 39 and per_evaluation[0] > 0
    assert per_evaluation.max() <= 2 * per_evaluation[0], visited
    assert customs == ([0] * 40 if create_graph else []), customs
    want = odeint(dynamics("reverse"), (x, x.new_zeros(2)), times, **solve)[1][-1]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if create_graph:
        params = list(model.parameters())
        grads = torch.autograd.grad(got.sum(), params)
        torch.testing.assert_close(grads, torch.autograd.grad(want.sum(), params))


def test_numpy_scalar_end_times_are_taken():
    """score_sde's ``eps`` and ``sde.T`` read from a NumPy-typed config (``np.float32``):
    ``log_likelihood`` refused them ("t0 must be a float or a 0-dim tensor, got float32");
    they give the Python floats' result. A boolean is still refused."""
    pytest.importorskip("torchdiffeq")
    np = pytest.importorskip("numpy")
    from torchdiv.flows import log_likelihood

    torch.manual_seed(0)
    model = ScoreMLP().to(f64)
    x = torch.randn(4, 3, dtype=f64)
    normal = lambda z: -0.5 * z.square().sum(-1)  # noqa: E731
    solve = {"solver": "rk4", "options": {"step_size": 0.25}}
    want = log_likelihood(_vp_velocity(model), x, 1.0, 0.25, normal, **solve)
    got = log_likelihood(_vp_velocity(model), x, np.float32(1.0), np.float64(0.25), normal, **solve)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="t0 must be"):
        log_likelihood(_vp_velocity(model), x, True, 0.25, normal, **solve)
