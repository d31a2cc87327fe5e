"""flows28: continuous normalizing flows end to end, the faults found.

References: float64, the same ODE (same solver, steps and tolerances) integrated with the
divergence from a per-sample loop of ``torch.autograd.grad`` (each sample's own rows), and the
closed form where one exists.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchdiffeq import odeint

import torchdiv
from torchdiv.flows import AugmentedDynamics, log_likelihood

f64 = torch.float64
RK4 = {"method": "rk4", "options": {"step_size": 0.25}}


def normal(z: torch.Tensor) -> torch.Tensor:
    flat = z.flatten(1)
    return -0.5 * flat.square().sum(-1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


class Sinusoidal(nn.Module):
    """A time-dependent field: a sinusoidal embedding of ``t`` added to the hidden layer."""

    def __init__(self, d: int = 3, hidden: int = 16, k: int = 4):
        super().__init__()
        self.k = k
        self.emb, self.a = nn.Linear(2 * k, hidden), nn.Linear(d, hidden)
        self.b = nn.Linear(hidden, d)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(self.k, dtype=z.dtype))
        tt = (torch.zeros(z.shape[0], dtype=z.dtype) + t)[:, None] * freqs
        e = torch.cat([tt.sin(), tt.cos()], 1)
        return self.b(nn.functional.silu(self.a(z) + self.emb(e)))


def field() -> nn.Module:
    torch.manual_seed(0)
    return Sinusoidal().to(f64)


class HutchinsonLoop(nn.Module):
    """``(f, -mean_j e_j^T J e_j)`` per sample by ``autograd.grad`` of ``(f * e_j).sum()``
    (samples independent: the gradient's rows are each sample's own ``J^T e_j``)."""

    def __init__(self, f: nn.Module, probes: torch.Tensor):
        super().__init__()
        self.f, self.probes = f, probes

    def forward(self, t: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]):
        z = state[0].detach().requires_grad_(True)
        with torch.enable_grad():
            v = self.f(t, z)
            terms = [
                (torch.autograd.grad((v * e).sum(), z, retain_graph=True)[0] * e).flatten(1).sum(1)
                for e in self.probes
            ]
        return v.detach(), -torch.stack(terms).mean(0)


def test_a_delta_state_of_another_shape_is_refused_where_it_would_mix_terms() -> None:
    """torchdiffeq flattens a tuple state and cuts ``f``'s outputs by the state's shapes: a
    ``Delta`` of FFJORD's ``(B, m)`` where the dynamics give ``(m, B)`` took the terms of other
    samples (each sample's estimate a mean of others' terms, silently)."""
    f, x = field(), torch.randn(4, 3, dtype=f64)
    g = torch.Generator().manual_seed(1)
    probes = torchdiv.draw_probes(x, 3, method="hutchinson", generator=g)
    dynamics = AugmentedDynamics(f, x, method="hutchinson", probes=probes)
    times = torch.tensor([1.0, 0.0], dtype=f64)
    _, delta = odeint(dynamics, dynamics.initial_state(x), times, **RK4)
    _, want = odeint(HutchinsonLoop(f, probes), (x, x.new_zeros(4)), times, **RK4)
    torch.testing.assert_close(delta[-1].mean(0), want[-1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"initial_state.*\(3, 4\).*\(4, 3\)"):
        odeint(dynamics, (x, x.new_zeros(4, 3)), times, **RK4)
    with pytest.raises(ValueError, match=r"initial_state.*\(3, 4\).*\(12,\)"):
        odeint(dynamics, (x, x.new_zeros(12)), times, **RK4)


@pytest.mark.parametrize("shape", [(1, 4), (4,), (4, 1)])
def test_one_term_in_the_shapes_users_give_it_is_each_sample_s(shape: tuple[int, ...]) -> None:
    """One term per sample (exact methods): ``(B,)`` and FFJORD's ``(B, 1)`` are each sample's
    own integral, returned in the state's shape."""
    f, x = field(), torch.randn(4, 3, dtype=f64)
    dynamics = AugmentedDynamics(f, x, method="reverse")
    times = torch.tensor([1.0, 0.0], dtype=f64)
    _, want = odeint(dynamics, dynamics.initial_state(x), times, **RK4)
    _, delta = odeint(dynamics, (x, x.new_zeros(shape)), times, **RK4)
    assert delta.shape[1:] == shape
    torch.testing.assert_close(delta[-1].reshape(-1), want[-1].reshape(-1), rtol=0, atol=0)
    v, d = dynamics(times[0], (x, x.new_zeros(shape)))
    assert v.shape == x.shape and d.shape == shape


def test_a_state_that_is_not_the_pair_or_not_the_probes_shape_is_named() -> None:
    """A bare ``z`` was taken for the pair (``z[0]`` the state: "z has shape (3,)"); a state of
    another batch than the probes' ``x`` failed in a reshape ("shape '[2, 4, 3]' is invalid")."""
    f, x = field(), torch.randn(4, 3, dtype=f64)
    t = torch.tensor(0.5, dtype=f64)
    with pytest.raises(TypeError, match=r"\(z, Delta\).*initial_state.*Tensor"):
        AugmentedDynamics(f, x)(t, x)
    dynamics = AugmentedDynamics(f, x[:1], method="hutchinson", num_probes=2)
    with pytest.raises(ValueError, match=r"probes were drawn for x of shape \(1, 3\).*\(4, 3\)"):
        dynamics(t, (x, x.new_zeros(2, 4)))


class Autonomous(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("method", ["reverse", "hutchinson"])
def test_a_learned_end_time_at_the_base_time_keeps_its_gradient(adjoint: bool, method: str) -> None:
    """``t1 == t0`` skips the solve (``log p = base_log_prob(x)``), but a learned end time
    there still has a derivative: ``d/dt1 log p(x) = -grad base(x) . f(t1, x) - div f(t1, x)``
    (one Euler step's, exact at zero length). It was missing (``None``, or no graph at all),
    silently, where the loss had other parameters. Linear field ``f = A z``: ``div = tr A``;
    also against central differences of solves at ``t1 = t0 +- h`` (float64: h = 1e-4 gives
    an O(h^2) = 1e-8 error, the solver's 1e-10 tolerance far below it)."""
    torch.manual_seed(0)
    lin = Autonomous(nn.Linear(3, 3, bias=False).to(f64))
    x = torch.randn(4, 3, dtype=f64)
    t0 = torch.tensor(0.5, dtype=f64)
    t1 = t0.clone().requires_grad_(True)
    options = {"num_probes": 2000} if method == "hutchinson" else {}
    logp = log_likelihood(lin, x, t0, t1, normal, method=method, adjoint=adjoint, **options)
    torch.testing.assert_close(logp, normal(x), rtol=0, atol=0)
    (got,) = torch.autograd.grad(logp.sum(), t1)
    A = lin.net.weight.detach()
    want = ((x * (x @ A.T)).sum(1) - A.trace()).sum()  # -grad base . A x with grad base = -x
    h, tol = 1e-4, {"rtol": 1e-10, "atol": 1e-10}
    ahead = log_likelihood(lin, x, t0, t0 + h, normal, **tol).sum()
    behind = log_likelihood(lin, x, t0, t0 - h, normal, **tol).sum()
    torch.testing.assert_close((ahead - behind).detach() / (2 * h), want, rtol=1e-7, atol=1e-7)
    if method == "reverse":
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:  # 2000 Rademacher probes of a 3x3 trace: standard error below 0.05 for this A
        torch.testing.assert_close(got, want, rtol=0, atol=0.25)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_scipy_solver_values_and_no_silent_gradients() -> None:
    """``solver="scipy_solver"`` (torchdiffeq's wrapper of SciPy) solves on NumPy copies: the
    value is right, but the result had no graph to ``x`` or ``f``'s parameters, and a loss
    with a learnable base density trained the base alone, silently. Now the value stands and
    a backward pass through the solve raises."""
    f, x = field(), torch.randn(4, 3, dtype=f64)
    mu = nn.Parameter(torch.zeros(3, dtype=f64))
    scipy = {"solver": "scipy_solver", "options": {"solver": "RK45"}, "rtol": 1e-10, "atol": 1e-10}
    logp = log_likelihood(f, x, 0.0, 1.0, lambda z: normal(z - mu), **scipy)
    want = log_likelihood(f, x, 0.0, 1.0, lambda z: normal(z - mu), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logp, want, rtol=1e-7, atol=1e-7)  # two solvers at 1e-10
    with pytest.raises(RuntimeError, match=r"scipy_solver.*no gradients"):
        (-logp.mean()).backward()
    t1 = torch.tensor(1.0, dtype=f64, requires_grad=True)  # a learned end time, f frozen
    logp = log_likelihood(field().requires_grad_(False), x, 0.0, t1, lambda z: normal(z - mu),
                          **scipy)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"scipy_solver.*no gradients"):
        torch.autograd.grad(logp.sum(), [t1, mu])
    with torch.no_grad():  # evaluation
        again = log_likelihood(f, x, 0.0, 1.0, lambda z: normal(z - mu), **scipy)
    torch.testing.assert_close(again, logp.detach(), rtol=0, atol=0)
    # the adjoint's backward solves evaluate the dynamics with grad: its gradients are right
    params = list(f.parameters())
    logp = log_likelihood(f, x, 0.0, 1.0, normal, adjoint=True, **scipy)
    grads = torch.autograd.grad(logp.sum(), params)
    want = log_likelihood(f, x, 0.0, 1.0, normal, rtol=1e-10, atol=1e-10)
    for g, w in zip(grads, torch.autograd.grad(want.sum(), params), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)  # adjoint's error at 1e-10


class TimeLinear(nn.Module):
    """``f(t, z) = (A0 + t A1) z``, ``A0`` and ``A1`` not commuting: ``Delta`` from ``t1`` back
    to ``t0`` is ``integral tr A = tr(M)``, ``M = (t1 - t0) A0 + (t1^2 - t0^2) / 2 A1``,
    whatever the trajectory; a Hutchinson term ``e^T A(t) e`` integrates to ``e^T M e`` (rk4
    integrates a polynomial of degree 1 in ``t`` exactly)."""

    def __init__(self, d: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.A0 = nn.Parameter(torch.randn(d, d, generator=g, dtype=f64))
        self.A1 = nn.Parameter(torch.randn(d, d, generator=g, dtype=f64))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return z @ (self.A0 + t * self.A1).T

    def M(self, t0: float, t1: float) -> torch.Tensor:
        return ((t1 - t0) * self.A0 + (t1**2 - t0**2) / 2 * self.A1).detach()


@pytest.mark.parametrize("method", ["auto", "forward", "reverse", "structured", "hutchinson"])
def test_a_time_dependent_linear_field_at_several_output_times(method: str) -> None:
    """Output times ``[1, 0.6, -0.2]`` (the span crosses 0 and runs backward): ``Delta`` at each
    is the closed form's trace (exact methods), or each sample's mean of ``e_j^T M e_j`` with
    its own probes (Hutchinson: the probes are the solve's, at every evaluation: redrawn ones
    would not give this), to round-off (float64, 1e-12)."""
    field, x = TimeLinear(), torch.randn(5, 3, dtype=f64)
    times = [1.0, 0.6, -0.2]
    probes = torchdiv.draw_probes(x, 4, method="hutchinson")
    options = {"probes": probes} if method == "hutchinson" else {}
    dynamics = AugmentedDynamics(field, x, method=method, **options)
    grid = {"method": "rk4", "options": {"step_size": 0.2}}  # the output times on its grid
    _, delta = odeint(dynamics, dynamics.initial_state(x), torch.tensor(times, dtype=f64), **grid)
    for i, t in enumerate(times):
        M = field.M(t, times[0])
        if method == "hutchinson":
            want = torch.einsum("jbi,ik,jbk->b", probes, M, probes) / len(probes)
        else:
            want = M.trace().expand(5)
        torch.testing.assert_close(delta[i].mean(0), want, rtol=1e-12, atol=1e-12)


def test_hutchinson_is_unbiased_with_its_exact_variance() -> None:
    """400 copies of one point, one Rademacher probe each (fixed seed): the integrated term is
    ``e^T M e``, of mean ``tr M`` and variance ``sum_{i<j} (M_ij + M_ji)^2`` exactly; the mean
    lies within 4 of its exact standard errors, and the reported standard error of a
    4-probe estimate is the sample one of its terms."""
    field = TimeLinear()
    x = torch.randn(1, 3, dtype=f64).expand(400, 3)
    g = torch.Generator().manual_seed(11)
    est = log_likelihood(field, x, 0.0, 1.0, normal, method="hutchinson", num_probes=1,
                         generator=g, **{"solver": "rk4", "options": RK4["options"]})  # fmt: skip
    exact = log_likelihood(field, x[:1], 0.0, 1.0, normal, solver="rk4", options=RK4["options"])
    M = field.M(0.0, 1.0)
    S = M + M.T
    variance = S.triu(1).square().sum()
    assert (est.mean() - exact).abs() < 4 * (variance / 400).sqrt()
    probes = torchdiv.draw_probes(x[:6], 4, method="hutchinson", generator=g)
    _, stderr = log_likelihood(field, x[:6], 0.0, 1.0, normal, method="hutchinson",
                               probes=probes, return_stderr=True, solver="rk4",
                               options=RK4["options"])  # fmt: skip
    terms = torch.einsum("jbi,ik,jbk->jb", probes, M, probes)
    torch.testing.assert_close(stderr, terms.std(0) / 2, rtol=1e-10, atol=1e-12)


class Conditional(nn.Module):
    """A conditional field: ``cat([z, t, c])`` through a softplus MLP, ``c`` a context."""

    def __init__(self, d: int = 3, c: int = 2, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1 + c, hidden), nn.Softplus(), nn.Linear(hidden, d))

    def forward(self, t: torch.Tensor, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(z.shape[0], 1), c], 1))


@pytest.mark.parametrize(
    "method, num_probes",
    [("auto", None), ("forward", None), ("hutchinson", 2), ("hutch++", 6), ("xtrace", 4)],
)
def test_one_sample_or_its_context_moved_leaves_the_others_alone(method, num_probes) -> None:
    """A fixed-step solve of a conditional flow: moving sample 2's point or its context changes
    its log-density and leaves the others' bitwise (each sample's probes its own)."""
    torch.manual_seed(0)
    field = Conditional().to(f64)
    x, c = torch.randn(5, 3, dtype=f64), torch.randn(5, 2, dtype=f64)

    def run(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(4) if num_probes else None
        return log_likelihood(lambda t, z: field(t, z, c), x, 0.0, 1.0, normal, method=method,
                              num_probes=num_probes, generator=g, solver="rk4",
                              options=RK4["options"]).detach()  # fmt: skip

    base = run(x, c)
    others = [0, 1, 3, 4]
    one = torch.tensor([2])
    x_moved = x.index_add(0, one, torch.ones(1, 3, dtype=f64))
    c_moved = c.index_add(0, one, torch.ones(1, 2, dtype=f64))
    for moved in (run(x_moved, c), run(x, c_moved)):
        assert torch.equal(moved[others], base[others])
        assert (moved[2] - base[2]).abs() > 1e-3


@pytest.mark.parametrize("adjoint", [False, True])
@pytest.mark.parametrize("method, num_probes", [("auto", None), ("hutchinson", 2)])
@pytest.mark.parametrize("training", [True, False])
def test_nothing_the_caller_passed_is_changed(adjoint, method, num_probes, training) -> None:
    """``module.training``, ``requires_grad`` (a frozen layer too), existing ``.grad``, buffers,
    ``x`` and the probes keep their values and versions through the call; the backward pass
    adds to the gradients of what requires grad only (the frozen layer's stays ``None``)."""
    torch.manual_seed(0)
    field = Sinusoidal().to(f64).train(training)
    field.a.weight.requires_grad_(False)
    field.register_buffer("scale", torch.ones(()))
    for p in field.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    x = torch.randn(3, 3, dtype=f64, requires_grad=True)
    probes = torchdiv.draw_probes(x.detach(), 2, method="hutchinson") if num_probes else None
    versions = [x._version] + ([probes._version] if probes is not None else [])
    flags = [(p.requires_grad, p.grad.clone() if p.grad is not None else None)
             for p in field.parameters()]  # fmt: skip
    logp = log_likelihood(field, x, 0.0, 1.0, normal, method=method, probes=probes,
                          adjoint=adjoint, solver="rk4", options=RK4["options"])  # fmt: skip
    assert field.training == training and field.scale.item() == 1.0 and x.grad is None
    assert versions == [x._version] + ([probes._version] if probes is not None else [])
    for p, (flag, grad) in zip(field.parameters(), flags, strict=True):
        assert p.requires_grad == flag
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)
    logp.sum().backward()
    assert field.a.weight.grad is None and x.grad is not None
    assert field.training == training
