"""Adversarial review of compile19's replay (``_structured.replay``): a chain plan recorded
while Dynamo traces and replayed in the graph must never serve a call whose ``f`` differs
from the recording's in a way the graph's guards do not see."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from conftest import assert_close
from test_compiled_losses import (
    Counting,
    _fresh_dynamo,  # noqa: F401  (autouse: Dynamo reset per test)
    loss_and_grads,
    mlp,
)

import torchdiv

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not")


def _divergence(f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torchdiv.divergence(f, x, method="structured")


def _matches_eager(f: torch.nn.Module, loss: Callable[..., torch.Tensor], x: torch.Tensor):
    """The compiled loss's value and parameter gradients equal eager ones (float64)."""
    value, grads = loss_and_grads(lambda x, _: loss(x), f, x, x)
    want, want_grads = loss_and_grads(lambda x, _: _divergence(f, x).square().mean(), f, x, x)
    assert_close(value, want)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got, expected)


@torch.compiler.disable
def _log(x: torch.Tensor) -> None:
    """A helper Dynamo does not trace (a logger, a profiler hook): a graph break."""


class Logged(torch.nn.Module):
    """An MLP whose forward calls such a helper first: Dynamo breaks the graph inside ``f``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 16), torch.nn.LeakyReLU(0.1), torch.nn.Linear(16, 3)
        ).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _log(x)
        return self.net(x)


def _slope(f: Logged) -> None:
    f.net[1].negative_slope = 0.7


def _swap(f: Logged) -> None:
    f.net[1] = torch.nn.Tanh()


@pytest.mark.parametrize(  # (1-3 s each: the nested variants in the daily sample)
    "nested", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["", "nested_graph_breaks"]
)
# (one fault: the changed slope always, the swapped activation in the daily sample: 9-11 s
# each on a loaded run)
@pytest.mark.parametrize("change", [_slope, pytest.param(_swap, marks=pytest.mark.slow)])
def test_a_graph_break_inside_f_does_not_keep_a_stale_plan(change, nested):
    """The unused ``f(x)`` carries Dynamo's guards on ``f`` into the replay's graph only if it
    is traced in that graph: broken inside ``f``, the replay was in a graph guarded on ``f``'s
    parameters alone, and a changed slope or a swapped activation kept the old plan (values
    0.19 / 0.15 off, gradients 0.98 / 1.1; Dynamo's ``nested_graph_breaks`` alike)."""
    f, x = Logged(), torch.randn(5, 3, dtype=torch.float64)
    loss = torch.compile(lambda x: _divergence(f, x).square().mean(), backend="aot_eager")
    with torch._dynamo.config.patch(nested_graph_breaks=nested):
        _matches_eager(f, loss, x)
        change(f)
        _matches_eager(f, loss, x)


class BatchScaled(torch.nn.Module):
    """An MLP whose pre-activation is scaled by a float made from the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x) * (3.0 / x.shape[0]))


def test_a_float_made_from_the_shape_is_not_replayed_at_another_shape():
    """A recorded call's float argument may come from ``x``'s shape, which ``dynamic=True``
    leaves unguarded: the replay recorded at 2 samples served 3, 5 and 8 with the factor
    3/2 (values 0.08-0.25 off). Such a replay holds at its shape only (a guard on it)."""
    f, backend = BatchScaled(), Counting()
    compiled = torch.compile(lambda x: _divergence(f, x), backend=backend, dynamic=True)
    for n in (2, 3):
        x = torch.randn(n, 3, dtype=torch.float64)
        assert_close(compiled(x), _divergence(f, x))
    assert backend.runs == 2


def test_two_calls_in_one_compiled_loss_are_one_graph():
    """Dynamo read the dict of replays once per trace, the second call's key recorded after:
    a loss with two calls (here at two point sets, as a PINN's interior and boundary terms)
    raised ``Unsupported`` under ``fullgraph=True`` (a ``KeyError`` while tracing)."""
    net, backend = mlp(), Counting()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (
            _divergence(net, x).square().mean()
            + torchdiv.jacobian_diagonal(net, y, method="structured").mean()
        )

    value, grads = loss_and_grads(torch.compile(loss, backend=backend, fullgraph=True), net, x, y)
    want, want_grads = loss_and_grads(loss, net, x, y)
    assert_close(value, want)
    for got, expected in zip(grads, want_grads, strict=True):
        assert_close(got, expected)
    assert backend.compiled == 1


class Config:
    """A training configuration read by the model (a global object, not a module)."""

    temperature = 1.0


CONFIG = Config()


class Tempered(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x) / CONFIG.temperature)


def test_a_setting_changed_in_the_compiled_code_before_the_call_is_read(monkeypatch):
    """Dynamo sets what the traced code changed only after the graph: the recording saw the
    temperature as it was before the step (the previous one: 0.07 off, for every step after
    that set the same temperature). Such calls run eagerly."""
    monkeypatch.setattr(CONFIG, "temperature", 1.0)  # (put back after the test)
    f, x = Tempered(), torch.randn(5, 3, dtype=torch.float64)

    def step(x: torch.Tensor, temperature: float) -> torch.Tensor:
        CONFIG.temperature = temperature
        return _divergence(f, x)

    compiled = torch.compile(step, backend="aot_eager")
    for temperature in (2.0, 3.0, 3.0):
        got = compiled(x, temperature)
        assert_close(got, step(x, temperature))
