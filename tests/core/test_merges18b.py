"""The watch's relaxations merged in the eighteenth session, attacked (rev-merges18b).

A truncating dense batch (PyG's ``to_dense_batch`` with ``max_num_nodes`` below a graph's
size: ``B * k + 1`` rows, the nodes cut off sent to the last, spare row, sliced off after)
is followed since leftovers18: the buffer is marked mixed by its spare row until a slice
cuts that row off, which then cleared the mark whatever else had made the buffer mixed.
Samples combined into it before or after that write went unrefused.

A tensor ``f`` builds from Python data (``torch.tensor([...])``) and then writes in place
was taken for state outside ``f`` (its storage made by no ATen op: ``lift_fresh`` aliases
it), compared between evaluations and refused as "wrote other values": on the paths that
evaluate ``f`` several times, and since leftovers18 on ``"auto"``'s recording then fallback.
Written with values computed from ``x``, its recorded ``lift_fresh`` replayed the written
memory: the Taylor Laplacian (``"auto"``'s plan) silently off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    assert_close,
    assert_same_parameter_gradients,
    laplacian_alone,
    laplacian_by_grad_of_grad,
)
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64
B, N, D, K = 3, 4, 2, 2  # samples, nodes a sample, features, places kept a sample


def _dense(h: torch.Tensor, form: str) -> torch.Tensor:
    """``to_dense_batch``'s truncating write of each sample's ``N`` nodes ``h`` (``(B * N,
    D)``) into ``K`` places each (sample 2 keeps only its first node, so its second place is
    never written), the others into the spare row, which is then sliced off; ``form``: how
    the buffer also gets values of several samples (a sum over the batch, or sample 1's node
    in sample 0's place), before or after that write."""
    node = torch.arange(B * N) % N
    at = torch.where(node < K, node + torch.arange(B).repeat_interleave(N) * K, B * K)
    at[2 * N + 1] = B * K
    dense = h.new_zeros(B * K + 1, D)
    if form == "sum before":
        dense[2 * K + 1] = h.sum(0)
    dense[at] = h
    if form == "sum after":
        dense[0] = h.sum(0)
    elif form == "other sample after":
        dense[1] = h[N]
    elif form == "other sample after, indexed":
        dense[torch.tensor([1])] = h[N : N + 1]
    return dense[:-1].reshape(B, K, D)


def _energy(form: str):
    weight = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(0))

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, D) @ weight)
        return (_dense(h, form).sum(1) ** 2).sum(-1)

    return energy


_FORMS = ["sum before", "sum after", "other sample after", "other sample after, indexed"]


@pytest.mark.parametrize("form", _FORMS)
def test_samples_combined_into_a_truncating_dense_batch_are_refused(form: str) -> None:
    """Failed before the fix (each sample's Laplacian silently of the batch's function): the
    slice cutting the spare row off cleared the buffer's mark, though a sum over the batch or
    another sample's node was written into a row kept."""
    x = torch.randn(B, N, D, dtype=f64)
    for method, probes in (("auto", None), ("hutchinson", 1)):
        with pytest.raises(BatchInteractionError, match="laplacian"):
            torchdiv.laplacian(_energy(form), x, method=method, num_probes=probes)


def test_a_truncating_dense_batch_alone_is_followed() -> None:
    """The same write with nothing else in the buffer: not refused (leftovers18's case)."""
    x = torch.randn(B, N, D, dtype=f64)
    assert torchdiv.laplacian(_energy("alone"), x).shape == (B,)


def _unsorted_energy(form: str):
    """Each sample's ``N`` nodes ``h`` (``(B * N, D)``) with another sample's node written
    into sample 0's first row or added to every row (``form``), sorted along the batch and
    gathered back into place (the identity, as PyG's median does it): mixed as before."""
    weight = torch.randn(D, D, dtype=f64, generator=torch.Generator().manual_seed(0))

    def energy(p: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(p.reshape(-1, D) @ weight)
        if form == "written in":
            mixed = h.clone()
            mixed[0] = h[N]
        else:
            mixed = h + h[N]
        values, order = mixed.sort(0)
        back = values.gather(0, order.argsort(0)).reshape(B, N, D)
        return (back.sum(1) ** 2).sum(-1)

    return energy


@pytest.mark.parametrize("form", ["written in", "added"])
def test_samples_combined_before_a_sort_and_gather_back_are_refused(form: str) -> None:
    """Failed before the fix: a sort along samples of a tensor that already mixed them was
    noted as one whose gather back holds each sample's own values (``_sorted``), and the
    gather cleared the mark of the earlier mixing (the same ``f`` without the sort is
    refused)."""
    x = torch.randn(B, N, D, dtype=f64)
    for method, probes in (("auto", None), ("hutchinson", 1)):
        with pytest.raises(BatchInteractionError, match="picked out of the batch"):
            torchdiv.laplacian(_unsorted_energy(form), x, method=method, num_probes=probes)


class _Shifted(nn.Module):
    """An ``lgamma`` MLP (no Taylor rule: ``"auto"``'s Laplacian records, then falls back)
    whose input is shifted by a constant built from a Python list and scaled in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tensor([0.5, -0.25, 0.125], dtype=x.dtype)
        shift.mul_(0.1)
        return self.b(torch.lgamma(self.a(x + shift).abs() + 1.5))


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse"])
def test_a_tensor_built_from_python_data_and_written_in_f_is_its_own(method: str) -> None:
    """Failed before the fix ("wrote other values"): values and parameter gradients of the
    Laplacian against grad of grad, float64."""
    torch.manual_seed(0)
    net = _Shifted().double()
    x = torch.rand(3, 3, dtype=f64)
    got = torchdiv.laplacian(net, x, method=method, chunk_size=1)
    want = torch.stack(
        [laplacian_by_grad_of_grad(lambda z, k=k: net(z)[:, k], x) for k in range(3)], 1
    )
    assert_close(got, want)
    assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse"])
def test_an_array_outside_f_written_through_from_numpy_is_put_back(method: str) -> None:
    """``torch.from_numpy`` also lifts (``lift_fresh``) memory, an array's, which may be
    state outside ``f`` (here a counter): still put back between evaluations, so each is
    one evaluation's (taking it for ``f``'s own, as ``torch.tensor``'s, gave a Laplacian off
    by 4e-3 with forward over reverse, the counter at 3)."""
    torch.manual_seed(0)
    net, counter = _Shifted().double(), np.zeros(3)

    def f(z: torch.Tensor) -> torch.Tensor:
        shift = torch.from_numpy(counter)
        shift.add_(1.0)
        return net.b(torch.lgamma(net.a(z + shift).abs() + 1.5))

    x = torch.rand(3, 3, dtype=f64)
    got = torchdiv.laplacian(f, x, method=method, chunk_size=1)
    once = lambda z: net.b(torch.lgamma(net.a(z + 1.0).abs() + 1.5))  # noqa: E731
    want = torch.stack(
        [laplacian_by_grad_of_grad(lambda z, k=k: once(z)[:, k], x) for k in range(3)], 1
    )
    assert_close(got, want)
    assert counter.tolist() == [1.0, 1.0, 1.0]


def _score(energy: nn.Module):
    """A score model written for inputs that require grad: ``grad(E(x).sum(), x)``."""
    return lambda x: torch.autograd.grad(energy(x).sum(), x, create_graph=True)[0]


def test_the_hint_for_a_score_in_a_laplacian_names_no_method_it_lacks() -> None:
    """Failed before the fix: ``laplacian(score, x)`` (``"auto"``; ``x`` without grad) was
    told "method='forward' cannot run a backward pass inside f: use 'auto' or 'reverse'",
    the method that had just raised and one the Laplacian has not. The way out named is the
    one that works (then ``"auto"`` runs)."""
    torch.manual_seed(0)
    score = _score(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double())
    x = torch.rand(4, 3, dtype=f64)
    with pytest.raises(RuntimeError, match="pass x with requires_grad=True") as info:
        torchdiv.laplacian(score, x)
    assert "use 'auto' or 'reverse'" not in str(info.value)
    assert "method='forward'" not in str(info.value)
    assert torchdiv.laplacian(score, x.requires_grad_(True)).shape == (4, 3)
    with pytest.raises(RuntimeError, match="method='forward' cannot run a backward pass"):
        torchdiv.divergence(score, x.detach(), method="forward")


def _gated(net: nn.Module):
    """``net``'s output scaled by a table built from a Python list, written in place with
    values computed from ``x`` (a gate) before use."""

    def f(x: torch.Tensor) -> torch.Tensor:
        table = torch.tensor([[1.0, 2.0, 3.0]] * x.shape[0], dtype=x.dtype)
        table.mul_(torch.tanh(x))
        table[:, 1] += x[:, 0] ** 2
        return net(x) * table

    return f


@pytest.mark.parametrize("method", ["auto", "taylor"])
def test_a_tensor_built_from_python_data_written_from_x_is_replayed_as_built(method: str):
    """Failed before the fix (0.84 off, on c53e7f7 too): the recording's ``lift_fresh``
    node read the tensor ``f`` then wrote in place, so its replays started from the written
    values. Values and parameter gradients against each sample alone by grad of grad."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.rand(4, 3, dtype=f64)
    f = _gated(net)
    want = torch.stack([laplacian_alone(lambda z, k=k: f(z)[:, k], x) for k in range(3)], 1)
    for _ in range(2):
        got = torchdiv.laplacian(f, x, method=method)
        assert_close(got, want)
        assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())
