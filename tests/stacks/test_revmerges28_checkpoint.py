"""rev-merges28: calls inside the caller's non-reentrant checkpoint region after f1510f2e
(only ``dispatch.evaluate``'s generic engines keep their saves apart): the explicit forward
mode, the grad-of-grad Laplacian under a selective checkpoint, and a flow whose ``f``
checkpoints too. Reference: the same loss without the checkpoint (values, gradients in x
and the parameters)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

import torchdiv


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _policy(ctx, op, *args, **kwargs):  # type: ignore[no-untyped-def]
    return (
        CheckpointPolicy.MUST_SAVE
        if op == torch.ops.aten.mm.default
        else CheckpointPolicy.PREFER_RECOMPUTE
    )


def _same_as_unchecked(call, selective: bool = False) -> None:  # type: ignore[no-untyped-def]
    """``call(h)`` inside a region (``h = 1.5 x``) against the region without checkpoint."""
    x = torch.randn(8, 3, dtype=torch.float64)
    weights = torch.arange(1, 9, dtype=torch.float64)

    def region(z: torch.Tensor) -> torch.Tensor:
        h = z * 1.5
        return (call(h) * weights).sum() + h.sum()

    params = list(_NET.parameters())
    plain = x.clone().requires_grad_(True)
    want = region(plain)
    want_grads = torch.autograd.grad(want, [plain, *params], allow_unused=True)
    checked = x.clone().requires_grad_(True)
    context = (
        functools.partial(create_selective_checkpoint_contexts, _policy) if selective else None
    )
    kwargs = {"context_fn": context} if context is not None else {}
    got = checkpoint(region, checked, use_reentrant=False, **kwargs)
    grads = torch.autograd.grad(got, [checked, *params], allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64, the same ops
    for g, w in zip(grads, want_grads, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


_NET = _net()


def test_explicit_forward_mode_inside_a_checkpoint_around_the_call() -> None:
    """``method="forward"``: its saves are the checkpoint's again, and its look for a
    checkpoint *in* ``f`` refused the call ("forward mode cannot differentiate through
    torch.utils.checkpoint"); right at 22acb900 (apart at the public call)."""
    _same_as_unchecked(lambda h: torchdiv.divergence(_NET, h, method="forward"))


def test_grad_of_grad_laplacian_inside_a_selective_checkpoint() -> None:
    """Its backward passes inside the call went through the region's saves: PyTorch's
    "backward once on any region computed under selective activation checkpoint"."""
    _same_as_unchecked(
        lambda h: torchdiv.laplacian(_NET, h, method="grad-of-grad").sum(-1), selective=True
    )


def test_a_flow_whose_f_checkpoints_inside_a_checkpoint_around_the_call() -> None:
    """``log_likelihood`` with a checkpoint in ``f`` and one around the call: PyTorch's
    internal "early_stop is set" assertion."""

    def velocity(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return checkpoint(_NET, z, use_reentrant=False)

    def normal(z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.pow(2).sum(-1)

    _same_as_unchecked(
        lambda h: torchdiv.flows.log_likelihood(
            velocity, h, 0.0, 0.5, normal, solver="rk4", options={"step_size": 0.25}
        )
    )
