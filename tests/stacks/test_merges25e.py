"""Merge review of taylormem25 (rev-merges25e): the Taylor replay's in-place writes
(``Context.overwrite``, ``jet.square_sum``'s accumulator), thresholds lowered so that small
networks take them."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from conftest import assert_close, laplacian_by_grad_of_grad
from torch import nn

import torchdiv
from torchdiv._taylor import jet

replay = importlib.import_module("torchdiv._taylor.propagate")  # (the package names its function)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_square_sums_keep_float_accumulation(monkeypatch, dtype: torch.dtype) -> None:
    """``sum_k jac_k^2`` over 512 directions in 16-bit: accumulated in place in the jac's own
    dtype, each addition rounded, the small squares stagnated against the growing sum (bf16:
    Laplacian 6 % off, float16 0.3 %; ``square().sum(0)`` reduces in float32: 0.13 %, 0.01 %).
    Reference: the closed form ``sum_j w2_j tanh''(z_j) |W1_j|^2`` in float64 at the same
    16-bit weights and inputs; tolerance: the dtype's ``eps`` (2^-7, 2^-10), relative."""
    monkeypatch.setattr(jet, "ACCUMULATED_NUMEL", 1)
    monkeypatch.setattr(jet, "ACCUMULATED_TOTAL", 1)
    torch.manual_seed(0)
    d = 512
    net = nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, 1), nn.Flatten(0))
    net = net.requires_grad_(False).to(dtype)
    x = torch.randn(4, d, dtype=dtype) * 0.25
    out = torchdiv.laplacian(net, x, method="taylor")
    w1, b1, w2 = (t.double() for t in (net[0].weight, net[0].bias, net[2].weight[0]))
    t = torch.tanh(x.double() @ w1.T + b1)
    expected = (w2 * -2 * t * (1 - t**2) * w1.square().sum(1)).sum(1)
    error = (out.double() - expected).norm() / expected.norm()
    assert error < torch.finfo(dtype).eps


class _Aliased(nn.Module):
    """Jets sharing storage the ways networks make them: a residual stream, one layer applied
    twice, ``chunk``/``unbind``/``narrow`` views of one jac read by different ops, ``x`` read
    twice (``x * 1`` passes its jac on), ``h + shift`` (passes ``h``'s jac on) dying at ``tanh``
    while ``h`` lives on, a ``view`` of ``h`` likewise."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(d, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.register_buffer("shift", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x * 1.0)) + torch.sin(x).sum(-1, keepdim=True)
        h = h + torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h)) + torch.tanh(h + self.shift) * torch.sigmoid(h - self.shift)
        h = torch.sin(h.view(-1, 2, 4)).flatten(1) * torch.tanh(h)
        p, q = h.chunk(2, -1)
        first = h.unbind(-1)[0]
        h = torch.cat([torch.tanh(p) * torch.sin(q), torch.exp(q)], -1) + first.unsqueeze(-1)
        return self.out(torch.tanh(h) + torch.cos(h.narrow(-1, 1, 1))).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_shared_jets_not_written_over(monkeypatch, mode, chunk_size: int | None) -> None:
    """Every jet written in place where it dies (thresholds 1), trained parameters under
    ``no_grad``/``inference_mode``: values = the float64 loop's, and ``x``, parameters and
    buffers bit-identical after the call."""
    monkeypatch.setattr(replay, "OVERWRITE_NUMEL", 1)
    monkeypatch.setattr(jet, "ACCUMULATED_NUMEL", 1)
    torch.manual_seed(3)
    net, x = _Aliased(), torch.randn(5, 4)
    kept = x.clone(), {k: t.clone() for k, t in net.state_dict().items()}
    with mode():
        out = torchdiv.laplacian(net, x, method="taylor", chunk_size=chunk_size)
    expected = laplacian_by_grad_of_grad(copy.deepcopy(net).double(), x.double())
    assert_close(out.detach(), expected.detach().float())
    torch.testing.assert_close(x, kept[0], rtol=0, atol=0)
    for k, t in net.state_dict().items():
        torch.testing.assert_close(t, kept[1][k], rtol=0, atol=0)
