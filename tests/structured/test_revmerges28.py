"""rev-merges28: the structured engine's kept recordings under ``torch.func`` transforms
around the call. References: float64 per-sample loops of ``autograd.grad``."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, loop_diagonal
from torch import nn
from torch.func import functional_call, grad, jvp, stack_module_state, vmap

import torchdiv
from torchdiv._taylor.jet import UnsupportedOp


def _net(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 4)).double()


@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
@pytest.mark.parametrize("transform", ["grad", "jvp"])
def test_a_kept_recording_is_not_checked_under_a_transform(transform: str, op: str) -> None:
    """A recording kept at a site (the second structure called there: the first call's
    template missed, the second's kept) was checked, not captured, under ``torch.func.grad``
    around the call: the checker's dispatch mode sees the transform's unwrapped tensors, so
    the divergence was computed from the parameters' plain values and their gradient (or
    tangent) through it was silently 0 (wrong by the whole gradient); ``capture`` refuses
    there, the check now too."""
    x = torch.randn(5, 4, dtype=torch.float64)
    first, second = _net(nn.Tanh()), _net(nn.SiLU())

    def loss(n: nn.Module, p: dict[str, torch.Tensor]) -> torch.Tensor:
        div = getattr(torchdiv, op)(lambda z: functional_call(n, p, (z,)), x, method="structured")
        return div.pow(2).sum()

    for n in (first, second):  # the same site (the lambda's code), two structures
        loss(n, dict(n.named_parameters()))
    params = {k: v.detach() for k, v in second.named_parameters()}
    with pytest.raises(UnsupportedOp, match=r"torch\.func transform"):
        if transform == "grad":
            grad(lambda p: loss(second, p))(params)
        else:
            tangents = {k: torch.ones_like(v) for k, v in params.items()}
            jvp(lambda p: loss(second, p), (params,), (tangents,))


def test_auto_under_grad_after_kept_recordings_is_the_loop() -> None:
    """``"auto"`` at the same sequence: the parameter gradients are the float64 loop's."""
    x = torch.randn(5, 4, dtype=torch.float64)
    first, second = _net(nn.Tanh()), _net(nn.SiLU())

    def loss(n: nn.Module, p: dict[str, torch.Tensor], method: str) -> torch.Tensor:
        return (
            torchdiv.divergence(lambda z: functional_call(n, p, (z,)), x, method=method)
            .pow(2)
            .sum()
        )

    for n in (first, second, second):
        loss(n, dict(n.named_parameters()), "auto")
    params = {k: v.detach() for k, v in second.named_parameters()}
    got = grad(lambda p: loss(second, p, "auto"))(params)
    want = torch.autograd.grad(
        loop_diagonal(second, x, create_graph=True).sum(-1).pow(2).sum(),
        list(second.parameters()),
        allow_unused=True,
    )
    for g, w in zip(got.values(), want, strict=True):
        assert_close(g, torch.zeros_like(g) if w is None else w)  # float64 tolerances


def test_an_ensemble_by_vmap_over_parameters_after_a_kept_recording() -> None:
    """``vmap`` over stacked parameters (an ensemble by ``functional_call``) at a site whose
    recording was kept: the check ran on the unwrapped parameters, and every member's
    divergence came out wrong (0.18 off), silently; refused now, as ``capture`` refuses."""
    x = torch.randn(5, 4, dtype=torch.float64)
    first, second = _net(nn.Tanh()), _net(nn.SiLU())

    def div(n: nn.Module, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torchdiv.divergence(lambda z: functional_call(n, p, (z,)), x, method="structured")

    for n in (first, second):
        div(n, dict(n.named_parameters()))
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(nn.Sequential(nn.Linear(4, 6), nn.SiLU(), nn.Linear(6, 4)).double())
    params, _ = stack_module_state(members)
    with pytest.raises(UnsupportedOp, match=r"torch\.func transform"):
        vmap(lambda p: div(second, p))(params)
