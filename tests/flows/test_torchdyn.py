"""torchdyn's continuous normalizing flow (``torchdyn.models.CNF`` in a ``NeuralODE``, a
``DepthCat`` time input) with torchdiv's divergence as its trace estimator, in the same training
step, against torchdyn's own ``autograd_trace`` and ``hutch_trace``; skipped where torchdyn (or
what its import needs: lightning, torchsde, torchcde, attrs) is not installed."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchdiv

core = pytest.importorskip("torchdyn.core")
models = pytest.importorskip("torchdyn.models")
dyn_nn = pytest.importorskip("torchdyn.nn")
f64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:Setting tolerances has no effect:UserWarning")


def graph_trace(x_out, x_in, noise=None, **kwargs):
    """torchdyn hands its estimator the graph: ``graph_divergence`` with ``create_graph``."""
    if noise is None:
        return torchdiv.graph_divergence(x_out, x_in, create_graph=True)
    return torchdiv.graph_divergence(
        x_out, x_in, method="hutchinson", probes=noise[None], create_graph=True
    )


class FixedNoise:
    """A noise distribution whose one draw is given: both estimators see the same probes."""

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def sample(self, shape):
        return self.noise


def _step(estimator, sensitivity: str, noise: torch.Tensor | None):
    """``-mean log p`` of 6 points through the NeuralODE (rk4, 10 steps) and its gradients."""
    torch.manual_seed(0)
    net = nn.Sequential(
        dyn_nn.DepthCat(1), nn.Linear(3, 16), nn.Tanh(), dyn_nn.DepthCat(1), nn.Linear(17, 2)
    ).to(f64)
    cnf = models.CNF(net, estimator, None if noise is None else FixedNoise(noise))
    node = core.NeuralODE(cnf, solver="rk4", sensitivity=sensitivity).to(f64)
    x = torch.randn(6, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
    t_span = torch.linspace(0, 1, 11, dtype=f64)
    _, trajectory = node(torch.cat([torch.zeros(6, 1, dtype=f64), x], 1), t_span)
    end = trajectory[-1]
    log_p = -0.5 * end[:, 1:].square().sum(1) - math.log(2 * math.pi) - end[:, 0]
    return log_p.detach(), torch.autograd.grad(-log_p.mean(), list(net.parameters()))


@pytest.mark.parametrize("sensitivity", ["autograd", "adjoint"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_torchdiv_as_torchdyns_trace_estimator(sensitivity, stochastic):
    noise = torch.randn(6, 2, dtype=f64, generator=torch.Generator().manual_seed(2))
    own = models.hutch_trace if stochastic else models.autograd_trace
    want, expected = _step(own, sensitivity, noise if stochastic else None)
    got, grads = _step(graph_trace, sensitivity, noise if stochastic else None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
