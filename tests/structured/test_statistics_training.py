"""The group-norm split (``torchdiv._structured.statistics``) as a training loop and a sampler
use it: the recording kept across calls (``torchdiv._taylor.cache``) while parameters, ``eps``
and per-sample time conditioning change between calls, group norms of tensors that do not
depend on ``x``, and in-place ops after a group norm. References in float64, independent of
torchdiv: a row-by-row ``autograd.grad`` loop (``conftest.loop_diagonal``) and, where the
function writes in place, central differences.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, loop_diagonal
from torch import nn

import torchdiv
from torchdiv._structured import statistics

f64 = torch.float64


@pytest.fixture(autouse=True)
def _small_states_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split on states far below ``SPLIT_WORK`` (where plain columns are faster), to
    check its values at test sizes."""
    monkeypatch.setattr(statistics, "SPLIT_WORK", 0)


def _gn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.SiLU(),
        nn.Conv2d(8, 2, 3, padding=1),
    ).to(f64)


def test_parameters_and_eps_changed_between_calls(split_plans: list[bool]) -> None:
    """Three optimiser steps, then ``eps`` set on every group norm (a float: a value of the
    kept recording, not its structure): each call's divergence is this call's net's."""
    net = _gn_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(4):
        x = torch.randn(3, 2, 8, 8, dtype=f64)
        if step == 3:
            for m in net.modules():
                if isinstance(m, nn.GroupNorm):
                    m.eps = 0.3
        div = torchdiv.divergence(net, x)
        assert_close(div.detach(), loop_diagonal(net, x).flatten(1).sum(1))
        opt.zero_grad()
        div.square().mean().backward()
        opt.step()
    assert split_plans == [True] * 4


def test_time_conditioned_group_norm(split_plans: list[bool]) -> None:
    """AdaGN (a diffusion U-Net's ``scale_shift`` block): a group norm without affine
    parameters, then a per-sample scale and shift computed from each sample's time."""
    torch.manual_seed(0)
    conv1, conv2 = nn.Conv2d(2, 8, 3, padding=1).to(f64), nn.Conv2d(8, 2, 3, padding=1).to(f64)
    norm, emb = nn.GroupNorm(2, 8, affine=False), nn.Linear(1, 16).to(f64)
    t = torch.rand(3, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        scale, shift = emb(t[:, None])[:, :, None, None].chunk(2, 1)
        return conv2(nn.functional.silu(norm(conv1(z)) * (1 + scale) + shift))

    x = torch.randn(3, 2, 8, 8, dtype=f64)
    assert_close(torchdiv.jacobian_diagonal(f, x), loop_diagonal(f, x))
    assert split_plans == [True]


def test_group_norm_of_a_tensor_that_does_not_depend_on_x() -> None:
    """A conditioning map normalised by a group norm: no statistic depends on ``x``, and the
    net is coloured as it is."""
    net, norm = _gn_net(), nn.GroupNorm(2, 8).to(f64)
    cond = torch.randn(3, 8, 8, 8, dtype=f64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net[6](torch.tanh(net[3](torch.tanh(net[0](z) + norm(cond)))))

    x = torch.randn(3, 2, 8, 8, dtype=f64)
    assert_close(torchdiv.jacobian_diagonal(f, x), loop_diagonal(f, x))


def test_in_place_ops_after_and_behind_a_group_norm(split_plans: list[bool]) -> None:
    """``add_``, ``mul_`` and ``relu_`` on a group norm's output, and ``relu_`` on its input
    after it has been read: against central differences (autograd itself refuses the second,
    whose backward needs the input as it was)."""
    net = _gn_net()

    def f(z: torch.Tensor) -> torch.Tensor:
        h = net[0](z)
        y = net[1](h).add_(1.0).mul_(2.0)
        h.relu_()
        return net[6](y.relu_() * h)

    x = torch.randn(2, 2, 8, 8, dtype=f64)
    step, n = 1e-6, x[0].numel()
    basis = torch.eye(n, dtype=f64).reshape(n, 1, *x.shape[1:])
    with torch.no_grad():
        rows = [(f(x + step * e) - f(x - step * e)).flatten(1)[:, i] for i, e in enumerate(basis)]
    ref = (torch.stack(rows, 1) / (2 * step)).reshape(x.shape)
    torch.testing.assert_close(torchdiv.jacobian_diagonal(f, x), ref, rtol=1e-6, atol=1e-8)
    assert split_plans == [True]
