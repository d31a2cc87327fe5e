"""The structured engine's first derivatives of activations with arguments (``FIRST``: ELU,
SELU, CELU, GELU in both forms, Softplus, SiLU) by PyTorch's own backward kernels at a unit
cotangent, or SiLU's four ops, instead of the first-and-second-derivative rules: values and
parameter gradients of a loss of the divergence and the diagonal. References: float64
per-sample loops of ``autograd.grad`` (``create_graph``) and, for the parameter gradients, a
central difference of the loop's loss along a random direction of the parameters (which
reads no second derivative formula of PyTorch's)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_close,
    central_difference,
    loop_diagonal,
    shifted,
)
from torch import nn

import torchdiv
from torchdiv._structured import factors

ACTIVATIONS = {
    "elu": lambda: nn.ELU(alpha=0.7),
    "selu": nn.SELU,
    "celu": lambda: nn.CELU(alpha=1.3),
    "gelu": nn.GELU,
    "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.5),  # both sides of its threshold
    "silu": nn.SiLU,
}


class _CELU(nn.Module):
    """CELU written out: PyTorch's own derivative of ``celu`` takes ``1 / alpha`` in float32
    (``elu_backward``'s input scale 0.7692307974 for ``alpha = 1.3``: a float64 loop's
    derivatives ~4e-8 relative off), the reference's must not."""

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.where(z > 0, z, self.alpha * torch.expm1(z.clamp(max=0) / self.alpha))


def _net(name: str, exact: bool = False) -> nn.Module:
    """An MLP with the activation ``name``; ``exact``: the reference's (CELU written out)."""
    torch.manual_seed(0)
    act = (lambda: _CELU(1.3)) if exact and name == "celu" else ACTIVATIONS[name]
    layers = [nn.Linear(5, 9), act(), nn.Linear(9, 9), act(), nn.Linear(9, 5)]
    return nn.Sequential(*layers).double()


@pytest.fixture
def firsts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The ops whose derivative the structured engine took from ``FIRST``."""
    taken: list[object] = []
    original = factors._Walker._first

    def spy(self, node, out, source):
        taken.append(node.func)
        return original(self, node, out, source)

    monkeypatch.setattr(factors._Walker, "_first", spy)
    return taken


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("op", ["divergence", "jacobian_diagonal"])
def test_values_and_parameter_gradients(name: str, op: str, firsts: list[object]) -> None:
    net, exact = _net(name), _net(name, exact=True)  # (the same weights)
    x = 1.5 * torch.randn(6, 5, dtype=torch.float64)
    ours = getattr(torchdiv, op)(net, x, method="structured")
    assert firsts, "the structured engine took the first-derivative rules"

    def loss_of(result: torch.Tensor) -> torch.Tensor:
        weights = torch.linspace(-1, 2, result.numel(), dtype=result.dtype)
        return (result * weights.reshape(result.shape)).sum()

    def reference() -> torch.Tensor:
        diagonal = loop_diagonal(exact, x, create_graph=True)
        return diagonal.sum(-1) if op == "divergence" else diagonal

    want = reference()
    assert_close(ours, want.detach())  # float64: the dtype's tolerances (conftest)
    params = list(net.parameters())
    grads = torch.autograd.grad(loss_of(ours), params, allow_unused=True)
    loop_grads = torch.autograd.grad(loss_of(want), list(exact.parameters()), allow_unused=True)
    for g, w, p in zip(grads, loop_grads, params, strict=True):
        assert_close(
            torch.zeros_like(p) if g is None else g, torch.zeros_like(p) if w is None else w
        )
    torch.manual_seed(1)
    directions = [torch.randn_like(p) for p in params]

    def moved(t: float) -> torch.Tensor:
        with shifted(list(exact.parameters()), directions, t):
            return loss_of(reference().detach())

    # the Richardson-extrapolated central difference at a step of 1e-6 (the derivatives of
    # ELU and SELU jump at 0, Softplus's at its threshold: a step of the default 3e-4 moved a
    # SELU net's pre-activation across 0): truncation ~1e-18, round-off ~eps |loss| / h ~
    # 1e-9 relative in float64
    fd = central_difference(moved, h=1e-6).item()
    got = sum((g * v).sum().item() for g, v in zip(grads, directions, strict=True) if g is not None)
    assert abs(got - fd) <= 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_a_per_atom_field(name: str) -> None:
    """``v(r)_a = B phi(A r_a)`` for each atom ``a`` of a sample (constant matrices: a per-atom
    field's read-out): the structured engine colours the atoms and propagates columns forward
    (``_taylor.elementwise._given``), whose first-order branch called ``FIRST``'s derivative
    without the op's arguments (ELU's ``alpha``, CELU's and SELU's constants, GELU's
    approximation, Softplus's ``beta``: 96 % off)."""
    torch.manual_seed(0)
    lift = torch.randn(9, 5, dtype=torch.float64)
    back = torch.randn(5, 9, dtype=torch.float64)
    act, exact = (_net(name)[1], _net(name, exact=True)[1])
    x = 1.5 * torch.randn(3, 4, 5, dtype=torch.float64)  # 3 samples of 4 atoms
    ours = torchdiv.divergence(lambda r: act(r @ lift.T) @ back.T, x, method="structured")
    want = loop_diagonal(lambda r: exact(r @ lift.T) @ back.T, x).sum((-2, -1))
    assert_close(ours, want)  # float64: the dtype's tolerances (conftest)
