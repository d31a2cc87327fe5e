"""Review of the chain's trace by cyclicity and the diagonal's unit rows (``_exact.chain``,
merge of percall23): layouts and gates the merge's own tests do not reach, against
float64 closed forms and per-sample ``autograd.grad`` loops."""

from __future__ import annotations

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
