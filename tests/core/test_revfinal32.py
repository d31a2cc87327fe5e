"""rev-final32: a review of rev-late32's structure key (classes ``f`` names read as plain
objects). References: float64 per-sample loops of ``torch.autograd.grad`` (values and
parameter gradients); float64 throughout, so the dtype's default tolerances of
``assert_close`` (rtol 1e-7) hold for two sums of three products each."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_close

import torchdiv
from torchdiv import BatchInteractionError


class _Flagged(torch.nn.Module):
    """A 3-3 tanh layer whose ``forward`` adds the batch's mean once ``mix`` is set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.mix = torch.nn.Linear(3, 3).double(), False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.lin(z))
        return y + z.mean(0, keepdim=True) if self.mix else y


class _State:
    def __init__(self, net: Any) -> None:
        self.net = net


def _loop(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each sample's divergence by ``torch.autograd.grad`` of each output coordinate, one
    sample at a time, and the gradients of their sum in the parameters."""
    params = list(net.parameters())
    out = []
    for xi in x:
        xi = xi.detach().clone().requires_grad_(True)
        y = net(xi[None])[0]
        out.append(
            sum(torch.autograd.grad(y[j], xi, create_graph=True)[0][j] for j in range(y.numel()))
        )
    div = torch.stack(out)
    return div.detach(), [g.detach() for g in torch.autograd.grad(div.sum(), params)]


def _check(f: Any, net: torch.nn.Module, x: torch.Tensor) -> None:
    div = torchdiv.divergence(f, x)
    grads = torch.autograd.grad(div.sum(), list(net.parameters()))
    expected, expected_grads = _loop(net, x)
    assert_close(div.detach(), expected)
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e)


def test_a_module_behind_a_plain_object_a_class_holds_set_to_mix_is_refused():
    """A class ``f`` names (``Registry.state.net(z)``) was read for its flags, containers and
    modules, not for the modules of the plain objects it holds, as a plain object is (rev-late32
    read classes "as plain objects"): ``net.mix = True`` kept the key, the first call's pass
    was served, the batch's mean unwatched (divergence and its parameter gradients silently
    off by the mean's share)."""
    net = _Flagged()

    class Registry:
        state = _State(net)

    f = (lambda r: lambda z: r.state.net(z))(Registry)
    x = torch.randn(5, 3, dtype=torch.float64)
    _check(f, net, x)
    net.mix = True
    with pytest.raises(BatchInteractionError, match="mean"):
        torchdiv.divergence(f, x)
