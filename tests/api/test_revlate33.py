"""rev-late33: late review of the session's error and refusal paths (``_api/reporting.py``,
``_core/modes.py``'s ``underived``, forward mode's and the Taylor recorder's refusals).

Each test pins a fault found: a refusal's hint that says something untrue of the call, or a way
out that fails. References: the closed forms of ``f`` in float64 (exact to rounding)."""

from __future__ import annotations

import pytest
import torch

import torchdiv


def _geqrf(z: torch.Tensor) -> torch.Tensor:
    """An op of ``f`` PyTorch has no derivative for at all (``geqrf``: "the derivative for
    'geqrf' is not implemented" from the first backward pass)."""
    return torch.geqrf(z.reshape(z.shape[0], 2, 2))[0].reshape(z.shape)


@pytest.mark.parametrize(
    "call",
    [
        lambda x: torchdiv.divergence(_geqrf, x),
        lambda x: torchdiv.jacobian(_geqrf, x, method="reverse"),
        lambda x: torchdiv.laplacian(_geqrf, x, method="grad-of-grad"),
    ],
    ids=["divergence", "jacobian", "laplacian"],
)
def test_an_op_of_f_without_any_derivative_is_not_called_a_second_derivative(call) -> None:
    """``geqrf`` applied by ``f`` itself has no first derivative: the hint said
    "which divergence's second derivatives of f ... need: write that part of f with ops PyTorch
    differentiates twice", untrue of a first-order call and of the cause."""
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError) as info:
        call(x)
    hint = str(info.value).partition("Hint: ")[2]
    assert "'geqrf'" in hint and "second derivatives" not in hint
    assert "differentiates twice" not in hint
    # the hint's claim: plain autograd cannot take f's first derivative through it
    y = x.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="derivative for 'geqrf'"):
        torch.autograd.grad(_geqrf(y).sum(), y)
