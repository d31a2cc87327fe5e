"""``"auto"``'s Laplacian of several output components per sample (a Navier-Stokes net's
``u, v, p``) counts them where ``f`` is not a chain: the loop of backward passes takes
``1 + m (1 + n)`` passes, the Taylor engine the same jets at any ``m``, and at ``m = 3`` the
rule for one component looped where the Taylor engine was 1.3-2.6x faster (frozen LAAF and
random-Fourier-feature nets, batch 256-2048; 1.6-2.3x trained at batch 256:
``bench/laplacian_crossover.py --only=-m``). Values and parameter gradients against float64
grad-of-grad loops per component (``laplacian_by_grad_of_grad``)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, laplacian_by_grad_of_grad
from torch import nn

import torchdiv
from torchdiv._laplacian import methods
from torchdiv._taylor import RULES, capture
from torchdiv._taylor.cache import PlanCache

f64 = torch.float64


class Laaf(nn.Module):
    """DeepXDE's "LAAF-10 tanh": ``tanh(10 a z)``, one learnable slope ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.1, dtype=f64))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(10 * self.a * z)


def _net(d: int, outputs: int, adaptive: bool = True, width: int = 32) -> nn.Module:
    """A PINN ``d -> width -> width -> outputs``, LAAF (not a chain: ``methods.chained``) or
    plain tanh (a chain)."""
    act = Laaf() if adaptive else nn.Tanh()
    return nn.Sequential(
        nn.Linear(d, width), act, nn.Linear(width, width), act, nn.Linear(width, outputs)
    ).to(f64)


@pytest.fixture
def one_thread(monkeypatch) -> None:
    """``loops_for``'s one-thread rules (the 2-thread ones are not calibrated for ``m``)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)


@pytest.mark.parametrize(
    "d, outputs, adaptive, trained, loops",
    [
        (2, 1, True, False, True),  # one component: the rule as before
        (2, 1, True, True, True),
        (2, 2, True, False, True),  # m (1 + n) = 6 passes, m n w = 34k: the loop 0.74x
        (3, 2, True, False, True),  # 8 passes, 51k: 0.80x
        (2, 3, True, False, False),  # 9 passes: looped, the loop 0.97-1.2x (LAAF, RFF)
        (3, 3, True, False, False),  # looped, the loop 1.06-1.3x
        (2, 2, True, True, False),  # trained: looped, the loop 1.24-1.5x
        (2, 3, False, True, True),  # a chain: its loop costs the same at any m (0.71x)
    ],
)
def test_one_thread_rule_counts_output_components(one_thread, d, outputs, adaptive, trained, loops):
    """At batch 256 on one thread: the loop for a non-chain ``f`` of several components only
    frozen, while ``m (1 + n) <= LOOP_PASSES_OUTPUTS`` and ``m n w < 2 LOOP_WORK_OUTPUTS``;
    a chain's ``m`` not counted."""
    torch.manual_seed(0)
    net = _net(d, outputs, adaptive).requires_grad_(trained)
    x = torch.randn(256, d, dtype=f64)
    assert methods.loops_for(capture(net, x, RULES, batch_dims=1), x, 1) == loops


@pytest.mark.parametrize("trained", [False, True])
def test_three_components_take_the_taylor_engine_with_reference_values(
    one_thread, monkeypatch, trained
):
    """``u, v, p`` of ``(x, y)`` by a LAAF net, batch 32 (the rule counts passes first), three
    calls: each records ``f`` and runs the Taylor engine (before: the second and third
    looped), each component's Laplacian and the parameter gradients of a loss on them the
    float64 grad-of-grad loop's."""
    monkeypatch.setattr(methods, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(methods, "_LOOPING_SITES", PlanCache(256))
    looped, grad_of_grad = [], methods.grad_of_grad
    monkeypatch.setattr(methods, "grad_of_grad", lambda *a: looped.append(1) or grad_of_grad(*a))
    torch.manual_seed(0)
    net = _net(2, 3).requires_grad_(trained)
    x = torch.randn(32, 2, dtype=f64)
    for _ in range(3):
        got = torchdiv.laplacian(net, x)
        assert not looped and got.shape == (32, 3)
        want = torch.stack(
            [laplacian_by_grad_of_grad(lambda z, i=i: net(z)[:, i], x) for i in range(3)], 1
        )
        assert_close(got, want)
        if trained:
            assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())


def _tanh_net(d: int, outputs: int = 1, width: int = 32) -> nn.Module:
    """``pinn23``'s plain tanh PINN ``d -> width -> width -> outputs`` (a chain)."""
    return _net(d, outputs, adaptive=False, width=width)


@pytest.mark.parametrize(
    "batch, outputs, gradient, loops",
    [
        (4096, 1, True, True),  # the whole sweep: the loop 0.86x (it took Taylor)
        (8192, 1, True, False),  # 0.98: even
        (4096, 1, False, False),  # the Laplacian alone: its chain's rule, unchanged
        (256, 2, True, True),  # two components: counted (no chain for the gradient)
        (1024, 2, True, False),
    ],
)
def test_whole_sweep_rule_frozen(one_thread, batch, outputs, gradient, loops):
    """``value_grad_laplacian`` over every coordinate, frozen, one thread (``gradient``): the
    loop while ``n² w < 2 LOOP_WORK_SWEEP (1 + LOOP_TILT s)``, its output components counted
    as the Laplacian's for an ``f`` that is not a chain; the Laplacian's rule unchanged."""
    torch.manual_seed(0)
    net = _tanh_net(2, outputs).requires_grad_(False)
    x = torch.randn(batch, 2, dtype=f64)
    graph = capture(net, x, RULES, batch_dims=1)
    assert methods.loops_for(graph, x, 1, None, gradient) == loops


def test_whole_sweep_plan_not_taken_by_the_laplacian(one_thread, monkeypatch):
    """The frozen whole sweep decided to loop at one structure (its rule: the limit patched so
    that the Laplacian's does not loop there, batch 64) keeps its plan under a key of its own:
    a Laplacian at the same ``f`` and ``x`` records ``f`` (its own rule), while later sweeps
    loop without recording; values, gradients and Laplacians the float64 references'."""
    monkeypatch.setattr(methods, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(methods, "_LOOPING_SITES", PlanCache(256))
    monkeypatch.setattr(methods, "LOOP_WORK_ONE_THREAD", 0)
    monkeypatch.setattr(methods, "CHAIN_INPUTS", 0)  # (the Laplacian's chain plan: its own tests)
    recorded, capture_ = [], methods.capture
    monkeypatch.setattr(methods, "capture", lambda *a, **k: recorded.append(1) or capture_(*a, **k))
    torch.manual_seed(0)
    net = _tanh_net(2).requires_grad_(False)
    x = torch.randn(64, 2, dtype=f64)
    z = x.detach().requires_grad_(True)
    (want_grad,) = torch.autograd.grad(net(z).sum(), z)
    want_lap = laplacian_by_grad_of_grad(lambda v: net(v)[:, 0], x)
    for call, records in ((0, True), (1, False), (2, True), (3, False)):
        recorded.clear()
        if call == 2:
            assert_close(torchdiv.laplacian(net, x)[:, 0], want_lap)
        else:
            out = torchdiv.value_grad_laplacian(net, x)
            assert_close(out.gradient[:, 0], want_grad)
            assert_close(out.laplacian[:, 0], want_lap)
        assert bool(recorded) == records, call
