"""Score-matching losses as their papers' code writes them, with torchdiv inside the loss.

Implicit score matching (Hyvarinen 2005): ``mean_b[tr(d s/d x) + |s|^2 / 2]``. Sliced score
matching (Song et al. 2019): the same with ``tr`` replaced by ``v^T (d s/d x) v``, written in
their repository as ``autograd.grad((s * v).sum(), x, create_graph=True)`` dotted with ``v``.
References: that grad-of-grad formula with the same probes, and the exact divergence; the
stochastic losses' PARAMETER gradients must be unbiased (the mean over independent draws).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from conftest import assert_close

import torchdiv

F64 = torch.float64


def score_net(d: int = 6, hidden: int = 12) -> torch.nn.Module:
    """The toy score network of the sliced score matching experiments: Linear-Softplus."""
    return torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.Softplus(), torch.nn.Linear(hidden, d)
    ).to(F64)


def gradient(loss: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
    """``d loss / d theta`` over the parameters that reach the score, flattened."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])


def test_sliced_loss_equals_the_papers_grad_of_grad_with_the_same_probes() -> None:
    """``divergence(method="hutchinson", probes=v)`` in the SSM loss: the value and parameter
    gradients of ``v . grad((s . v).sum(), x)`` with ``x.requires_grad_()`` as the paper's code."""
    net = score_net()
    x = torch.randn(5, 6, dtype=F64)
    v = torch.randn(1, 5, 6, dtype=F64)
    leaf = x.clone().requires_grad_(True)
    s = net(leaf)
    (vjp,) = torch.autograd.grad((s * v[0]).sum(), leaf, create_graph=True)
    want = ((v[0] * vjp).sum(-1) + 0.5 * s.square().sum(-1)).mean()
    div = torchdiv.divergence(net, x, method="hutchinson", probes=v)
    got = (div + 0.5 * net(x).square().sum(-1)).mean()
    assert_close(got, want)
    assert_close(gradient(got, net), gradient(want, net))


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_probes_are_fresh_each_step_and_repeat_with_a_generator(method: str) -> None:
    """A training loop's estimates: new probes at every call (no cache reuses a draw), the same
    estimate from the same generator state, the global generator left alone when one is
    given, and the draw equal to ``draw_probes`` from that state."""
    net = score_net()
    x = torch.randn(3, 6, dtype=F64)
    k = {"hutchinson": 2, "hutch++": 3, "xtrace": 4}[method]
    first = torchdiv.divergence(net, x, method=method, num_probes=k)
    assert not torch.equal(first, torchdiv.divergence(net, x, method=method, num_probes=k))
    state = torch.get_rng_state()
    one = torchdiv.divergence(
        net, x, method=method, num_probes=k, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(state, torch.get_rng_state())
    again = torchdiv.divergence(
        net, x, method=method, num_probes=k, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(one, again)
    probes = torchdiv.draw_probes(x, k, method=method, generator=torch.Generator().manual_seed(3))
    assert_close(torchdiv.divergence(net, x, method=method, probes=probes), one)


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["rademacher", "gaussian", "sphere"])
@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_sliced_loss_parameter_gradients_are_unbiased(method: str, probe: str) -> None:
    """The SSM loss's gradient in the network's parameters, averaged over 100 independent
    calls of 24 replicates of 3 points (each replicate its own probes), against the exact ISM
    loss's gradient: every coordinate within a Bonferroni bound (family error 1% over the
    coordinates and the 9 cases: about 4.4 standard errors). Coordinates whose gradient the
    probes do not reach (the last bias) must agree to rounding."""
    torch.manual_seed(0)
    net = score_net()
    x = torch.randn(3, 6, dtype=F64)
    exact = torchdiv.divergence(net, x, method="reverse")
    want = gradient((exact + 0.5 * net(x).square().sum(-1)).mean(), net)
    reps, calls = 24, 100
    xs = x.repeat(reps, 1)
    k = {"hutchinson": 2, "hutch++": 3, "xtrace": 4}[method]
    gen = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(calls):
        div = torchdiv.divergence(net, xs, method=method, num_probes=k, probe=probe, generator=gen)
        draws.append(gradient((div + 0.5 * net(xs).square().sum(-1)).mean(), net))
    got = torch.stack(draws)
    se = got.std(0) / math.sqrt(calls)
    bound = NormalDist().inv_cdf(1 - 0.01 / (2 * want.numel() * 9))
    assert ((got.mean(0) - want).abs() <= bound * se + 1e-12 * want.abs().max()).all()
