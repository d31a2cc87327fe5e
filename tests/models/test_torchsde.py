"""torchsde (Li et al. 2020) with torchdiv inside the SDE's drift, and around the solve.

A latent SDE in the layout of torchsde's examples: a posterior drift ``f(t, y)`` from ``(t, y,
context)``, a prior drift ``h``, a diagonal diffusion ``g`` built from one small net per
dimension. torchdiv adds, inside ``f``: the Stratonovich drift ``f - 0.5 g dg/dy``
(``jacobian_diagonal``), a Fokker-Planck log-density ``d logp = -(div f - 0.5 sum_i d_i^2 g_i^2)
dt`` along the path (a divergence of a diagonal), or a divergence regulariser ``dr = (div f)^2
dt``. Solved by ``torchsde.sdeint`` and ``sdeint_adjoint`` on a ``BrownianInterval`` with a
fixed entropy, the final states and the parameter gradients of a loss of them are compared
with the same solve whose torchdiv terms come from a loop of backward passes, one sample at a
time; one direction against float64 central differences on the same Brownian path. Also: a
VP probability-flow ODE's log-likelihood solved by torchsde against ``torchdiv.flows``,
per-sample isolation along the solve, the sample-mixing watch, and the divergence of the
flow map ``y0 -> Y_T`` (torchdiv around ``sdeint``). float64, 3 samples of 2 dimensions.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import torchdiv
from torchdiv import flows

torchsde = pytest.importorskip("torchsde")

f64 = torch.float64
B, D = 3, 2
TS = torch.tensor([0.0, 0.25, 0.5], dtype=f64)
STEP = 0.05
EXACT = ["auto", "reverse", "forward", "structured"]
SLOW = pytest.mark.slow


def loop_terms(fn, z: torch.Tensor, rows: list[slice]) -> torch.Tensor:
    """``d fn(z)_b / d z_b`` diagonal per sample, one sample at a time (``rows[0]`` selects
    the sample's context row while it runs), with ``create_graph``: shape ``z.shape``."""
    out = []
    with torch.enable_grad():
        try:
            for b in range(z.shape[0]):
                rows[0] = slice(b, b + 1)
                zb = z[b : b + 1]
                zb = zb if zb.requires_grad else zb.detach().requires_grad_(True)
                y = fn(zb)
                out.append(
                    torch.stack(
                        [
                            torch.autograd.grad(y[0, i], zb, create_graph=True)[0][0, i]
                            for i in range(z.shape[1])
                        ]
                    )
                )
        finally:
            rows[0] = slice(None)
    return torch.stack(out)


class LatentSDE(nn.Module):
    """torchsde's latent SDE (diagonal noise) with a torchdiv term in its drift (see the
    module docstring): ``mode`` is ``"stratonovich"``, ``"logp"`` or ``"regulariser"``; with
    ``method=None`` the terms come from ``loop_terms`` (the reference)."""

    noise_type = "diagonal"

    def __init__(self, mode: str, method: str | None, context: torch.Tensor):
        super().__init__()
        self.mode, self.method, self.context = mode, method, context
        self.sde_type = "stratonovich" if mode == "stratonovich" else "ito"
        self.rows = [slice(None)]
        self.f_net = nn.Sequential(
            nn.Linear(D + 4, 8), nn.Softplus(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, D)
        )
        self.h_net = nn.Sequential(nn.Linear(D, 8), nn.Softplus(), nn.Linear(8, D))
        self.g_nets = nn.ModuleList(
            nn.Sequential(nn.Linear(1, 8), nn.Softplus(), nn.Linear(8, 1), nn.Sigmoid())
            for _ in range(D)
        )

    def drift(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = torch.ones_like(z[:, :1]) * t
        c = self.context[self.rows[0]]
        return self.f_net(torch.cat([torch.sin(tt), torch.cos(tt), z, c], 1))

    def diffusion(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        parts = torch.split(z, 1, dim=1)
        return torch.cat([g(p) for g, p in zip(self.g_nets, parts, strict=True)], 1) + 0.1

    def diagonal(self, fn, z: torch.Tensor) -> torch.Tensor:
        if self.method is None:
            return loop_terms(fn, z, self.rows)
        return torchdiv.jacobian_diagonal(fn, z, method=self.method)

    def divergence(self, fn, z: torch.Tensor) -> torch.Tensor:
        if self.method is None:
            return loop_terms(fn, z, self.rows).sum(1)
        return torchdiv.divergence(fn, z, method=self.method)

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "stratonovich":
            dg = self.diagonal(lambda z: self.diffusion(t, z), y)
            return self.drift(t, y) - 0.5 * self.diffusion(t, y) * dg
        z = y[:, :D]
        div_f = self.divergence(lambda u: self.drift(t, u), z)
        if self.mode == "logp":
            g2 = lambda v: self.diffusion(t, v) ** 2  # noqa: E731
            dd = self.divergence(lambda u: self.diagonal(g2, u), z)
            extra = -(div_f - 0.5 * dd)
        else:
            extra = div_f**2
        return torch.cat([self.drift(t, z), extra[:, None]], 1)

    def h(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.h_net(y)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.mode == "stratonovich":
            return self.diffusion(t, y)
        return torch.cat([self.diffusion(t, y[:, :D]), torch.zeros_like(y[:, D:])], 1)


def latent_sde(mode: str, method: str | None) -> tuple[LatentSDE, torch.Tensor]:
    """The model (same weights for every ``method``) and its ``y0``."""
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(B, 2, generator=gen, dtype=f64)
    y0 = torch.randn(B, D, generator=gen, dtype=f64)
    torch.manual_seed(0)
    sde = LatentSDE(mode, method, context).to(f64)
    if mode != "stratonovich":
        y0 = torch.cat([y0, torch.zeros(B, 1, dtype=f64)], 1)
    return sde, y0


def solve(sde, y0, solver, *, adjoint=False, logqp=False):
    """Final states and ``log q/p`` of one solve on the fixed Brownian path."""
    bm = torchsde.BrownianInterval(
        t0=0.0,
        t1=float(TS[-1]),
        size=(y0.shape[0], y0.shape[1] + logqp),
        dtype=y0.dtype,
        entropy=7,
        levy_area_approximation="space-time" if solver == "srk" else "none",
    )
    kwargs = {"adjoint_params": tuple(sde.parameters())} if adjoint else {}
    sdeint = torchsde.sdeint_adjoint if adjoint else torchsde.sdeint
    out = sdeint(sde, y0, TS, bm=bm, method=solver, dt=STEP, logqp=logqp, **kwargs)
    ys, log_ratio = out if logqp else (out, torch.zeros((), dtype=y0.dtype))
    return ys[-1], log_ratio


def loss_and_gradients(sde, y0, solver, **kwargs):
    """The final states and the gradient of ``sum y_T^2 + sum y_T[:, -1] + sum log q/p``
    with respect to every parameter (zeros for those the loss does not reach)."""
    y_end, log_ratio = solve(sde, y0, solver, **kwargs)
    loss = (y_end**2).sum() + y_end[:, -1].sum() + log_ratio.sum()
    params = list(sde.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return y_end.detach(), torch.cat([g.flatten() for g in flat])


@functools.cache
def _solved(solve, *args):
    return solve(*args)


def cached(solve, *args):
    """``solve(*args)``, computed once per process: the references (``method=None``: terms
    from the loop) that several tests and methods compare with. Deterministic (seeded weights,
    a Brownian path of fixed entropy); each caller gets copies, so that a test writing into
    its reference cannot change another's (sharing them loses no check)."""
    return tuple(t.clone() for t in _solved(solve, *args))


def latent_solve(
    mode: str, method: str | None, solver: str, adjoint: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_and_gradients`` of ``latent_sde(mode, method)`` solved by ``solver``."""
    return loss_and_gradients(*latent_sde(mode, method), solver, adjoint=adjoint)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-12) -> None:
    scale = expected.abs().max().clamp_min(1e-300)
    assert ((actual - expected).abs().max() / scale).item() <= tol


def assert_solved_alike(got: tuple, expected: tuple, tol: float = 1e-12) -> None:
    """Two ``loss_and_gradients`` results: the solves' values and the parameter gradients
    each within ``tol`` of the reference's largest element."""
    assert_rel(got[0].double(), expected[0], tol)
    assert_rel(got[1].double(), expected[1], tol)


SOLVES = [
    ("stratonovich", "midpoint"),
    ("logp", "euler"),
    ("logp", "milstein"),
    ("regulariser", "srk"),
]
# every engine runs always on the Stratonovich correction (a Jacobian diagonal) and on the
# log-density by Euler (a divergence of the drift and of a diagonal); Milstein (the same drift,
# its diffusion differentiated by autograd) and SRK (the regulariser's squared divergence at
# every stage, the costliest solve) run "auto" always, the other engines in the daily sample
DRIFT_CASES = [
    pytest.param(
        mode,
        solver,
        method,
        marks=() if "stratonovich" in mode or "euler" in solver or method == "auto" else SLOW,
    )
    for mode, solver in SOLVES
    for method in EXACT
]


@pytest.mark.parametrize(("mode", "solver", "method"), DRIFT_CASES)
def test_sdeint_with_torchdiv_in_the_drift(mode, solver, method):
    expected = cached(latent_solve, mode, None, solver)
    got = latent_solve(mode, method, solver)
    assert_solved_alike(got, expected)


@pytest.mark.parametrize("method", ["auto", "structured"])
@pytest.mark.parametrize(("mode", "solver"), [("stratonovich", "midpoint"), ("logp", "euler")])
def test_sdeint_adjoint_with_torchdiv_in_the_drift(mode, solver, method):
    """The adjoint's backward calls ``f`` again (its vector-Jacobian products with
    ``create_graph``): the same gradients as the adjoint with the reference terms."""
    expected = cached(latent_solve, mode, None, solver, True)
    got = latent_solve(mode, method, solver, True)
    assert_solved_alike(got, expected)


def test_logqp_with_the_stratonovich_correction():
    reference = loss_and_gradients(*latent_sde("stratonovich", None), "euler_heun", logqp=True)
    got = loss_and_gradients(*latent_sde("stratonovich", "auto"), "euler_heun", logqp=True)
    assert_solved_alike(got, reference)


def test_gradient_against_central_differences_on_the_same_path():
    sde, y0 = latent_sde("logp", "auto")
    _, grads = loss_and_gradients(sde, y0, "euler")
    gen = torch.Generator().manual_seed(5)
    directions = [torch.randn(p.shape, generator=gen, dtype=f64) for p in sde.parameters()]

    def loss_at(h: float) -> float:
        with torch.no_grad():
            for p, d in zip(sde.parameters(), directions, strict=True):
                p.add_(h * d)
            y_end, _ = solve(sde, y0, "euler")
            for p, d in zip(sde.parameters(), directions, strict=True):
                p.sub_(h * d)
        return ((y_end**2).sum() + y_end[:, -1].sum()).item()

    h = 1e-5  # truncation error ~h^2, round-off ~eps/h: both near 1e-10 here
    central = (loss_at(h) - loss_at(-h)) / (2 * h)
    directional = (grads @ torch.cat([d.flatten() for d in directions])).item()
    assert directional == pytest.approx(central, rel=1e-8)


@pytest.mark.parametrize("method", ["auto", "structured", "forward"])
def test_samples_stay_apart_along_the_solve(method):
    ends = []
    for bump in (0.0, 0.7):
        sde, y0 = latent_sde("logp", method)
        with torch.no_grad():
            y0[1] += bump
            sde.context[1] -= bump
        ends.append(solve(sde, y0, "euler")[0].detach())
    assert torch.equal(ends[0][[0, 2]], ends[1][[0, 2]])
    assert not torch.equal(ends[0][1], ends[1][1])


class Centred(LatentSDE):
    """A drift of the batch-centred state: mixes samples."""

    def drift(self, t, z):
        return super().drift(t, z - z.mean(0, keepdim=True))


@pytest.mark.parametrize("method", ["auto", "structured", "hutchinson"])
def test_a_drift_mixing_samples_is_refused_inside_sdeint(method):
    sde, y0 = latent_sde("logp", method)
    mixing = Centred("logp", method, sde.context).to(f64)
    if method == "hutchinson":
        mixing.divergence = lambda fn, z: torchdiv.divergence(fn, z, method=method, num_probes=2)
    with pytest.raises(torchdiv.BatchInteractionError, match="mean over samples"):
        torchsde.sdeint(mixing, y0, TS, method="euler", dt=STEP)


@pytest.mark.parametrize("adaptive", [False, True])
def test_divergence_of_the_flow_map(adaptive):
    """torchdiv around ``sdeint``: the divergence of ``y0 -> Y_T`` on one Brownian path
    against a loop of backward passes through the same batched solve (torchsde picks adaptive
    steps from the whole batch under ``no_grad``: no derivative crosses samples)."""
    sde, y0 = latent_sde("stratonovich", "auto")

    def flow_map(y):
        bm = torchsde.BrownianInterval(t0=0.0, t1=0.5, size=y0.shape, dtype=f64, entropy=7)
        kwargs = {"rtol": 1e-3, "atol": 1e-3} if adaptive else {}
        return torchsde.sdeint(
            sde, y, TS[[0, -1]], bm=bm, method="midpoint", dt=0.1, adaptive=adaptive, **kwargs
        )[-1]

    y = y0.clone().requires_grad_(True)
    out = flow_map(y)
    reference = sum(
        torch.autograd.grad(out[:, i].sum(), y, retain_graph=True)[0][:, i] for i in range(D)
    )
    for method in ("auto", "reverse", "forward"):
        assert_rel(torchdiv.divergence(flow_map, y0, method=method), reference)


B_T, B_0 = 20.0, 0.1


class Score(nn.Module):
    """A small time-conditioned score net divided by the VP marginal std."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(4 * torch.randn(4), requires_grad=False)
        self.net = nn.Sequential(nn.Linear(D + 8, 16), nn.SiLU(), nn.Linear(16, D))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t * self.W
        emb = torch.cat([torch.sin(angles), torch.cos(angles)]).expand(x.shape[0], 8)
        std = torch.sqrt(1 - torch.exp(-0.5 * t**2 * (B_T - B_0) - t * B_0))
        return self.net(torch.cat([x, emb], 1)) / std


class ProbabilityFlow(nn.Module):
    """The VP SDE's probability-flow ODE as a torchsde SDE of zero diffusion, over the state
    ``[x, int div v dt]``."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, score: Score, method: str):
        super().__init__()
        self.score, self.method = score, method

    def v(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        beta = B_0 + t * (B_T - B_0)
        return -0.5 * beta * (x + self.score(x, t))

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = y[:, :-1]
        div = torchdiv.divergence(lambda u: self.v(t, u), x, method=self.method)
        return torch.cat([self.v(t, x), div[:, None]], 1)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_probability_flow_likelihood_by_torchsde_and_by_flows(method):
    """Euler from ``t = 1e-3`` to 1 by torchsde equals ``flows.log_likelihood``'s Euler solve
    (the drift's divergence itself is checked against loops above and in test_score_sde.py)."""
    torch.manual_seed(0)
    score = Score().to(f64)
    x = 0.5 * torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=f64)
    normal = lambda z: -0.5 * (z**2).sum(-1) - D / 2 * math.log(2 * math.pi)  # noqa: E731
    eps, step = 1e-3, (1 - 1e-3) / 20
    pf = ProbabilityFlow(score, method)
    y0 = torch.cat([x, torch.zeros(B, 1, dtype=f64)], 1)
    ends = torchsde.sdeint(pf, y0, torch.tensor([eps, 1.0], dtype=f64), method="euler", dt=step)
    by_sde = normal(ends[-1, :, :-1]) + ends[-1, :, -1]
    by_flows = flows.log_likelihood(
        pf.v, x, 1.0, eps, normal, method=method, solver="euler", options={"step_size": step}
    )
    params = [p for p in score.parameters() if p.requires_grad]
    g_sde = torch.autograd.grad(by_sde.square().sum(), params)
    g_flows = torch.autograd.grad(by_flows.square().sum(), params)
    assert_rel(by_flows, by_sde)
    for a, b in zip(g_flows, g_sde, strict=True):
        assert_rel(a, b)


@pytest.mark.parametrize(
    ("mode", "solver"),
    [
        pytest.param(*solve, marks=SLOW) if solve[1] in ("milstein", "srk") else solve
        for solve in SOLVES
    ],
)
def test_float32_solve_against_float64(mode, solver):
    """The same weights rounded to float32 (the Brownian increments of these few elements
    are drawn alike in both dtypes): within 16 float32 eps of the float64 loop's solve (the
    Jacobian diagonal and the log-density always, Milstein and SRK in the daily sample)."""
    expected = cached(latent_solve, mode, None, solver)
    sde, y0 = latent_sde(mode, "auto")
    sde.float()
    sde.context = sde.context.float()
    got = loss_and_gradients(sde, y0.float(), solver)
    assert_solved_alike(got, expected, tol=16 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("method", ["auto", "structured"])
def test_second_solve_equals_the_first_and_nothing_is_mutated(method):
    sde, y0 = latent_sde("logp", method)
    before = (y0.clone(), sde.context.clone())
    for p in sde.parameters():
        p.grad = torch.ones_like(p)
    first = solve(sde, y0, "euler")[0]
    second = solve(sde, y0, "euler")[0]
    assert torch.equal(first, second)
    assert torch.equal(y0, before[0]) and torch.equal(sde.context, before[1]) and sde.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in sde.parameters())


class GeneralNoise(nn.Module):
    """General noise ``g(t, y) -> (B, D + 1, noise)`` over the state ``[z, logp]`` (scalar
    noise for ``noise=1``), with
    ``d logp = -(div f - 0.5 sum_ij d_i d_j (g g^T)_ij) dt``: the second term is the
    divergence of ``z -> sum_j d_j (g g^T)_ij``, a trace of ``torchdiv.jacobian``; with
    ``method=None`` both come from a loop of backward passes, one sample at a time."""

    sde_type = "ito"

    def __init__(self, method: str | None, noise: int):
        super().__init__()
        self.method, self.noise = method, noise
        self.noise_type = "scalar" if noise == 1 else "general"
        self.f_net = nn.Sequential(nn.Linear(D + 1, 8), nn.Tanh(), nn.Linear(8, D))
        self.g_net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D * noise))

    def drift(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.f_net(torch.cat([z, torch.ones_like(z[:, :1]) * t], 1))

    def covariance(self, z: torch.Tensor) -> torch.Tensor:
        g = self.g_net(z).view(-1, D, self.noise)
        return g @ g.transpose(1, 2)

    def looped(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.enable_grad():
            for b in range(z.shape[0]):
                zb = z[b : b + 1] if z.requires_grad else z[b : b + 1].detach().requires_grad_()
                fb, ab = self.drift(t, zb)[0], self.covariance(zb)[0]
                d = lambda y, i, zb=zb: torch.autograd.grad(y, zb, create_graph=True)[0][0, i]  # noqa: E731
                div = sum(d(fb[i], i) for i in range(D))
                second = sum(d(d(ab[i, j], j), i) for i in range(D) for j in range(D))
                out.append(div - 0.5 * second)
        return torch.stack(out)

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = y[:, :D]
        if self.method is None:
            terms = self.looped(t, z)
        else:
            m = self.method
            div = torchdiv.divergence(lambda u: self.drift(t, u), z, method=m)
            rows = lambda u: torch.einsum(  # noqa: E731
                "bijj->bi", torchdiv.jacobian(self.covariance, u, method=m)
            )
            terms = div - 0.5 * torchdiv.divergence(rows, z, method=m)
        return torch.cat([self.drift(t, z), -terms[:, None]], 1)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self.g_net(y[:, :D]).view(-1, D, self.noise)
        return torch.cat([g, torch.zeros_like(g[:, :1])], 1)


def general_noise_solve(method: str | None, noise: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The final states of ``GeneralNoise``'s Euler solve and the parameter gradients of
    ``sum y_T^2 + sum y_T[:, -1]``."""
    torch.manual_seed(0)
    sde = GeneralNoise(method, noise).to(f64)
    z0 = torch.randn(B, D, generator=torch.Generator().manual_seed(1), dtype=f64)
    y0 = torch.cat([z0, torch.zeros(B, 1, dtype=f64)], 1)
    bm = torchsde.BrownianInterval(t0=0.0, t1=0.5, size=(B, noise), dtype=f64, entropy=7)
    y_end = torchsde.sdeint(sde, y0, TS, bm=bm, method="euler", dt=STEP)[-1]
    grads = torch.autograd.grad((y_end**2).sum() + y_end[:, -1].sum(), sde.parameters())
    return y_end.detach(), torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
@pytest.mark.parametrize("noise", [1, 3])
def test_general_noise_fokker_planck_term(method, noise):
    expected = cached(general_noise_solve, None, noise)
    got = general_noise_solve(method, noise)
    assert_solved_alike(got, expected)


class DiffusionOfADiagonal(LatentSDE):
    """Ito, diagonal noise ``g(y) = 0.1 + sigmoid(diag du/dy)``: torchdiv inside ``g``, which
    Milstein differentiates again (``g dg/dy`` by autograd), and the adjoint a third time."""

    def __init__(self, method: str | None, context: torch.Tensor):
        super().__init__("ito", method, context)
        self.u = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D))

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.drift(t, y)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.1 + torch.sigmoid(self.diagonal(self.u, y))


def milstein_solve(method: str | None, adjoint: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``loss_and_gradients`` of ``DiffusionOfADiagonal`` solved by Milstein."""
    plain, y0 = latent_sde("stratonovich", None)
    torch.manual_seed(0)
    sde = DiffusionOfADiagonal(method, plain.context).to(f64)
    return loss_and_gradients(sde, y0, "milstein", adjoint=adjoint)


# the adjoint (a third differentiation) by "auto" always, by the other engines in the sample
@pytest.mark.parametrize(
    ("adjoint", "method"),
    [(False, m) for m in ("auto", "forward", "structured")]
    + [(True, "auto")]
    + [pytest.param(True, m, marks=SLOW) for m in ("forward", "structured")],
)
def test_milstein_through_torchdiv_in_the_diffusion(method, adjoint):
    expected = cached(milstein_solve, None, adjoint)
    got = milstein_solve(method, adjoint)
    assert_solved_alike(got, expected)


class FixedProbes(LatentSDE):
    """The log-density drift with a Hutchinson divergence, its probes fixed for the solve."""

    probes: torch.Tensor

    def divergence(self, fn, z: torch.Tensor) -> torch.Tensor:
        return torchdiv.divergence(fn, z, method="hutchinson", probes=self.probes)


@pytest.mark.slow
def test_hutchinson_log_density_is_unbiased_over_all_sign_patterns():
    """``logp`` is linear in the estimates, and so is ``sum |z_T|^2 + sum logp_T``: their
    means over every Rademacher probe (one per sample; ``v`` and ``-v`` give the same
    estimate), values and parameter gradients, are the exact solve's."""

    def solved(sde: LatentSDE) -> tuple[torch.Tensor, torch.Tensor]:
        y_end, _ = solve(sde, y0, "euler")
        loss = (y_end[:, :D] ** 2).sum() + y_end[:, -1].sum()
        grads = torch.autograd.grad(loss, list(sde.parameters()), materialize_grads=True)
        return y_end.detach(), torch.cat([g.flatten() for g in grads])

    sde, y0 = latent_sde("logp", "auto")
    exact = solved(sde)
    signs = [torch.tensor([1.0, s], dtype=f64) for s in (1.0, -1.0)]
    ends, grads = [], []
    for pattern in range(2**B):
        estimated = FixedProbes("logp", "auto", sde.context).to(f64)
        estimated.load_state_dict(sde.state_dict())
        estimated.probes = torch.stack([signs[(pattern >> b) & 1] for b in range(B)])[None]
        end, grad = solved(estimated)
        ends.append(end)
        grads.append(grad)
    assert not torch.equal(ends[0], ends[-1])
    assert_rel(torch.stack(ends).mean(0), exact[0])
    assert_rel(torch.stack(grads).mean(0), exact[1])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["auto", "structured"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_training_steps_through_the_solve(method, adjoint):
    """Three Adam steps through ``sdeint``/``sdeint_adjoint``: parameters changed in place
    between solves of the same structure (kept plans) end where the loop's training ends."""

    def train(m: str | None) -> torch.Tensor:
        sde, y0 = latent_sde("logp", m)
        optimiser = torch.optim.Adam(sde.parameters(), lr=0.05)
        for _ in range(3):
            y_end, _ = solve(sde, y0, "euler", adjoint=adjoint)
            optimiser.zero_grad()
            ((y_end**2).sum() + y_end[:, -1].sum()).backward()
            optimiser.step()
        return torch.cat([p.detach().flatten() for p in sde.parameters()])

    torch.testing.assert_close(train(m=method), train(m=None), rtol=0, atol=1e-14)


def adjoint_flow_map_gaps(step: float) -> tuple[float, float]:
    """Relative gaps between the divergences of ``y0 -> Y_T`` by ``sdeint_adjoint`` (method
    ``"auto"``) and by backpropagation through ``sdeint``, values and the parameter gradients
    of their squares, on one Brownian path."""
    sde, y0 = latent_sde("stratonovich", "auto")
    params = list(sde.parameters())

    def divergence(adjoint: bool) -> tuple[torch.Tensor, torch.Tensor]:
        def flow_map(y):
            bm = torchsde.BrownianInterval(t0=0.0, t1=0.5, size=y0.shape, dtype=f64, entropy=7)
            if adjoint:
                ys = torchsde.sdeint_adjoint(
                    sde, y, TS[[0, -1]], bm=bm, method="midpoint", dt=step,
                    adjoint_params=tuple(params),
                )  # fmt: skip
            else:
                ys = torchsde.sdeint(sde, y, TS[[0, -1]], bm=bm, method="midpoint", dt=step)
            return ys[-1]

        div = torchdiv.divergence(flow_map, y0, method="auto" if adjoint else "reverse")
        grads = torch.autograd.grad(div.square().sum(), params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        ]
        return div.detach(), torch.cat([g.flatten() for g in grads])

    (value, grads), (expected, expected_grads) = divergence(True), divergence(False)
    scale = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    return scale(value, expected), scale(grads, expected_grads)


@pytest.mark.slow
def test_sdeint_adjoint_inside_f_converges_to_backpropagation():
    """``sdeint_adjoint`` inside ``f``: its backward is an adjoint solve, itself differentiable
    (torchsde nests its Function), so the divergence's parameter gradients exist; they differ
    from backpropagation's by the adjoint's discretisation, first order in the step."""
    coarse, fine = adjoint_flow_map_gaps(0.1), adjoint_flow_map_gaps(0.025)
    assert 0 < fine[0] < coarse[0] / 3 and coarse[0] < 1e-4
    assert 0 < fine[1] < coarse[1] / 3 and coarse[1] < 3e-3


@pytest.mark.parametrize("method", ["reverse", "forward"])
def test_sdeint_adjoint_inside_f_under_torch_func_is_refused_with_the_way_out(method):
    sde, y0 = latent_sde("stratonovich", "auto")

    def flow_map(y):
        bm = torchsde.BrownianInterval(t0=0.0, t1=0.5, size=y0.shape, dtype=f64, entropy=7)
        return torchsde.sdeint_adjoint(sde, y, TS[[0, -1]], bm=bm, method="midpoint", dt=0.1)[-1]

    with pytest.raises(RuntimeError, match=r"(?s)setup_context.*method='auto'"):
        torchdiv.divergence(flow_map, y0, method=method)


class EncodedContext(nn.Module):
    """torchsde's latent_sde_lorenz layout: an encoder's context ``(T, B, C)`` handed over by
    ``contextualize((ts, ctx))``, the drift reading ``ctx[i]`` at
    ``i = min(searchsorted(ts, t, right=True), T - 1)``: what ``f`` reads changes with ``t``
    between calls of the same structure. State ``[z, logp]``, ``d logp = -div f dt``."""

    sde_type, noise_type = "ito", "diagonal"

    def __init__(self, method: str | None):
        super().__init__()
        self.method = method
        self.f_net = nn.Sequential(nn.Linear(D + 2, 8), nn.Softplus(), nn.Linear(8, D))
        self.rows = [slice(None)]

    def contextualize(self, ctx: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._ctx = ctx

    def drift(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ts, ctx = self._ctx
        i = min(torch.searchsorted(ts, t, right=True), len(ts) - 1)
        return self.f_net(torch.cat((y, ctx[i][self.rows[0]]), dim=1))

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z, drift = y[:, :D], lambda u: self.drift(t, u)
        if self.method is None:
            div = loop_terms(drift, z, self.rows).sum(1)
        else:
            div = torchdiv.divergence(drift, z, method=self.method)
        return torch.cat([drift(z), -div[:, None]], 1)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.3 * torch.ones_like(y[:, :D]), torch.zeros_like(y[:, D:])], 1)


@pytest.mark.parametrize("method", ["auto", "structured"])
@pytest.mark.parametrize("adjoint", [False, True])
def test_context_picked_by_time_along_the_solve(method, adjoint):
    ts = torch.linspace(0, 0.5, 6, dtype=f64)
    ctx = torch.randn(6, B, 2, dtype=f64, generator=torch.Generator().manual_seed(4))
    z0 = torch.randn(B, D, dtype=f64, generator=torch.Generator().manual_seed(1))
    y0 = torch.cat([z0, torch.zeros(B, 1, dtype=f64)], 1)

    def run(m):
        torch.manual_seed(0)
        sde = EncodedContext(m).to(f64)
        sde.contextualize((ts, ctx))
        bm = torchsde.BrownianInterval(t0=0.0, t1=0.5, size=y0.shape, dtype=f64, entropy=7)
        kwargs = {"adjoint_params": tuple(sde.parameters())} if adjoint else {}
        sdeint = torchsde.sdeint_adjoint if adjoint else torchsde.sdeint
        ys = sdeint(sde, y0, ts, bm=bm, method="euler", dt=0.02, **kwargs)
        grads = torch.autograd.grad((ys**2).sum(), list(sde.parameters()))
        return ys.detach(), torch.cat([g.flatten() for g in grads])

    reference, got = run(None), run(method)
    assert_solved_alike(got, reference)
