"""Merge review of rev-left24 (integer-list picks of one sample of a batch dimension followed
as partial picks): a picked column written by ``scatter`` into another column's places mixes
samples and must be refused, by ``"auto"``, ``"taylor"`` and ``"hutchinson"`` alike (after
rev-left24 ``x[:, [0]]`` there was accepted; ``x[:, 0:1]`` was accepted before it too).
``check_batch_independence`` (autograd across samples) confirms each program mixes; the
per-sample puts stay accepted, values and parameter gradients against float64 per-point
grad-of-grad."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, laplacians_by_grad_of_grad

import torchdiv

f64 = torch.float64
T, X = 2, 4


def _point_net() -> torch.nn.Module:
    """A per-point ``(x, t) -> u`` net on a ``(T, X, 2)`` grid, as DeepXDE/PINA-style codes."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        f64
    )


def _at(dim_size: tuple[int, ...], i: int) -> torch.Tensor:
    return torch.full(dim_size, i)


# one sample of a batch dimension scattered into another sample's places
MIXING = {
    "list_into_other_column": lambda net, z: net(z).scatter(1, _at((T, 1, 1), 2), net(z[:, [0]])),
    "slice_into_other_column": lambda net, z: net(z).scatter(1, _at((T, 1, 1), 2), net(z[:, 0:1])),
    "scatter_add_into_other": lambda net, z: net(z).scatter_add(
        1, _at((T, 1, 1), 3), net(z[:, [-4]])
    ),
    "first_batch_dim": lambda net, z: net(z).scatter(0, _at((1, X, 1), 1), net(z[[0]])),
    "along_the_features": lambda net, z: net(z).scatter(2, _at((T, 1, 1), 0), net(z[:, [1]])),
}
# with batch_dims=1, on (T * X, 2) points: x[[i]] is a whole pick (``tr.picks``), not followed
# by the scatter's check before (accepted before rev-left24 too)
MIXING_1 = {
    "row_into_other_row": lambda net, z: net(z).scatter(0, _at((1, 1), 2), net(z[[0]])),
    "row_into_zeros": lambda net, z: torch.zeros(T * X, 1, dtype=f64).scatter(
        0, _at((1, 1), 5), net(z[[1]])
    ),
}
PER_SAMPLE_1 = {
    "row_into_own_row": lambda net, z: net(z).scatter(0, _at((1, 1), 2), net(z[[2]])),
}
PER_SAMPLE = {
    "list_into_own_column": lambda net, z: net(z).scatter(1, _at((T, 1, 1), 0), net(z[:, [0]])),
    "slice_into_own_column": lambda net, z: net(z).scatter(1, _at((T, 1, 1), 1), net(z[:, 1:2])),
    "first_batch_dim_own": lambda net, z: net(z).scatter(0, _at((1, X, 1), 1), net(z[[1]])),
}


def _grid() -> torch.Tensor:
    return torch.rand(T, X, 2, dtype=f64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", ["auto", "taylor", "hutchinson"])
@pytest.mark.parametrize("name", sorted(MIXING))
def test_a_picked_sample_scattered_into_other_places_is_refused(name: str, method: str) -> None:
    """``u.scatter(1, [[[2]]] * T, g(x[:, [0]]))``: column 2's output is column 0's; the
    scatter's check followed the rows only, not the partial pick of the second batch
    dimension, so "auto" and "hutchinson" returned values for a ``f`` whose Jacobian has
    off-sample blocks (``check_batch_independence`` refuses it) instead of refusing it."""
    net, x = _point_net(), _grid()
    f = lambda z: MIXING[name](net, z)  # noqa: E731
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.check_batch_independence(f, x, batch_dims=2)
    extra = {"num_probes": 4} if method == "hutchinson" else {}
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.laplacian(f, x, batch_dims=2, method=method, **extra)


@pytest.mark.parametrize("method", ["auto", "hutchinson"])
@pytest.mark.parametrize("name", sorted(MIXING_1))
def test_a_picked_row_scattered_into_other_rows_is_refused(name: str, method: str) -> None:
    """``u.scatter(0, [[2]], g(x[[0]]))`` with ``batch_dims=1``: row 2's output is row 0's."""
    net, x = _point_net(), _grid().reshape(-1, 2)
    f = lambda z: MIXING_1[name](net, z)  # noqa: E731
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.check_batch_independence(f, x)
    extra = {"num_probes": 4} if method == "hutchinson" else {}
    with pytest.raises(torchdiv.BatchInteractionError):
        torchdiv.laplacian(f, x, method=method, **extra)


@pytest.mark.parametrize("name", sorted(PER_SAMPLE) + sorted(PER_SAMPLE_1))
def test_a_picked_sample_scattered_into_its_own_places_is_kept(name: str) -> None:
    """The same puts into the picked sample's own places are per point: values and parameter
    gradients equal the float64 per-point loop's."""
    net, x = _point_net(), _grid()
    if name in PER_SAMPLE_1:
        got = torchdiv.laplacian(lambda z: PER_SAMPLE_1[name](net, z), x.reshape(-1, 2))
    else:
        got = torchdiv.laplacian(lambda z: PER_SAMPLE[name](net, z), x, batch_dims=2)
    want = laplacians_by_grad_of_grad(net, x.reshape(-1, 2)).reshape(got.shape)
    assert_close(got, want)
    assert_same_parameter_gradients(net, (got**2).sum(), (want**2).sum())
