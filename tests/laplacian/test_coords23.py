"""``"auto"``'s choice between the loop of backward passes and the Taylor engine counts the
coordinates the second derivatives run along (``value_grad_laplacian``'s ``coordinates``), not
every input: a heat residual ``u_t - Δ_x u`` of ``u(x, t)`` at batch 1024 took the Taylor
sweep for two inputs where the loop at one was 1.5-2.9x faster (rev-pinn23). Values and
parameter gradients against float64 per-sample grad-of-grad loops; the choice by spies
(``LOOP_ELEMENTS`` made small: small batches)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients

import torchdiv
from torchdiv._api import second_order
from torchdiv._laplacian import methods
from torchdiv._taylor import RULES, capture
from torchdiv._taylor.cache import PlanCache

f64 = torch.float64


def _net(d: int, outputs: int = 1) -> torch.nn.Module:
    """A PINN's tanh MLP ``(x, t) -> u``, trained (its parameters require grad)."""
    return torch.nn.Sequential(
        torch.nn.Linear(d, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, outputs),
    ).to(f64)


def _reference(u: torch.nn.Module, x: torch.Tensor, coordinates: list[int]):
    """The user's loop, per output: its gradient, then one pass per chosen coordinate:
    ``(N, m, n)`` gradients and ``(N, m)`` Laplacians over ``coordinates``."""
    z = x.detach().requires_grad_(True)
    y = u(z)
    grads, laps = [], []
    for i in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, i].sum(), z, create_graph=True)
        passes = [torch.autograd.grad(g[:, j].sum(), z, create_graph=True)[0] for j in coordinates]
        grads.append(g)
        laps.append(sum(p[:, j] for p, j in zip(passes, coordinates, strict=True)))
    return torch.stack(grads, 1), torch.stack(laps, 1)


@pytest.fixture
def calls(monkeypatch) -> dict[str, list[object]]:
    """``"auto"``'s decisions forgotten; per kind, one entry per call: ``"recorded"`` (``f``
    recorded for the Taylor engine), ``"looped"`` (``value_grad_laplacian``'s loop, with its
    coordinates) and ``"rule"`` (the coordinates ``loops_for`` counted)."""
    monkeypatch.setattr(methods, "_LOOPS", PlanCache(256))
    monkeypatch.setattr(methods, "LOOP_ELEMENTS", 64)  # (the one-input rule's batch: small tests)
    monkeypatch.setattr(methods, "_LOOPING_SITES", PlanCache(256))
    seen: dict[str, list[object]] = {"recorded": [], "looped": [], "rule": []}
    for module in (methods, second_order):
        capture = module.capture
        monkeypatch.setattr(
            module,
            "capture",
            lambda *a, capture=capture, **k: seen["recorded"].append(1) or capture(*a, **k),
        )
    looped = second_order._looped
    monkeypatch.setattr(
        second_order,
        "_looped",
        lambda f, x, b, plan, index: seen["looped"].append(index) or looped(f, x, b, plan, index),
    )
    return seen


def _residual(u: torch.nn.Module, x: torch.Tensor, coordinates: list[int] | None):
    """``value_grad_laplacian``'s gradient and Laplacian, and a heat residual's loss."""
    out = torchdiv.value_grad_laplacian(u, x, coordinates=coordinates)
    loss = (out.gradient[..., -1] - 0.1 * out.laplacian).square().mean()
    return out, loss


def test_the_heat_residual_loops_at_one_coordinate(calls, monkeypatch):
    """``Δ_x u`` of ``u(x, t)`` where the one-thread rule for trained functions loops at one
    input and not at two (its limit scaled down with the batch: B = 128): the deciding call
    runs the Taylor engine from its recording, later ones the loop over the one chosen
    coordinate without recording ``f`` (counting both inputs, every call took the Taylor
    sweep); values and parameter gradients right at each call."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(methods, "LOOP_WORK_TRAINED_ONE_THREAD", 1280)
    torch.manual_seed(0)
    u, x = _net(2), torch.rand(128, 2, dtype=f64)
    grads, laps = _reference(u, x, [0])
    for _ in range(3):
        out, loss = _residual(u, x, [0])
        assert_close(out.gradient, grads)
        assert_close(out.laplacian, laps)
        assert_same_parameter_gradients(u, loss, (grads[..., -1] - 0.1 * laps).square().mean())
    assert len(calls["recorded"]) == 1 and len(calls["looped"]) == 2


def test_a_plan_kept_for_some_coordinates_is_not_taken_for_others(calls, monkeypatch):
    """The rule counts the chosen coordinates and a loop decided at one coordinate (by a
    call that runs the Taylor engine from its recording) is kept for that many: at the same
    ``f`` and ``x`` (recorded: batch beyond the one-input rule), every coordinate, two, and
    the whole Laplacian decide again (the Taylor engine here), while one coordinate, the same
    or another, takes the kept loop without recording; values and parameter gradients right
    at each call."""
    monkeypatch.setattr(
        methods,
        "loops_for",
        lambda graph, x, batch_dims, chosen=None, gradient=False: (
            calls["rule"].append(chosen) or chosen == 1
        ),
    )
    torch.manual_seed(1)
    u, x = _net(3, outputs=2), torch.rand(100, 3, dtype=f64)
    steps = [([0], 1, False), ([0], 0, True), (None, 1, False), ([2], 0, True), ([0, 1], 1, False)]
    for coordinates, recorded, looped in steps:
        calls["recorded"].clear(), calls["looped"].clear()
        chosen = [0, 1, 2] if coordinates is None else coordinates
        grads, laps = _reference(u, x, chosen)
        out, loss = _residual(u, x, coordinates)
        assert (len(calls["recorded"]), bool(calls["looped"])) == (recorded, looped), coordinates
        assert_close(out.gradient, grads)
        assert_close(out.laplacian, laps)
        assert_same_parameter_gradients(u, loss, (grads[..., -1] - 0.1 * laps).square().mean())
    assert calls["rule"] == [1, 3, 2]
    calls["recorded"].clear()
    assert_close(torchdiv.laplacian(u, x), _reference(u, x, [0, 1, 2])[1])
    assert calls["recorded"] == [1]  # (the whole Laplacian: its own decision, not the loop's)


@pytest.mark.parametrize("operator", ["laplacian", "weighted"])
def test_the_partial_and_low_rank_operators_count_their_directions(calls, operator):
    """``laplacian(coordinates=[0])`` and ``weighted_laplacian(sigma=S)`` with one column run
    on the shifted function of one input: within the one-input rule's batch the loop, not
    recorded; values and parameter gradients right."""
    torch.manual_seed(2)
    u, x = _net(3), torch.rand(64, 3, dtype=f64)
    if operator == "laplacian":
        got = torchdiv.laplacian(u, x, coordinates=[0])
    else:
        sigma = torch.eye(3, dtype=f64)[:, :1]
        got = torchdiv.weighted_laplacian(u, x, sigma=sigma)
    want = _reference(u, x, [0])[1]
    assert calls["recorded"] == []
    assert_close(got, want)
    assert_same_parameter_gradients(u, got.square().mean(), want.square().mean())


@pytest.mark.parametrize("trained", [False, True])
@pytest.mark.parametrize("way", ["coordinates", "sigma", "x requires grad"])
def test_the_chain_gives_the_partial_and_low_rank_laplacian(laplacian_chained, trained, way):
    """Where ``"auto"``'s loop runs (forced here) on a chain MLP, the Laplacian over chosen
    coordinates or along ``weighted_laplacian``'s ``sigma`` (the shift ``x + z Sᵀ`` is one
    more product of the chain, ``x`` its bias) comes from the chain, also where ``x``
    requires grad (then the result's gradient in ``x`` goes through the saved activations).
    Values, parameter gradients and the gradient in ``x`` against the float64 loop on the
    shifted function written in plain torch."""
    torch.manual_seed(3)
    u, x = _net(3, outputs=2), torch.rand(32, 3, dtype=f64)
    u.requires_grad_(trained)
    sigma = torch.randn(3, 2, dtype=f64) if way == "sigma" else torch.eye(3, dtype=f64)[:, 1:]
    if way == "x requires grad":
        x.requires_grad_(True)
    for _ in range(2):  # the deciding call and the remembered plan
        if way == "sigma":
            got = torchdiv.weighted_laplacian(u, x, sigma=sigma)
        else:
            got = torchdiv.laplacian(u, x, coordinates=[1, 2])
    assert laplacian_chained[-1]
    z = torch.zeros(32, 2, dtype=f64)
    want = _reference(lambda z: u(x + z @ sigma.T), z, [0, 1])[1]
    assert_close(got, want)
    if trained:
        assert_same_parameter_gradients(u, got.square().mean(), want.square().mean())
    if way == "x requires grad":
        (dx,) = torch.autograd.grad(got.sum(), x, retain_graph=True)
        assert_close(dx, torch.autograd.grad(want.sum(), x)[0])


# lapcall24: the rule for value_grad_laplacian along some of the inputs of a scalar u, fitted
# by bench/laplacian_crossover.py --vgl (the loop 0.4-0.9x the Taylor sweep at one coordinate)


@pytest.mark.parametrize("trained", [True, False])
def test_one_coordinate_of_a_scalar_loops_whatever_the_work(calls, monkeypatch, trained):
    """``Δ_x u`` of a scalar ``u(x, t)`` on one thread: with every work limit at 0 (every
    Laplacian would record), the deciding call runs the Taylor engine from its recording and
    the next two loop over the one coordinate without recording ``f``: the loop's three passes
    beat the Taylor sweep's two sweeps at every measured size (batch 1024 to 32768, 0.4-0.9x).
    Values and parameter gradients right at each call."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    for limit in ("LOOP_WORK_TRAINED_ONE_THREAD", "LOOP_WORK_ONE_THREAD", "LOOP_WORK_PARTIAL"):
        monkeypatch.setattr(methods, limit, 0)
    torch.manual_seed(4)
    u, x = _net(2), torch.rand(128, 2, dtype=f64)
    u.requires_grad_(trained)
    grads, laps = _reference(u, x, [0])
    for _ in range(3):
        out, loss = _residual(u, x, [0])
        assert_close(out.gradient, grads)
        assert_close(out.laplacian, laps)
        if trained:
            reference = (grads[..., -1] - 0.1 * laps).square().mean()
            assert_same_parameter_gradients(u, loss, reference)
    assert len(calls["recorded"]) == 1 and len(calls["looped"]) == 2


@pytest.mark.parametrize("over", [False, True])
def test_two_coordinates_of_a_scalar_loop_by_their_square_times_the_work(calls, monkeypatch, over):
    """Two coordinates of three, trained, one thread: the loop while ``k² x work`` is below
    ``2 x LOOP_WORK_PARTIAL x (1 + LOOP_TILT_PARTIAL x share)`` (the limit put 10% on either
    side of this net's work; the Laplacian's own limit at 0): the kept loop below, the Taylor
    sweep at every call above. Values and parameter gradients right at each call."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(methods, "LOOP_WORK_TRAINED_ONE_THREAD", 0)
    torch.manual_seed(5)
    u, x = _net(3), torch.rand(128, 3, dtype=f64)
    graph = capture(u, x, RULES, batch_dims=1)
    tilt = 1 + methods.LOOP_TILT_PARTIAL * methods._products_share(graph)
    limit = 4 * graph.work_per_call() / (2 * tilt)
    monkeypatch.setattr(methods, "LOOP_WORK_PARTIAL", limit * (0.9 if over else 1.1))
    grads, laps = _reference(u, x, [0, 1])
    for _ in range(3):
        out, loss = _residual(u, x, [0, 1])
        assert_close(out.gradient, grads)
        assert_close(out.laplacian, laps)
        assert_same_parameter_gradients(u, loss, (grads[..., -1] - 0.1 * laps).square().mean())
    assert (len(calls["recorded"]), len(calls["looped"])) == ((3, 0) if over else (1, 2))


def test_one_coordinate_of_several_outputs_keeps_the_laplacians_rule(calls, monkeypatch):
    """With several output components (Navier-Stokes' ``(u, v, p)``: the loop takes
    ``1 + m (1 + k)`` passes, the Taylor sweep one) one coordinate is counted as the
    Laplacian's rule counts it: with that rule's limit at 0, every call records."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(methods, "LOOP_WORK_TRAINED_ONE_THREAD", 0)
    torch.manual_seed(6)
    u, x = _net(2, outputs=2), torch.rand(128, 2, dtype=f64)
    grads, laps = _reference(u, x, [0])
    for _ in range(2):
        out, _ = _residual(u, x, [0])
        assert_close(out.gradient, grads)
        assert_close(out.laplacian, laps)
    assert (len(calls["recorded"]), len(calls["looped"])) == (2, 0)
