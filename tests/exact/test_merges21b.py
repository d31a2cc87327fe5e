"""Review of the chain (``_exact.chain``, merged from percall21): graphs a user's model makes
where reading the nodes' saved tensors outside a backward pass differs from the engine's pass."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, loop_diagonal, tanh_mlp
from torch.utils.checkpoint import checkpoint

import torchdiv
from torchdiv._exact import autograd


def test_a_checkpointed_chain_is_recomputed_once_per_pass_not_per_saved_tensor(monkeypatch):
    """A non-reentrant ``checkpoint`` around an MLP (saved-tensor hooks: each unpack outside a
    backward pass recomputes the region) took the chain, whose read of each saved tensor ran
    the MLP's forward again: 6 forwards for one D = 2 divergence of a 3-layer MLP against the
    engine's 3 (one, then one per pass). Now the engine, as before the chain: values and
    parameter gradients equal the loop's, float64."""
    torch.manual_seed(0)
    net = tanh_mlp(2, 8, 2)
    forwards: list[int] = []
    net.register_forward_pre_hook(lambda module, args: forwards.append(1))
    x = torch.randn(6, 2, dtype=torch.float64)
    want = loop_diagonal(net, x, create_graph=True)

    def f(z: torch.Tensor) -> torch.Tensor:
        return checkpoint(net, z, use_reentrant=False)

    torchdiv.divergence(f, x)
    counted = []
    for chain in (autograd.chain, lambda *args: None):  # as merged, then the engine alone
        monkeypatch.setattr(autograd, "chain", chain)
        del forwards[:]
        got = torchdiv.divergence(f, x)
        counted.append(len(forwards))
        assert_close(got, want.sum(-1))
        assert_same_parameter_gradients(net, got.sum(), want.sum())
    assert counted[0] <= counted[1], counted


@pytest.mark.parametrize(
    ("shape", "batch_dims"), [((3, 4, 2), 2), ((5, 1, 2), 1), ((2,), 0)], ids=str
)
def test_an_elementwise_chain_reads_entries_of_any_event_shape(chained, shape, batch_dims):
    """A chain of activations alone (``f = tanh``) on an ``x`` that is not ``(N, D)``: the
    chain's rows keep ``x``'s shape, and the diagonal entries were read as ``row[:, i]`` of
    ``(k,) + x.shape`` rather than of ``(k, N, D)`` as the engine's: batch_dims=2, an event
    ``(1, 2)`` and batch_dims=0 raised (an ``IndexError`` or a bad reshape). Closed form
    ``1 - tanh(x)^2``."""
    x = torch.randn(*shape, dtype=torch.float64)
    want = 1 - torch.tanh(x) ** 2
    for _ in range(2):  # (the second call: the chain)
        assert_close(torchdiv.jacobian_diagonal(torch.tanh, x, batch_dims=batch_dims), want)
        got = torchdiv.divergence(torch.tanh, x, batch_dims=batch_dims)
        assert_close(got, want.flatten(batch_dims).sum(-1))
    assert chained
