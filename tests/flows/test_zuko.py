"""zuko's continuous normalizing flow (``zuko.flows.CNF``: an ELU MLP on ``(x, cos/sin(t))``
and a context, its exact FFJORD log-determinant): torchdiv's divergence of that very vector
field, and ``torchdiv.flows.log_likelihood`` of the flow, against zuko's own ``log_prob``."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import torchdiv

zuko = pytest.importorskip("zuko")
f64 = torch.float64


def _flow() -> torch.nn.Module:
    torch.manual_seed(0)
    return zuko.flows.CNF(features=3, context=2, hidden_features=(16, 16)).to(f64)


@pytest.mark.parametrize("batch", [5, 512])  # tiny problems and those "auto" plans
def test_the_divergence_of_zukos_vector_field_and_its_gradients(batch: int) -> None:
    flow = _flow()
    x, c = torch.randn(batch, 3, dtype=f64), torch.randn(batch, 2, dtype=f64)
    t = torch.tensor(0.3, dtype=f64)
    field = lambda z: flow.transform.f(t, z, c)  # noqa: E731

    def one(z: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        return flow.transform.f(t, z[None], cb[None])[0]

    want = torch.func.vmap(torch.func.jacrev(one))(x, c).diagonal(0, -2, -1).sum(-1)
    got = torchdiv.divergence(field, x)
    assert_close(got, want, rtol=1e-10, atol=1e-10)
    params = list(flow.parameters())
    # the last layer's bias has no part in the divergence: its gradient is zero
    grads = torch.autograd.grad(got.square().mean(), params, materialize_grads=True)
    expected = torch.autograd.grad(want.square().mean(), params, materialize_grads=True)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e, rtol=1e-10, atol=1e-10)


# slow (sampled): two adaptive solves at 1e-8 and backpropagation through the steps of one.
# Every run keeps log_likelihood of zuko's field against zuko's log_prob (the Hutchinson test
# below: the same direction, base and sign), its parameter gradients (the adjoint test) and
# the divergence of zuko's exact field with its gradients (above)
@pytest.mark.slow
def test_log_likelihood_equals_zukos_log_prob_and_its_gradients() -> None:
    """zuko integrates data (t = 0) to its base (t = 1): base at ``t0 = 1``, data at ``t1 = 0``.
    Both adaptive solvers at 1e-8 agree to about 1e-5, and the gradients (zuko's by its own
    adjoint solve, torchdiv's through the solver's steps) to about 5e-4; a divergence with the
    wrong sign, or column sums instead of the trace, is off by O(1)."""
    flow = _flow()
    flow.transform.atol = flow.transform.rtol = 1e-8
    x, c = torch.randn(5, 3, dtype=f64), torch.randn(5, 2, dtype=f64)
    dist = flow(c)
    want = dist.log_prob(x)
    got = torchdiv.flows.log_likelihood(
        lambda t, z: flow.transform.f(t, z, c),
        x,
        1.0,
        0.0,
        dist.base.log_prob,
        rtol=1e-8,
        atol=1e-8,
    )
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    params = list(flow.parameters())
    for g, e in zip(
        torch.autograd.grad(got.mean(), params),
        torch.autograd.grad(want.mean(), params),
        strict=True,
    ):
        assert_close(g, e, rtol=1e-2, atol=2e-3)


def test_adjoint_takes_zukos_velocity_as_it_hands_it_on() -> None:
    """zuko's velocity is a bound method (``flow.transform.f``), and its transform holds it as
    ``partial(self.f, c=c)``: ``adjoint=True`` refused both ("f must be an nn.Module"), and
    ``AugmentedDynamics`` did not register their module, so ``odeint_adjoint`` gave its
    parameters no gradient, silently. A tanh field (zuko's default ELU has a kink in its
    second derivative, which the parameter gradient of the divergence sees) and rk4: the
    adjoint's backward solve differs from backpropagation through the same steps by the
    discretisation error (measured 2e-7 with 10 steps)."""
    from torchdiffeq import odeint_adjoint

    torch.manual_seed(0)
    flow = zuko.flows.CNF(2, 1, hidden_features=(8,), activation=torch.nn.Tanh).to(f64)
    x = torch.randn(4, 2, dtype=f64, requires_grad=True)
    c = torch.randn(4, 1, dtype=f64)
    dist = flow(c)
    velocity = dist.transform.f  # functools.partial(flow.transform.f, c=c)
    params = list(flow.parameters())
    solve = {"solver": "rk4", "options": {"step_size": 0.1}}
    direct = torchdiv.flows.log_likelihood(velocity, x, 1.0, 0.0, dist.base.log_prob, **solve)
    want = torch.autograd.grad(direct.sum(), params)
    adjoint = torchdiv.flows.log_likelihood(
        velocity, x, 1.0, 0.0, dist.base.log_prob, adjoint=True, **solve
    )
    assert_close(adjoint, direct)
    for g, e in zip(torch.autograd.grad(adjoint.sum(), params), want, strict=True):
        assert_close(g, e, rtol=1e-5, atol=1e-5)

    unconditional = zuko.flows.CNF(2, hidden_features=(8,), activation=torch.nn.Tanh).to(f64)
    dynamics = torchdiv.flows.AugmentedDynamics(unconditional.transform.f, x)
    times = torch.tensor([1.0, 0.0], dtype=f64)
    _, delta = odeint_adjoint(dynamics, dynamics.initial_state(x), times, method="rk4",
                              options={"step_size": 0.1})  # fmt: skip
    weight = unconditional.transform.ode[0].weight
    (grad,) = torch.autograd.grad(delta[-1].sum(), weight, allow_unused=True)
    assert grad is not None and grad.abs().max() > 0


def test_hutchinson_with_zukos_noise_equals_zukos_stochastic_log_prob() -> None:
    """zuko's ``exact=False`` draws one Gaussian ``eps = randn_like(x)`` per solve: the same
    ``eps`` as ``probes=`` gives zuko's estimate, to the two adaptive solves' difference
    (tolerance 1e-6 each: measured 5e-5, and 1e-6 at 1e-9, on log-densities of about 7)."""
    torch.manual_seed(0)
    flow = zuko.flows.CNF(3, 2, hidden_features=(16,), exact=False).to(f64)
    flow.transform.atol = flow.transform.rtol = 1e-6
    x, c = torch.randn(5, 3, dtype=f64), torch.randn(5, 2, dtype=f64)
    dist = flow(c)
    torch.manual_seed(1)
    want = dist.log_prob(x)
    torch.manual_seed(1)
    eps = torch.randn_like(x)  # zuko's draw, reproduced
    got = torchdiv.flows.log_likelihood(
        dist.transform.f, x, 1.0, 0.0, dist.base.log_prob, method="hutchinson",
        probes=eps[None], rtol=1e-6, atol=1e-6,
    )  # fmt: skip
    assert_close(got, want, rtol=1e-4, atol=1e-4)
    exact = torchdiv.flows.log_likelihood(
        dist.transform.f, x, 1.0, 0.0, dist.base.log_prob, rtol=1e-6, atol=1e-6
    )
    assert (got - exact).abs().max() > 1e-2  # the comparison sees the probes
