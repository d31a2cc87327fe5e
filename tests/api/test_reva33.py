"""rev-a33: the session's custom-op refusals, and what ``check_batch_independence`` and a
recording's undo put back.

A ``torch.library.custom_op`` with no derivative at all (no ``register_autograd``: a NumPy
kernel) cannot be differentiated by any method: plain autograd's backward pass raises
PyTorch's "no autograd formula was registered". The refusals of forward mode and of
``torch.func``'s reverse mode named ``method='auto'`` as the way out for every custom op,
and the backward pass's error said the op was called in another op's registered backward
(second derivatives), where ``f`` called it and a first derivative failed.
"""

from __future__ import annotations

import pytest
import torch

import torchdiv

f64 = torch.float64


@torch.library.custom_op("torchdiv_reva33::square", mutates_args=())
def _square(x: torch.Tensor) -> torch.Tensor:  # a NumPy kernel, no derivative registered
    return torch.from_numpy(x.detach().numpy() ** 2)


_square.register_fake(torch.empty_like)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 3, dtype=f64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["auto", "forward", "reverse"])
def test_a_custom_op_without_a_derivative_names_no_method(x: torch.Tensor, method: str) -> None:
    """Every method raises for it (plain autograd too): no message names one as a way out,
    each names the op and register_autograd."""
    with pytest.raises((RuntimeError, NotImplementedError)) as info:
        torchdiv.divergence(_square, x, method=method)
    lines = str(info.value).splitlines()
    text = " ".join([lines[0], *(line for line in lines if line.startswith("Hint:"))])
    assert "torchdiv_reva33" in text
    assert "has no derivative" in text and "register_autograd for" in text, text
    assert "use method=" not in text, text  # (no method runs it: none named as a way out)
    assert "a custom op's derivative (its register_autograd backward) calls" not in text
    # the message is true: plain autograd cannot take it either
    z = x.detach().requires_grad_(True)
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        torch.autograd.grad(_square(z).sum(), z)
