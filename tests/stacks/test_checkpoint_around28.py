"""A torchdiv call inside the caller's non-reentrant ``torch.utils.checkpoint`` region (around
the call, not inside ``f``): the saved tensors of the engines that take backward passes are
kept apart from the checkpoint's (``_core.modes.saves_apart``). Before, every backward pass
the call took inside
the region set off the region's recomputation in the middle of its forward: ``"auto"`` on a
small problem ended in PyTorch's ``CheckpointError``, Hutch++ in its internal assertion
"early_stop is set", XTrace in recomputed tensors of other shapes. Reference: the same loss
without the checkpoint (the default generator's state is restored by the checkpoint for its
recomputation, so the estimators draw the same probes), values, parameter and input
gradients, float64."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_close
from torch.utils.checkpoint import checkpoint

import torchdiv


def _net(d_out: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, d_out))
    return net.double()


CALLS: dict[str, tuple[int, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]]] = {
    "divergence auto": (3, lambda f, x: torchdiv.divergence(f, x)),
    "divergence hutchinson": (
        3,
        lambda f, x: torchdiv.divergence(f, x, method="hutchinson", num_probes=2),
    ),
    "divergence hutch++": (
        3,
        lambda f, x: torchdiv.divergence(f, x, method="hutch++", num_probes=6),
    ),
    "divergence xtrace": (3, lambda f, x: torchdiv.divergence(f, x, method="xtrace", num_probes=6)),
    "jacobian_diagonal auto": (3, lambda f, x: torchdiv.jacobian_diagonal(f, x)),
    "jacobian auto": (3, lambda f, x: torchdiv.jacobian(f, x)),
    "laplacian auto": (1, lambda f, x: torchdiv.laplacian(f, x)),
}


@pytest.mark.parametrize("x_grad", [False, True], ids=["params", "params+x"])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("name", CALLS)
def test_a_call_inside_a_checkpoint_region(name: str, squared: bool, x_grad: bool) -> None:
    """``squared``: the loss a weighted sum of the result's squares (the region saves the
    result), else its sum (it saves nothing of the call's: a fresh call's watched first
    evaluation had saved other tensors than its recomputation)."""
    d_out, call = CALLS[name]
    net = _net(d_out)
    params = list(net.parameters())
    torch.manual_seed(1)
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss(z: torch.Tensor) -> torch.Tensor:
        result = call(net, z)
        if not squared:
            return result.sum()
        weights = torch.arange(1.0, 5.0, dtype=z.dtype).reshape(4, *[1] * (result.dim() - 1))
        return (result.square() * weights).sum()

    for _ in range(2):  # the first call at this structure (watched), then a later one
        z = x.clone().requires_grad_(x_grad)
        torch.manual_seed(2)
        got = checkpoint(loss, z, use_reentrant=False)
        inputs = [z, *params] if x_grad else params
        grads = torch.autograd.grad(got, inputs, allow_unused=True, materialize_grads=True)
        w = x.clone().requires_grad_(x_grad)
        torch.manual_seed(2)
        want = loss(w)
        inputs = [w, *params] if x_grad else params
        wanted = torch.autograd.grad(want, inputs, allow_unused=True, materialize_grads=True)
        assert_close(got, want)  # float64: the dtype's tolerances (conftest)
        for g, v in zip(grads, wanted, strict=True):
            assert_close(g, v)
