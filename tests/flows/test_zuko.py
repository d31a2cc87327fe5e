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
