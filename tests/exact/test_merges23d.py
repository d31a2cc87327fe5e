"""Review of the chain's trace by cyclicity and the diagonal's unit rows (``_exact.chain``,
merge of percall23): layouts and gates the merge's own tests do not reach, against
float64 closed forms and per-sample ``autograd.grad`` loops."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import torchdiv


def _full_diagonal(f, x: torch.Tensor) -> torch.Tensor:
    """The diagonal of ``f``'s Jacobian over the whole of ``x`` (one sample), ``x.shape``."""
    jac = torch.autograd.functional.jacobian(f, x)
    return jac.reshape(x.numel(), x.numel()).diagonal().reshape(x.shape)


def test_an_unbatched_column_is_one_sample_of_two_entries(unit_rows):
    """``batch_dims=0`` with ``x`` of shape ``(2, 1)``: one sample whose event is both rows
    (two entries, one pass each), not the top layer's rows of a ``(N, n)`` batch (its weight
    has one row: the divergence summed one entry)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)
    ).double()
    x = torch.randn(2, 1, dtype=torch.float64)
    want = _full_diagonal(net, x)
    assert_close(torchdiv.divergence(net, x, batch_dims=0), want.sum())
    assert_close(torchdiv.jacobian_diagonal(net, x, batch_dims=0), want)
    assert not any(unit_rows)


class _Shared(torch.nn.Module):
    """One ``Linear`` applied three times (weight tying), twice in a row: two adjacent steps,
    merged, read the same weight, and a third below the ``tanh``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.layer(self.layer(torch.tanh(self.layer(h))))


class _Raw(torch.nn.Module):
    """``addmm`` with ``alpha`` and ``beta`` over an ``(in, out)`` weight used as it is (no
    transpose node): ``beta * b + alpha * h @ W``."""

    def __init__(self, d_in: int, d_out: int, alpha: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.bias = torch.nn.Parameter(torch.randn(d_out))
        self.alpha = alpha

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, h, self.weight, beta=2.0, alpha=self.alpha)


_L = torch.nn.Linear
# layouts the merge's tests do not build, each traced by cyclicity
LAYOUTS = {
    "kinked merged activations": lambda d: [
        _L(d, 8),
        torch.nn.ReLU(),
        torch.nn.LeakyReLU(-0.5),
        _L(8, 8),
        torch.nn.LeakyReLU(2.5),
        _L(8, d),
    ],
    "alpha, beta, untransposed weights": lambda d: [
        _Raw(d, 8, -1.5),
        torch.nn.Tanh(),
        _Raw(8, 8, 0.3),
        torch.nn.Sigmoid(),
        torch.nn.Tanh(),
        _Raw(8, d, 1.0),
    ],
    "a weight shared by merged linears": lambda d: [torch.nn.Sigmoid(), _Shared(d)],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_cnf_regulariser_through_the_trace_gives_the_loop_s_gradients(chain_traced, layout):
    """The CNF / score-matching regulariser ``|grad_x div f|^2 + div f^2``: its gradient in
    the parameters (second order in them through ``x``'s) and in ``x`` (a third derivative of
    ``f``), through the trace by cyclicity, equal those of the float64 per-row loop."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*LAYOUTS[layout](2)).double()
    x = torch.randn(8, 2, dtype=torch.float64)
    x[0] = 0.0  # (every kink at 0 reached: ReLU's and LeakyReLU's subgradient conventions)
    torchdiv.divergence(net, x.requires_grad_())  # (the first call of a structure: watched)
    del chain_traced[:]
    ours = torchdiv.divergence(net, x)
    assert chain_traced == [True]
    z = x.view_as(x)
    y = net(z)
    rows = [torch.autograd.grad(y[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2)]
    theirs = rows[0] + rows[1]
    losses = []
    for value in (ours, theirs):
        (slope,) = torch.autograd.grad(value.sum(), x, create_graph=True)
        losses.append(slope.square().sum() + value.square().sum())
    params = [x, *net.parameters()]
    for a, b in zip(
        torch.autograd.grad(losses[0], params, materialize_grads=True),
        torch.autograd.grad(losses[1], params, materialize_grads=True),
        strict=True,
    ):
        assert_close(a, b)
