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


@torch.library.custom_op("torchdiv_reva33::cube", mutates_args=())
def _cube(x: torch.Tensor) -> torch.Tensor:
    return x**3


_cube.register_fake(torch.empty_like)


def _cube_backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors  # type: ignore[attr-defined]
    return grad * 3 * x**2


def _save_input(ctx: object, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
    ctx.save_for_backward(inputs[0])  # type: ignore[attr-defined]


_cube.register_autograd(_cube_backward, setup_context=_save_input)


def test_biharmonic_taylor_refusal_of_a_custom_op_names_a_way_that_runs(x: torch.Tensor) -> None:
    """``biharmonic(method="taylor")`` has no rule for a custom op; its refusal named
    ``method='auto'``, whose forward over reverse refuses the op as well. The way it names
    runs, and gives the closed form: ``f = sum x**4 + x_0 * x_1**3`` per sample (the op
    cubes), ``Δ²f = 24 n``, the mixed term's ``Δ² = 0``, float64 to rounding."""

    def f(z: torch.Tensor) -> torch.Tensor:
        return (z * _cube(z)).sum(-1) + z[:, 0] * _cube(z[:, 1])

    with pytest.raises(NotImplementedError, match="torchdiv_reva33") as info:
        torchdiv.biharmonic(f, x, method="taylor")
    with pytest.raises(RuntimeError):  # ('auto': forward over reverse refuses it too)
        torchdiv.biharmonic(f, x)
    way = str(info.value).rpartition("; use ")[2]
    assert "method='auto'" not in way, way
    assert way.startswith("laplacian(lambda z: laplacian(f, z, method='grad-of-grad')"), way
    lap = torchdiv.laplacian
    got = lap(lambda z: lap(f, z, method="grad-of-grad"), x, method="grad-of-grad")
    torch.testing.assert_close(got, torch.full((4,), 24.0 * 3, dtype=f64))


class _Counting(torch.nn.Module):
    """A flag, a count, an attribute added and one deleted by the forward (plain values of a
    module: put back), and a count kept in a dictionary (not copied: moves once)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.first, self.calls, self.doomed = True, 0, "here"
        self.counts = {"calls": 0}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.first, self.calls, self.added = False, self.calls + 1, 1.0
        self.counts["calls"] += 1
        if hasattr(self, "doomed"):
            del self.doomed
        return self.lin(z)


def test_check_batch_independence_puts_back_plain_values_not_containers(x: torch.Tensor) -> None:
    """As its docstring says: the module's plain values as found (an attribute the forward
    added removed, one it deleted back), a dictionary's count moved by one evaluation."""
    net = _Counting()
    torchdiv.check_batch_independence(net, x)
    assert (net.first, net.calls, net.doomed) == (True, 0, "here")
    assert not hasattr(net, "added")
    assert net.counts == {"calls": 1}


@pytest.mark.parametrize("fn", ["laplacian", "biharmonic", "value_grad_laplacian"])
def test_taylor_refusal_of_a_custom_op_without_a_derivative(x: torch.Tensor, fn: str) -> None:
    """The Taylor engine's refusal of such an op named 'auto' (or the nested loop), which
    raise PyTorch's "no autograd formula" in turn: it names no method."""
    with pytest.raises(NotImplementedError, match="torchdiv_reva33") as info:
        getattr(torchdiv, fn)(lambda z: _square(z).sum(-1), x, method="taylor")
    text = str(info.value)
    assert "; use " not in text, text
    assert "register_autograd" in text, text
