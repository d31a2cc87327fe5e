"""Review of the merge of rev-left23 (rev-merges23a): ``log_likelihood``'s watch for a partly
stopped field, and ``FakeTensorMode`` calls followed by real ones.

References: ``log p0(z(t0)) - ∫ div f`` by torchdiffeq's Euler steps with each divergence a
per-sample grad loop in float64 (``test_left23._solved``), parameter gradients by
``assert_same_parameter_gradients``; per-sample Laplacians by grad of grad."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses import FakeTensorMode

import torchdiv
from tests.conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_alone,
    tanh_mlp,
)

f64 = torch.float64


# --- log_likelihood's stopped-field check ----------------------------------------------------

left23 = pytest.importorskip("tests.stacks.test_left23")


def test_a_quantised_component_beside_a_stop_is_not_refused():
    """A value read off the graph for logging (``.item()``: a stop, so the check runs) and a
    component quantised under grad (``round(4 z) / 4``: derivative 0 is right). Samples near
    a step of the quantiser jump at the check's small step: the component was refused as
    stopped. A jump is on one side of ``z`` only; a stopped value moves on both."""
    net = tanh_mlp(2, 8, 1)
    x = torch.tensor([[0.3, 0.125 + 1e-5], [-1.2, 0.125 - 1e-5], [0.8, -0.375 + 1e-5]], dtype=f64)
    seen = []

    def field(t, z):
        seen.append(z.detach().abs().max().item())
        return torch.cat([net(z) * t, torch.round(z[:, 1:] * 4) / 4], -1)

    ours = torchdiv.flows.log_likelihood(field, x, 0.0, 1.0, left23.log_p0, **left23.EULER)
    expected = left23._solved(field, x)
    assert_close(ours, expected)
    assert_same_parameter_gradients(net, ours.sum(), expected.sum())


def test_the_check_leaves_a_tensor_counter_in_the_closure_as_the_solve_left_it():
    """``nonlocal calls; calls = calls + 1`` with a tensor (as ``self._num_evals += 1`` is
    FFJORD's): the check's evaluation counted (5 for 4 Euler steps); numbers only were put
    back."""
    rotation = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=f64)
    calls = torch.zeros(())

    def turned(t, z):
        nonlocal calls
        calls = calls + 1
        return z @ rotation.T

    torchdiv.flows.log_likelihood(
        turned, torch.randn(3, 2, dtype=f64), 0.0, 1.0, left23.log_p0, **left23.EULER
    )
    assert calls.item() == 4


# --- FakeTensorMode, then real calls -----------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(
            lambda f, x: torchdiv.laplacian(f, x, method="hutchinson", num_probes=2),
            id="hutchinson",
        ),
        pytest.param(
            lambda f, x: torchdiv.value_grad_laplacian(f, x).laplacian, id="value_grad_laplacian"
        ),
    ],
)
def test_a_fake_call_on_a_real_model_leaves_its_weights(call):
    """Shape-only tracing of the caller's own model (``FakeTensorMode(allow_non_fake_inputs=
    True)``, as a memory estimate does): the put-back of the parameters' ``.data``, read
    under the mode, set fake tensors as their data: the model's weights became meta and every
    later real call raised "Cannot copy out of meta tensor". Now the weights are as they
    were and a real call after is right."""
    net, x = tanh_mlp(3, 8, 1), torch.randn(4, 3, dtype=f64)
    weights = [p.detach().clone() for p in net.parameters()]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        assert call(net, mode.from_tensor(x)).shape == (4, 1)
    for p, before in zip(net.parameters(), weights, strict=True):
        assert not p.is_meta
        assert torch.equal(p.detach(), before)
    assert_close(torchdiv.value_grad_laplacian(net, x).laplacian, laplacian_alone(net, x)[:, None])


class _Detached(torch.nn.Module):
    """A field whose second component reads ``z.detach()`` (its term of the divergence lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tanh_mlp(2, 8, 2)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(z)[:, :1], self.net(z.detach())[:, 1:]], -1)


@pytest.mark.parametrize(
    ("method", "adjoint"), [("forward", False), ("forward", True), ("structured", True)]
)
def test_a_detach_is_seen_where_the_state_requires_no_grad(method, adjoint):
    """Forward mode's state, and the adjoint's forward solve under a recording method, require
    no grad: a ``detach`` there was not taken for a stop, and log p(x) lost the component's
    term silently. A detach of a floating tensor now sends the solve to the check."""
    x = torch.randn(3, 2, dtype=f64)
    with pytest.raises(ValueError, match=r"components \[1\] of f\(t, z\)"):
        torchdiv.flows.log_likelihood(
            _Detached(), x, 0.0, 1.0, left23.log_p0, method=method, adjoint=adjoint, **left23.EULER
        )
