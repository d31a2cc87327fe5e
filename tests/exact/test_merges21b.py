"""Review of the chain (``_exact.chain``, merged from percall21): graphs a user's model makes
where reading the nodes' saved tensors outside a backward pass differs from the engine's pass."""

from __future__ import annotations

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
    for chain in (autograd.chain, lambda y, x: None):  # as merged, then the engine alone
        monkeypatch.setattr(autograd, "chain", chain)
        del forwards[:]
        got = torchdiv.divergence(f, x)
        counted.append(len(forwards))
        assert_close(got, want.sum(-1))
        assert_same_parameter_gradients(net, got.sum(), want.sum())
    assert counted[0] <= counted[1], counted
