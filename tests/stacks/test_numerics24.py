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
  loop's error per sample; its first form, ``1 / cosh^2``, overflowed past ``|x| ~ 13`` and
  made the rule's derivative (parameter gradients) ``nan``;
* XTrace's rank test in float32: singular values below ``eps^(2/3)`` (200 ulps) of the
  largest were taken for round-off, and a column's part in the null space had to exceed
  ``100 k`` round-offs over the gap, more than 1 in float32: every column of a rank-deficient
  sketch passed for independent and each left-out sketch dropped a direction it spans (a
  rank-4 Jacobian's "exact" estimate 1e3-1e5x the loop's error);
* the Taylor rule of ``det`` went through ``log|det|``: ``det (lap log|det| + sum_k (tr
  M_k)^2)`` cancels terms ``1/sigma_min^2`` larger than the result, 6-1300x the loop's error
  for a Slater determinant near a node (now the adjugate's grouping, PyTorch's own).

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


class _Bottleneck(torch.nn.Module):
    """``b(tanh(a x))`` through 4 units: a rank-4 Jacobian whose singular values spread over
    two decades (a low-rank flow layer, an autoencoder's bottleneck)."""

    def __init__(self, n: int = 16, rank: int = 4) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(n, rank), torch.nn.Linear(rank, n)
        with torch.no_grad():
            spread = torch.logspace(0, 2, rank)
            self.a.weight.mul_(spread[:, None].sqrt())
            self.b.weight.mul_(3 * spread.sqrt())

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def _trace_by_loop(net: torch.nn.Module, x: Tensor) -> Tensor:
    """Each sample's divergence by a backward pass per output element (the loop users write)."""
    leaf = x.detach().requires_grad_(True)
    y = net(leaf)
    rows = [
        torch.autograd.grad(y[:, i].sum(), leaf, retain_graph=True)[0][:, i]
        for i in range(y.shape[1])
    ]
    return torch.stack(rows).sum(0)


def test_xtrace_exact_for_a_low_rank_jacobian_in_float32() -> None:
    """XTrace with a sketch of 10 (``num_probes=20``) is exact for a rank-4 Jacobian: in
    float32 within 30x the loop's error of the largest trace (measured 1-10x). Its rank test
    took genuine directions 3e-6 of the largest for round-off (``eps^(2/3)``) and its 100 k
    margin over round-off made every sketch column independent: 1e-2-1e-1 off, 1e5x."""
    torch.manual_seed(0)
    net = _Bottleneck()
    x = torch.randn(32, 16)
    truth = _trace_by_loop(copy.deepcopy(net).double(), x.double()).detach()
    scale = truth.abs().max()
    loop = (_trace_by_loop(net, x).double() - truth).abs().max() / scale
    est = torchdiv.estimate_divergence(
        net, x, method="xtrace", num_probes=20, generator=torch.Generator().manual_seed(0)
    )
    assert est.value.dtype == torch.float32
    assert (est.value.detach().double() - truth).abs().max() / scale <= 30 * loop


def test_gelu_tanh_rule_differentiable_where_tanh_saturates() -> None:
    """The rule's ``gelu'`` and ``gelu''`` have finite derivatives in ``x`` (what parameter
    gradients of a Laplacian go through) at any ``|x|``: ``1 / cosh^2`` overflowed past
    ``|x| ~ 13`` in float32 and its derivative was ``nan`` there."""
    for dtype in (torch.float32, torch.float64):
        x = torch.linspace(-100, 100, 401, dtype=dtype, requires_grad=True)
        d1, d2 = _gelu(x, F.gelu(x, approximate="tanh"), "tanh")
        (grad,) = torch.autograd.grad((d1 + d2).sum(), x)
        assert torch.isfinite(grad).all()


class _SlaterDeterminant(torch.nn.Module):
    """``psi = det[phi_j(r_i)]`` of 4 electrons in 3-D, orbitals from one tanh MLP (a VMC
    ansatz written without the log: ``-0.5 Δpsi / psi`` is the kinetic energy)."""

    def __init__(self) -> None:
        super().__init__()
        self.orbitals = torch.nn.Sequential(
            torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.linalg.det(self.orbitals(x.reshape(-1, 4, 3)))


def test_determinant_laplacian_near_a_node_within_the_loops_error() -> None:
    """Electrons 0 and 1 1e-2 apart (the orbital matrix near-singular, ``psi`` near a node):
    each sample's float32 Laplacian by the Taylor sweep within 2x the grad-of-grad loop's
    relative error (measured 0.0-0.7x over five draws; 6-1300x when ``det``'s rule went
    through ``log|det|``, whose ``1/sigma_min^2`` terms cancel)."""
    torch.manual_seed(3)
    net = _SlaterDeterminant()
    torch.manual_seed(100)
    x = torch.randn(8, 12, dtype=torch.float64)
    x[:, 3:6] = x[:, 0:3] + 1e-2 * torch.randn(8, 3, dtype=torch.float64)
    truth = laplacian_alone(copy.deepcopy(net).double(), x).detach()
    loop = _per_sample_error(laplacian_alone(net, x.float()).detach(), truth)
    ours = torchdiv.laplacian(net, x.float(), method="taylor")
    assert ours.dtype == torch.float32
    assert _per_sample_error(ours.detach(), truth) <= 2 * loop
