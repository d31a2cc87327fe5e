"""rev-qmc28: one-probe Hutchinson past the graph-walk bound (scale27's ``GraphTooDeep``).

A one-product estimate (``num_probes=1`` or one probe in ``probes=``, the CNF training
staple) evaluates ``f`` by plain autograd and walks its graph; past the bound that walk
raised ``GraphTooDeep`` at every call, where the documentation (limitations: very deep
graphs) says the estimators take the reverse engine, as they do from two probes on.
References: float64 per-sample loops of ``autograd.grad``, values and parameter gradients.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv
from torchdiv._core import walk

f64 = torch.float64


@pytest.fixture
def small_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk bound of 100 nodes (as tests/core/test_scale27.py): a 64-step loop is past it."""
    monkeypatch.setattr(walk, "_FLOOR", 16)
    monkeypatch.setattr(walk, "_stack_bytes", lambda: 100 * walk._BYTES_PER_NODE)


class _Deep(torch.nn.Module):
    """64 residual steps (~256 nodes, past the bound) and a buffer counting evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.lin = torch.nn.Linear(3, 3, dtype=f64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.count += 1
        for _ in range(64):
            z = z + 0.05 * torch.tanh(self.lin(z))
        return z


def _jacobians(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every sample's Jacobian, alone, by rows of ``autograd.grad`` with a graph: ``(B, 3, 3)``."""
    out = []
    for xb in x:
        leaf = xb[None].clone().requires_grad_(True)
        y = net(leaf)[0]
        rows = [torch.autograd.grad(y[i], leaf, create_graph=True)[0][0] for i in range(3)]
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("how", ["num_probes", "probes", "estimate", "flows"])
def test_one_probe_past_the_bound(small_stack: None, how: str) -> None:
    """Every call (the first watched, later ones not) gives ``v^T J v`` of the probe, its
    parameter gradients those of the loop's, and ``f``'s buffer moves once a call."""
    torch.manual_seed(0)
    net = _Deep()
    for call in range(3):
        x = torch.randn(5, 3, dtype=f64)
        v = torch.randn(1, 5, 3, dtype=f64)
        net.count.zero_()
        if how == "num_probes":  # the probe drawn as draw_probes draws it
            generator = torch.Generator().manual_seed(call)
            got = torchdiv.divergence(
                net, x, method="hutchinson", num_probes=1, generator=generator
            )
            v = torchdiv.draw_probes(x, 1, generator=torch.Generator().manual_seed(call))
        elif how == "probes":
            got = torchdiv.divergence(net, x, method="hutchinson", probes=v)
        elif how == "estimate":
            got = torchdiv.estimate_divergence(net, x, probes=v).value
        else:  # a flow's dynamics: minus the one term of the probe, and f(x) with it
            dynamics = torchdiv.flows.AugmentedDynamics(
                lambda t, z: net(z), x, method="hutchinson", probes=v
            )
            velocity, terms = dynamics(torch.zeros((), dtype=f64), dynamics.initial_state(x))
            got = -terms[0]
            net.count.sub_(1)  # (the reference evaluation below counts too)
            torch.testing.assert_close(velocity, net(x), rtol=0, atol=0)
        assert net.count.item() == 1, call
        want = torch.einsum("bi,bij,bj->b", v[0], _jacobians(net, x), v[0])
        # float64 through 64 steps: rounding only
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        params = list(net.parameters())
        ours = torch.autograd.grad(got.sin().sum(), params)
        loop = torch.autograd.grad(want.sin().sum(), params)
        for a, b in zip(ours, loop, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_one_probe_past_the_bound_still_watched(small_stack: None) -> None:
    """The first call's watch did not finish (the walk stopped inside it): the generic
    engines' evaluation is watched, and a mean over the batch inside ``f`` is refused."""
    net = _Deep()
    x = torch.randn(5, 3, dtype=f64)
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.divergence(lambda z: net(z) + z.mean(0), x, method="hutchinson", num_probes=1)
