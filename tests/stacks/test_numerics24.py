"""Float32 accuracy of the fast paths against the plain per-sample autograd loop (rev-numerics24).

Every engine whose arithmetic differs from plain autograd (the chain's trace by cyclicity, the
structured engine, Taylor jets, the chain's forward Laplacian, forward over reverse, the
determinant rules) was measured in float32 on ill-conditioned but realistic nets (saturated
activations, weights x10-100, inputs ~1e3, near-singular orbital matrices) against a float64
truth, beside the float32 error of the loop users write (``NOTES_rev-numerics24.md`` lists the
ratios). A path is at fault where its error is many times the loop's. Faults found:

* the Taylor rule of the tanh-approximated GELU took ``sech^2 u`` as ``1 - tanh(u)^2``, which
  cancels where ``|u| > 3``: its second derivative on ``2.5 < |x| < 6`` was ~10x less
  accurate than autograd's double backward, and Laplacians of a GELU(tanh) net with large
  pre-activations (``method="taylor"``, ``"auto"``, ``value_grad_laplacian``) 5-9x the
  loop's error per sample.

Tolerances: a multiple of the float32 loop's own error on the same rounded weights and
inputs (the level users accept), never an absolute guess.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import torchdiv
from tests.conftest import laplacian_alone
from torchdiv._taylor.elementwise import _gelu

Tensor = torch.Tensor


def _second_derivative(x: Tensor) -> Tensor:
    """``gelu''(x)`` (tanh approximation) by autograd's double backward, elementwise."""
    leaf = x.detach().requires_grad_(True)
    (first,) = torch.autograd.grad(F.gelu(leaf, approximate="tanh").sum(), leaf, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), leaf)
    return second


def test_gelu_tanh_second_derivative_as_accurate_as_autograd() -> None:
    """Where ``tanh u`` saturates (``2.5 < |x| < 6``), the rule's ``gelu''`` in float32 is
    within a few times autograd's double backward's error (it was ~10x: 3.6e-6 against
    3.8e-7, of values up to 3e-2; 2e-8 from cosh)."""
    x64 = torch.cat([torch.linspace(-6, -2.5, 200), torch.linspace(2.5, 6, 200)]).double()
    x32 = x64.float()
    truth = _second_derivative(x64)
    loop = (_second_derivative(x32).double() - truth).abs().max()
    _, d2 = _gelu(x32, F.gelu(x32, approximate="tanh"), "tanh")
    assert d2.dtype == torch.float32
    ours = (d2.double() - truth).abs().max()
    assert ours <= 2 * loop, (float(ours), float(loop))


def _gelu_net() -> torch.nn.Module:
    """A GELU(tanh) MLP (GPT-2's activation) whose pre-activations reach |z| ~ 30-60."""
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 16), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(16, 1)
    )
    with torch.no_grad():
        net[0].weight.mul_(30.0)
        net[0].bias.mul_(30.0)
    return net


def _per_sample_error(ours: Tensor, truth: Tensor) -> float:
    return float(((ours.double().reshape(truth.shape) - truth).abs() / truth.abs()).max())


def test_gelu_tanh_laplacian_taylor_within_the_loops_error() -> None:
    """Each sample's Laplacian by the Taylor sweep (``"taylor"``, ``value_grad_laplacian``)
    within 2x the float32 grad-of-grad loop's relative error (measured 0.2x; 9.3x before)."""
    net = _gelu_net()
    torch.manual_seed(0)
    x = torch.randn(8, 3)
    truth = laplacian_alone(copy.deepcopy(net).double(), x.double()).detach()
    loop = _per_sample_error(laplacian_alone(net, x).detach(), truth)
    for ours in (
        torchdiv.laplacian(net, x, method="taylor"),
        torchdiv.value_grad_laplacian(net, x).laplacian,
    ):
        assert ours.dtype == torch.float32
        assert _per_sample_error(ours.detach(), truth) <= 2 * loop
