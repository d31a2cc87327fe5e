"""Review of rev-pinn23's merge (rev-merges23b): the watch follows a sample picked along one of
several batch dimensions (``x[:, 0]`` or ``x[:, 0:1]`` of a ``(T, X, 2)`` grid taken with
``batch_dims=2``: grid column 0 beside every time slice) and refuses it where combined with
that dimension's samples. Two ways such a pick still reached the output of ``f`` in place of
other samples passed ``"auto"``, ``"taylor"`` and ``"hutchinson"`` (Taylor's Laplacian silently
another; with ``batch_dims=1`` both were refused): the pick broadcast along its dimension
(``expand``, ``repeat``, a ``stack`` of it alone) and a pick written into another column's
place of a fresh buffer (``y[:, i] = net(x[:, i + 1])``). The per-column and per-time-slice
codes that write each column or slice to its own place keep their grad-of-grad values.
Columns restacked in order (``torch.stack([net(x[:, i]) for i in range(X)], 1)``) were not
followed as that batch dimension again, so a mean over them afterwards passed; samples picked
alone and joined in another order (any ``batch_dims``) were not followed at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from conftest import laplacian_by_grad_of_grad, sampled_daily

import torchdiv

f64 = torch.float64
T, X = 3, 4

Grid = Callable[[torch.Tensor], torch.Tensor]


def _net() -> Callable[[torch.Tensor], torch.Tensor]:
    """A model written for ``(N, 2)`` rows of ``(x, t)`` points: ``(..., 2) -> (..., 1)``."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        f64
    )


def _columns(net, order: list[int], select: bool) -> Grid:
    """Column ``i`` of a fresh buffer written from column ``order[i]`` of the grid (a select
    ``x[:, j]`` or a slice ``x[:, j:j + 1]``), as a per-column loop writes it."""

    def f(z: torch.Tensor) -> torch.Tensor:
        y = z.new_zeros(T, X, 1)
        for i, j in enumerate(order):
            if select:
                y[:, i] = net(z[:, j])
            else:
                y[:, i : i + 1] = net(z[:, j : j + 1])
        return y

    return f


MIXING: dict[str, Callable[..., Grid]] = {
    "expand": lambda net: lambda z: net(z[:, 0:1].expand(T, X, 2)),
    "repeat": lambda net: lambda z: net(z[:, :1].repeat(1, X, 1)),
    "stack_of_one": lambda net: lambda z: torch.stack([net(z[:, 0])] * X, 1),
    "cat_of_one": lambda net: lambda z: torch.cat([net(z[:, -1:])] * X, 1),
    "shifted_columns": lambda net: _columns(net, [1, 2, 3, 0], True),
    "swapped_slices": lambda net: _columns(net, [1, 0, 2, 3], False),
}


def _restacked(net, dim: int, pieces: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``net`` on each grid column (``dim`` 1) or time slice (``dim`` 0) alone, joined back
    in order (``"stack"`` of selects, ``"cat"`` of one-long slices)."""

    def f(z: torch.Tensor) -> torch.Tensor:
        if pieces == "stack":
            return torch.stack([net(p) for p in z.unbind(dim)], dim)
        return torch.cat([net(p) for p in z.split(1, dim)], dim)

    return f


def _centred(y: torch.Tensor, dim: int) -> torch.Tensor:
    return y - y.mean(dim, keepdim=True)


AFTER_RESTACK: dict[str, tuple[Callable[..., Grid], str]] = {
    "mean_over_columns": (
        lambda net: lambda z: _centred(_restacked(net, 1, "stack")(z), 1),
        "a mean over samples",
    ),
    "mean_over_slices": (
        lambda net: lambda z: _centred(_restacked(net, 0, "stack")(z), 0),
        "a mean over samples",
    ),
    "roll_of_columns": (
        lambda net: lambda z: _restacked(net, 1, "cat")(z).roll(1, 1),
        "moved samples",
    ),
    "cumsum_of_columns": (
        lambda net: lambda z: _restacked(net, 1, "cat")(z).cumsum(1),
        "cumsum",
    ),
}

PER_SAMPLE: dict[str, Callable[..., Grid]] = {
    "columns_in_place": lambda net: _columns(net, [0, 1, 2, 3], True),
    "slices_in_place": lambda net: _columns(net, [0, 1, 2, 3], False),
    "stack_of_columns": lambda net: lambda z: torch.stack([net(z[:, i]) for i in range(X)], 1),
    "boundary_column": lambda net: lambda z: torch.cat([torch.sin(z[:, :1, :1]), net(z[:, 1:])], 1),
    "restacked_slices": lambda net: lambda z: torch.tanh(_restacked(net, 0, "cat")(z)),
}


def _laplacian(f: Grid, x: torch.Tensor, method: str, batch_dims: int = 2) -> torch.Tensor:
    probes = torch.randn(3, *x.shape, dtype=f64) if method == "hutchinson" else None
    return torchdiv.laplacian(f, x, batch_dims=batch_dims, method=method, probes=probes)


@pytest.mark.parametrize(
    "name", sampled_daily(sorted(MIXING), set(MIXING) - {"expand", "shifted_columns"})
)
def test_one_column_put_in_other_columns_places_is_refused(name: str) -> None:
    """Grid column ``j`` feeding the output at column ``i != j`` is refused, naming it, by
    every method that watches."""
    f = MIXING[name](_net())
    x = torch.randn(T, X, 2, dtype=f64)
    for method in ("auto", "taylor", "hutchinson"):
        with pytest.raises(torchdiv.BatchInteractionError, match=r"picked out|moved samples"):
            _laplacian(f, x, method)


@pytest.mark.parametrize(
    "name", sampled_daily(sorted(PER_SAMPLE), set(PER_SAMPLE) - {"columns_in_place"})
)
def test_each_column_in_its_own_place_keeps_its_laplacian(name: str) -> None:
    """Per-column codes: the grad-of-grad loop's Laplacians on the flattened points, by every
    method."""
    f = PER_SAMPLE[name](_net())
    x = torch.randn(T, X, 2, dtype=f64)
    want = laplacian_by_grad_of_grad(lambda p: f(p.reshape(T, X, 2)).reshape(-1), x.reshape(-1, 2))
    for method in ("auto", "taylor", "forward-over-reverse", "hessian", "grad-of-grad"):
        got = _laplacian(f, x, method)
        torch.testing.assert_close(got, want.reshape(T, X, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "name", sampled_daily(sorted(AFTER_RESTACK), set(AFTER_RESTACK) - {"mean_over_columns"})
)
def test_a_restacked_batch_dimension_is_followed_again(name: str) -> None:
    """Columns or slices joined back in order hold that batch dimension again: a mean, a roll
    or a cumulative sum along it afterwards mixes samples (it was followed no more: auto and
    taylor answered, Taylor silently another; refused with ``batch_dims=1``)."""
    make, what = AFTER_RESTACK[name]
    f = make(_net())
    x = torch.randn(T, X, 2, dtype=f64)
    for method in ("auto", "taylor", "hutchinson"):
        with pytest.raises(torchdiv.BatchInteractionError, match=what):
            _laplacian(f, x, method)


REVERSED: dict[str, tuple[Callable[..., Grid], int]] = {
    "rows": (lambda net: lambda z: torch.cat([net(z[i : i + 1]) for i in range(3, -1, -1)]), 1),
    "columns": (
        lambda net: lambda z: torch.stack([net(z[:, i]) for i in range(X - 1, -1, -1)], 1),
        2,
    ),
}


@pytest.mark.parametrize("name", sampled_daily(sorted(REVERSED), {"rows"}))
def test_samples_restacked_in_another_order_are_put_back_or_refused(name: str) -> None:
    """Samples picked alone and joined in reverse order sit in other samples' places: refused
    (they were followed no more, with one batch dimension too: Taylor silently another);
    flipped back, the grad-of-grad loop's Laplacians."""
    make, batch_dims = REVERSED[name]
    net = _net()
    f = make(net)
    x = torch.randn(*((4,) if batch_dims == 1 else (T, X)), 2, dtype=f64)
    for method in ("auto", "taylor", "hutchinson"):
        with pytest.raises(torchdiv.BatchInteractionError, match="moved samples"):
            _laplacian(f, x, method, batch_dims)
    back = lambda z: f(z).flip(batch_dims - 1)  # noqa: E731
    got = torchdiv.laplacian(back, x, batch_dims=batch_dims, method="auto")
    flat = x.reshape(-1, 2)
    want = laplacian_by_grad_of_grad(lambda p: back(p.reshape(x.shape)).reshape(-1), flat)
    torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-10, atol=1e-10)


def test_a_row_of_a_matrix_over_pairs_of_samples_is_no_pick() -> None:
    """``w[0, 1] = 0.5`` into packed attention weights ``(B N, B N)`` (the batch along both
    dimensions, zero across samples): its row ``w[0]`` is no sample beside other batch
    dimensions; the refusal names the write across samples (the merge took the row for a
    partial pick and named that)."""
    weight = torch.randn(2, 2, dtype=f64)
    batch = torch.arange(3).repeat_interleave(2)
    mask = torch.zeros(6, 6, dtype=f64).masked_fill(batch[:, None] != batch[None, :], -math.inf)

    def f(z: torch.Tensor) -> torch.Tensor:
        h = (z @ weight).reshape(6, 2)
        w = torch.softmax(h @ h.T + mask, -1).clone()
        w[0, 2] = 0.5
        return (w @ h).reshape(3, 2, 2)

    with pytest.raises(torchdiv.BatchInteractionError, match="summing over samples"):
        torchdiv.divergence(f, torch.randn(3, 2, 2, dtype=f64))
