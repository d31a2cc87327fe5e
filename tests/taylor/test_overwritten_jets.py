"""Jets written in place (issue 18): where a replay's ``jac`` dies at an elementwise op and
nothing records a graph, the op writes its ``jac`` over it (``Context.overwrite``), and sums of
squares accumulate in place (``jet.square_sum``). Never over a ``jac`` another value still
reads, the caller's input, nor a tensor autograd saved. The size thresholds are lowered here
so that small networks take those paths; references are float64 loops of backward passes."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import assert_close, laplacian_by_grad_of_grad
from torch import nn

import torchdiv
from torchdiv._taylor import elementwise, jet
from torchdiv._taylor.capture import capture
from torchdiv._taylor.jet import Context, Jet

replay = importlib.import_module("torchdiv._taylor.propagate")  # (the package names its function)


@pytest.fixture
def overwrites(monkeypatch) -> list[bool]:
    """Every size takes the in-place paths; the list records each ``scaled_jac``'s
    ``ctx.overwrite``."""
    seen: list[bool] = []
    scaled = jet.scaled_jac

    def spy(ctx: Context, d: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
        seen.append(ctx.overwrite)
        return scaled(ctx, d, jac)

    monkeypatch.setattr(replay, "OVERWRITE_NUMEL", 1)
    monkeypatch.setattr(jet, "ACCUMULATED_NUMEL", 1)
    monkeypatch.setattr(jet, "ACCUMULATED_TOTAL", 1)
    monkeypatch.setattr(jet, "scaled_jac", spy)
    monkeypatch.setattr(elementwise, "scaled_jac", spy)
    return seen


class Shared(nn.Module):
    """``tanh(h + 1) sin(h)``, ``h`` a layer of ``tanh(x)`` (a ``jac`` per sample): ``h + 1``
    passes ``h``'s ``jac`` on as it is, and dies at ``tanh`` while ``sin`` still reads ``h``."""

    def __init__(self, d: int):
        super().__init__()
        self.first, self.last = nn.Linear(d, 6), nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(torch.tanh(x))
        return self.last(torch.tanh(h + 1) * torch.sin(h)).squeeze(-1)


def _fnn(d: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 1), nn.Flatten(0)
    )


@pytest.mark.parametrize("make", [_fnn, Shared], ids=["fnn", "shared"])
def test_frozen_values(overwrites: list[bool], make) -> None:
    torch.manual_seed(0)
    net = make(3).requires_grad_(False)
    x = torch.randn(5, 3)
    before = x.clone(), [p.clone() for p in net.parameters()]
    out = torchdiv.laplacian(net, x, method="taylor")
    expected = laplacian_by_grad_of_grad(net.double(), x.double()).detach()
    assert_close(out, expected.float())
    assert any(overwrites)  # (tanh(x)'s jac dies at the first layer)
    torch.testing.assert_close(x, before[0], rtol=0, atol=0)
    for p, kept in zip(net.float().parameters(), before[1], strict=True):
        torch.testing.assert_close(p, kept, rtol=0, atol=0)


@pytest.mark.parametrize("frozen_first", [False, True])
def test_trained_gradients(overwrites: list[bool], frozen_first: bool) -> None:
    """With parameters training, the replay records a graph: nothing is overwritten, and
    the Laplacian's parameter gradients are the loop's (a saved tensor written over would
    fail autograd's version check, or give other gradients)."""
    torch.manual_seed(1)
    net = _fnn(3)
    net[0].requires_grad_(not frozen_first)
    x = torch.randn(5, 3)
    grads = _gradients(torchdiv.laplacian(net, x, method="taylor"), net)
    assert overwrites and not any(overwrites)
    net64 = net.double()
    expected = _gradients(laplacian_by_grad_of_grad(net64, x.double()), net64)
    for g, e in zip(grads, expected, strict=True):
        assert_close(g, e.float(), scale=10)


def _gradients(lap: torch.Tensor, net: nn.Module) -> list[torch.Tensor]:
    """``d sum(lap^2) / d p`` for the parameters training (zero for the last bias)."""
    params = [p for p in net.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lap.square().sum(), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def test_caller_directions_unchanged(overwrites: list[bool]) -> None:
    """A caller's directions reach ``tanh`` as a view (``reshape``) after ``x`` died: its
    ``jac`` is the caller's storage, so it is not written over."""
    torch.manual_seed(2)
    x = torch.randn(4, 2, 3)
    graph = capture(lambda z: torch.tanh(z.reshape(4, 6)), x, replay.RULES)
    directions = torch.randn(3, 4, 2, 3)
    kept = directions.clone()
    with torch.no_grad():
        out = replay.propagate(graph, Jet(x, directions, None), Context(3, True))
    torch.testing.assert_close(directions, kept, rtol=0, atol=0)
    d1 = 1 - torch.tanh(x.reshape(4, 6)) ** 2
    assert_close(out.jac, d1 * directions.reshape(3, 4, 6))
