"""Review of the percall24 and lapcall24 merges (rows for diagonals of at most two entries,
``walk.batched_vjp`` without ``_vmap``'s wrapper, ``value_grad_laplacian``'s loop rule for
chosen coordinates, the one-input loop's plan kept per structure). No fault found; this
guards the one new piece of kept state: the one-input loop's ``loop.Settings`` (``f``
evaluated plain where its graph allows, the chain's forward Laplacian where the call keeps
no graph), shared by every call at a structure, through what a training loop changes
between calls.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, assert_same_parameter_gradients, laplacian_by_grad_of_grad
from torch import nn

import torchdiv
from torchdiv import BatchInteractionError

f64 = torch.float64


def _by_hand(net: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    """``net(z)`` with its layer norms written out (PyTorch's fused one has a wrong third
    derivative: the Laplacian's parameter gradients), its hooks called."""
    for layer in net:
        if isinstance(layer, nn.LayerNorm):
            centred = z - z.mean(-1, keepdim=True)
            scale = (centred.square().mean(-1, keepdim=True) + layer.eps).rsqrt()
            z = centred * scale * layer.weight + layer.bias
        else:
            z = layer(z)
    return z


def test_the_one_input_plan_follows_a_training_loop_s_changes():
    """A 1-D Poisson residual's ``u''`` at batch 8 (``"auto"``: the loop, a plan kept for the
    module's structure), called as a training loop does between steps: trained, under
    ``no_grad`` (validation), frozen, with a forward hook added, with a layer norm swapped in
    (an op the plan must evaluate under the modes) and trained again; a lambda mixing the
    samples over the same module is refused. Values and parameter gradients as the float64
    grad-of-grad loop at each call."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    net = net.to(f64)
    x = torch.rand(8, 1, dtype=f64)

    def check(trained: bool = True) -> None:
        got = torchdiv.laplacian(net, x)[:, 0]
        want = laplacian_by_grad_of_grad(lambda z: _by_hand(net, z)[:, 0], x)
        assert_close(got, want)
        if trained:
            assert_same_parameter_gradients(net, got.square().sum(), want.square().sum())

    check()
    with torch.no_grad():
        got = torchdiv.laplacian(net, x)
    assert not got.requires_grad
    check()
    net.requires_grad_(False)
    check(trained=False)
    net.requires_grad_(True)
    net[1].register_forward_hook(lambda module, args, out: out + 0.5 * out.square())
    check()
    net[3] = nn.LayerNorm(8, dtype=f64)  # (a layer swapped: a guarded op)
    check()
    net.requires_grad_(False)
    check(trained=False)
    net.requires_grad_(True)
    check()
    with pytest.raises(BatchInteractionError):
        torchdiv.laplacian(lambda z: net(z) - net(z).mean(0), x)
