"""rev-late30: d5aebae1's last contraction, a batched product for blocks of two columns or
more and a product and its sum for one column, on blocks that mix both (a width of 7 in
blocks of 3: 3, 3, 1; of 1: every block one column), a shared unit diagonal before the last
matrix (``d`` of shape ``(1, w)``) and the columns of the first matrix carried alone (``v``
of shape ``(1, k, w)``); and a compiled call (``dynamic=True``) whose batch sizes change.
References: per-sample ``autograd.grad`` loops, float64 (conftest's tolerances)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, carried_columns, loop_diagonal
from torch import nn

import torchdiv
from torchdiv._structured import cycle

f64 = torch.float64


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 7), nn.Linear(7, 8), nn.Tanh(), nn.Linear(8, 7)
    ).to(f64)  # (two linear layers in a row: a unit diagonal between two matrices)


@pytest.mark.parametrize("chunk_size", [1, 3, 6])
def test_blocks_of_one_column_and_more_with_their_gradients(chunk_size: int) -> None:
    torch.manual_seed(0)
    f = _mlp()
    x = torch.randn(4, 7, dtype=f64)
    params = list(f.parameters())
    want = loop_diagonal(f, x, create_graph=True)
    got = torchdiv.jacobian_diagonal(f, x, method="structured", chunk_size=chunk_size)
    assert_close(got, want.detach())
    unused = {"allow_unused": True, "materialize_grads": True}  # (the last bias: none)
    for g, w in zip(
        torch.autograd.grad(got.tanh().sum(), params, **unused),
        torch.autograd.grad(want.tanh().sum(), params, **unused),
        strict=True,
    ):
        assert_close(g, w)


def test_entries_of_one_sample_row_shared_diagonals() -> None:
    """``d`` of shape ``(1, w)`` and ``v`` of ``(1, k, w)`` in every block (no per-sample
    diagonal): the dense product's diagonal."""
    torch.manual_seed(0)
    s1, s2, s3 = (torch.randn(5, 5, dtype=f64) for _ in range(3))
    d1, d2 = torch.randn(1, 5, dtype=f64), torch.ones(1, 5, dtype=f64)
    want = (s3 @ (d2[0, :, None] * s2) @ (d1[0, :, None] * s1)).diagonal()
    for chunk in (1, 2, 4, 5):
        got = cycle._entries([s1, s2, s3], [d1, d2], chunk)
        assert got.shape == (1, 5)
        assert_close(got[0], want)


@pytest.mark.slow
def test_a_compiled_call_whose_batch_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 elements: the replay recorded at 2 rows carries 3 columns a block (3, 3,
    1), at 5 rows and more one; each batch's diagonal equals the loop's."""
    carried = carried_columns(monkeypatch)
    monkeypatch.setattr(cycle, "BLOCK_ELEMENTS", 64)
    torch.manual_seed(0)
    f = _mlp()

    def diagonal(z: torch.Tensor) -> torch.Tensor:
        return torchdiv.jacobian_diagonal(f, z, method="structured")

    compiled = torch.compile(diagonal, dynamic=True, backend="eager")
    for n in (2, 5, 3, 64, 2):
        x = torch.randn(n, 7, dtype=f64)
        assert_close(compiled(x), loop_diagonal(f, x))
    assert 1 in carried and max(carried) > 1
